"""Tools for testing surge applications: fast, in-process, reproducible.

- :class:`VirtualClock` runs a loop on virtual time: sleeps, timeouts,
  retries and triggers take no real time.
- :class:`Harness` runs an app on the memory transport, records what it
  published and handled, and injects the faults of a seeded :class:`Faults`
  plan (fail the n-th delivery, duplicate or delay deliveries).
"""

from collections.abc import Coroutine
from typing import Any, TypeVar

from .._clock import VirtualClock
from ._harness import Faults, FaultyTransport, Harness, InjectedFault

__all__ = ("Faults", "FaultyTransport", "Harness", "InjectedFault", "VirtualClock", "run")

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, clock: VirtualClock | None = None) -> T:
    """Run the coroutine ``main`` on ``clock`` (a fresh VirtualClock if None)."""
    return (clock or VirtualClock()).run(main)
