"""A stop in named phases, each bounded and timed, and the report it leaves.

:meth:`App.stop <surge.App.stop>` runs these phases, in order, through one
:class:`Shutdown`:

``drain``        (``stop(drain=True)`` only) wait until nothing is left to handle
``triggers``     timers stop firing; a slot being fired is published and its
                 trigger state saved
``intake``       consumers stop fetching; deliveries fetched but not started
                 are handed back
``handlers``     handlers in flight finish; at their deadline they are
                 cancelled and their deliveries handed back
``acks``         what the handlers settled is acknowledged; the reply inbox stops
``close``        the transport hands its partitions over and closes its
                 connections; the executor pools shut down

The phases that wait for the app's own work (``drain``, ``triggers``,
``handlers``) end at three quarters of ``shutdown_timeout``; the bookkeeping
(``intake``, ``cancel``, ``acks``, ``close``) by ``shutdown_timeout``, so it
always keeps time of its own, and at least half a second: a stop with
``shutdown_timeout=0`` still hands back what it fetched and closes. Each wait runs as a task
awaited with that bound, never as a bare cancel-and-wait: a client library
may swallow a cancel (Python 3.11's ``asyncio.wait_for`` does when the
awaited reply comes with it), and a stop must end anyway. A wait cut at its
bound is cancelled and left behind; the phase is marked cut, a warning says
so, and the stop goes on. Each phase is logged at DEBUG with its duration;
the stop's one-line summary (``str(report)``) at INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec

from ._clock import Clock

__all__ = ("Shutdown", "StopPhase", "StopReport")

log = logging.getLogger("surge")

# Of shutdown_timeout, the share kept for the bookkeeping: the phases that
# wait for the app's own work end this much before the deadline.
_RESERVE = 0.25
# The least time the bookkeeping gets, whatever shutdown_timeout says.
_FLOOR = 0.5


class StopPhase(msgspec.Struct, frozen=True, kw_only=True):
    """One phase of a stop: its name, how long it took, whether it finished
    (False: cut at its bound, what it waited for abandoned)."""

    name: str
    seconds: float
    finished: bool = True


class StopReport(msgspec.Struct, frozen=True, kw_only=True):
    """How an app's last stop went: its phases in order and the total."""

    phases: tuple[StopPhase, ...]
    seconds: float
    timeout: float

    @property
    def finished(self) -> bool:
        """Every phase finished within its bound."""
        return all(p.finished for p in self.phases)

    def phase(self, name: str) -> StopPhase | None:
        """The phase called ``name``, if this stop ran it."""
        for p in self.phases:
            if p.name == name:
                return p
        return None

    def __str__(self) -> str:
        parts = ", ".join(
            f"{p.name} {p.seconds:.3f}s{'' if p.finished else ' (cut)'}" for p in self.phases
        )
        return f"stopped in {self.seconds:.3f}s of {self.timeout:g}s: {parts}"


class Shutdown:
    """Times and bounds the phases of one stop (see the module docstring).

    ``async with shutdown.phase(name):`` times a phase; inside it,
    ``await shutdown.wait(coro)`` runs ``coro`` until it ends or the phase's
    bound, and says whether it ended. :meth:`report` gives the result.
    """

    def __init__(self, clock: Clock, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self.started = clock.monotonic()
        self.deadline = self.started + max(timeout, _FLOOR)
        # the bound of the phases that wait for the app's own work
        self.early = self.started + (1 - _RESERVE) * timeout
        self._phases: list[StopPhase] = []
        self._until = self.deadline
        self._cut = False

    @contextlib.asynccontextmanager
    async def phase(self, name: str, *, early: bool = False) -> AsyncIterator[None]:
        """Time the phase ``name``; ``early``: bound it by :attr:`early`."""
        self._until = self.early if early else self.deadline
        self._cut = False
        began = self.clock.monotonic()
        try:
            yield
        finally:
            took = self.clock.monotonic() - began
            self._phases.append(StopPhase(name=name, seconds=took, finished=not self._cut))
            log.debug("stop: %s took %.3fs%s", name, took, " (cut)" if self._cut else "")

    @property
    def left(self) -> float:
        """Seconds until the current phase's bound (0 once passed)."""
        return max(0.0, self._until - self.clock.monotonic())

    async def wait(self, coro: Awaitable[Any], what: str = "") -> bool:
        """Run ``coro`` as a task until it ends or the phase's bound; True if
        it ended. Cut, it is cancelled and not waited for (a swallowed cancel
        must not hold the stop), and the phase is marked cut."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_retrieve)
        try:
            await asyncio.wait((task,), timeout=self.left)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.warning("stop: %s failed: %r", what or "a step", exc)
            return True
        task.cancel()
        self._cut = True
        log.warning(
            "stop: %s did not finish within the stop's bound (shutdown_timeout=%gs); left behind",
            what or "a step",
            self.timeout,
        )
        return False

    def report(self) -> StopReport:
        """The phases so far and the time since the stop began."""
        return StopReport(
            phases=tuple(self._phases),
            seconds=self.clock.monotonic() - self.started,
            timeout=self.timeout,
        )


def _retrieve(task: asyncio.Future[Any]) -> None:
    # a step left behind may fail later: that is not news (its phase was cut)
    if not task.cancelled():
        task.exception()
