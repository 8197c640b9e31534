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
