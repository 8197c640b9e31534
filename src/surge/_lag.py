"""How late the event loop runs: a handler that blocks it shows here.

Everything in an app shares one event loop, so a handler that computes or
calls blocking I/O without awaiting holds up every other subscription, the
transport's heartbeats and the HTTP ingress alike. Nothing can interrupt
it; what the app can do is notice and say so. :class:`LoopLag` wakes every
``interval`` seconds and measures how much later than asked it woke: that
is how long the loop was held. ``App.statistics()`` reports the last and
the largest lag (``loop_lag``, ``loop_lag_max``; the metrics export the
largest as ``surge_loop_lag_max_seconds``), and a lag of ``warn_after``
seconds or more is logged as a WARNING.

Only on a real clock: on a virtual clock time moves only when the loop is
idle, so a lag cannot be seen (and a timer that never ends would keep
virtual time running).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ._clock import Clock, RealClock
from ._runtime import Runtime

__all__ = ("LoopLag",)

log = logging.getLogger("surge")


class LoopLag:
    """A :class:`~surge._runtime.Part` that measures the event loop's lag."""

    interval = 0.25
    """Seconds between two looks."""
    warn_after = 1.0
    """A lag this long (seconds) or longer is logged as a WARNING."""

    def __init__(self, clock: Clock, app_name: str) -> None:
        self._clock = clock
        self._app_name = app_name
        self._task: asyncio.Task[None] | None = None
        self.last = 0.0
        """The lag measured last (seconds)."""
        self.max = 0.0
        """The largest lag since the app started (seconds)."""

    async def start(self, runtime: Runtime) -> None:
        if not isinstance(self._clock, RealClock) or self._task is not None:
            return
        self.last = self.max = 0.0
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="surge-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        clock = self._clock
        interval = self.interval
        while True:
            asked = clock.monotonic() + interval
            await clock.sleep(interval)
            lag = max(0.0, clock.monotonic() - asked)
            self.last = lag
            if lag > self.max:
                self.max = lag
            if lag >= self.warn_after:
                log.warning(
                    "app %s: the event loop was blocked for %.2fs (a handler or callback "
                    "that runs without awaiting; every subscription waited meanwhile)",
                    self._app_name,
                    lag,
                    extra={"loop_lag": lag},
                )
