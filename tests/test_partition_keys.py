"""The app gives the transport the key to partition by (per-key order across
processes): the publisher's ``key=``, or the key of the app's keyed
subscription of the event's topic."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

import surge
from surge._event import Envelope
from surge.transports import MemoryTransport


class Placed(surge.Event):
    __topic__ = "keys.placed"
    order_id: int


class Shipped(surge.Event):
    __topic__ = "keys.shipped"
    order_id: int


class Note(surge.Event):
    __topic__ = "keys.note"
    text: str


class Partitioned(MemoryTransport):
    """A memory transport that says it partitions, and records what it got."""

    partitions = 4
    durable = True  # no put_one fast path: every publish goes through publish()

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Envelope] = []

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.seen.extend(envelopes)
        await super().publish(envelopes)

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        self.seen.extend(envelopes)
        super().publish_nowait(envelopes)


async def test_keys_come_from_the_keyed_subscription_of_the_topic() -> None:
    transport = Partitioned()
    app = surge.App("keys", transport=transport)

    @app.on(Placed, key="order_id")
    async def ship(ev: Placed) -> Shipped:
        return Shipped(order_id=ev.order_id)

    @app.on(Shipped, key=lambda e: f"o-{e.order_id}")
    async def shipped(ev: Shipped) -> None:
        pass

    @app.on(Note)
    async def note(ev: Note) -> None:
        pass

    async with app:
        await app.publish(Placed(order_id=7))
        await app.publish(Placed(order_id=8), key="explicit")
        app.publish_nowait(Placed(order_id=9))
        await app.publish(Note(text="unkeyed"))
        await app.drain()
    keys = {(e.topic, e.event.order_id if e.topic != Note.__topic__ else None): e.key
            for e in transport.seen}  # fmt: skip
    assert keys == {
        ("keys.placed", 7): "7",
        ("keys.placed", 8): "explicit",
        ("keys.placed", 9): "9",
        ("keys.shipped", 7): "o-7",  # a handler's output, keyed by its own topic
        ("keys.shipped", 8): "o-8",
        ("keys.shipped", 9): "o-9",
        ("keys.note", None): None,
    }


async def test_no_keys_on_a_transport_without_partitions() -> None:
    transport = Partitioned()
    transport.partitions = 0
    app = surge.App("keys", transport=transport)

    @app.on(Placed, key="order_id")
    async def ship(ev: Placed) -> None:
        pass

    async with app:
        await app.publish(Placed(order_id=7))
        await app.drain()
    assert [e.key for e in transport.seen] == [None]


async def test_two_keys_for_one_topic_warn(caplog: pytest.LogCaptureFixture) -> None:
    app = surge.App("keys", transport=Partitioned())

    @app.on(Placed, key="order_id")
    async def one(ev: Placed) -> None:
        pass

    @app.on(Placed, key=lambda e: e.order_id % 10)
    async def two(ev: Placed) -> None:
        pass

    with caplog.at_level(logging.WARNING, logger="surge"):
        async with app:
            pass
    assert any("2 keyed subscriptions with different keys" in r.message for r in caplog.records)


class Paid(surge.Event):
    __topic__ = "keys.paid"
    __key__ = "order_id"
    order_id: int


async def test_an_event_type_names_its_key_for_publishers_that_do_not_subscribe() -> None:
    """A process that only publishes (a web front) keys events by the type's
    ``__key__``, so the workers' partitions still see one key per order."""
    transport = Partitioned()
    front = surge.App("front", transport=transport)  # no subscriptions at all
    async with front:
        await front.publish(Paid(order_id=41))
        front.publish_nowait(Paid(order_id=42))
        await front.publish(Paid(order_id=43), key="explicit")
    assert [e.key for e in transport.seen] == ["41", "42", "explicit"]


def test_a_subscription_defaults_to_the_event_types_key() -> None:
    app = surge.App("keys")

    @app.on(Paid)
    async def charge(ev: Paid) -> None:
        pass

    @app.on(Paid, Placed, name="both")
    async def both(ev: Paid | Placed) -> None:
        pass

    key = app.subscriptions["keys.charge"].key
    assert key is not None
    assert key(Paid(order_id=5)) == 5
    assert app.subscriptions["keys.both"].key is None  # the types disagree


class Broken(surge.Event):
    __topic__ = "keys.broken"
    __key__ = "no_such_field"  # a typo: reading it raises AttributeError
    order_id: int


def _bad_key(ev: Placed) -> int:
    raise ZeroDivisionError("bad key")


async def test_a_failing_key_raises_at_publish_and_publishes_nothing() -> None:
    """A key function or ``__key__`` read that raises is a ``KeyFailed`` naming
    the type and the error, on publish and publish_nowait; nothing goes out."""
    transport = Partitioned()
    app = surge.App("keys", transport=transport)

    @app.on(Placed, key=_bad_key)
    async def ship(ev: Placed) -> None:
        pass

    async with app:
        with pytest.raises(surge.KeyFailed, match=r"Placed \(keys.placed\).*bad key") as info:
            await app.publish(Placed(order_id=1))
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        assert info.value.topic == "keys.placed"
        with pytest.raises(surge.KeyFailed, match="bad key"):
            app.publish_nowait(Placed(order_id=2))
        with pytest.raises(surge.KeyFailed, match=r"field 'no_such_field'.*AttributeError"):
            await app.publish(Broken(order_id=3))
        with pytest.raises(surge.KeyFailed):
            app.publish_nowait(Broken(order_id=4))
    assert transport.seen == []


async def test_a_handler_output_with_a_failing_key_fails_the_attempt() -> None:
    """A handler whose output's key fails has failed: its retry policy runs and
    the event is dead-lettered with ``KeyFailed``; the output is not published."""
    transport = Partitioned()
    app = surge.App("keys", transport=transport, retry=surge.Retry(attempts=2, backoff=0))
    runs: list[int] = []

    @app.on(Shipped)
    async def emit(ev: Shipped) -> Broken:
        runs.append(ev.order_id)
        return Broken(order_id=ev.order_id)

    async with app:
        await app.publish(Shipped(order_id=9))
        await app.drain()
        dead = await app.dead_letters()
    assert runs == [9, 9]
    assert [(d.group, d.error_type, d.attempts) for d in dead] == [("keys.emit", "KeyFailed", 2)]
    assert "no_such_field" in dead[0].error
    assert [e.topic for e in transport.seen] == ["keys.shipped"]


async def test_a_key_function_that_raises_at_consume_dead_letters_that_event() -> None:
    """A subscription's key function that raises on a delivered event (one
    published with an explicit key, or by another app) dead-letters that event
    as KeyFailed once its retries are spent; the consumer keeps going."""
    app = surge.App("keys")
    handled: list[int] = []

    def key(ev: Placed) -> int:
        return 100 // ev.order_id  # raises on order 0

    @app.on(Placed, key=key, retry=surge.Retry(attempts=2, backoff=0.1))
    async def ship(ev: Placed) -> None:
        handled.append(ev.order_id)

    async with app:
        for i in (1, 0, 2):
            await app.publish(Placed(order_id=i))
        await app.drain()
        dead = await app.dead_letters()
    assert sorted(handled) == [1, 2]
    assert [(d.error_type, d.attempts) for d in dead] == [("KeyFailed", 2)]
    assert "ZeroDivisionError" in dead[0].error
