"""The RabbitMQ transport beyond the conformance suite: what only it does."""

from __future__ import annotations

import aiormq
import pytest

import surge
from surge.transports import open_transport

from ._servers import shared_amqp_url
from .conformance._helpers import Item, Reader, env, number

pytestmark = pytest.mark.realtime


def _prefix(url: str) -> str:
    return url.split("prefix=", 1)[1]


async def test_bytes_published_straight_to_a_queue_are_dead_lettered() -> None:
    """A message that is not an envelope is dead-lettered on its first delivery, with why."""
    url = shared_amqp_url()
    app = surge.App("poison", transport=open_transport(url))
    seen: list[int] = []

    @app.on(Item)
    async def handle(ev: Item) -> None:
        seen.append(ev.n)

    async with app:
        conn = await aiormq.connect(url.split("?")[0])
        ch = await conn.channel(publisher_confirms=True)
        (group,) = app.subscriptions
        queue = f"{_prefix(url)}.g.{group}"
        await ch.basic_publish(b"\x00not an envelope", routing_key=queue)
        await conn.close()
        await app.publish(Item(n=1))
        await app.drain()
        dead = await app.dead_letters()
        assert len(dead) == 1
        assert dead[0].error_type == "DecodeError"
        assert dead[0].attempts == 1
        assert dead[0].body == b"\x00not an envelope"
    assert seen == [1]


async def test_deliveries_of_a_closed_consumer_go_to_the_next() -> None:
    """What a consumer held unsettled when its channel closed is delivered again, attempt 2."""
    url = shared_amqp_url()
    first = open_transport(url, close_timeout=0.1)
    await first.start()
    await first.declare("g", ["conf.item"])
    await first.publish([env(1), env(2)])
    r1 = Reader(first, "g")
    held = await r1.take(2)
    assert [d.attempt for d in held] == [1, 1]
    await first.close()  # as if the process died: nothing settled
    second = open_transport(url)
    await second.start()
    try:
        await second.declare("g", ["conf.item"])
        r2 = Reader(second, "g")
        again = await r2.take(2)
        assert sorted(number(d) for d in again) == [1, 2]
        assert [d.attempt for d in again] == [2, 2]
        await second.ack(again)
        assert await r2.quiet(0.5)
        await r2.aclose()
    finally:
        await second.close()


async def test_state_is_the_last_value_saved() -> None:
    """Trigger state: load gives the last saved value, to another transport too."""
    url = shared_amqp_url()
    a, b = open_transport(url), open_transport(url)
    await a.start()
    await b.start()
    try:
        assert await a.load_state("trigger:x") is None  # type: ignore[attr-defined]
        await a.save_state("trigger:x", b"1.0")  # type: ignore[attr-defined]
        await a.save_state("trigger:x", b"2.0")  # type: ignore[attr-defined]
        assert await b.load_state("trigger:x") == b"2.0"  # type: ignore[attr-defined]
        assert await b.load_state("trigger:x") == b"2.0"  # type: ignore[attr-defined]
    finally:
        await a.close()
        await b.close()


def test_bad_options_are_configuration_errors() -> None:
    """Options that cannot work are refused when the transport is made."""
    with pytest.raises(surge.ConfigurationError):
        open_transport("amqp://127.0.0.1/?partitions=x")
    with pytest.raises(surge.ConfigurationError):
        open_transport("amqp://127.0.0.1/?prefix=a b")


async def test_unreachable_broker_is_a_transport_error() -> None:
    """Starting against a port where nothing listens fails with TransportError."""
    from ._servers import free_port

    t = open_transport(f"amqp://guest:guest@127.0.0.1:{free_port()}/", connect_timeout=2.0)
    with pytest.raises(surge.TransportError):
        await t.start()
