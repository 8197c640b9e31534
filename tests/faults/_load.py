"""A load under a fault: what the fault tests measure (see RELIABILITY.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable

import surge
from surge.transports import Transport

from ._figures import Figure, tally

__all__ = ("Tick", "run_fault")


class Tick(surge.Event):
    """A numbered event of the outage tests."""

    __topic__ = "faults.tick"

    n: int


async def run_fault(
    transports: Callable[[], Transport],
    *,
    test: str,
    fault: str,
    start_fault: Callable[[], Awaitable[None]],
    heal: Callable[[], Awaitable[None]],
    outage: float,
    rate: float = 400.0,
    warm: float = 1.0,
    after: float = 2.0,
    producers: int = 16,
    limit: int = 20_000,
    recover_within: float = 30.0,
) -> Figure:
    """Publish ``rate`` events/s (at most ``limit``) from ``producers`` tasks
    of one app while another consumes (each on a transport of its own, from
    ``transports()``); ``warm`` seconds in, ``start_fault()``, wait
    ``outage`` seconds, ``heal()``, go on ``after`` seconds; then wait until
    every acknowledged event was handled (at most ``recover_within`` s) and
    tally."""
    loop = asyncio.get_running_loop()
    handled: Counter[int] = Counter()
    acked: list[int] = []
    failed = 0
    healed_at: float | None = None
    backlog: set[int] = set()  # acked before the heal and not handled yet
    backlog_done = loop.create_future()
    published_again = loop.create_future()
    everything: set[int] = set()  # acked and not handled, once producing ended
    everything_done = loop.create_future()
    producing = True

    consumer = surge.App("faults-consumer", transport=transports())

    @consumer.on(Tick, concurrency=8, prefetch=32)
    async def handle(event: Tick) -> None:
        handled[event.n] += 1
        backlog.discard(event.n)
        if healed_at is not None and not backlog and not backlog_done.done():
            backlog_done.set_result(loop.time())
        everything.discard(event.n)
        if not producing and not everything and not everything_done.done():
            everything_done.set_result(None)

    producer = surge.App("faults-producer", transport=transports())
    numbers = iter(range(limit))
    start = loop.time()
    stop_at = start + warm + outage + after

    async def produce() -> None:
        nonlocal failed
        for i in numbers:
            now = loop.time()
            if now >= stop_at:
                return
            ahead = start + i / rate - now
            if ahead > 0:
                await asyncio.sleep(ahead)
            try:
                await producer.publish(Tick(n=i))
            except surge.TransportError:
                failed += 1
                continue
            acked.append(i)
            if healed_at is not None and not published_again.done():
                published_again.set_result(loop.time())

    async with consumer, producer:
        tasks = [asyncio.create_task(produce()) for _ in range(producers)]
        await asyncio.sleep(warm)  # the fault lands at a moment of the test's choosing
        assert handled, "nothing was handled before the fault"
        await start_fault()
        await asyncio.sleep(outage)
        backlog.update(n for n in acked if handled[n] == 0)
        await heal()
        healed_at = loop.time()
        if not backlog:
            backlog_done.set_result(healed_at)
        await asyncio.gather(*tasks)
        producing = False
        everything.update(n for n in acked if handled[n] == 0)
        if not everything:
            everything_done.set_result(None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(backlog_done, published_again, everything_done), recover_within
            )
        recover = (
            max(backlog_done.result(), published_again.result()) - healed_at
            if backlog_done.done() and published_again.done()
            else float("inf")
        )
    lost, duplicates = tally(acked, handled)
    return Figure(
        test=test,
        fault=fault,
        acked=len(acked),
        failed=failed,
        handled=len(handled),
        lost=lost,
        duplicates=duplicates,
        recover=recover,
    )
