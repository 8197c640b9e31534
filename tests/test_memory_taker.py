"""memory://'s taker (TakesNow): a worker settles and takes its next batch
itself, without awaiting, instead of ending and leaving it to the consume loop."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

import surge
from surge._event import Envelope, new_id
from surge._transport import Taker, capabilities_of
from surge.testing import Faults, FaultyTransport
from surge.transports import MemoryTransport

from .conformance._helpers import Reader


class Tick(surge.Event):
    __topic__ = "take.tick"
    n: int


def _env(n: int) -> Envelope:
    return Envelope(new_id(), Tick.__topic__, None, 0.0, None, Tick(n=n))


def _ns(ds: list[surge.Delivery]) -> list[int]:
    return [d.envelope.event.n for d in ds]


async def test_memory_offers_a_taker_and_a_subclass_that_consumes_its_own_way_none(
    clock: surge.Clock,
) -> None:
    """memory:// offers TakesNow; FaultyTransport, whose consume duplicates and
    delays deliveries, has no taker, so that every delivery passes its consume."""
    t = MemoryTransport(clock=clock)
    assert capabilities_of(t).takes_now is not None
    await t.start()
    await t.declare("g", [Tick.__topic__])
    assert t.taker("g") is not None
    faulty = FaultyTransport(faults=Faults(), rng=random.Random(1), clock=clock)
    await faulty.start()
    await faulty.declare("g", [Tick.__topic__])
    assert faulty.taker("g") is None


async def _taking(clock: surge.Clock) -> tuple[MemoryTransport, Taker]:
    """A started memory:// with group "g" on Ticks, and its taker."""
    t = MemoryTransport(clock=clock)
    await t.start()
    await t.declare("g", [Tick.__topic__])
    taker = t.taker("g")
    assert taker is not None
    return t, taker


async def test_settle_take_acks_and_takes_what_consume_would(clock: surge.Clock) -> None:
    """settle_take acknowledges what it is given and returns, at once, what
    consume would yield next: up to prefetch less what is unsettled, in
    order, and nothing when nothing is queued; settle is ack."""
    t, (settle_take, settle) = await _taking(clock)
    assert settle_take(3, []) == []
    await t.publish([_env(n) for n in range(5)])
    first = settle_take(3, [])
    assert _ns(first) == [0, 1, 2]
    assert settle_take(3, []) == []  # prefetch reached: none until something settles
    assert await t.stats("g") == surge.TransportStats(2, 3, 0, 0)
    second = settle_take(3, first[:2])
    assert _ns(second) == [3, 4]
    assert await t.stats("g") == surge.TransportStats(0, 3, 0, 0)
    assert not t.idle
    settle([first[2], *second])
    assert await t.stats("g") == surge.TransportStats(0, 0, 0, 0)
    assert t.idle


async def test_a_consumer_waiting_for_room_wakes_when_a_take_leaves_the_queue_empty(
    clock: surge.Clock,
) -> None:
    """A consume waiting for room (its prefetch unsettled) is woken by a
    settle_take that leaves nothing queued, so it waits for publishes
    again: left asleep, it would never see the next one."""
    t, (settle_take, _) = await _taking(clock)
    await t.publish([_env(0), _env(1), _env(2)])
    reader = Reader(t, "g", prefetch=2)
    try:
        held = await reader.take(2)
        assert _ns(held) == [0, 1]
        # the reader's consume waits for room (its prefetch is held) ...
        assert await reader.quiet(1)
        # ... and the take settles its two and takes the last, leaving the
        # queue empty
        assert _ns(settle_take(2, held)) == [2]
        await t.publish([_env(3)])
        assert _ns(await reader.take(1, timeout=5)) == [3]
    finally:
        await reader.aclose()
        await t.close()


async def _turns(app: surge.App, events: int) -> list[int]:
    """Publish ``events`` Ticks and drain; the number handled at each turn of
    the loop meanwhile (a callback that runs at every turn looks)."""
    stats = app.statistics
    seen: list[int] = []
    loop = asyncio.get_running_loop()

    def look() -> None:
        handled = sum(s.succeeded for s in stats().subscriptions.values())
        seen.append(handled)
        if handled < events:
            loop.call_soon(look)

    for n in range(events):
        await app.publish(Tick(n=n))
    loop.call_soon(look)
    async with asyncio.timeout(60):
        await app.drain()
    assert seen[-1] == events
    return [b - a for a, b in itertools.pairwise(seen)]


async def test_under_a_virtual_clock_a_worker_lets_the_loop_run_after_each_batch(
    clock: surge.Clock,
) -> None:
    """Under a virtual clock a worker lets the loop run after every batch it
    handled, whatever the real time it took: a seeded run interleaves the
    same way each time. A callback at every turn of the loop sees at most
    one batch (40) handled between two turns."""
    app = surge.App("t", clock=clock)

    @app.on(Tick, executor="inline", prefetch=40)
    def handle(ev: Tick) -> None:
        return None

    async with app:
        steps = await _turns(app, 1000)
    assert max(steps) <= 40


@pytest.mark.realtime
async def test_a_worker_that_held_the_loop_a_millisecond_lets_it_run() -> None:
    """In real time, a worker whose handlers never await lets the loop run
    before its next batch once it has held it for 1 ms: with handlers that
    work 0.1 ms each (spent here), at most one batch of 40 is handled
    between two turns of the loop."""
    app = surge.App("t")

    @app.on(Tick, executor="inline", prefetch=40)
    def handle(ev: Tick) -> None:
        until = time.perf_counter() + 0.0001
        while time.perf_counter() < until:
            pass

    async with app:
        steps = await _turns(app, 400)
    assert max(steps) <= 40


async def test_a_stop_hands_back_what_a_worker_took_and_did_not_start(
    clock: surge.VirtualClock,
) -> None:
    """Stopped while its worker holds a batch it took itself, a runner hands
    back what no handler started: each event is handled once across the
    stop and a restart, and none costs an attempt."""
    transport = MemoryTransport(clock=clock)
    handled: list[int] = []
    attempts: list[int] = []
    stopped = asyncio.Event()

    def make() -> surge.App:
        app = surge.App("t", transport=transport, clock=clock)

        @app.on(Tick, prefetch=10, concurrency=1)
        async def handle(ev: Tick, ctx: surge.Context) -> None:
            handled.append(ev.n)
            attempts.append(ctx.attempt)
            if ev.n == 25:
                stopped.set()  # the worker is three batches in
                await clock.sleep(1)

        return app

    first = make()
    await first.start()
    for n in range(100):
        await first.publish(Tick(n=n))
    async with asyncio.timeout(60):
        await stopped.wait()
        await first.stop()
    assert handled == list(range(26))
    second = make()
    async with second, asyncio.timeout(60):
        await second.drain()
    assert handled == list(range(100))
    assert set(attempts) == {1}


async def test_a_keyed_delivery_does_not_wait_behind_a_stream(clock: surge.Clock) -> None:
    """An envelope-keyed delivery that found every worker slot taken gets the
    next one to end: a shared worker hands its slot over instead of taking
    another batch, so the keyed event is not left until the stream ends."""
    app = surge.App("t", clock=clock)
    order: list[int] = []

    @app.on(Tick, concurrency=1)  # prefetch 256
    async def handle(ev: Tick) -> None:
        order.append(ev.n)

    async with app, asyncio.timeout(60):
        await app.publish(Tick(n=-1), key="k")
        for n in range(3000):
            await app.publish(Tick(n=n))
        await app.drain()
    assert sorted(order) == [-1, *range(3000)]
    assert order.index(-1) <= 256, order.index(-1)


async def test_a_keys_order_holds_across_a_stop(clock: surge.VirtualClock) -> None:
    """Stopped while one of a key's events waits in its lane and a later one
    of that key is still in the shared queue, a runner hands the lane's back
    first: the next app handles the key in order."""
    transport = MemoryTransport(clock=clock)
    handled: list[int] = []
    busy = asyncio.Event()

    def make() -> surge.App:
        app = surge.App("t", transport=transport, clock=clock)

        @app.on(Tick, prefetch=10, concurrency=1)
        async def handle(ev: Tick) -> None:
            handled.append(ev.n)
            if ev.n == 0 and not busy.is_set():
                busy.set()
                await clock.sleep(1)

        return app

    first = make()
    async with asyncio.timeout(60):
        await first.start()
        await first.publish(Tick(n=1), key="k")  # to its lane: no slot is free
        await first.publish(Tick(n=0))  # slow, holding the one slot
        await first.publish(Tick(n=2), key="k")  # still queued when the stop comes
        await busy.wait()
        await first.stop()
        assert handled == [0]
        async with make() as second:
            await second.drain()
    assert handled == [0, 1, 2]
