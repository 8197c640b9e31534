"""The Transport protocol, used directly: what every transport promises."""

from __future__ import annotations

import asyncio

import pytest

import surge
from surge._event import derive_id

from ._helpers import Reader, env, number
from .conftest import Case, Factory


async def test_publish_consume_ack(transport_factory: Factory) -> None:
    """Published envelopes reach a declared group once, in order, and ack settles them."""
    async with transport_factory.started() as t:
        await t.declare("g", ["conf.item"])
        await t.publish([env(i) for i in range(5)])
        r = Reader(t, "g")
        got = await r.take(5)
        assert [number(d) for d in got] == [0, 1, 2, 3, 4]
        assert all(d.attempt == 1 and d.group == "g" for d in got)
        await t.ack(got)
        assert await r.quiet(1.0)
        stats = await t.stats("g")
        assert (stats.backlog, stats.pending, stats.scheduled, stats.dead) == (0, 0, 0, 0)
        await r.aclose()


async def test_undeclared_topic_is_not_stored(transport_factory: Factory) -> None:
    """An envelope whose topic no group matches reaches nobody, not even later groups."""
    async with transport_factory.started() as t:
        await t.publish([env(1, topic="conf.nobody")])
        await t.declare("late", ["conf.nobody"])
        r = Reader(t, "late")
        assert await r.quiet(1.0)
        await r.aclose()


async def test_fan_out_to_every_group(transport_factory: Factory) -> None:
    """Every group whose patterns match gets its own copy of every envelope."""
    async with transport_factory.started() as t:
        for g in ("a", "b", "c"):
            await t.declare(g, ["conf.item"])
        await t.publish([env(1), env(2)])
        for g in ("a", "b", "c"):
            r = Reader(t, g)
            got = await r.take(2)
            assert sorted(number(d) for d in got) == [1, 2]
            await t.ack(got)
            await r.aclose()


async def test_pattern_topics(transport_factory: Factory) -> None:
    """``*`` matches one token and a final ``>`` one or more; exact names only themselves."""
    async with transport_factory.started() as t:
        await t.declare("star", ["orders.*"])
        await t.declare("rest", ["orders.>"])
        await t.declare("exact", ["orders"])
        await t.publish(
            [
                env(1, topic="orders"),
                env(2, topic="orders.placed"),
                env(3, topic="orders.eu.placed"),
                env(4, topic="ordersx.placed"),
            ]
        )
        expect = {"star": [2], "rest": [2, 3], "exact": [1]}
        for group, numbers in expect.items():
            r = Reader(t, group)
            got = await r.take(len(numbers))
            assert sorted(number(d) for d in got) == numbers, group
            assert await r.quiet(0.5), group
            await t.ack(got)
            await r.aclose()


async def test_prefetch_bounds_unsettled(transport_factory: Factory) -> None:
    """A consumer never holds more than ``prefetch`` unsettled deliveries."""
    async with transport_factory.started() as t:
        await t.declare("g", ["conf.item"])
        await t.publish([env(i) for i in range(10)])
        r = Reader(t, "g", prefetch=3)
        held = await r.take(3)
        assert await r.quiet(1.0), "got a 4th delivery while 3 were unsettled"
        await t.ack(held[:1])
        more = await r.batch()
        assert len(more) == 1
        assert await r.quiet(1.0)
        await t.ack([*held[1:], *more])
        rest = await r.take(3)
        await t.ack(rest)
        rest = await r.take(3)
        await t.ack(rest)
        assert await r.quiet(0.5)
        await r.aclose()


async def test_nack_redelivers_after_delay(transport_factory: Factory, clock: surge.Clock) -> None:
    """A nacked delivery comes back with attempt + 1, and not before its delay."""
    async with transport_factory.started() as t:
        await t.declare("g", ["conf.item"])
        await t.publish([env(7)])
        r = Reader(t, "g")
        (d,) = await r.take(1)
        assert d.attempt == 1
        nacked_at = clock.time()
        await t.nack(d, 0.5)
        stats = await t.stats("g")
        assert (stats.scheduled, stats.pending) == (1, 0)
        (again,) = await r.take(1)
        assert clock.time() >= nacked_at + 0.5
        assert again.attempt == 2
        assert number(again) == 7
        assert again.envelope.id == d.envelope.id
        await t.nack(again, 0.0)
        (third,) = await r.take(1)
        assert third.attempt == 3
        await t.ack([third])
        await r.aclose()


async def test_dead_letter_replay_purge(transport_factory: Factory, clock: surge.Clock) -> None:
    """Dead letters are kept per group, replayed as deliveries, and purged."""
    async with transport_factory.started() as t:
        await t.declare("g", ["conf.item"])
        await t.declare("other", ["conf.item"])
        await t.publish([env(1), env(2)])
        r = Reader(t, "g")
        got = await r.take(2)
        for d in got:
            rec = surge.DeadLetter(
                id=d.envelope.id,
                group="g",
                topic=d.envelope.topic,
                key=None,
                headers={"h": "v"},
                body=d.envelope.body or b"",
                error_type="ValueError",
                error="boom",
                traceback="tb",
                attempts=d.attempt,
                first_attempt_at=d.first_time,
                failed_at=clock.time(),
            )
            await t.dead_letter(d, rec)
        dead = await t.dead_letters("g")
        assert sorted(x.id for x in dead) == sorted(d.envelope.id for d in got)
        assert dead[0].error == "boom"
        assert dead[0].headers == {"h": "v"}
        assert (await t.stats("g")).dead == 2
        assert all(x.group == "g" for x in await t.dead_letters())
        assert await t.dead_letters("other") == []

        assert await t.replay("g", [got[0].envelope.id]) == 1
        (back,) = await r.take(1)
        assert back.envelope.id == got[0].envelope.id
        assert number(back) == number(got[0])
        await t.ack([back])
        assert [x.id for x in await t.dead_letters("g")] == [got[1].envelope.id]
        assert await t.purge("g") == 1
        assert await t.dead_letters("g") == []
        assert await t.purge("g") == 0
        with pytest.raises(surge.ConfigurationError):
            await t.replay("nope")
        await r.aclose()


async def test_dedup_drops_repeated_derived_ids(transport_factory: Factory) -> None:
    """A derived id published again within the window is dropped; fresh ids never are."""
    async with transport_factory.started() as t:
        await t.declare("g", ["conf.item"])
        parent = surge.new_id()
        child = derive_id(parent, 0)
        await t.publish([env(1, id=child)])
        await t.publish([env(1, id=child), env(2, id=derive_id(parent, 1))])
        await t.publish([env(3, id=derive_id(parent, 2)), env(3, id=derive_id(parent, 2))])
        fresh = [env(100 + i) for i in range(50)]
        await t.publish(fresh)
        r = Reader(t, "g")
        got = await r.take(53)
        assert await r.quiet(1.0)
        nums = sorted(number(d) for d in got)
        assert nums == [1, 2, 3, *range(100, 150)]
        await t.ack(got)
        await r.aclose()


async def test_not_before_is_honoured(transport_factory: Factory, clock: surge.Clock) -> None:
    """No group receives an envelope before its ``not_before`` time."""
    async with transport_factory.started() as t:
        await t.declare("g", ["conf.item"])
        due = clock.time() + 0.6
        await t.publish([env(1, not_before=due), env(2)])
        r = Reader(t, "g")
        (now,) = await r.take(1)
        assert number(now) == 2
        assert (await t.stats("g")).scheduled == 1
        (later,) = await r.take(1)
        assert number(later) == 1
        assert clock.time() >= due
        assert later.attempt == 1
        await t.ack([now, later])
        await r.aclose()


async def test_publish_nowait_overloads_and_publish_waits(
    transport_factory: Factory, case: Case
) -> None:
    """Past its capacity publish_nowait raises Overloaded and publish waits for room."""
    if not case.bounded:
        pytest.skip(f"{case.id} has no bounded buffer")
    async with transport_factory.started(**case.bounded_options) as t:
        await t.declare("g", ["conf.item"])
        cap = case.bounded_capacity
        t.publish_nowait([env(i) for i in range(cap)])
        with pytest.raises(surge.Overloaded):
            t.publish_nowait([env(99)])
        waiting = asyncio.ensure_future(t.publish([env(cap)]))
        done, _ = await asyncio.wait({waiting}, timeout=0.5)
        assert not done, "publish returned while the buffer was full"
        r = Reader(t, "g", prefetch=cap + 1)
        got = await r.take(cap)
        await waiting
        got += await r.take(1)
        assert sorted(number(d) for d in got) == list(range(cap + 1))
        await t.ack(got)
        await r.aclose()


async def test_unsettled_delivery_returns_when_consumer_is_gone(
    transport_factory: Factory, case: Case, clock: surge.Clock
) -> None:
    """At-least-once: a delivery whose consumer died unsettled goes to another consumer."""
    if not case.leases:
        pytest.skip(f"{case.id} has no leases")
    async with transport_factory.started(**case.lease_options) as dead:
        await dead.declare("g", ["conf.item"])
        await dead.publish([env(5)])
        r1 = Reader(dead, "g")
        (d,) = await r1.take(1)
        taken_at = clock.time()
        # ``dead`` never settles or extends d; a second process takes over.
        async with transport_factory.started(**case.lease_options) as alive:
            await alive.declare("g", ["conf.item"])
            r2 = Reader(alive, "g")
            (again,) = await r2.take(1)
            assert again.envelope.id == d.envelope.id
            assert again.attempt == 2
            assert clock.time() > taken_at
            await alive.ack([again])
            await r2.aclose()
        await r1.aclose()


async def test_oversized_envelope_is_refused_at_publish(transport_factory: Factory) -> None:
    """A batch holding an envelope over the codec's max_message_size raises MessageTooLarge
    from publish and publish_nowait and none of it is stored; the next batch goes through."""
    codec = surge.MsgpackCodec(max_message_size=4096)
    async with transport_factory.started(codec=codec) as t:
        await t.declare("g", ["conf.item"])
        with pytest.raises(surge.MessageTooLarge, match="the limit is 4096"):
            await t.publish([env(1), env(2, pad=8192)])
        with pytest.raises(surge.MessageTooLarge, match="the limit is 4096"):
            t.publish_nowait([env(3), env(4, pad=8192)])
        await t.publish([env(5), env(6, pad=1024)])
        r = Reader(t, "g")
        got = await r.take(2)
        assert sorted(number(d) for d in got) == [5, 6]
        await t.ack(got)
        assert await r.quiet(0.5)
        await r.aclose()


async def test_closed_transport_refuses_publish(transport_factory: Factory) -> None:
    """Publishing on a closed transport raises Closed."""
    t = transport_factory.open()
    await t.start()
    await t.declare("g", ["conf.item"])
    await t.close()
    with pytest.raises(surge.Closed):
        await t.publish([env(1)])


async def test_stats_count_every_consumers_settled_attempts(
    transport_factory: Factory, case: Case, clock: surge.Clock
) -> None:
    """Two transports (two processes) consume one group: each one's stats
    count the attempts both finished (acks, a retry, a dead letter) and both
    consumers, where the transport counts them (what
    admission reads a stage's throughput from); None where it cannot."""
    if not case.shared:
        pytest.skip(f"{case.id}: one process per store")
    async with transport_factory.started() as a, transport_factory.started() as b:
        for t in (a, b):
            await t.declare("g", ["conf.item"])
        readers = {t: Reader(t, "g", prefetch=4).start() for t in (a, b)}
        await a.publish([env(i) for i in range(20)])
        waits = {t: r._pending() for t, r in readers.items()}
        acked = 0
        while acked < 19:
            done, _ = await asyncio.wait(
                waits.values(), timeout=30, return_when=asyncio.FIRST_COMPLETED
            )
            assert done, "no delivery within 30 s"
            for t, task in list(waits.items()):
                if task not in done:
                    continue
                readers[t]._next = None
                batch = task.result()
                for d in batch:
                    n = number(d)
                    if n == 0 and d.attempt == 1:
                        await t.nack(d, 0.0)  # a retry: a finished attempt
                    elif n == 1:
                        await t.dead_letter(d, _dead(d, clock.time()))
                    else:
                        await t.ack([d])
                        acked += 1
                waits[t] = readers[t]._pending()

        async def counted() -> tuple[int | None, int | None]:
            stats = await t.stats("g")
            return stats.settled, stats.consumers

        for t in (a, b):
            if not case.counts_settled:
                assert (await t.stats("g")).settled is None
                continue
            for _ in range(200):  # a member's first round may still be under way
                if (found := await counted()) == (21, 2):
                    break
                await asyncio.sleep(0.05)
            assert found == (21, 2)
        for r in readers.values():
            await r.aclose()


def _dead(d: surge.Delivery, now: float) -> surge.DeadLetter:
    return surge.DeadLetter(
        id=d.envelope.id,
        group=d.group,
        topic=d.envelope.topic,
        key=None,
        headers=None,
        body=d.envelope.body or b"",
        error_type="ValueError",
        error="boom",
        traceback="",
        attempts=d.attempt,
        first_attempt_at=d.first_time,
        failed_at=now,
    )
