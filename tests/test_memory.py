"""memory:// beyond the conformance suite: its capabilities."""

from __future__ import annotations

import asyncio

import pytest

import surge
from surge._transport import capabilities_of
from surge.transports import MemoryTransport

from .conformance._helpers import Item, Reader, env, number


async def test_memory_declares_its_capabilities(clock: surge.Clock) -> None:
    """Memory hands back, tells idleness, keeps state and takes the direct put;
    it has no partitions (one process reads every key in order already)."""
    caps = capabilities_of(MemoryTransport(clock=clock))
    assert caps.hands_back is not None
    assert caps.idle is not None
    assert caps.state is not None
    assert caps.direct_put is not None
    assert caps.key_routing is None


async def test_released_deliveries_come_first_without_an_attempt(clock: surge.Clock) -> None:
    """release puts deliveries back before the rest of the queue, in their
    order, and the next delivery of each is still attempt 1."""
    t = MemoryTransport(clock=clock)
    await t.start()
    await t.declare("g", ["conf.item"])
    await t.publish([env(i) for i in range(3)])
    r = Reader(t, "g", prefetch=10)
    first = await r.take(3)
    await t.publish([env(i) for i in range(3, 5)])
    await t.release(first[1:])
    assert (await t.stats("g")).pending == 1  # only the one not released
    again = await r.take(4)
    assert [number(d) for d in again] == [1, 2, 3, 4]
    assert [d.attempt for d in again] == [1, 1, 1, 1]
    await t.ack([first[0], *again])
    assert t.idle
    await r.aclose()
    await t.close()


async def test_state_lives_as_long_as_the_transport(clock: surge.Clock) -> None:
    """save_state then load_state returns the value; another transport has its own."""
    t = MemoryTransport(clock=clock)
    assert await t.load_state("k") is None
    await t.save_state("k", b"one")
    await t.save_state("k", b"two")
    assert await t.load_state("k") == b"two"
    assert await MemoryTransport(clock=clock).load_state("k") is None


async def test_fault_hooks_duplicate_and_hold_back(clock: surge.Clock) -> None:
    """redeliver queues a second delivery at the same attempt; hold_back
    brings a delivery again after its delay, its attempt not counted."""
    t = MemoryTransport(clock=clock)
    await t.start()
    await t.declare("g", ["conf.item"])
    await t.publish([env(1), env(2)])
    r = Reader(t, "g", prefetch=10)
    one, two = await r.take(2)
    t.redeliver(one)
    t.hold_back(two, 5.0)
    (dup,) = await r.take(1)
    assert (number(dup), dup.attempt) == (1, 1)
    start = clock.time()
    (late,) = await r.take(1)
    assert (number(late), late.attempt) == (2, 1)
    assert clock.time() - start == 5.0
    await t.ack([one, dup, late])
    assert t.idle
    await r.aclose()
    await t.close()


class _Fencing(MemoryTransport):
    """memory:// with a fence that refuses every other keyed delivery asked
    about (and settles it itself, as a fencing transport forgets it)."""

    def __init__(self, clock: surge.Clock) -> None:
        super().__init__(clock=clock)
        self.asked = 0

    def fenced(self, delivery: surge.Delivery) -> bool:
        self.asked += 1
        return self.asked % 2 == 0


class _Step(surge.Event):
    __topic__ = "fence.step"

    key: str
    seq: int


async def test_the_runner_skips_fenced_keyed_deliveries(clock: surge.VirtualClock) -> None:
    """A transport with ``fenced`` is asked before each keyed delivery
    starts, and a fenced one is never handled (nor settled by the app)."""
    transport = _Fencing(clock)
    assert capabilities_of(transport).fences is transport
    app = surge.App("fence", transport=transport)
    seen: list[int] = []

    @app.on(_Step, key="key", concurrency=1)
    async def step(event: _Step) -> None:
        seen.append(event.seq)

    async with app:
        for seq in range(10):
            await app.publish(_Step(key="k", seq=seq))
        await clock.sleep(1)
        assert transport.asked == 10
        assert seen == [0, 2, 4, 6, 8]
        stats = await transport.stats("fence.step")
        assert stats.pending == 5  # the fenced ones: forgotten by the app, left to the transport


class _FailsOnce(MemoryTransport):
    """memory:// whose first consume of a group dies after one batch."""

    def __init__(self, clock: surge.Clock) -> None:
        super().__init__(clock=clock)
        self.consumes: dict[str, int] = {}

    async def consume(self, group: str, *, prefetch: int):  # type: ignore[no-untyped-def]
        self.consumes[group] = self.consumes.get(group, 0) + 1
        first = self.consumes[group] == 1
        async for batch in super().consume(group, prefetch=prefetch):
            yield batch
            if first:
                raise RuntimeError("the consumer's connection went away")


async def test_a_failed_consume_is_logged_and_started_again(
    clock: surge.VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A transport's consume that raises does not leave the subscription
    without a consumer: one error line, and consuming starts again after a
    backoff; every event is handled."""
    transport = _FailsOnce(clock)
    app = surge.App("refail", transport=transport)
    seen: list[int] = []

    @app.on(_Step)
    async def step(event: _Step) -> None:
        seen.append(event.seq)

    async with app:
        await app.publish(_Step(key="k", seq=0))
        await clock.sleep(0.05)
        for seq in range(1, 4):
            await app.publish(_Step(key="k", seq=seq))
        await clock.sleep(1)
        assert sorted(seen) == [0, 1, 2, 3]
    assert transport.consumes["refail.step"] == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        "refail.step: consuming failed (RuntimeError: the consumer's connection went away); "
        "consuming again in 0.1 s"
    ]


class _CountingCodec(surge.MsgpackCodec):
    """msgpack, counting the events it encodes."""

    def __init__(self, *, max_message_size: int = 1 << 20) -> None:
        super().__init__(max_message_size=max_message_size)
        self.encoded = 0
        encode = self._encode

        def counting(obj: object) -> bytes:
            self.encoded += 1
            return encode(obj)

        self._encode = self.encode_event = counting  # type: ignore[method-assign,assignment]


class _Text(surge.Event):
    __topic__ = "mem.text"
    text: str


class _Wide(surge.Event):
    """Fixed-size fields whose bound (116 bytes) is over a 40-byte limit (45 at most encoded)."""

    __topic__ = "mem.wide"
    a: int
    b: int
    c: int
    d: int


@pytest.mark.parametrize("nowait", [False, True])
async def test_only_events_that_may_not_fit_are_measured(clock: surge.Clock, nowait: bool) -> None:
    """An event type whose every instance fits the codec's limit (Codec.size_bound) is
    never encoded to be measured; a str field is measured each publish, and one whose
    bound is over the limit too, so an oversized event of either is still refused."""
    codec = _CountingCodec(max_message_size=40)
    app = surge.App("m", clock=clock, transport=MemoryTransport(clock=clock, codec=codec))
    got: list[object] = []

    @app.on(Item, _Text, _Wide)
    async def take(ev: surge.Event) -> None:
        got.append(ev)

    async def publish(ev: surge.Event) -> None:
        if nowait:
            app.publish_nowait(ev)
        else:
            await app.publish(ev)

    async with app:
        for first in (Item(n=0), _Text(text="a"), _Wide(a=0, b=0, c=0, d=0)):
            await publish(first)  # each type's bound is worked out once
        codec.encoded = 0
        for i in range(1, 21):
            await publish(Item(n=2**63 + i))
        assert codec.encoded == 0
        for ev in (_Text(text="short"), _Wide(a=1, b=2, c=3, d=4)):
            await publish(ev)
        assert codec.encoded == 2
        for big in (_Text(text="x" * 40), _Wide(a=2**63, b=2**63, c=2**63, d=2**63)):
            with pytest.raises(surge.MessageTooLarge, match="the limit is 40"):
                await publish(big)
        await app.drain()
    assert len(got) == 25


class _Order(surge.Event):
    __topic__ = "loop.order"
    n: int


class _Done(surge.Event):
    __topic__ = "loop.done"
    n: int


async def test_a_subscription_fed_by_its_own_outputs_does_not_deadlock(
    clock: surge.VirtualClock,
) -> None:
    """A subscription on ``loop.>`` that emits ``loop.done`` for each order gets
    its own outputs: under a burst past its group's capacity its handlers'
    outputs go in past the bound (only its own consumer could make room, and
    its workers are the ones publishing), while outside publishers still
    wait for room."""
    transport = MemoryTransport(capacity=8, clock=clock)
    app = surge.App("t", transport=transport, clock=clock)
    orders: list[int] = []
    dones: list[int] = []
    peak = 0

    @app.on("loop.>", concurrency=2, prefetch=4)
    async def handle(ev: surge.Event) -> list[_Done] | None:
        nonlocal peak
        peak = max(peak, (await transport.stats("t.handle")).backlog)
        if isinstance(ev, _Order):
            orders.append(ev.n)
            return [_Done(n=ev.n), _Done(n=-ev.n)]
        assert isinstance(ev, _Done)
        dones.append(ev.n)
        return None

    async with app, asyncio.timeout(60):
        for n in range(1, 201):
            await app.publish(_Order(n=n))
        await app.drain()
    assert sorted(orders) == list(range(1, 201))
    assert sorted(dones) == sorted([*range(1, 201), *range(-200, 0)])
    # past the bound, by at most two outputs for each order queued or fetched
    assert 8 < peak <= 2 * (8 + 4)


async def test_a_stage_fed_by_another_holds_its_bound(clock: surge.VirtualClock) -> None:
    """Outputs into another subscription's group wait for room there, as any
    publish does: backpressure reaches the stage before a slow one."""
    transport = MemoryTransport(capacity=8, clock=clock)
    app = surge.App("t", transport=transport, clock=clock)
    peak = 0
    done = 0

    @app.on(_Order, concurrency=4)
    async def first(ev: _Order) -> _Done:
        return _Done(n=ev.n)

    @app.on(_Done, concurrency=1)
    async def slow(ev: _Done) -> None:
        nonlocal peak, done
        peak = max(peak, (await transport.stats("t.slow")).backlog)
        await clock.sleep(0.01)
        done += 1

    async with app, asyncio.timeout(60):
        for n in range(200):
            await app.publish(_Order(n=n))
        await app.drain()
    assert done == 200
    assert peak == 8


class _Audit(surge.Event):
    __topic__ = "loop.audit"
    n: int


async def test_a_task_started_while_outputs_are_published_waits_for_room(
    clock: surge.VirtualClock,
) -> None:
    """A task started while a handler's outputs are published (here by
    middleware) inherits the context but not the outputs' pass: its
    publishes into that group wait for room like any outside publisher's."""
    transport = MemoryTransport(capacity=8, clock=clock)
    app = surge.App("t", transport=transport, clock=clock)
    pumped = asyncio.Event()
    peak = 0

    async def pump() -> None:
        for n in range(100):
            await app.publish(_Audit(n=n))
        pumped.set()

    class StartsAPump(surge.Middleware):
        task: asyncio.Task[None] | None = None

        def after_publish(self, env: surge.Envelope) -> None:
            if self.task is None and env.topic == _Done.__topic__:
                self.task = asyncio.get_running_loop().create_task(pump())

    app.add_middleware(StartsAPump())

    @app.on("loop.>", concurrency=1)
    async def handle(ev: surge.Event) -> _Done | None:
        nonlocal peak
        peak = max(peak, (await transport.stats("t.handle")).backlog)
        await clock.sleep(0.001)
        return _Done(n=ev.n) if isinstance(ev, _Order) else None

    async with app, asyncio.timeout(60):
        await app.publish(_Order(n=1))
        await pumped.wait()
        await app.drain()
    assert peak <= 8
