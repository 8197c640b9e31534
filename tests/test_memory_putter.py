"""memory://'s putters (TopicPut): ``put_one`` made once per topic and type."""

from __future__ import annotations

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
