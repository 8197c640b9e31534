"""The optional capabilities (docs/transports.md), each where a transport has it,
and what the runtime does where it has not.

A capability test runs when ``surge.capabilities_of`` finds the protocol on
the transport and skips, naming it, when not; each degradation test runs
where the capability is missing and skips where it is there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

import surge
from surge.testing import Harness

from ._helpers import Item, Reader, body, env, number
from .conftest import Case, Factory


def _n(d: surge.Delivery) -> int:
    """The Item's ``n``: an event object in process, else its encoded body."""
    ev = d.envelope.event
    return ev.n if isinstance(ev, Item) else number(d)


def _caps(factory: Factory) -> surge.Capabilities:
    return surge.capabilities_of(factory.open())


def _need(have: object, name: str, case: Case) -> None:
    if have is None:
        pytest.skip(f"{case.id} has no {name}")


def _lack(have: object, name: str, case: Case) -> None:
    if have is not None:
        pytest.skip(f"{case.id} has {name}: nothing to degrade")


@asynccontextmanager
async def _reopened(
    factory: Factory, case: Case, first: surge.Transport
) -> AsyncIterator[surge.Transport]:
    """After ``first`` closed: the store as the next process sees it (a new
    transport on a shared store, else ``first`` started again)."""
    if case.shared:
        async with factory.started(**case.order_options) as t:
            yield t
        return
    await first.start()
    try:
        yield first
    finally:
        await first.close()


# --- HandsBack -----------------------------------------------------------------
async def test_release_keeps_attempt_and_place(transport_factory: Factory, case: Case) -> None:
    """Released deliveries come back at once, in order and before envelopes
    of their key published later, with the attempt they had."""
    _need(_caps(transport_factory).hands_back, "HandsBack", case)
    # keyed: short leases, so that a partition's first owner takes it at once
    first = transport_factory.open(**case.order_options)
    await first.start()
    await first.declare("g", ["conf.item"])

    def keyed(numbers: range) -> list[surge.Envelope]:
        envs = [env(i) for i in numbers]
        for e in envs:
            e.key = "k"  # one partition, where the transport has partitions
        return envs

    await first.publish(keyed(range(6)))
    r = Reader(first, "g", prefetch=100)
    held = await r.take(6)
    assert [number(d) for d in held] == [0, 1, 2, 3, 4, 5]
    hands_back = surge.capabilities_of(first).hands_back
    assert hands_back is not None
    await r.aclose()
    await hands_back.release(held)
    await first.close()
    async with _reopened(transport_factory, case, first) as t:
        await t.declare("g", ["conf.item"])
        await t.publish(keyed(range(6, 9)))
        r = Reader(t, "g", prefetch=100)
        again = await r.take(9)
        assert [number(d) for d in again] == list(range(9))
        assert [d.attempt for d in again] == [1] * 9
        await t.ack(again)
        await r.aclose()


async def test_stop_hands_back_what_no_handler_saw(transport_factory: Factory, case: Case) -> None:
    """Events fetched but never handled when the app stops come back with
    attempt 1 where the transport hands back, attempt 2 (a nack) where not."""
    releases = surge.capabilities_of(transport_factory.open()).hands_back is not None
    app = transport_factory.app(shutdown_timeout=0)
    started = asyncio.Event()
    blocked: list[int] = []

    @app.on(Item, concurrency=1, prefetch=100)
    async def stuck(ev: Item) -> None:
        blocked.append(ev.n)
        started.set()
        await asyncio.Event().wait()  # cancelled at the stop

    await app.start()
    for i in range(5):
        await app.publish(Item(n=i))
    async with asyncio.timeout(30):
        await started.wait()
    await app.stop()
    expect = 1 if releases else 2
    async with _reopened(transport_factory, case, app.transport) as t:
        await t.declare(f"{app.name}.stuck", ["conf.item"])
        r = Reader(t, f"{app.name}.stuck")
        others: dict[int, int] = {}
        while len(others) < 4:
            for d in await r.batch():
                if _n(d) not in blocked:
                    others[_n(d)] = d.attempt
        assert sorted(others) == sorted(set(range(5)) - set(blocked))
        assert set(others.values()) == {expect}, others
        await r.aclose()


# --- KeyRouting ----------------------------------------------------------------
class Keyed(surge.Event):
    __topic__ = "conf.keyed"
    __key__ = "account"
    account: str
    n: int


async def test_partitions_and_filled_keys(transport_factory: Factory, case: Case) -> None:
    """A partitioned transport says how many partitions it has once started,
    and the app fills each envelope's key from the event type's ``__key__``;
    without partitions the envelope keeps the publisher's key (none)."""
    app = transport_factory.app()
    keys: list[str | None] = []
    done = asyncio.Event()

    @app.on(Keyed)
    async def handle(ev: Keyed, ctx: surge.Context) -> None:
        keys.append(ctx.key)
        if len(keys) == 3:
            done.set()

    async with app:
        routing = app.capabilities.key_routing
        for i in range(3):
            await app.publish(Keyed(account=f"a{i}", n=i))
        async with asyncio.timeout(30):
            await done.wait()
    if routing is None:
        assert keys == [None, None, None]
    else:
        assert routing.partitions >= 1
        assert app.capabilities.partitions == routing.partitions
        assert sorted(k or "" for k in keys) == ["a0", "a1", "a2"]


# --- IdleAware -----------------------------------------------------------------
async def test_idle_and_wait_idle(transport_factory: Factory, case: Case) -> None:
    """Idle means nothing undelivered, unsettled or scheduled; wait_idle
    returns once that holds."""
    _need(_caps(transport_factory).idle, "IdleAware", case)
    async with transport_factory.started() as t:
        idle = surge.capabilities_of(t).idle
        assert idle is not None
        await t.declare("g", ["conf.item"])
        await idle.wait_idle()
        assert idle.idle
        await t.publish([env(1), env(2)])
        waiting = asyncio.ensure_future(idle.wait_idle())
        r = Reader(t, "g")
        got = await r.take(2)
        await t.nack(got[0], 0.3)  # scheduled: still not idle
        await t.ack(got[1:])
        done, _ = await asyncio.wait({waiting}, timeout=0.1)
        assert not done, "idle while a delivery was scheduled"
        (back,) = await r.take(1)
        await t.ack([back])
        async with asyncio.timeout(30):
            await waiting
        assert idle.idle
        await r.aclose()


async def test_without_idle_drain_raises(transport_factory: Factory, case: Case) -> None:
    """Without IdleAware, App.drain, Harness.drain and App.stop(drain=True)
    raise NotImplementedError; the app runs on and a plain stop stops it."""
    _lack(_caps(transport_factory).idle, "IdleAware", case)
    app = transport_factory.app()
    handled = asyncio.Event()

    @app.on(Item)
    async def handle(ev: Item) -> None:
        handled.set()

    async with Harness(app) as h:
        with pytest.raises(NotImplementedError, match="IdleAware"):
            await app.drain()
        with pytest.raises(NotImplementedError):
            await h.drain()
        await app.publish(Item(n=1))
        async with asyncio.timeout(30):
            await handled.wait()
        assert h.handled_by("handle") == [Item(n=1)]
        with pytest.raises(NotImplementedError):
            await app.stop(drain=True)
        assert app.state == "running"
    stopped: str = app.state  # (mypy keeps the narrowing above across the await)
    assert stopped == "stopped"


# --- StateStore ----------------------------------------------------------------
async def test_state_round_trip(transport_factory: Factory, case: Case) -> None:
    """load_state gives back what save_state stored last, and None before;
    a second transport on a shared store sees the same values."""
    _need(_caps(transport_factory).state, "StateStore", case)
    async with transport_factory.started() as t:
        store = surge.capabilities_of(t).state
        assert store is not None
        assert await store.load_state("conf:k") is None
        await store.save_state("conf:k", b"one")
        await store.save_state("conf:k", b"two")
        assert await store.load_state("conf:k") == b"two"
        if case.shared:
            async with transport_factory.started() as other:
                other_store = surge.capabilities_of(other).state
                assert other_store is not None
                assert await other_store.load_state("conf:k") == b"two"
                await other_store.save_state("conf:k", b"three")
            assert await store.load_state("conf:k") == b"three"


def _ticker(factory: Factory, transport: surge.Transport, fired: list[float]) -> surge.App:
    app = surge.App("conf", transport=transport, clock=factory.clock)

    @app.every(seconds=10, name="ten", misfire="catch_up")
    async def ten(t: surge.Tick) -> None:
        fired.append(t.scheduled)

    return app


async def test_trigger_state_without_a_store_lives_on_the_app(
    transport_factory: Factory, case: Case, clock: surge.Clock
) -> None:
    """Without a StateStore, an app restarted catches up on the slots it
    missed, and a new app (a new process) starts with no history."""
    _lack(_caps(transport_factory).state, "StateStore", case)
    if case.realtime:
        pytest.skip("timers over minutes run on the virtual clock")
    fired: list[float] = []
    transport = transport_factory.open()
    app = _ticker(transport_factory, transport, fired)
    async with app:
        await clock.sleep(25)
    assert len(fired) == 2
    await clock.sleep(60)
    async with app:
        await clock.sleep(1)
    assert len(fired) == 8  # caught up on the six slots missed
    await clock.sleep(60)
    async with _ticker(transport_factory, transport, fired):
        await clock.sleep(1)
    assert len(fired) == 8  # a new app knows of no firing: nothing to catch up


async def test_trigger_state_in_the_store_is_shared(
    transport_factory: Factory, case: Case, clock: surge.Clock
) -> None:
    """With a StateStore, a new app on the store (a new process) catches up
    from the slot the previous one fired last."""
    _need(_caps(transport_factory).state, "StateStore", case)
    if case.realtime:
        pytest.skip("timers over minutes run on the virtual clock")
    fired: list[float] = []
    first = transport_factory.open()
    async with _ticker(transport_factory, first, fired):
        await clock.sleep(25)
    assert len(fired) == 2
    await clock.sleep(60)
    second = transport_factory.open() if case.shared else first
    async with _ticker(transport_factory, second, fired):
        await clock.sleep(1)
    assert len(fired) == 8


# --- KnowsGroups ---------------------------------------------------------------
async def test_groups_for_names_the_groups_of_every_process(
    transport_factory: Factory, case: Case
) -> None:
    """groups_for(topic) names the declared groups whose topics or patterns
    match it, those another transport on a shared store declared included."""
    _need(_caps(transport_factory).groups, "KnowsGroups", case)
    async with transport_factory.started() as t:
        groups = surge.capabilities_of(t).groups
        assert groups is not None
        assert await groups.groups_for("conf.a") == []
        await t.declare("g-exact", ["conf.a"])
        await t.declare("g-star", ["conf.*"])
        if case.shared:
            async with transport_factory.started() as other:
                await other.declare("g-rest", ["conf.>"])
        else:
            await t.declare("g-rest", ["conf.>"])
        assert sorted(await groups.groups_for("conf.a")) == ["g-exact", "g-rest", "g-star"]
        assert sorted(await groups.groups_for("conf.b")) == ["g-rest", "g-star"]
        assert await groups.groups_for("conf.b.c") == ["g-rest"]
        assert await groups.groups_for("other") == []


async def test_without_groups_mandatory_publish_cannot_tell(
    transport_factory: Factory, case: Case
) -> None:
    """Without KnowsGroups, publish(mandatory=True) raises NotImplementedError
    naming the capability, and a plain publish counts nothing."""
    _lack(_caps(transport_factory).groups, "KnowsGroups", case)
    app = transport_factory.app()
    async with app:
        with pytest.raises(NotImplementedError, match="KnowsGroups"):
            await app.publish(Item(n=1), mandatory=True)
        await app.publish(Item(n=2))
        assert app.statistics().unroutable == {}


# --- Fences --------------------------------------------------------------------
def _stall(clock: surge.Clock, seconds: float) -> None:
    """Nothing of this process runs for ``seconds`` (a blocked loop, a pause):
    virtual time jumps, real time passes with the loop blocked."""
    if isinstance(clock, surge.VirtualClock):
        clock.jump(seconds)
    else:
        time.sleep(seconds)


def _past_fence(case: Case) -> float:
    """Longer than 2/3 of the case's short lease (``order_options``)."""
    lease: float = case.order_options.get("lease", 1.0)
    return lease * 2 / 3 + 0.2


async def test_a_delivery_held_past_its_fence_is_fenced(
    transport_factory: Factory, case: Case, clock: surge.Clock
) -> None:
    """Keyed deliveries are not fenced while their partition's lease is fresh,
    and all are once their consumer stalled past 2/3 of a lease; they come
    back, in order, to the partition's owner (this consumer, taking it again)."""
    _need(_caps(transport_factory).fences, "Fences", case)
    async with transport_factory.started(**case.order_options) as t:
        fences = surge.capabilities_of(t).fences
        assert fences is not None
        await t.declare("g", ["conf.item"])
        envs = [env(i) for i in range(5)]
        for e in envs:
            e.key = "k"
        await t.publish(envs)
        r = Reader(t, "g", prefetch=100)
        held = await r.take(5)
        assert [number(d) for d in held] == list(range(5))
        assert not any(fences.fenced(d) for d in held)
        _stall(clock, _past_fence(case))
        assert all(fences.fenced(d) for d in held)
        again = await r.take(5)
        assert [number(d) for d in again] == list(range(5))
        await t.ack(again)
        await r.aclose()


async def test_the_runner_skips_what_is_fenced_and_nothing_else(
    transport_factory: Factory, case: Case, clock: surge.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler stalls past 2/3 of a lease while later deliveries of its key
    wait in its lane. Where the transport fences, the runner starts none that
    it reports fenced, and they are handled once they come back, in order;
    where it does not, the runner skips nothing: each is handled once, in
    order, right after the stall."""
    transport = transport_factory.open(**case.order_options)
    fences = surge.capabilities_of(transport).fences
    refused: list[surge.Delivery] = []
    if fences is not None:
        ask = fences.fenced

        def fenced(d: surge.Delivery) -> bool:
            out = ask(d)
            if out:
                refused.append(d)
            return out

        monkeypatch.setattr(transport, "fenced", fenced)
    # The handler stalls only once all five are in the runner's lane.
    received = asyncio.Event()
    consume = transport.consume

    async def counting(group: str, *, prefetch: int) -> AsyncIterator[list[surge.Delivery]]:
        seen = 0
        async for batch in consume(group, prefetch=prefetch):
            seen += len(batch)
            if seen >= 5:
                received.set()
            yield batch

    monkeypatch.setattr(transport, "consume", counting)
    app = surge.App("conf", transport=transport, clock=transport_factory.clock)
    handled: list[tuple[int, surge.Delivery]] = []
    done = asyncio.Event()

    @app.on(Keyed, concurrency=1, prefetch=100)
    async def handle(ev: Keyed, ctx: surge.Context) -> None:
        handled.append((ev.n, ctx.delivery))
        if ev.n == 0 and len(handled) == 1:
            await received.wait()
            _stall(clock, _past_fence(case))
        if {n for n, _ in handled} == set(range(5)):
            done.set()

    async with app:
        await app.publish_many([Keyed(account="a", n=i) for i in range(5)])
        async with asyncio.timeout(60):
            await done.wait()
    numbers = [n for n, _ in handled]
    if fences is None:
        assert numbers == list(range(5))
        return
    assert refused, "nothing held was fenced after the stall"
    started = {id(d) for _, d in handled}
    assert not any(id(d) in started for d in refused)
    assert list(dict.fromkeys(numbers)) == list(range(5))


# --- FencedState ---------------------------------------------------------------
async def test_a_stalled_consumers_state_save_is_refused(
    transport_factory: Factory, case: Case, clock: surge.Clock
) -> None:
    """save_state_held saves while its keyed delivery is fresh; once the
    consumer stalled past the whole lease and the partition's next owner
    saved the key, it saves nothing and says so, and the next owner's value
    stays; the delivery, nacked as the runner does, comes back and saves
    (unless fenced again). Each save follows a load, as a condition's does."""
    _need(_caps(transport_factory).fenced_state, "FencedState", case)
    async with transport_factory.started(**case.order_options) as t:
        held = surge.capabilities_of(t).fenced_state
        store = surge.capabilities_of(t).state
        assert held is not None
        assert store is not None
        await t.declare("g", ["conf.item"])
        e = env(0)
        e.key = "k"
        await t.publish([e])
        r = Reader(t, "g", prefetch=100)
        [d] = await r.take(1)
        assert await store.load_state("when:k") is None
        assert await held.save_state_held("when:k", b"1", d)
        assert await store.load_state("when:k") == b"1"
        _stall(clock, case.order_options.get("lease", 1.0) + 0.2)
        await store.save_state("when:k", b"next")  # the next owner went on
        assert not await held.save_state_held("when:k", b"2", d)
        assert await store.load_state("when:k") == b"next"
        # The runner's answer to a refused save (RetryLater): a nack.
        await t.nack(d, 0.0)
        [again] = await r.take(1)
        assert number(again) == 0
        fences = surge.capabilities_of(t).fences
        assert await store.load_state("when:k") == b"next"
        if await held.save_state_held("when:k", b"3", again):
            assert await store.load_state("when:k") == b"3"
        else:
            # A loaded machine can stall a 1-second lease again: refused
            # only if the transport has forgotten the delivery by now.
            assert fences is not None
            assert fences.fenced(again)
        await t.ack([again])
        await r.aclose()


# --- Outbox --------------------------------------------------------------------
async def test_outbox_publishes_with_the_callers_commit(
    transport_factory: Factory, case: Case
) -> None:
    """publish(connection=...) writes the event inside the caller's
    transaction: delivered once it commits, never when it rolls back."""
    _need(_caps(transport_factory).outbox, "Outbox", case)
    assert case.transaction is not None, f"{case.id}: give its Case a transaction"
    app = transport_factory.app()
    seen: list[int] = []
    done = asyncio.Event()

    @app.on(Item)
    async def handle(ev: Item) -> None:
        seen.append(ev.n)
        if ev.n == 2:
            done.set()

    async with app:
        async with case.transaction(transport_factory.url, False) as conn:
            await app.publish(Item(n=1), connection=conn)
        async with case.transaction(transport_factory.url, True) as conn:
            await app.publish(Item(n=2), connection=conn)
        async with asyncio.timeout(30):
            await done.wait()
        await app.drain()
    assert seen == [2]


async def test_without_an_outbox_publish_through_a_connection_is_refused(
    transport_factory: Factory, case: Case
) -> None:
    """Without Outbox, publish(connection=...) raises ConfigurationError and
    publishes nothing; a plain publish still works."""
    _lack(_caps(transport_factory).outbox, "Outbox", case)
    app = transport_factory.app()
    seen: list[int] = []
    done = asyncio.Event()

    @app.on(Item)
    async def handle(ev: Item) -> None:
        seen.append(ev.n)
        done.set()

    async with app:
        with pytest.raises(surge.ConfigurationError, match="outbox"):
            await app.publish(Item(n=1), connection=object())
        await app.publish(Item(n=2))
        async with asyncio.timeout(30):
            await done.wait()
    assert seen == [2]


# --- DirectPut -----------------------------------------------------------------
async def test_put_one_takes_all_or_nothing(transport_factory: Factory, case: Case) -> None:
    """put_one queues a fresh envelope and says True, or takes nothing and
    says False when a group is full."""
    _need(_caps(transport_factory).direct_put, "DirectPut", case)
    if not case.bounded:
        pytest.skip(f"{case.id} has no bounded buffer")
    async with transport_factory.started(**case.bounded_options) as t:
        put = surge.capabilities_of(t).direct_put
        assert put is not None
        assert not t.durable
        await t.declare("g", ["conf.item"])
        await t.declare("h", ["conf.item"])
        made = [
            surge.Envelope(surge.new_id(), "conf.item", None, 0.0, None, None, body(i))
            for i in range(case.bounded_capacity + 1)
        ]
        for e in made[:-1]:
            assert put.put_one(e)
        assert not put.put_one(made[-1])
        for group in ("g", "h"):
            r = Reader(t, group)
            got = await r.take(case.bounded_capacity)
            assert [number(d) for d in got] == list(range(case.bounded_capacity))
            assert await r.quiet(0.5)
            await t.ack(got)
            await r.aclose()
