"""The core runtime: handlers, ordering, concurrency, backpressure, lifecycle."""

from __future__ import annotations

import asyncio
import datetime
import enum
import os
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest

import surge
from surge.transports import MemoryTransport

from . import handlers_proc


class Ping(surge.Event):
    n: int


class Keyed(surge.Event):
    key: str
    seq: int


class Order(surge.Event):
    __topic__ = "orders.placed"
    order_id: str
    amount: float


class Refund(surge.Event):
    __topic__ = "orders.refunded"
    order_id: str


def test_topic_defaults_to_class_name_and_can_be_set() -> None:
    """An event's topic is its class name unless __topic__ says otherwise."""
    assert Ping.__topic__ == "Ping"
    assert Order.__topic__ == "orders.placed"
    with pytest.raises(AttributeError):
        Ping(n=1).n = 2  # type: ignore[misc]


async def test_per_key_order_under_concurrency(clock: surge.VirtualClock) -> None:
    """Events with one key are handled in publish order while keys interleave."""
    app = surge.App("t", clock=clock)
    seen: dict[str, list[int]] = {}
    active: set[str] = set()
    overlap = 0

    @app.on(Keyed, key="key", concurrency=50)
    async def handle(ev: Keyed) -> None:
        nonlocal overlap
        if ev.key in active:
            overlap += 1
        active.add(ev.key)
        await clock.sleep(0.001 * (ev.seq % 3))
        active.discard(ev.key)
        seen.setdefault(ev.key, []).append(ev.seq)

    async with app:
        for i in range(10_000):
            await app.publish(Keyed(key=f"k{i % 100}", seq=i))
        await app.drain()
    assert overlap == 0
    assert len(seen) == 100
    for key, seqs in seen.items():
        assert seqs == sorted(seqs), key
        assert len(seqs) == 100


async def test_envelope_key_orders_when_subscription_has_none(clock: surge.VirtualClock) -> None:
    """publish(key=...) alone is enough to keep one key's events in order."""
    app = surge.App("t", clock=clock)
    seen: list[int] = []

    @app.on(Keyed, concurrency=8)
    async def handle(ev: Keyed) -> None:
        await clock.sleep(0.001 * ((7 * ev.seq) % 5))
        seen.append(ev.seq)

    async with app:
        for i in range(200):
            await app.publish(Keyed(key=f"k{i % 3}", seq=i), key=f"k{i % 3}")
        for i in range(200, 400):  # no key: these may overtake each other
            await app.publish(Keyed(key="", seq=i))
        await app.drain()
    for k in range(3):
        mine = [s for s in seen if s < 200 and s % 3 == k]
        assert mine == sorted(mine)
        assert len(mine) == len(range(k, 200, 3))
    unkeyed = [s for s in seen if s >= 200]
    assert sorted(unkeyed) == list(range(200, 400))
    assert unkeyed != sorted(unkeyed)


async def test_in_flight_limit_is_never_exceeded(clock: surge.VirtualClock) -> None:
    """No more than `concurrency` handlers of a subscription run at once."""
    app = surge.App("t", clock=clock)
    running = peak = 0

    @app.on(Ping, concurrency=7)
    async def handle(ev: Ping) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await clock.sleep(0.01)
        running -= 1

    async with app:
        for i in range(1_000):
            await app.publish(Ping(n=i))
        await app.drain()
        assert app.statistics().subscriptions["t.handle"].succeeded == 1_000
    assert peak == 7


async def test_many_handlers_in_flight_at_once(clock: surge.VirtualClock) -> None:
    """A burst reaches the full in-flight limit (workers are added, doubling)."""
    app = surge.App("t", clock=clock, concurrency=5_000)
    gate = asyncio.Event()
    started = 0
    all_started = asyncio.Event()

    @app.on(Ping, prefetch=10_000)
    async def handle(ev: Ping) -> None:
        nonlocal started
        started += 1
        if started == 5_000:
            all_started.set()
        await gate.wait()

    async with app:
        for i in range(5_000):
            await app.publish(Ping(n=i))
        await all_started.wait()
        assert app.statistics().subscriptions["t.handle"].in_flight == 5_000
        gate.set()
        await app.drain()


async def test_handlers_that_never_wait_take_one_worker_for_a_burst(
    clock: surge.VirtualClock,
) -> None:
    """A burst for a handler that never awaits is handled by one worker task: it
    takes each next batch itself (memory:// is ``TakesNow``), and no helper
    worker is started to find the queue already drained."""
    app = surge.App("t", clock=clock)
    seen: list[int] = []

    @app.on(Ping, concurrency=100, prefetch=256)
    async def handle(ev: Ping) -> None:
        seen.append(ev.n)

    started: list[str] = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        started.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with app:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(counting)
        try:
            for i in range(1_000):
                app.publish_nowait(Ping(n=i))
            await app.drain()
        finally:
            loop.set_task_factory(None)
    assert seen == list(range(1_000))
    assert [n for n in started if n.endswith("_work_shared")] == ["Runner._work_shared"]


async def test_in_flight_counts_the_handlers_running_then(clock: surge.VirtualClock) -> None:
    """statistics().in_flight counts handlers running at that moment: itself for a handler
    that never awaits, each suspended one, none once all is handled (a failure retried
    on the way), with every success counted."""
    app = surge.App("t", clock=clock)
    seen: list[int] = []
    gate = asyncio.Event()
    waiting = 0
    three = asyncio.Event()

    def stats() -> surge.SubscriptionStats:
        return app.statistics().subscriptions["t.sync"]

    @app.on(Ping, executor="inline", retry=surge.Retry(attempts=2, backoff=0.001, jitter=0.0))
    def sync(ev: Ping) -> None:
        seen.append(stats().in_flight)
        if ev.n == 0 and stats().failed == 0:
            raise RuntimeError("once")

    @app.on(Ping, name="held")
    async def held(ev: Ping) -> None:
        nonlocal waiting
        waiting += 1
        if waiting == 3:
            three.set()
        await gate.wait()

    async with app:
        for i in range(3):
            await app.publish(Ping(n=i))
        await three.wait()
        assert app.statistics().subscriptions["t.held"].in_flight == 3
        gate.set()
        await app.drain()
        both = app.statistics().subscriptions
    assert seen == [1, 1, 1, 1]
    assert (both["t.sync"].in_flight, both["t.sync"].succeeded, both["t.sync"].failed) == (0, 3, 1)
    assert (both["t.held"].in_flight, both["t.held"].succeeded) == (0, 3)


async def test_backpressure_bounds_the_buffer(clock: surge.VirtualClock) -> None:
    """A publisher of 1,000,000 events into a stalled handler waits at the bound."""
    transport = MemoryTransport(capacity=1_000, clock=clock)
    app = surge.App("t", clock=clock, transport=transport)
    gate = asyncio.Event()

    @app.on(Ping, concurrency=10, prefetch=50)
    async def slow(ev: Ping) -> None:
        await gate.wait()

    published = 0

    async def producer() -> None:
        nonlocal published
        for i in range(1_000_000):
            await app.publish(Ping(n=i))
            published += 1

    async with app:
        task = asyncio.create_task(producer())
        for _ in range(200):  # let the loop settle; the producer must block
            await asyncio.sleep(0)
        stats = await transport.stats("t.slow")
        assert stats.backlog == 1_000
        assert stats.pending == 50
        assert published == 1_050
        assert not task.done()
        task.cancel()
        gate.set()


async def test_slow_handler_keeps_buffer_at_bound_while_draining(
    clock: surge.VirtualClock,
) -> None:
    """Over a long run through a slow handler the queue never passes capacity."""
    transport = MemoryTransport(capacity=100, clock=clock)
    app = surge.App("t", clock=clock, transport=transport)
    handled = 0
    peak = 0

    @app.on(Ping, concurrency=4, prefetch=8)
    async def slow(ev: Ping) -> None:
        nonlocal handled
        await clock.sleep(0.001)
        handled += 1

    async with app:
        for i in range(20_000):
            await app.publish(Ping(n=i))
            peak = max(peak, (await transport.stats("t.slow")).backlog)
        await app.drain()
    assert handled == 20_000
    assert peak == 100


async def test_publish_nowait_raises_overloaded_when_full(clock: surge.VirtualClock) -> None:
    """publish_nowait refuses with Overloaded instead of growing the buffer."""
    transport = MemoryTransport(capacity=10, clock=clock)
    app = surge.App("t", clock=clock, transport=transport)
    gate = asyncio.Event()

    @app.on(Ping, concurrency=1, prefetch=1)
    async def stuck(ev: Ping) -> None:
        await gate.wait()

    async with app:
        accepted = 0
        refused: surge.Overloaded | None = None
        for i in range(100):
            try:
                app.publish_nowait(Ping(n=i))
            except surge.Overloaded as exc:
                refused = exc
                break
            accepted += 1
            await asyncio.sleep(0)
        assert isinstance(refused, surge.Overloaded)
        assert accepted == 11  # one taken by the handler, ten queued
        gate.set()
        await app.drain()
        assert app.statistics().subscriptions["t.stuck"].succeeded == 11


async def test_sync_async_inline_and_process_handlers(clock: surge.VirtualClock) -> None:
    """Each executor runs its handler, and sync ones run off the loop thread."""
    app = surge.App("t", clock=clock, processes=1)
    loop_thread = threading.get_ident()
    where: dict[str, object] = {}

    @app.on(Ping)
    async def in_loop(ev: Ping) -> None:
        where["async"] = threading.get_ident()

    @app.on(Ping)
    def in_thread(ev: Ping) -> None:
        where["thread"] = threading.get_ident()

    @app.on(Ping, executor="inline")
    def inline(ev: Ping) -> None:
        where["inline"] = threading.get_ident()

    app.on(Ping, executor="process")(handlers_proc.square)

    @app.on(handlers_proc.Squared)
    async def got_square(ev: handlers_proc.Squared) -> None:
        where["process"] = ev.pid
        where["value"] = ev.value

    async with app:
        await app.publish(Ping(n=12))
        await app.drain()
    assert where["async"] == loop_thread
    assert where["inline"] == loop_thread
    assert where["thread"] != loop_thread
    assert where["process"] != os.getpid()
    assert where["value"] == 144


async def test_fan_out_reaches_every_subscription(clock: surge.VirtualClock) -> None:
    """Every subscription of a topic, exact or pattern, gets every event."""
    app = surge.App("t", clock=clock)
    got: dict[str, list[str]] = {"a": [], "b": [], "star": [], "tail": []}

    @app.on(Order)
    async def a(ev: Order) -> None:
        got["a"].append(ev.order_id)

    @app.on(Order)
    async def b(ev: Order) -> None:
        got["b"].append(ev.order_id)

    @app.on("orders.*")
    async def star(ev: surge.Event) -> None:
        got["star"].append(type(ev).__name__)

    @app.on("orders.>")
    async def tail(ev: surge.Event) -> None:
        got["tail"].append(type(ev).__name__)

    async with app:
        await app.publish(Order(order_id="1", amount=2.0))
        await app.publish(Refund(order_id="1"))
        await app.drain()
    assert got["a"] == got["b"] == ["1"]
    assert sorted(got["star"]) == sorted(got["tail"]) == ["Order", "Refund"]


async def test_failing_handler_leaves_others_running(clock: surge.VirtualClock) -> None:
    """An exception in one handler neither stops the app nor other handlers."""
    app = surge.App("t", clock=clock, retry=surge.Retry(attempts=1))
    ok: list[int] = []

    @app.on(Ping)
    async def broken(ev: Ping) -> None:
        raise RuntimeError(f"boom {ev.n}")

    @app.on(Ping)
    async def fine(ev: Ping) -> None:
        ok.append(ev.n)

    async with app:
        for i in range(100):
            await app.publish(Ping(n=i))
        await app.drain()
        stats = app.statistics().subscriptions
    assert ok == list(range(100))
    assert stats["t.broken"].failed == 100
    assert stats["t.broken"].dead_lettered == 100


async def test_handlers_publish_by_returning_and_by_ctx(clock: surge.VirtualClock) -> None:
    """Returned events, sequences and ctx.publish all reach subscribers."""
    app = surge.App("t", clock=clock)
    refunds: list[str] = []

    @app.on(Order)
    async def split(ev: Order, ctx: surge.Context) -> list[Refund]:
        ctx.publish(Refund(order_id=ev.order_id + "-ctx"))
        return [Refund(order_id=ev.order_id + "-a"), Refund(order_id=ev.order_id + "-b")]

    @app.on(Refund)
    async def collect(ev: Refund) -> None:
        refunds.append(ev.order_id)

    async with app:
        await app.publish(Order(order_id="o", amount=1.0))
        await app.drain()
    assert sorted(refunds) == ["o-a", "o-b", "o-ctx"]


async def test_graceful_shutdown_finishes_in_flight(clock: surge.VirtualClock) -> None:
    """stop() lets running handlers finish and hands queued ones back, losing none."""
    transport = MemoryTransport(clock=clock)
    app = surge.App("t", clock=clock, transport=transport, shutdown_timeout=5)
    finished: list[int] = []
    started = 0
    all_started = asyncio.Event()

    @app.on(Ping, concurrency=10, prefetch=30)
    async def work(ev: Ping) -> None:
        nonlocal started
        started += 1
        if started == 10:
            all_started.set()
        await clock.sleep(1.0)
        finished.append(ev.n)

    await app.start()
    for i in range(100):
        await app.publish(Ping(n=i))
    await all_started.wait()
    await app.stop()
    stats = await transport.stats("t.work")
    assert len(finished) == 10  # the ten in flight completed
    assert stats.pending == 0  # nothing left half-done
    assert len(finished) + stats.backlog == 100  # the rest is still in the transport


async def test_shutdown_deadline_cancels_and_hands_back(clock: surge.VirtualClock) -> None:
    """Handlers still running at the deadline are cancelled and handed back."""
    transport = MemoryTransport(clock=clock)
    app = surge.App("t", clock=clock, transport=transport, shutdown_timeout=2)
    started = asyncio.Event()

    @app.on(Ping)
    async def forever(ev: Ping) -> None:
        started.set()
        await clock.sleep(3600)

    await app.start()
    await app.publish(Ping(n=1))
    await started.wait()
    t0 = clock.monotonic()
    await app.stop()
    # handlers get three quarters of shutdown_timeout; settling and closing the rest
    assert clock.monotonic() - t0 == 1.5
    stats = await transport.stats("t.forever")
    assert (stats.backlog, stats.pending) == (1, 0)
    report = app.stop_report
    assert report is not None
    assert not report.finished
    assert [(p.name, p.seconds, p.finished) for p in report.phases] == [
        ("triggers", 0, True),
        ("intake", 0, True),
        ("handlers", 1.5, False),
        ("cancel", 0, True),
        ("acks", 0, True),
        ("close", 0, True),
    ]


async def test_stop_with_drain_handles_everything_first(clock: surge.VirtualClock) -> None:
    """stop(drain=True) waits until the transport holds nothing for the app."""
    app = surge.App("t", clock=clock)
    n = 0

    @app.on(Ping, concurrency=3)
    async def work(ev: Ping) -> None:
        nonlocal n
        await clock.sleep(0.1)
        n += 1

    await app.start()
    for i in range(50):
        await app.publish(Ping(n=i))
    await app.stop(drain=True)
    assert n == 50


async def test_publish_outside_running_app_is_refused(clock: surge.VirtualClock) -> None:
    """Publishing before start or after stop raises Closed, not a silent drop."""
    app = surge.App("t", clock=clock)
    with pytest.raises(surge.Closed):
        await app.publish(Ping(n=1))
    async with app:
        pass
    with pytest.raises(surge.Closed):
        app.publish_nowait(Ping(n=1))


async def test_publishing_a_known_type_after_stop_is_refused(clock: surge.VirtualClock) -> None:
    """What publish learnt of an event type while running (its one synchronous put) is
    forgotten at stop: publish and publish_nowait raise Closed, and a restarted app
    handles the type again."""
    app = surge.App("t", clock=clock)
    got: list[int] = []

    @app.on(Ping)
    async def handle(ev: Ping) -> None:
        got.append(ev.n)

    async with app:
        await app.publish(Ping(n=1))
        await app.drain()  # the topic is known routed by now
        await app.publish(Ping(n=2))
        app.publish_nowait(Ping(n=3))
        await app.drain()
    with pytest.raises(surge.Closed):
        await app.publish(Ping(n=4))
    with pytest.raises(surge.Closed):
        app.publish_nowait(Ping(n=4))
    async with app:
        await app.publish(Ping(n=5))
        await app.drain()
    assert got == [1, 2, 3, 5]


def test_decoding_names_the_field() -> None:
    """A wrongly typed body gives a DecodeError naming the field."""
    codec = surge.MsgpackCodec()
    bad = msgspec.msgpack.encode({"order_id": "1", "amount": "lots"})
    with pytest.raises(surge.DecodeError) as info:
        codec.decode_event(bad, Order, topic="orders.placed")
    assert info.value.field == "$.amount"
    assert "Expected `float`, got `str`" in str(info.value)
    with pytest.raises(surge.DecodeError) as info2:
        codec.decode_event(b"\xc1\xff", Order)
    assert "malformed" in str(info2.value)
    json_codec = surge.JsonCodec()
    with pytest.raises(surge.DecodeError) as info3:
        json_codec.decode_event(b'{"order_id": 5, "amount": 1}', Order)
    assert info3.value.field == "$.order_id"


def test_envelope_round_trips_through_both_codecs() -> None:
    """An envelope survives encoding with msgpack and with JSON."""
    for codec in (surge.MsgpackCodec(), surge.JsonCodec()):
        env = surge.Envelope(
            surge.new_id(), "orders.placed", "k", 1.5, {"h": "v"}, Order(order_id="1", amount=2.5)
        )
        back = codec.decode_envelope(codec.encode_envelope(env))
        assert (back.id, back.topic, back.key, back.time, back.headers) == (
            env.id,
            env.topic,
            "k",
            1.5,
            {"h": "v"},
        )
        assert codec.decode_event(back.body or b"", Order) == env.event


def test_oversized_message_is_refused() -> None:
    """Encoding an envelope over max_message_size raises MessageTooLarge."""
    codec = surge.MsgpackCodec(max_message_size=100)
    env = surge.Envelope(
        surge.new_id(), "orders.placed", None, 0.0, None, Order(order_id="x" * 200, amount=1.0)
    )
    with pytest.raises(surge.MessageTooLarge):
        codec.encode_envelope(env)


class _Colour(enum.Enum):
    RED = "red"
    BLUE = "a much longer value than red"


class _Inner(msgspec.Struct):
    at: datetime.datetime
    ok: bool


class _Fixed(surge.Event):
    """Every field of a fixed size: a bound exists."""

    __topic__ = "bounds.fixed"
    __version__ = 2
    n: int
    x: float | None
    colour: _Colour
    mode: Literal["on", "off", "standby"]
    pair: tuple[int, bool]
    inner: _Inner | None
    when: datetime.date
    tick: datetime.timedelta
    uid: uuid.UUID
    small: Annotated[int, msgspec.Meta(ge=0, le=9)]


class _Node(msgspec.Struct):
    next: _Node | None = None


def test_size_bound_covers_every_value_of_fixed_size_fields() -> None:
    """A type of fixed-size fields has a size bound per codec that its extreme values stay
    within (JSON has none: it writes ints of any size); text, bytes, collections, recursion
    and a codec that does not say have none."""
    msgpack, json = surge.MsgpackCodec(), surge.JsonCodec()
    bound = msgpack.size_bound(_Fixed)
    assert bound is not None
    assert bound < 1024
    assert json.size_bound(_Fixed) is None
    tz = datetime.timezone(-datetime.timedelta(hours=23, minutes=59))
    for n in (-(2**63), 2**64 - 1):
        for at in (datetime.datetime.max, datetime.datetime.min.replace(tzinfo=tz)):
            ev = _Fixed(
                n=n,
                x=-1.2345678901234567e-300,
                colour=_Colour.BLUE,
                mode="standby",
                pair=(n, False),
                inner=_Inner(at=at, ok=True),
                when=datetime.date.max,
                tick=datetime.timedelta(days=-999_999_999, microseconds=1),
                uid=uuid.uuid4(),
                small=n,  # types are not checked until decoding; an int is an int
            )
            assert len(msgpack.encode_event(ev)) <= bound

    class Floats(surge.Event):
        x: float
        on: bool | None

    assert json.size_bound(Floats) is not None
    for codec in (msgpack, json):
        assert codec.size_bound(Order) is None
        assert codec.size_bound(_Node) is None
    assert msgpack.size_bound(Floats) == msgpack.size_bound(Floats)  # cached, same answer

    class Quiet(surge.Codec):
        """A codec that says nothing of its sizes."""

    assert Quiet().size_bound(Floats) is None


def test_ids_sort_by_time_and_derived_ids_repeat() -> None:
    """Fresh ids increase; derived ids are deterministic and marked as such."""
    from surge._event import is_derived

    ids = [surge.new_id() for _ in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000
    d1 = surge.derive_id(ids[0], 0)
    assert d1 == surge.derive_id(ids[0], 0) != surge.derive_id(ids[0], 1)
    assert is_derived(d1)
    assert not is_derived(ids[0])
    assert d1[:12] == ids[0][:12]


async def test_ids_from_publish_and_new_id_share_one_increasing_sequence(
    clock: surge.VirtualClock,
) -> None:
    """Ids handed out in blocks (publish pops them inline) are valid UUIDv7s,
    increasing across blocks and across both ways of taking one."""
    import uuid

    app = surge.App("t", clock=clock)

    @app.on(Ping, executor="inline")
    def handle(ev: Ping) -> None: ...

    async with app:
        ids = [await app.publish(Ping(n=i)) if i % 3 else surge.new_id() for i in range(200)]
        await app.drain()
    assert ids == sorted(ids)
    assert len(set(ids)) == 200
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)


def test_bad_subscriptions_are_refused() -> None:
    """Misconfigured handlers fail at declaration with ConfigurationError."""
    app = surge.App("t")
    with pytest.raises(surge.ConfigurationError):
        app.on()
    with pytest.raises(surge.ConfigurationError):
        app.on(Ping, concurrency=0)

    async def h(ev: Ping) -> None: ...

    app.on(Ping)(h)
    with pytest.raises(surge.ConfigurationError, match="two subscriptions"):
        app.on(Ping)(h)
    with pytest.raises(surge.ConfigurationError, match="process"):
        app.on(Ping, executor="process")(lambda ev: None)
    with pytest.raises(surge.ConfigurationError):
        surge.App("bad name")


def test_unknown_transport_url_is_a_clear_error() -> None:
    """An unknown scheme names the schemes that exist."""
    app = surge.App("t", transport="carrier-pigeon://x")
    with pytest.raises(surge.ConfigurationError, match="memory://"):
        _ = app.transport


async def test_keyed_and_unkeyed_share_the_only_slot(clock: surge.VirtualClock) -> None:
    """At concurrency 1, unkeyed work waiting behind a lane runs when the lane ends."""
    app = surge.App("t", clock=clock)
    seen: list[int] = []

    @app.on(Ping, concurrency=1)
    async def handle(ev: Ping) -> None:
        await clock.sleep(0.1)
        seen.append(ev.n)

    async with app:
        await app.publish(Ping(n=1), key="k")
        await app.publish(Ping(n=2))
        await app.publish(Ping(n=3), key="k")
        await app.drain()
    assert sorted(seen) == [1, 2, 3]


async def test_publish_refuses_what_is_not_an_event(clock: surge.VirtualClock) -> None:
    """Publishing a class, a dict or None raises TypeError, on every path."""
    app = surge.App("t", clock=clock)

    @app.on(Ping)
    async def handle(ev: Ping) -> None: ...

    async with app:
        for bad in (Ping, {"n": 1}, None):
            with pytest.raises(TypeError, match="publish takes an Event"):
                await app.publish(bad)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="publish takes an Event"):
                app.publish_nowait(bad)  # type: ignore[arg-type]


def test_app_codec_reaches_a_durable_transport(tmp_path: Path) -> None:
    """An app with the JSON codec round-trips events through the sqlite transport."""
    clock = surge.VirtualClock()
    app = surge.App("j", clock=clock, codec="json", transport=f"sqlite:///{tmp_path / 'j.db'}")
    got: list[int] = []

    @app.on(Ping)
    async def handle(ev: Ping) -> None:
        got.append(ev.n)

    async def main() -> None:
        async with app:
            await app.publish(Ping(n=3))
            await app.drain()

    clock.run(main())
    assert got == [3]


class _First(surge.Event):
    __topic__ = "dup.topic"
    n: int


class _Second(surge.Event):  # same topic, other fields: defined last, so the process default
    __topic__ = "dup.topic"
    name: str


async def test_app_types_win_over_the_last_class_defined(clock: surge.VirtualClock) -> None:
    """A pattern subscription decodes with the type its app declared for the topic."""
    app = surge.App("t", clock=clock)
    got: list[surge.Event] = []

    @app.on(_First)
    async def exact(ev: _First) -> None: ...

    @app.on("dup.*")
    async def pattern(ev: surge.Event) -> None:
        got.append(ev)

    async with app:
        body = surge.MsgpackCodec().encode_event(_First(n=5))
        await app.transport.publish(
            [surge.Envelope(surge.new_id(), "dup.topic", None, 0.0, None, None, body)]
        )
        await app.drain()
        assert await app.dead_letters() == []
    assert got == [_First(n=5)]
    other = surge.App("o")
    other.register(_Second)
    assert other._types["dup.topic"] is _Second


class _CountingPuts(MemoryTransport):
    """Counts the synchronous hand-offs (DirectPut) the app makes."""

    puts = 0

    def put_one(self, env: surge.Envelope) -> bool:
        self.puts += 1
        return super().put_one(env)


class _Marks(surge.Middleware):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def before_publish(self, envelope: surge.Envelope) -> None:
        envelope.headers = {**(envelope.headers or {}), "x-mark": "1"}

    def before_handle(self, ctx: surge.Context) -> None:
        self.seen.append(ctx.headers.get("x-mark", ""))


async def test_middleware_keeps_the_direct_put_path(clock: surge.VirtualClock) -> None:
    """With middleware, publish still hands each event over synchronously
    (DirectPut), with the publish hooks around it and the handle hooks run."""
    transport = _CountingPuts(clock=clock)
    app = surge.App("t", clock=clock, transport=transport)
    marks = _Marks()
    app.add_middleware(marks)
    got: list[int] = []

    @app.on(Ping)
    async def handle(ev: Ping) -> None:
        got.append(ev.n)

    async with app:
        for i in range(5):
            await app.publish(Ping(n=i))
        app.publish_nowait(Ping(n=5))
        await app.drain()
    assert transport.puts == 6
    assert got == [0, 1, 2, 3, 4, 5]
    assert marks.seen == ["1"] * 6
    assert app.middleware == (marks,)


async def test_parts_and_middleware_are_fixed_while_running(clock: surge.VirtualClock) -> None:
    """Middleware, timings and parts are chosen before the app starts."""
    app = surge.App("t", clock=clock)
    async with app:
        with pytest.raises(surge.ConfigurationError):
            app.add_middleware(surge.Middleware())
        with pytest.raises(surge.ConfigurationError):
            app.use_timings(None)
        assert app.capabilities.idle is not None  # memory:// can tell when it is idle
    assert app.middleware == ()


async def test_stop_warns_of_what_a_transport_that_is_not_durable_drops(
    clock: surge.VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping with events still queued on a transport that is not durable
    says how many are lost, naming the transport's URL."""
    app = surge.App("t", clock=clock, shutdown_timeout=0)
    started = asyncio.Event()

    @app.on(Ping, concurrency=1)
    async def slow(ev: Ping) -> None:
        started.set()
        await clock.sleep(3600)

    await app.start()
    for i in range(4):
        await app.publish(Ping(n=i))
    await started.wait()
    await app.stop()
    assert "memory:// is not durable: 4 undelivered events are dropped" in caplog.text


def test_one_executor_choice() -> None:
    """executor= names where a handler runs; a mismatch is refused."""
    app = surge.App("t")

    async def coro(ev: Ping) -> None: ...

    def plain(ev: Ping) -> None: ...

    app.on(Ping, executor="inline")(plain)
    app.on(Ping, executor="async", name="c")(coro)
    assert [s.kind for s in app.subscriptions.values()] == ["inline", "async"]
    with pytest.raises(surge.ConfigurationError, match="is async"):
        app.on(Ping, executor="inline", name="x")(coro)
    with pytest.raises(surge.ConfigurationError, match="not a coroutine"):
        app.on(Ping, executor="async", name="y")(plain)
    with pytest.raises(surge.ConfigurationError, match="unknown executor"):
        app.on(Ping, executor="fiber", name="z")(plain)  # type: ignore[arg-type]


async def test_virtual_clock_jump_is_a_stall(clock: surge.VirtualClock) -> None:
    """jump() moves virtual time on at once, and what fell due meanwhile
    runs only when the loop goes on, late; time never moves back."""
    fired: list[float] = []
    done = asyncio.Event()

    def due() -> None:
        fired.append(clock.monotonic())
        done.set()

    clock.call_later(1.0, due)
    start = clock.monotonic()
    clock.jump(5.0)
    assert clock.monotonic() == start + 5.0
    assert fired == []
    await done.wait()
    assert fired == [start + 5.0]
    with pytest.raises(ValueError, match="forward"):
        clock.jump(-1.0)
