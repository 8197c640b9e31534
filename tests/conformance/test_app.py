"""The same promises, kept through an App: what handler code relies on.

Every test runs twice: on a bare app and on one with a middleware, which
must see every hook pair and change nothing the handlers see (the dispatch
fast paths keep running with hooks). Tests wait on what their handlers
report (a :class:`Countdown`), so they apply to transports that cannot say
when they are idle; on one that can, they also drain, so a late extra
delivery would show.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

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


class Hooks(surge.Middleware):
    """Counts every hook call, for the apps it was added to."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.apps: list[surge.App] = []

    def before_publish(self, envelope: Envelope) -> None:
        self.calls["before_publish"] += 1

    def after_publish(self, envelope: Envelope) -> None:
        self.calls["after_publish"] += 1

    def before_handle(self, ctx: surge.Context) -> None:
        self.calls["before_handle"] += 1

    def after_handle(self, ctx: surge.Context, result: Any) -> None:
        self.calls["after_handle"] += 1

    def on_error(self, ctx: surge.Context, exc: BaseException) -> None:
        self.calls["on_error"] += 1


@pytest.fixture(params=["bare", "middleware"])
def hooks(request: pytest.FixtureRequest) -> Iterator[Hooks | None]:
    """None, or the middleware every app of the test gets; its hooks pair up."""
    if request.param == "bare":
        yield None
        return
    mw = Hooks()
    yield mw
    if all(app.state == "new" for app in mw.apps):
        return  # skipped before its app ran
    c = mw.calls
    assert c["before_publish"] == c["after_publish"] > 0
    # on_error also follows an event that failed to decode, before any handler
    assert c["after_handle"] > 0
    assert c["after_handle"] + c["on_error"] >= c["before_handle"]


def make_app(factory: Factory, hooks: Hooks | None, **options: Any) -> surge.App:
    app = factory.app(**options)
    if hooks is not None:
        app.add_middleware(hooks)
        hooks.apps.append(app)
    return app


class Countdown:
    """Set once ``n`` things were counted."""

    def __init__(self, n: int) -> None:
        self.left = n
        self._done = asyncio.Event()

    def tick(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self._done.set()

    async def wait(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            await self._done.wait()


async def settle(app: surge.App, *countdowns: Countdown) -> None:
    """Wait for ``countdowns``; then, if the transport can tell, drain."""
    for c in countdowns:
        await c.wait()
    if app.capabilities.idle is not None:
        await app.drain()


def needs_idle(app: surge.App) -> None:
    if surge.capabilities_of(app.transport).idle is None:
        pytest.skip(f"{app.transport.url}: drain() needs IdleAware, which it does not have")


async def test_publish_and_handle_each_once(
    transport_factory: Factory, hooks: Hooks | None
) -> None:
    """Every published event is handled exactly once by each subscription."""
    app = make_app(transport_factory, hooks)
    seen: list[int] = []
    seen_b: list[int] = []
    done = Countdown(100)

    @app.on(Item)
    async def handle(ev: Item) -> None:
        seen.append(ev.n)
        done.tick()

    @app.on(Item, executor="inline")
    def other(ev: Item) -> None:
        seen_b.append(ev.n)
        done.tick()

    async with app:
        for i in range(50):
            await app.publish(Item(n=i))
        await settle(app, done)
    assert sorted(seen) == list(range(50))
    assert sorted(seen_b) == list(range(50))


async def test_sync_handlers_run_in_threads(
    transport_factory: Factory, hooks: Hooks | None
) -> None:
    """A plain function runs off the loop, and what it returns is published."""
    app = make_app(transport_factory, hooks)
    shipped: list[int] = []
    done = Countdown(10)

    @app.on(Placed)
    def ship(ev: Placed) -> Shipped:
        return Shipped(n=ev.n)

    @app.on(Shipped)
    async def count(ev: Shipped) -> None:
        shipped.append(ev.n)
        done.tick()

    async with app:
        for i in range(10):
            app.publish_nowait(Placed(n=i))
        await settle(app, done)
    assert sorted(shipped) == list(range(10))


async def test_patterns_and_derived_outputs(
    transport_factory: Factory, hooks: Hooks | None
) -> None:
    """Pattern subscriptions see matching topics; a handler's outputs are delivered."""
    app = make_app(transport_factory, hooks)
    star: list[str] = []
    rest: list[str] = []
    done = Countdown(3)

    @app.on("orders.*", name="star")
    async def on_star(ev: surge.Event, ctx: surge.Context) -> None:
        star.append(ctx.topic)
        done.tick()

    @app.on("orders.>", name="rest")
    async def on_rest(ev: surge.Event, ctx: surge.Context) -> None:
        rest.append(ctx.topic)
        done.tick()

    @app.on(Placed)
    async def ship(ev: Placed) -> Shipped:
        return Shipped(n=ev.n)

    async with app:
        await app.publish(Placed(n=1))
        await settle(app, done)
    assert star == ["orders.placed"]
    assert sorted(rest) == ["orders.eu.shipped", "orders.placed"]


async def test_retry_then_success(
    transport_factory: Factory, clock: surge.Clock, hooks: Hooks | None
) -> None:
    """A handler that asks to retry runs again, attempt 2, no sooner than asked."""
    app = make_app(transport_factory, hooks)
    attempts: list[tuple[int, float]] = []
    done = Countdown(1)

    @app.on(Item, retry=surge.Retry(attempts=3, backoff=0.1))
    async def flaky(ev: Item, ctx: surge.Context) -> None:
        attempts.append((ctx.attempt, clock.time()))
        if ctx.attempt == 1:
            raise surge.RetryLater(0.4)
        done.tick()

    async with app:
        await app.publish(Item(n=1))
        await settle(app, done)
    assert [a for a, _ in attempts] == [1, 2]
    assert attempts[1][1] - attempts[0][1] >= 0.4


async def test_malformed_body_is_dead_lettered(
    transport_factory: Factory, hooks: Hooks | None
) -> None:
    """A body that does not decode goes to the dead letters with DecodeError, unretried."""
    app = make_app(transport_factory, hooks)
    calls: list[Item] = []

    @app.on(Item, retry=surge.Retry(attempts=5))
    async def handle(ev: Item) -> None:
        calls.append(ev)

    needs_idle(app)
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


async def test_dead_letter_and_replay(transport_factory: Factory, hooks: Hooks | None) -> None:
    """A handler that keeps failing is dead-lettered; replay runs it again."""
    app = make_app(transport_factory, hooks)
    ok = False
    runs: list[int] = []

    @app.on(Item, retry=surge.Retry(attempts=2, backoff=0.05, jitter=0))
    async def handle(ev: Item) -> None:
        runs.append(ev.n)
        if not ok:
            raise ValueError("not yet")

    needs_idle(app)
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


async def test_delayed_publish(
    transport_factory: Factory, clock: surge.Clock, hooks: Hooks | None
) -> None:
    """``publish(delay=)`` is handled no sooner than the delay."""
    app = make_app(transport_factory, hooks)
    handled: list[float] = []
    done = Countdown(1)

    @app.on(Item)
    async def handle(ev: Item) -> None:
        handled.append(clock.time())
        done.tick()

    async with app:
        sent = clock.time()
        await app.publish(Item(n=1), delay=0.5)
        await settle(app, done)
    assert len(handled) == 1
    assert handled[0] >= sent + 0.5


async def test_request_reply(transport_factory: Factory, hooks: Hooks | None) -> None:
    """A request gets the reply its handler returns, through the transport."""
    app = make_app(transport_factory, hooks)

    @app.on(Placed)
    async def ship(ev: Placed) -> Shipped:
        return Shipped(n=ev.n * 2)

    async with app:
        reply = await app.request(Placed(n=21), expect=Shipped, timeout=5)
    assert reply == Shipped(n=42)


class Note(surge.Event):
    __topic__ = "conf.note"
    text: str


async def test_oversized_event_is_refused_at_publish(transport_factory: Factory) -> None:
    """An event over the codec's limit raises MessageTooLarge from publish, publish_nowait
    and request, and fails the attempt of a handler that returns one (dead-lettered with
    the reason); nothing oversized is handled."""
    codec = surge.MsgpackCodec(max_message_size=4096)
    app = make_app(transport_factory, None, codec=codec)
    notes: list[int] = []
    done = Countdown(2)

    @app.on(Item, retry=surge.Retry(attempts=1))
    async def expand(ev: Item) -> Note:
        done.tick()
        return Note(text="x" * ev.n)

    @app.on(Note)
    async def read(ev: Note) -> None:
        notes.append(len(ev.text))
        done.tick()

    async with app:
        big = Note(text="x" * 4096)
        with pytest.raises(surge.MessageTooLarge, match="the limit is 4096"):
            await app.publish(big)
        with pytest.raises(surge.MessageTooLarge, match="the limit is 4096"):
            app.publish_nowait(big)
        with pytest.raises(surge.MessageTooLarge, match="the limit is 4096"):
            await app.request(big, expect=Note, timeout=5)
        await app.publish(Item(n=8192))
        await app.publish(Note(text="fits"))
        await settle(app, done)
        [letter] = await app.dead_letters()
    assert notes == [4]
    assert letter.error_type == "MessageTooLarge"
    assert "the limit is 4096" in letter.error


async def test_redelivered_handler_outputs_once(
    transport_factory: Factory, hooks: Hooks | None
) -> None:
    """A handler run twice republishes the same derived ids, so downstream sees each once."""
    app = make_app(transport_factory, hooks)
    tries: dict[int, int] = {}
    downstream: list[int] = []
    retried = Countdown(20)
    done = Countdown(20)

    @app.on(Placed, retry=surge.Retry(attempts=3, backoff=0.01, jitter=0))
    async def crash_after_output(ev: Placed, ctx: surge.Context) -> Shipped:
        tries[ev.n] = tries.get(ev.n, 0) + 1
        out = Shipped(n=ev.n)
        if tries[ev.n] == 1:
            # as if the process died after publishing its output, before the ack
            child = Envelope(derive_id(ctx.id, 0), out.__topic__, None, 0.0, None, out)
            await app.transport.publish([child])
            raise RuntimeError("crashed after publishing")
        retried.tick()
        return out

    @app.on(Shipped)
    async def count(ev: Shipped) -> None:
        downstream.append(ev.n)
        done.tick()

    async with app:
        for i in range(20):
            await app.publish(Placed(n=i))
        # each retry's output is a duplicate, dropped by the transport
        await settle(app, retried, done)
    assert all(t == 2 for t in tries.values())
    assert sorted(downstream) == list(range(20))


async def test_batch_handler_and_publish_many(transport_factory: Factory) -> None:
    """``publish_many`` reaches a ``batch=`` handler as lists of at most its size,
    each event once; what a batch returns is published once; middleware sees a
    hook pair per event."""
    hooks = Hooks()
    app = make_app(transport_factory, hooks)
    sizes: list[int] = []
    seen: list[int] = []
    shipped: list[int] = []
    done = Countdown(60)

    @app.on(Placed, batch=16, linger=0.05)
    async def ship(events: list[Placed]) -> list[Shipped]:
        sizes.append(len(events))
        seen.extend(ev.n for ev in events)
        return [Shipped(n=ev.n) for ev in events]

    @app.on(Shipped, batch=7, executor="inline")
    def count(events: list[Shipped]) -> None:
        shipped.extend(ev.n for ev in events)
        for _ in events:
            done.tick()

    async with app:
        ids = await app.publish_many([Placed(n=i) for i in range(60)])
        await settle(app, done)
    assert len(set(ids)) == 60
    assert sorted(seen) == list(range(60))
    assert max(sizes) <= 16
    assert sorted(shipped) == list(range(60))
    assert hooks.calls["before_publish"] == hooks.calls["after_publish"] == 120
    assert hooks.calls["before_handle"] == hooks.calls["after_handle"] == 120


async def test_batch_failure_fails_its_events_and_batch_failed_only_those_named(
    transport_factory: Factory,
) -> None:
    """A batch handler that raises fails every event of its batch (each retried
    on its own); ``BatchFailed`` fails only the positions it names, and one that
    keeps failing is dead-lettered alone."""
    app = make_app(transport_factory, None)
    runs: Counter[int] = Counter()
    ok: Counter[int] = Counter()
    done = Countdown(20)
    dead = Countdown(1)

    class OnError(surge.Middleware):
        def on_error(self, ctx: surge.Context, exc: BaseException) -> None:
            if isinstance(exc, KeyError) and ctx.attempt == 2:
                dead.tick()

    app.add_middleware(OnError())

    @app.on(Item, batch=8, retry=surge.Retry(attempts=2, backoff=0.01, jitter=0))
    async def handle(events: list[Item]) -> None:
        for ev in events:
            runs[ev.n] += 1
        if any(ev.n == 0 and runs[0] == 1 for ev in events):
            raise RuntimeError("the batch with 0 in it fails once, as a whole")
        failures: dict[int, BaseException] = {}
        for i, ev in enumerate(events):
            if ev.n == 13:
                failures[i] = KeyError("13 always fails")
            elif ev.n % 5 == 1 and runs[ev.n] == 1:
                failures[i] = ValueError("fails its first run")
            else:
                ok[ev.n] += 1
                done.tick()
        if failures:
            raise surge.BatchFailed(failures)

    async with app:
        await app.publish_many([Item(n=i) for i in range(21)])
        await settle(app, done, dead)
        letters = await app.dead_letters(handle) if app.capabilities.idle else None
    assert ok == Counter(n for n in range(21) if n != 13)
    assert runs[0] == runs[13] == 2
    assert all(runs[n] == 2 for n in range(21) if n % 5 == 1)
    assert all(runs[n] in (1, 2) for n in range(21))
    if letters is not None:
        assert [(d.error_type, d.attempts) for d in letters] == [("KeyError", 2)]


async def test_a_publish_retried_under_one_id_is_handled_once(transport_factory: Factory) -> None:
    """publish(id=id_for(key)) sent again (a client's retry) is dropped by the
    transport: one handled event per key, under the id the caller gave."""
    app = make_app(transport_factory, None)
    handled: Counter[str] = Counter()
    done = Countdown(10)

    @app.on(Placed)
    async def take(ev: Placed, ctx: surge.Context) -> None:
        handled[ctx.id] += 1
        done.tick()

    ids = [surge.id_for(f"conformance:{i}") for i in range(10)]
    async with app:
        for i, event_id in enumerate(ids):
            assert await app.publish(Placed(n=i), id=event_id) == event_id
        for i, event_id in enumerate(ids):
            assert await app.publish(Placed(n=i), id=event_id) == event_id
            assert app.publish_nowait(Placed(n=i), id=event_id) == event_id
        await settle(app, done)
    assert handled == dict.fromkeys(ids, 1)
