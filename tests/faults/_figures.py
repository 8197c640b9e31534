"""The figures a fault test prints, one line each, for RELIABILITY.md."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ("Figure", "tally")


@dataclass(frozen=True)
class Figure:
    """What one fault run measured.

    ``acked``: events whose ``publish`` returned; ``failed``: publishes that
    raised (not acknowledged, so not counted as lost if missing); ``lost``:
    acknowledged and never handled; ``duplicates``: handlings beyond the
    first; ``recover``: seconds from the end of the fault until both a
    publish and a handling succeeded again.
    """

    test: str
    fault: str
    acked: int
    failed: int
    handled: int
    lost: int
    duplicates: int
    recover: float

    def __str__(self) -> str:
        return (
            f"FIGURE {self.test} | {self.fault} | acked={self.acked} failed={self.failed} "
            f"handled={self.handled} lost={self.lost} duplicates={self.duplicates} "
            f"recover={self.recover:.2f}s"
        )


def tally(acked: Iterable[int], handled: Counter[int]) -> tuple[int, int]:
    """(lost, duplicates) of ``handled`` against the ``acked`` numbers."""
    lost = sum(1 for n in set(acked) if handled[n] == 0)
    duplicates = sum(c - 1 for c in handled.values() if c > 1)
    return lost, duplicates
