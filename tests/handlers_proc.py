"""Module-level handlers for process-pool tests (they must be importable)."""

from __future__ import annotations

import os

import surge


class Squared(surge.Event):
    value: int
    pid: int


def square(ev: surge.Event) -> Squared:
    n: int = ev.n  # type: ignore[attr-defined]
    return Squared(value=n * n, pid=os.getpid())


def square_or_fail(ev: surge.Event) -> Squared:
    """Squares ``n``; fails for multiples of 7 (to test per-event failures)."""
    n: int = ev.n  # type: ignore[attr-defined]
    if n % 7 == 0:
        raise ValueError(f"{n} is a multiple of 7")
    return Squared(value=n * n, pid=os.getpid())


def square_all(events: list[surge.Event]) -> list[Squared]:
    """A batch handler run in a worker process."""
    return [square(ev) for ev in events]
