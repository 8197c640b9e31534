"""Delivery guarantees: retries, dead letters, timeouts, request/reply, dedup."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import surge
from surge.testing import Faults, Harness


class Job(surge.Event):
    n: int


class Done(surge.Event):
    n: int


class Ask(surge.Event):
    n: int
    delay: float = 0.0


class Answer(surge.Event):
    n: int


NO_JITTER = surge.Retry(attempts=5, backoff=0.1, max_backoff=30, jitter=0.0)


async def test_retry_waits_exact_backoff_then_succeeds(clock: surge.VirtualClock) -> None:
    """A handler failing twice then succeeding runs 3 times, at the backoff times."""
    app = surge.App("t", clock=clock, retry=NO_JITTER)
    calls: list[float] = []

    @app.on(Job)
    async def flaky(ev: Job, ctx: surge.Context) -> None:
        calls.append(clock.monotonic())
        if ctx.attempt < 3:
            raise OSError("transient")

    async with app:
        t0 = clock.monotonic()
        await app.publish(Job(n=1))
        await app.drain()
        stats = app.statistics().subscriptions["t.flaky"]
    assert [round(c - t0, 9) for c in calls] == [0.0, 0.1, 0.3]
    assert (stats.failed, stats.retried, stats.succeeded, stats.dead_lettered) == (2, 2, 1, 0)


async def test_backoff_is_capped_and_jittered_within_bounds(clock: surge.VirtualClock) -> None:
    """Delays double up to max_backoff and jitter stays within its fraction."""
    retry = surge.Retry(attempts=10, backoff=1, max_backoff=5, jitter=0.2)
    import random

    rng = random.Random(3)
    for attempt, base in [(1, 1), (2, 2), (3, 4), (4, 5), (9, 5)]:
        d = retry.delay(attempt, rng)
        assert base * 0.8 <= d <= base * 1.2


async def test_always_failing_ends_in_dead_letters_others_unaffected(
    clock: surge.VirtualClock,
) -> None:
    """After exactly `attempts` tries the event is dead-lettered; replay works once fixed."""
    app = surge.App("t", clock=clock, retry=NO_JITTER)
    attempts: list[int] = []
    fixed = False
    other_done: list[float] = []

    @app.on(Job)
    async def broken(ev: Job, ctx: surge.Context) -> Done:
        attempts.append(ctx.attempt)
        if not fixed:
            raise ValueError(f"cannot handle {ev.n}")
        return Done(n=ev.n)

    @app.on(Job, concurrency=1)
    async def steady(ev: Job) -> None:
        await clock.sleep(0.01)
        other_done.append(clock.monotonic())

    async with app:
        t0 = clock.monotonic()
        for i in range(100):
            await app.publish(Job(n=i))
        await app.drain()
        # the healthy subscription ran at full speed: 100 x 10 ms
        assert round(other_done[-1] - t0, 6) == 1.0
        assert len(attempts) == 500
        dead = await app.dead_letters("broken")
        assert len(dead) == 100
        letter = dead[0]
        assert (letter.attempts, letter.error_type, letter.group) == (5, "ValueError", "t.broken")
        assert "cannot handle" in letter.error
        assert "Traceback" in letter.traceback
        assert letter.failed_at >= letter.first_attempt_at
        fixed = True
        attempts.clear()
        assert await app.replay("broken") == 100
        await app.drain()
        assert attempts == [1] * 100
        assert await app.dead_letters("broken") == []
        assert app.statistics().subscriptions["t.broken"].succeeded == 100


async def test_errors_not_listed_in_on_are_not_retried(clock: surge.VirtualClock) -> None:
    """Only exceptions named in Retry.on are retried."""
    app = surge.App("t", clock=clock)
    calls = 0

    @app.on(Job, retry=surge.Retry(attempts=5, on=(OSError,)))
    async def picky(ev: Job) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("not transient")

    async with app:
        await app.publish(Job(n=1))
        await app.drain()
        assert calls == 1
        assert [d.error_type for d in await app.dead_letters()] == ["KeyError"]


async def test_retry_later_sets_the_delay(clock: surge.VirtualClock) -> None:
    """RetryLater(delay=) asks for exactly that delay."""
    app = surge.App("t", clock=clock)
    calls: list[float] = []

    @app.on(Job)
    async def later(ev: Job, ctx: surge.Context) -> None:
        calls.append(clock.monotonic())
        if ctx.attempt == 1:
            raise surge.RetryLater(delay=42.0)

    async with app:
        t0 = clock.monotonic()
        await app.publish(Job(n=1))
        await app.drain()
    assert [c - t0 for c in calls] == [0.0, 42.0]


async def test_malformed_payload_goes_straight_to_dead_letters(
    clock: surge.VirtualClock,
) -> None:
    """A body that does not decode is dead-lettered on its first delivery."""
    app = surge.App("t", clock=clock)
    good: list[int] = []

    @app.on(Job)
    async def handle(ev: Job) -> None:
        good.append(ev.n)

    async with app:
        bad = surge.Envelope(surge.new_id(), "Job", None, 0.0, None, None, b"\x81\xa1n\xa3six")
        await app.transport.publish([bad])
        await app.publish(Job(n=2))
        await app.drain()
        dead = await app.dead_letters()
    assert good == [2]
    assert len(dead) == 1
    assert (dead[0].error_type, dead[0].attempts) == ("DecodeError", 1)
    assert "$.n" in dead[0].error


async def test_async_handler_past_timeout_is_cancelled(clock: surge.VirtualClock) -> None:
    """A slow async handler is cancelled at its timeout and the attempt fails."""
    app = surge.App("t", clock=clock, retry=surge.Retry(attempts=2, backoff=1, jitter=0))
    cancelled = 0
    starts: list[float] = []

    @app.on(Job, timeout=2.0)
    async def slow(ev: Job) -> None:
        nonlocal cancelled
        starts.append(clock.monotonic())
        try:
            await clock.sleep(10)
        except asyncio.CancelledError:
            cancelled += 1
            raise

    async with app:
        t0 = clock.monotonic()
        await app.publish(Job(n=1))
        await app.drain()
        dead = await app.dead_letters()
    assert cancelled == 2
    assert [s - t0 for s in starts] == [0.0, 3.0]  # 2 s timeout + 1 s backoff
    assert dead[0].error_type == "HandlerTimeout"


@pytest.mark.realtime
async def test_sync_handler_past_timeout_is_reported() -> None:
    """A thread past its timeout fails the attempt and is counted as stuck."""
    failed = asyncio.Event()

    class Watch(surge.Middleware):
        def on_error(self, ctx: surge.Context, exc: BaseException) -> None:
            failed.set()

    app = surge.App("t", retry=surge.Retry(attempts=1), middleware=[Watch()])
    release = threading.Event()
    entered = threading.Event()

    @app.on(Job, timeout=0.05)
    def blocking(ev: Job) -> None:
        entered.set()
        release.wait(10)

    async with app:
        await app.publish(Job(n=1))
        await failed.wait()
        assert entered.is_set()
        assert app.statistics().subscriptions["t.blocking"].stuck_threads == 1
        release.set()
        await app.drain()
    assert app.statistics().subscriptions["t.blocking"].dead_lettered == 1


async def test_duplicated_deliveries_publish_each_downstream_event_once(
    clock: surge.VirtualClock,
) -> None:
    """A handler run twice on one event publishes its children once (derived ids)."""
    app = surge.App("t", clock=clock)
    runs = 0
    downstream: list[int] = []

    @app.on(Job)
    async def produce(ev: Job) -> list[Done]:
        nonlocal runs
        runs += 1
        return [Done(n=ev.n), Done(n=ev.n + 1000)]

    @app.on(Done)
    async def consume(ev: Done) -> None:
        downstream.append(ev.n)

    faults = Faults(duplicate_rate=0.5, groups=frozenset({"t.produce"}))
    async with Harness(app, seed=4, faults=faults) as h:
        for i in range(200):
            await app.publish(Job(n=i))
        await h.drain()
        assert isinstance(h.transport, surge.testing.FaultyTransport)
        assert h.transport.duplicated > 50
    assert runs > 200
    assert sorted(downstream) == sorted([*range(200), *range(1000, 1200)])


async def test_many_concurrent_requests_some_timing_out(clock: surge.VirtualClock) -> None:
    """10,000 requests, 1% too slow: each returns its own reply or times out in time."""
    app = surge.App("t", clock=clock)

    @app.on(Ask, concurrency=20_000)
    async def answer(ev: Ask) -> Answer:
        await clock.sleep(ev.delay)
        return Answer(n=ev.n)

    outcomes: dict[int, Any] = {}

    async def one(i: int) -> None:
        slow = i % 100 == 0
        t0 = clock.monotonic()
        try:
            reply = await app.request(
                Ask(n=i, delay=5.0 if slow else 0.5), expect=Answer, timeout=2.0
            )
            outcomes[i] = ("ok", reply.n, clock.monotonic() - t0)
        except surge.RequestTimeout:
            outcomes[i] = ("timeout", None, clock.monotonic() - t0)

    async with app:
        await asyncio.gather(*(one(i) for i in range(10_000)))
        assert app.pending_requests == 0
        await app.drain()
    timeouts = [i for i, o in outcomes.items() if o[0] == "timeout"]
    assert sorted(timeouts) == list(range(0, 10_000, 100))
    assert all(o[1] == i for i, o in outcomes.items() if o[0] == "ok")
    assert max(o[2] for o in outcomes.values()) <= 2.0
    assert all(o[2] == 2.0 for o in outcomes.values() if o[0] == "timeout")


async def test_request_cancelled_or_shut_down_leaks_nothing(clock: surge.VirtualClock) -> None:
    """Cancelling a request or stopping the app releases its future."""
    app = surge.App("t", clock=clock, shutdown_timeout=1)

    @app.on(Ask)
    async def never(ev: Ask) -> None:
        await clock.sleep(3600)

    await app.start()
    task = asyncio.create_task(app.request(Ask(n=1), expect=Answer, timeout=60))
    await clock.sleep(1)
    assert app.pending_requests == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert app.pending_requests == 0
    task2 = asyncio.create_task(app.request(Ask(n=2), expect=Answer, timeout=60))
    await clock.sleep(1)
    await app.stop()
    with pytest.raises(surge.Closed):
        await task2
    assert app.pending_requests == 0


async def test_reply_comes_from_downstream_stages(clock: surge.VirtualClock) -> None:
    """The expected reply may come from any stage the request leads to."""
    app = surge.App("t", clock=clock)

    @app.on(Ask)
    async def first(ev: Ask) -> Job:
        return Job(n=ev.n * 2)

    @app.on(Job)
    async def second(ev: Job) -> Answer:
        return Answer(n=ev.n + 1)

    async with app:
        assert await app.request(Ask(n=20), expect=Answer) == Answer(n=41)


async def test_middleware_hooks_wrap_in_order(clock: surge.VirtualClock) -> None:
    """before_* hooks run in order, after_* and on_error in reverse."""
    trail: list[str] = []

    class Tag(surge.Middleware):
        def __init__(self, name: str) -> None:
            self.name = name

        def before_publish(self, envelope: surge.Envelope) -> None:
            trail.append(f"{self.name}.before_publish")

        def after_publish(self, envelope: surge.Envelope) -> None:
            trail.append(f"{self.name}.after_publish")

        def before_handle(self, ctx: surge.Context) -> None:
            trail.append(f"{self.name}.before_handle")

        def after_handle(self, ctx: surge.Context, result: Any) -> None:
            trail.append(f"{self.name}.after_handle")

        def on_error(self, ctx: surge.Context, exc: BaseException) -> None:
            trail.append(f"{self.name}.on_error")

    app = surge.App(
        "t", clock=clock, middleware=[Tag("a"), Tag("b")], retry=surge.Retry(attempts=1)
    )

    @app.on(Job)
    async def handle(ev: Job) -> None:
        if ev.n:
            raise RuntimeError("no")

    async with app:
        await app.publish(Job(n=0))
        await app.drain()
        assert trail == [
            "a.before_publish",
            "b.before_publish",
            "b.after_publish",
            "a.after_publish",
            "a.before_handle",
            "b.before_handle",
            "b.after_handle",
            "a.after_handle",
        ]
        trail.clear()
        await app.publish(Job(n=1))
        await app.drain()
        assert trail[-4:] == ["a.before_handle", "b.before_handle", "b.on_error", "a.on_error"]


def _run_seeded(seed: int, fail_rate: float, dup: float, delay: float) -> tuple[Any, ...]:
    clock = surge.VirtualClock()
    app = surge.App(
        "p", clock=clock, seed=seed, retry=surge.Retry(attempts=3, backoff=0.05, jitter=0.5)
    )
    handled: list[tuple[int, float]] = []

    @app.on(Job, concurrency=4)
    async def stage1(ev: Job) -> Done:
        await clock.sleep(0.001 * (ev.n % 7))
        return Done(n=ev.n)

    @app.on(Done, concurrency=3)
    async def stage2(ev: Done) -> None:
        handled.append((ev.n, clock.monotonic()))

    async def main() -> tuple[Any, ...]:
        faults = Faults(fail_rate=fail_rate, duplicate_rate=dup, delay_rate=delay, max_delay=0.5)
        async with Harness(app, seed=seed, faults=faults) as h:
            for i in range(60):
                await app.publish(Job(n=i))
            await h.drain()
            dead = await app.dead_letters()
        lost = tuple(sorted((d.group, msgspec.msgpack.decode(d.body)["n"]) for d in dead))
        return tuple(handled), lost, h.injected

    return clock.run(main())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    fail_rate=st.floats(0, 0.5),
    dup=st.floats(0, 0.3),
    delay=st.floats(0, 0.3),
)
def test_random_faults_lose_nothing_and_replay_exactly(
    seed: int, fail_rate: float, dup: float, delay: float
) -> None:
    """Under any seeded fault plan every event is handled or dead-lettered, reproducibly."""
    handled, dead, injected = _run_seeded(seed, fail_rate, dup, delay)
    done = {n for n, _ in handled}
    dead_at_1 = {n for group, n in dead if group == "p.stage1"}
    dead_at_2 = {n for group, n in dead if group == "p.stage2"}
    # every Job either died at stage1, or its Done was handled or died at stage2
    assert done | dead_at_1 | dead_at_2 == set(range(60))
    if not dup:  # (a duplicated Job may die in one copy and succeed in the other)
        assert not dead_at_1 & (done | dead_at_2)
    if not (fail_rate or dup or delay):
        assert len(handled) == 60
        assert not dead
    assert _run_seeded(seed, fail_rate, dup, delay) == (handled, dead, injected)
