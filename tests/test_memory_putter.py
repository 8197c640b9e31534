"""memory://'s putters (TopicPut): ``put_one`` made once per topic and type."""

from __future__ import annotations

import asyncio

import pytest

import surge
from surge._event import Envelope, new_id
from surge._transport import capabilities_of
from surge.transports import MemoryTransport

from .conformance._helpers import Reader


class Small(surge.Event):
    __topic__ = "put.small"
    n: int


class Text(surge.Event):
    __topic__ = "put.text"
    s: str


def _env(event: surge.Event) -> Envelope:
    return Envelope(new_id(), event.__topic__, None, 0.0, None, event)


async def test_memory_makes_putters(clock: surge.Clock) -> None:
    """memory:// offers TopicPut, with a putter for a topic routed to one
    group and none for a topic routed to two."""
    t = MemoryTransport(clock=clock)
    assert capabilities_of(t).topic_put is not None
    await t.start()
    await t.declare("a", ["put.small", "put.text"])
    await t.declare("b", ["put.text"])
    assert t.putter("put.small", Small) is not None
    assert t.putter("put.text", Text) is None


async def test_a_putter_follows_a_group_declared_after_it(clock: surge.Clock) -> None:
    """A putter made while its topic had one group still reaches a second
    group declared later: the change of routes sends it to put_one."""
    t = MemoryTransport(clock=clock)
    await t.start()
    await t.declare("a", ["put.small"])
    put = t.putter("put.small", Small)
    assert put is not None
    assert put(_env(Small(n=1)))
    await t.declare("b", ["put.small"])
    assert put(_env(Small(n=2)))
    got_a = await Reader(t, "a").take(2)
    got_b = await Reader(t, "b").take(1)
    assert [d.envelope.event for d in got_a] == [Small(n=1), Small(n=2)]
    assert [d.envelope.event for d in got_b] == [Small(n=2)]


async def test_a_putter_takes_all_or_nothing_and_refuses_when_closed(clock: surge.Clock) -> None:
    """A putter says False and takes nothing once its group is full, and
    raises Closed after the transport closed, as put_one does."""
    t = MemoryTransport(clock=clock, capacity=2)
    await t.start()
    await t.declare("a", ["put.small"])
    put = t.putter("put.small", Small)
    assert put is not None
    assert put(_env(Small(n=1)))
    assert put(_env(Small(n=2)))
    assert not put(_env(Small(n=3)))
    assert (await t.stats("a")).backlog == 2
    [first] = await Reader(t, "a", prefetch=1).take(1)
    await t.ack([first])  # room for one again
    await t.close()
    with pytest.raises(surge.Closed):
        put(_env(Small(n=4)))


async def test_a_putter_measures_a_type_that_may_not_fit(clock: surge.Clock) -> None:
    """A type with a string field is measured at every put: one over the
    codec's limit raises MessageTooLarge and is not queued."""
    t = MemoryTransport(clock=clock, codec=surge.MsgpackCodec(max_message_size=200))
    await t.start()
    await t.declare("a", ["put.text"])
    put = t.putter("put.text", Text)
    assert put is not None
    assert put(_env(Text(s="short")))
    with pytest.raises(surge.MessageTooLarge):
        put(_env(Text(s="x" * 300)))
    assert (await t.stats("a")).backlog == 1


class _Counting(MemoryTransport):
    puts = 0

    def put_one(self, env: Envelope) -> bool:
        self.puts += 1
        return super().put_one(env)


async def test_a_subclass_overriding_put_one_gets_no_putter(clock: surge.Clock) -> None:
    """A subclass's own put_one sees every put: it gets no putter, and an
    app on it publishes through that put_one."""
    t = _Counting(clock=clock)
    app = surge.App("p", clock=clock, transport=t)
    got: list[int] = []

    @app.on(Small)
    async def handle(ev: Small) -> None:
        got.append(ev.n)

    async with app:
        assert t.putter("put.small", Small) is None
        for i in range(3):
            await app.publish(Small(n=i))
        app.publish_nowait(Small(n=3))
        await app.drain()
    assert got == [0, 1, 2, 3]
    assert t.puts == 4


async def _settle_loop() -> None:
    """Let every callback that is ready run (a consumer that was woken)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_put_does_not_wake_a_consumer_without_room(clock: surge.Clock) -> None:
    """A consumer whose whole prefetch is unsettled waits for room: puts
    leave it asleep; the ack that makes room wakes it, and it takes them."""
    t = MemoryTransport(clock=clock)
    await t.start()
    await t.declare("a", ["put.small"])
    put = t.putter("put.small", Small)
    assert put is not None
    reader = Reader(t, "a", prefetch=1)
    assert put(_env(Small(n=1)))
    [first] = await reader.take(1)
    pending = reader.start()._pending()
    await _settle_loop()
    woken = 0

    def count(_: object) -> None:
        nonlocal woken
        woken += 1

    [waiting] = t._groups["a"].roomless  # the reader waits for room
    waiting.add_done_callback(count)
    for i in range(2, 5):
        assert put(_env(Small(n=i)))
    await _settle_loop()
    assert woken == 0
    assert not pending.done()
    await t.ack([first])
    got = await reader.take(1)
    assert woken == 1
    assert [d.envelope.event for d in got] == [Small(n=2)]


async def test_a_nack_makes_room_for_a_waiting_consumer(clock: surge.Clock) -> None:
    """A nack with a long delay frees its prefetch slot at once: the
    consumer waiting for room takes the next envelope without waiting for
    the retry."""
    t = MemoryTransport(clock=clock)
    await t.start()
    await t.declare("a", ["put.small"])
    reader = Reader(t, "a", prefetch=1)
    await t.publish([_env(Small(n=1))])
    [first] = await reader.take(1)
    reader.start()
    await _settle_loop()
    await t.publish([_env(Small(n=2))])
    await _settle_loop()  # the consumer saw the put and still has no room
    await t.nack(first, 3600.0)
    [second] = await reader.take(1, timeout=5.0)
    assert second.envelope.event == Small(n=2)
    await t.ack([second])
