"""The same promises, kept through an App: what handler code relies on."""

from __future__ import annotations

import surge
from surge._event import Envelope, derive_id

from ._helpers import Item, env
from .conftest import Factory


class Placed(surge.Event):
    __topic__ = "orders.placed"
    n: int


class Shipped(surge.Event):
    __topic__ = "orders.eu.shipped"
    n: int


async def test_publish_and_handle_each_once(transport_factory: Factory) -> None:
    """Every published event is handled exactly once by each subscription."""
    app = transport_factory.app()
    seen: list[int] = []
    seen_b: list[int] = []

    @app.on(Item)
    async def handle(ev: Item) -> None:
        seen.append(ev.n)

    @app.on(Item)
    def other(ev: Item) -> None:
        seen_b.append(ev.n)

    async with app:
        for i in range(50):
            await app.publish(Item(n=i))
        await app.drain()
    assert sorted(seen) == list(range(50))
    assert sorted(seen_b) == list(range(50))


async def test_patterns_and_derived_outputs(transport_factory: Factory) -> None:
    """Pattern subscriptions see matching topics; a handler's outputs are delivered."""
    app = transport_factory.app()
    star: list[str] = []
    rest: list[str] = []

    @app.on("orders.*", name="star")
    async def on_star(ev: surge.Event, ctx: surge.Context) -> None:
        star.append(ctx.topic)

    @app.on("orders.>", name="rest")
    async def on_rest(ev: surge.Event, ctx: surge.Context) -> None:
        rest.append(ctx.topic)

    @app.on(Placed)
    async def ship(ev: Placed) -> Shipped:
        return Shipped(n=ev.n)

    async with app:
        await app.publish(Placed(n=1))
        await app.drain()
    assert star == ["orders.placed"]
    assert sorted(rest) == ["orders.eu.shipped", "orders.placed"]


async def test_retry_then_success(transport_factory: Factory, clock: surge.Clock) -> None:
    """A handler that asks to retry runs again, attempt 2, no sooner than asked."""
    app = transport_factory.app()
    attempts: list[tuple[int, float]] = []

    @app.on(Item, retry=surge.Retry(attempts=3, backoff=0.1))
    async def flaky(ev: Item, ctx: surge.Context) -> None:
        attempts.append((ctx.attempt, clock.time()))
        if ctx.attempt == 1:
            raise surge.RetryLater(0.4)

    async with app:
        await app.publish(Item(n=1))
        await app.drain()
        assert await app.dead_letters() == []
    assert [a for a, _ in attempts] == [1, 2]
    assert attempts[1][1] - attempts[0][1] >= 0.4


async def test_malformed_body_is_dead_lettered(transport_factory: Factory) -> None:
    """A body that does not decode goes to the dead letters with DecodeError, unretried."""
    app = transport_factory.app()
    calls: list[Item] = []

    @app.on(Item, retry=surge.Retry(attempts=5))
    async def handle(ev: Item) -> None:
        calls.append(ev)

    async with app:
        bad = env(0)
        bad.body = b"\xc1 not msgpack"
        await app.transport.publish([bad])
        await app.publish(Item(n=2))
        await app.drain()
        dead = await app.dead_letters(handle)
        assert [d.id for d in dead] == [bad.id]
        assert dead[0].error_type == "DecodeError"
        assert dead[0].attempts == 1
        assert dead[0].body == b"\xc1 not msgpack"
        assert calls == [Item(n=2)]
        assert await app.purge(handle) == 1


async def test_dead_letter_and_replay(transport_factory: Factory) -> None:
    """A handler that keeps failing is dead-lettered; replay runs it again."""
    app = transport_factory.app()
    ok = False
    runs: list[int] = []

    @app.on(Item, retry=surge.Retry(attempts=2, backoff=0.05, jitter=0))
    async def handle(ev: Item) -> None:
        runs.append(ev.n)
        if not ok:
            raise ValueError("not yet")

    async with app:
        await app.publish(Item(n=3))
        await app.drain()
        dead = await app.dead_letters(handle)
        assert len(dead) == 1
        assert (dead[0].error_type, dead[0].error, dead[0].attempts) == ("ValueError", "not yet", 2)
        ok = True
        assert await app.replay(handle) == 1
        await app.drain()
        assert await app.dead_letters(handle) == []
    assert runs == [3, 3, 3]


async def test_delayed_publish(transport_factory: Factory, clock: surge.Clock) -> None:
    """``publish(delay=)`` is handled no sooner than the delay."""
    app = transport_factory.app()
    handled: list[float] = []

    @app.on(Item)
    async def handle(ev: Item) -> None:
        handled.append(clock.time())

    async with app:
        sent = clock.time()
        await app.publish(Item(n=1), delay=0.5)
        await app.drain()
    assert len(handled) == 1
    assert handled[0] >= sent + 0.5


async def test_request_reply(transport_factory: Factory) -> None:
    """A request gets the reply its handler returns, through the transport."""
    app = transport_factory.app()

    @app.on(Placed)
    async def ship(ev: Placed) -> Shipped:
        return Shipped(n=ev.n * 2)

    async with app:
        reply = await app.request(Placed(n=21), expect=Shipped, timeout=5)
    assert reply == Shipped(n=42)


async def test_redelivered_handler_outputs_once(transport_factory: Factory) -> None:
    """A handler run twice republishes the same derived ids, so downstream sees each once."""
    app = transport_factory.app()
    tries: dict[int, int] = {}
    downstream: list[int] = []

    @app.on(Placed, retry=surge.Retry(attempts=3, backoff=0.01, jitter=0))
    async def crash_after_output(ev: Placed, ctx: surge.Context) -> Shipped:
        tries[ev.n] = tries.get(ev.n, 0) + 1
        out = Shipped(n=ev.n)
        if tries[ev.n] == 1:
            # as if the process died after publishing its output, before the ack
            child = Envelope(derive_id(ctx.id, 0), out.__topic__, None, 0.0, None, out)
            await app.transport.publish([child])
            raise RuntimeError("crashed after publishing")
        return out

    @app.on(Shipped)
    async def count(ev: Shipped) -> None:
        downstream.append(ev.n)

    async with app:
        for i in range(20):
            await app.publish(Placed(n=i))
        await app.drain()
    assert all(t == 2 for t in tries.values())
    assert sorted(downstream) == list(range(20))
