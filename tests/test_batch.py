"""Batch handlers (``app.on(..., batch=n, linger=s)``), ``publish_many``, and
process handlers fed in chunks. The per-transport promises are in
tests/conformance/test_app.py; these pin down timing and options."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

import surge

from . import handlers_proc


class Ping(surge.Event):
    n: int


async def test_linger_waits_for_a_full_batch_then_calls_with_what_came(
    clock: surge.VirtualClock,
) -> None:
    """A partial batch waits ``linger`` seconds; a full one is handled at once."""
    app = surge.App("t", clock=clock)
    calls: list[tuple[float, list[int]]] = []

    @app.on(Ping, batch=4, linger=0.5)
    async def handle(events: list[Ping]) -> None:
        calls.append((clock.time(), [ev.n for ev in events]))

    async with app:
        t0 = clock.time()
        await app.publish_many([Ping(n=0), Ping(n=1)])
        await app.drain()
        t1 = clock.time()
        await app.publish_many([Ping(n=i) for i in range(2, 10)])
        await app.drain()
    assert calls[0][0] == pytest.approx(t0 + 0.5)
    assert calls[0][1] == [0, 1]
    assert calls[1:] == [(t1, [2, 3, 4, 5]), (t1, [6, 7, 8, 9])]


async def test_without_linger_a_batch_holds_what_is_there(clock: surge.VirtualClock) -> None:
    """``batch`` without ``linger`` takes what waits, at once, up to the size."""
    app = surge.App("t", clock=clock)
    sizes: list[int] = []

    @app.on(Ping, batch=100, executor="inline", concurrency=1)
    def handle(events: list[Ping]) -> None:
        sizes.append(len(events))

    async with app:
        t0 = clock.time()
        await app.publish(Ping(n=0))
        await app.drain()
        assert clock.time() == t0
        await app.publish_many([Ping(n=i) for i in range(250)])
        await app.drain()
    assert sizes[0] == 1
    assert sum(sizes) == 251
    assert max(sizes) == 100


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch": 0}, "batch must be at least 1"),
        ({"linger": 0.1}, "linger= needs batch="),
        ({"batch": 10, "linger": -1}, "linger= needs batch="),
        ({"batch": 10, "prefetch": 5}, "could never fill"),
    ],
)
def test_batch_options_that_cannot_work(options: dict[str, Any], message: str) -> None:
    """Impossible batch options are refused when subscribing, saying why."""
    app = surge.App("t")
    with pytest.raises(surge.ConfigurationError, match=message):

        @app.on(Ping, **options)
        async def handle(events: list[Ping]) -> None: ...


def test_a_batch_handler_takes_no_context() -> None:
    """A batch handler takes the list only: one Context cannot stand for many events."""
    app = surge.App("t")
    with pytest.raises(surge.ConfigurationError, match="takes \\(events\\) only"):

        @app.on(Ping, batch=10)
        async def handle(events: list[Ping], ctx: surge.Context) -> None: ...


async def test_batch_failed_naming_a_position_outside_the_batch_fails_it_all(
    clock: surge.VirtualClock,
) -> None:
    """A ``BatchFailed`` that names no position of the batch is a bug in the
    handler: every event of the batch fails with a TypeError saying so."""
    app = surge.App("t", clock=clock)

    @app.on(Ping, batch=5, retry=surge.Retry(attempts=1))
    async def handle(events: list[Ping]) -> None:
        raise surge.BatchFailed({7: ValueError("no such position")})

    async with app:
        await app.publish_many([Ping(n=i) for i in range(3)])
        await app.drain()
        dead = await app.dead_letters(handle)
    assert [d.error_type for d in dead] == ["TypeError"] * 3
    assert "positions [7]" in dead[0].error


async def test_publish_many_outside_a_running_app_raises() -> None:
    """``publish_many`` on an app that is not running raises Closed."""
    with pytest.raises(surge.Closed):
        await surge.App("t").publish_many([Ping(n=1)])


async def test_process_handlers_in_chunks_fail_and_succeed_per_event() -> None:
    """Events of a per-event process handler cross in chunks, yet each succeeds,
    is retried or is dead-lettered on its own; a batch handler runs in a
    process too."""
    app = surge.App("t", processes=1)
    got: Counter[int] = Counter()
    app.on(Ping, executor="process", retry=surge.Retry(attempts=2, backoff=0.001, jitter=0))(
        handlers_proc.square_or_fail
    )
    app.on(Ping, executor="process", batch=50, name="batched")(handlers_proc.square_all)

    @app.on(handlers_proc.Squared, executor="inline")
    def squared(ev: handlers_proc.Squared) -> None:
        got[ev.value] += 1

    async with app:
        await app.publish_many([Ping(n=i) for i in range(70)])
        await app.drain()
        dead = await app.dead_letters(handlers_proc.square_or_fail)
        batched = await app.dead_letters("batched")
    sevens = [n for n in range(70) if n % 7 == 0]
    assert sorted(d.error_type for d in dead) == ["ValueError"] * len(sevens)
    assert all(d.attempts == 2 for d in dead)
    assert batched == []
    expected = Counter({n * n: 1 if n % 7 == 0 else 2 for n in range(70)})
    assert got == expected


async def test_a_stop_does_not_wait_out_a_lingering_batch(clock: surge.VirtualClock) -> None:
    """A partial batch lingering when the app stops is handed back at once,
    unhandled, rather than holding the stop for its linger."""
    app = surge.App("t", clock=clock)
    calls: list[int] = []

    @app.on(Ping, batch=10, linger=60.0)
    async def handle(events: list[Ping]) -> None:
        calls.append(len(events))

    async with app:
        await app.publish_many([Ping(n=i) for i in range(3)])
        await clock.sleep(1.0)
        stopping = clock.time()
    assert calls == []
    assert clock.time() - stopping < 1.0
    assert app.statistics().subscriptions["t.handle"].received == 3
