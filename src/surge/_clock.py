"""Clocks: the one place library code learns the time or waits for it.

:class:`RealClock` reads the running loop and the wall clock.
:class:`VirtualClock` drives an event loop whose time jumps straight to the
next due timer whenever nothing is ready to run, so ``asyncio.sleep``,
timeouts, retries and triggers all run on virtual time and a test that waits
an hour of it finishes in milliseconds.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ("Clock", "RealClock", "VirtualClock")

T = TypeVar("T")


@runtime_checkable
class Clock(Protocol):
    """What surge needs to know about time."""

    def monotonic(self) -> float:
        """Seconds on the loop's clock: for durations and deadlines."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the Unix epoch: for event times and cron."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock."""
        ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        """Run ``callback`` on the loop after ``delay`` seconds."""
        ...


class RealClock:
    """The running loop's clock and the system's wall clock."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that, instead of blocking until the next timer, jumps the
    virtual clock there, unless real work (a thread) is outstanding."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout <= 0:
            return super().select(timeout)
        ready = super().select(0)
        if ready:
            return ready
        if self._clock._holds:
            # A thread is working for the loop: it takes no virtual time, so
            # wait for it in real time and leave the virtual clock alone.
            return super().select(min(timeout, 0.05))
        self._clock._advance(timeout)
        return []


class VirtualClock:
    """Virtual time for tests and simulations.

    Run code under it with :meth:`run` (or ``asyncio.Runner(loop_factory=
    clock.new_event_loop)``). Time starts at ``start`` (epoch seconds) and
    moves only when every task is waiting on a timer: then it jumps to the
    earliest one. Work handed to threads takes no virtual time: while a
    thread runs for the loop, the clock stands still.
    """

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00Z
        self._now = 0.0
        self._epoch = start
        self._holds = 0
        self._lock = threading.Lock()

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        clock = self

        class _VirtualLoop(asyncio.SelectorEventLoop):
            surge_clock = clock  # virtual_clock_of() finds it

            def time(self) -> float:
                return clock._now

            async def shutdown_default_executor(self, *args: Any) -> None:
                # Joining the default executor's threads is real work in a
                # thread: hold the clock, or the 300 s asyncio.Runner gives
                # it (timed on the loop's clock in 3.13.0; 3.12.1 times it in
                # real time) expire at once in virtual time and the close fail
                # with a RuntimeWarning. A thread that never ends now hangs
                # the close, as it did before 3.12 gave it a bound.
                clock.hold()
                try:
                    await super().shutdown_default_executor(*args)
                finally:
                    clock.release()

        return _VirtualLoop(_JumpingSelector(self))

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """Run ``main`` to completion on a new loop driven by this clock."""
        with asyncio.Runner(loop_factory=self.new_event_loop) as runner:
            return runner.run(main)

    def _advance(self, seconds: float) -> None:
        self._now += seconds

    def jump(self, seconds: float) -> None:
        """Move virtual time ``seconds`` on at once, as a loop that stalled
        that long (a blocking call, a paused process) finds it: nothing
        scheduled in between has run; it runs, late, when the loop goes on."""
        if seconds < 0:
            raise ValueError("virtual time only moves forward")
        self._advance(seconds)

    def hold(self) -> None:
        """Freeze virtual time while real work (a thread) runs for the loop."""
        with self._lock:
            self._holds += 1

    def release(self) -> None:
        with self._lock:
            self._holds -= 1

    # Clock protocol
    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._epoch + self._now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)


def virtual_clock_of(loop: asyncio.AbstractEventLoop) -> VirtualClock | None:
    """The VirtualClock whose loop ``loop`` is (None: a real loop), whatever
    clock object the code running on it was given: work handed to a thread
    must hold it, or virtual time races ahead of the thread."""
    clock = getattr(loop, "surge_clock", None)
    return clock if isinstance(clock, VirtualClock) else None
