"""surge.testing.Harness watches an app without taking it off its plain paths."""

from __future__ import annotations

from typing import Any

import pytest

import surge
from surge._dispatch import Runner
from surge.testing import Faults, Harness


class Job(surge.Event):
    __topic__ = "harness.job"
    n: int


class Done(surge.Event):
    __topic__ = "harness.done"
    n: int


def _plain_loops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The groups whose workers ran the runner's plain loop, once per worker."""
    runs: list[str] = []
    plain = Runner._work_plain

    async def spy(self: Runner, *args: Any) -> None:
        runs.append(self.group)
        await plain(self, *args)

    monkeypatch.setattr(Runner, "_work_plain", spy)
    return runs


def _pipeline(clock: surge.VirtualClock) -> surge.App:
    app = surge.App("h", clock=clock, retry=surge.Retry(attempts=3, backoff=0.1, jitter=0))

    @app.on(Job)
    async def work(ev: Job) -> Done:
        return Done(n=ev.n)

    @app.on(Done, executor="inline")
    def done(ev: Done) -> None:
        pass

    return app


@pytest.mark.parametrize("middleware", [False, True], ids=["harness", "harness+middleware"])
async def test_a_harnessed_app_runs_the_plain_paths(
    clock: surge.VirtualClock, monkeypatch: pytest.MonkeyPatch, middleware: bool
) -> None:
    """Under the harness alone, publishes take the synchronous put and both
    handlers the runner's plain loop; a middleware switches both off. The
    harness records the same either way."""
    runs = _plain_loops(monkeypatch)
    app = _pipeline(clock)
    if middleware:
        app.add_middleware(surge.Middleware())
    async with Harness(app) as h:
        for i in range(3):
            await app.publish(Job(n=i))
        await h.drain()
        # the types whose publish is one synchronous put (App.publish's plain path)
        put_types = set(app._put_types)
        assert h.events(Job) == [Job(n=i) for i in range(3)]
        assert h.events(Done) == [Done(n=i) for i in range(3)]
        assert h.handled_by("work") == [Job(n=i) for i in range(3)]
        assert h.handled_by("done") == [Done(n=i) for i in range(3)]
    if middleware:
        assert runs == []
        assert put_types == set()
    else:
        assert set(runs) == {"h.work", "h.done"}
        assert Job in put_types


async def test_handler_faults_on_the_plain_path(
    clock: surge.VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault the plan injects on the plain loop fails that attempt as the
    handler would: retried, recorded as handled once, counted once."""
    runs = _plain_loops(monkeypatch)
    app = _pipeline(clock)
    async with Harness(app, faults=Faults(fail=frozenset({1}))) as h:
        await app.publish(Job(n=7))
        await h.drain()
        assert h.injected == 1
        assert h.handled_by("work") == [Job(n=7)]
        assert h.events(Done) == [Done(n=7)]
        stats = app.statistics().subscriptions["h.work"]
        assert (stats.failed, stats.retried, stats.succeeded) == (1, 1, 1)
    assert "h.work" in runs


@pytest.mark.parametrize("kind", ["ctx", "thread", "batch", "timeout"])
async def test_every_handler_path_is_recorded_and_faulted(
    clock: surge.VirtualClock, kind: str
) -> None:
    """Off the plain loop too (a context, a thread, a batch, a timeout),
    the harness records each handling and injects its faults."""
    app = surge.App("h", clock=clock, retry=surge.Retry(attempts=3, backoff=0.1, jitter=0))
    handled: list[int] = []

    if kind == "ctx":

        @app.on(Job)
        async def work(ev: Job, ctx: surge.Context) -> None:
            handled.append(ev.n)

    elif kind == "thread":

        @app.on(Job, name="work")
        def work_in_thread(ev: Job) -> None:
            handled.append(ev.n)

    elif kind == "batch":

        @app.on(Job, name="work", batch=2)
        async def work_batch(evs: list[Job]) -> None:
            handled.extend(ev.n for ev in evs)

    else:

        @app.on(Job, name="work", timeout=5.0)
        async def work_timed(ev: Job) -> None:
            handled.append(ev.n)

    async with Harness(app, faults=Faults(fail=frozenset({2}))) as h:
        await app.publish(Job(n=1))
        await h.drain()
        await app.publish(Job(n=2))
        await h.drain()
        assert h.injected == 1
        assert h.handled_by("work") == [Job(n=1), Job(n=2)]
        assert handled == [1, 2]
        assert app.statistics().subscriptions["h.work"].retried == 1
