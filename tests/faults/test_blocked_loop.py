"""A handler that holds the event loop for seconds (CPU work, or blocking
I/O called without awaiting).

Nothing can interrupt it; what must hold: the other subscriptions handle
everything once it lets go (none of their events lost), and the blocked
loop is reported: a WARNING naming the app and the time, and
``App.statistics().loop_lag_max`` (exported as
``surge_loop_lag_max_seconds``).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import surge
from surge._lag import LoopLag

pytestmark = pytest.mark.realtime


class Tick(surge.Event):
    __topic__ = "faults.lag.tick"

    n: int


class Hold(surge.Event):
    __topic__ = "faults.lag.hold"

    seconds: float


def hold_the_loop(seconds: float) -> None:
    """What a CPU-bound handler does: run without ever awaiting."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.timeout(60)
async def test_a_handler_that_blocks_the_loop_is_reported_and_the_others_catch_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler spins 2 s without awaiting while another subscription gets
    200 ticks/s: every tick is handled, ticks flow again within 1 s of the
    block's end, one WARNING says the loop was blocked about 2 s, and
    statistics report it."""
    caplog.set_level(logging.WARNING, logger="surge")
    app = surge.App("faults-lag")
    loop = asyncio.get_running_loop()
    handled: list[tuple[int, float]] = []
    released = 0.0
    everything = asyncio.Event()
    total = 600

    @app.on(Tick, concurrency=4)
    async def tick(event: Tick) -> None:
        handled.append((event.n, loop.time()))
        if len(handled) == total:
            everything.set()

    @app.on(Hold, executor="inline")
    def hold(event: Hold) -> None:
        nonlocal released
        hold_the_loop(event.seconds)
        released = loop.time()

    async with app:
        start = loop.time()
        for n in range(total):
            ahead = start + n / 200 - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
            await app.publish(Tick(n=n))
            if n == 100:
                await app.publish(Hold(seconds=2.0))
        await asyncio.wait_for(everything.wait(), 20)
        stats = app.statistics()
    assert sorted(n for n, _ in handled) == list(range(total))
    # the first tick handled after the block let go
    resumed = min(t for _, t in handled if t >= released) - released
    warnings = [r for r in caplog.records if "event loop was blocked" in r.getMessage()]
    print(
        f"\nFIGURE blocked-loop 2.0s: ticks={len(handled)} lost=0 "
        f"resumed={resumed:.3f}s loop_lag_max={stats.loop_lag_max:.2f}s "
        f"warnings={len(warnings)}"
    )
    # the block began somewhere in the monitor's interval: it sees at least
    # the block less one interval
    assert 2.0 - LoopLag.interval - 0.05 <= stats.loop_lag_max < 3.0
    assert len(warnings) == 1
    assert "faults-lag" in warnings[0].getMessage()
    assert resumed < 1.0
