"""Admission from downstream state: a route sheds (503, Retry-After) while the
pipeline behind it queues past its target, and what it admits is handled."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import msgspec
import pytest

import surge
from surge import VirtualClock
from surge._graph import downstream
from surge.http import Limits, Server
from surge.http._admission import AdaptiveLimit, Admission
from surge.tools import run_load


class Job(surge.Event):
    n: int
    sent: float = 0.0


class Step(surge.Event):
    n: int
    sent: float = 0.0


class Other(surge.Event):
    n: int


# --- the graph ---------------------------------------------------------------


def test_downstream_follows_what_handlers_return() -> None:
    """A topic's pipeline is its subscribers, then theirs by return annotation."""
    app = surge.App("graph")

    @app.on(Job)
    async def first(ev: Job) -> Step | None:
        return None

    @app.on(Step)
    def second(ev: Step) -> None:
        pass

    @app.on(Other)
    async def unrelated(ev: Other) -> None:
        pass

    names = [s.name for s in downstream(app.subscriptions.values(), "Job")]
    assert names == ["graph.first", "graph.second"]
    assert downstream(app.subscriptions.values(), "Nobody") == []


# --- the limit, one sample at a time -----------------------------------------


def test_the_limit_admits_up_to_it_then_sheds() -> None:
    """Between two samples the limit bounds what was queued plus what was admitted."""
    lim = AdaptiveLimit(0.1, initial=20, concurrency=(4,))
    lim.update(0.0, [(14, 0)])  # 10 queued beyond the 4 workers
    assert lim.queued == 10
    assert [lim.admit() for _ in range(11)] == [True] * 10 + [False]
    assert (lim.since, lim.shed) == (10, 1)


def test_a_queue_over_target_cuts_the_limit_to_littles_law() -> None:
    """Queued 200 at 100/s is 2 s: the limit becomes what would queue 0.1 s (10)."""
    lim = AdaptiveLimit(0.1, initial=500, minimum=1, concurrency=(0,))
    lim.update(0.0, [(0, 0)])
    lim.update(1.0, [(200, 100)])
    assert lim.delay == pytest.approx(2.0)
    assert lim.limit == pytest.approx(10.0)
    # the next sample sees the same backlog draining: no second cut below it
    lim.update(1.1, [(190, 110)])
    assert lim.limit == pytest.approx(10.0 * 0 + 190 * 0.1 / lim.delay)
    assert lim.limit <= 10.0


def test_the_limit_grows_only_while_it_refuses_under_target() -> None:
    """Doubling while far under target and shedding; still while idle."""
    lim = AdaptiveLimit(0.1, initial=10, concurrency=(0,))
    lim.update(0.0, [(0, 0)])
    lim.update(0.1, [(0, 10)])
    assert lim.limit == 10  # nothing refused: nothing learnt
    for _ in range(11):
        lim.admit()
    lim.update(0.2, [(0, 20)])
    assert lim.limit == 20
    for _ in range(21):
        lim.admit()
    lim.update(0.3, [(4, 40)])  # 4 queued at 100/s: 0.04 s, target/delay 2.5 -> x2
    assert lim.limit == 40
    for _ in range(41):
        lim.admit()
    lim.update(0.4, [(16, 80)])  # 16 queued at 200/s: 0.08 s -> x1.25
    assert lim.delay == pytest.approx(0.08)
    assert lim.limit == pytest.approx(50)


def test_a_stalled_stage_counts_how_long_it_has_not_moved() -> None:
    """A stage with work queued that finishes nothing counts its stall as delay,
    weighted by the share of the route's events that reach it."""
    lim = AdaptiveLimit(0.25, initial=100, minimum=5, concurrency=(1, 1))
    for k in range(11):  # stage 2 holds 3 (one handled, 2 queued) and stops
        lim.update(k / 10, [(0, 100), (3, 97)])
    assert lim.delay == pytest.approx(1.0)  # every event reaches it: the whole stall
    assert lim.limit == pytest.approx(5.0)  # 2 queued * 0.25 / 1.0 < minimum
    branch = AdaptiveLimit(0.25, initial=100, concurrency=(1, 1))
    for k in range(11):  # a branch 3 of 100 events took, starting (a cold pool)
        branch.update(k / 10, [(0, 100), (3, 0)])
    assert branch.delay == pytest.approx(0.03)
    assert branch.limit == 100


def test_each_consumer_of_a_stage_holds_its_concurrency() -> None:
    """Two worker processes of a stage each handle ``concurrency`` at once:
    what the transport says is held by them is not queued."""
    one = AdaptiveLimit(0.1, initial=100, concurrency=(4,))
    one.update(0.0, [(8, 0)])
    assert one.queued == 4
    two = AdaptiveLimit(0.1, initial=100, concurrency=(4,))
    two.consumers = (2,)
    two.update(0.0, [(8, 0)])
    assert two.queued == 0


def test_no_target_means_no_limit() -> None:
    """open(None) admits everything until a target is set again."""
    lim = AdaptiveLimit(0.1, initial=1, minimum=1)
    lim.open(None)
    assert all(lim.admit() for _ in range(1000))
    lim.update(1.0, [(5000, 0)])
    assert lim.statistics().limit is None
    lim.open(0.2)
    assert lim.limit == 1
    assert lim.target == 0.2


# --- the ingress on the virtual clock ----------------------------------------


async def _post(app: surge.App, path: str, body: bytes) -> tuple[int, dict[bytes, bytes]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-length", b"%d" % len(body))],
    }
    await app.http(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"])


async def test_a_slow_pipeline_is_shed_and_its_queue_stays_near_target(
    clock: VirtualClock,
) -> None:
    """500 requests/s at a 100/s pipeline for 3 virtual seconds: the route sheds
    with Retry-After, keeps the queue near its 0.1 s target, and every event it
    admitted is handled once."""
    app = surge.App("slow", clock=clock)
    waits: list[tuple[float, float]] = []  # (sent, waited)
    handled: list[int] = []

    @app.on(Job, concurrency=2)
    async def work(ev: Job) -> Step:
        waits.append((ev.sent, clock.monotonic() - ev.sent))
        await asyncio.sleep(0.02)  # two workers: 100 jobs/s
        return Step(n=ev.n, sent=clock.monotonic())

    @app.on(Step, concurrency=8)
    async def done(ev: Step) -> None:
        handled.append(ev.n)

    app.http.post("/jobs", publish=Job)
    app.http.configure(Limits(target_latency=0.1))
    statuses: dict[int, int] = {}
    accepted: list[int] = []

    async def request(n: int) -> None:
        body = msgspec.json.encode(Job(n=n, sent=clock.monotonic()))
        status, headers = await _post(app, "/jobs", body)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 202:
            accepted.append(n)
        else:
            assert headers[b"retry-after"] == b"1"
            assert b"connection" not in headers  # shedding keeps the connection

    async with app:
        tasks = []
        for n in range(1500):
            tasks.append(asyncio.ensure_future(request(n)))
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        await app.drain()
        admission = app.http.statistics().admission["POST /jobs"]
    assert set(statuses) == {202, 503}
    assert sorted(handled) == sorted(accepted)  # nothing admitted is lost
    assert admission.shed == statuses[503]
    assert admission.admitted == statuses[202]
    assert admission.stages == ("slow.work", "slow.done")
    # The pipeline is kept busy (3 s at 100/s)...
    assert len(accepted) >= 280
    # ...and what was admitted after the first second queued near the target,
    # where without admission the last ones would wait 12 s.
    start = waits[0][0]
    late = [w for sent, w in waits if sent - start >= 1.0]
    assert max(late) < 0.3
    assert sum(late) / len(late) < 0.15


async def test_a_route_of_its_own_target_or_none(clock: VirtualClock) -> None:
    """A route's target_latency overrides the app-wide one; math.inf never sheds;
    Limits(target_latency=None) turns admission off."""
    app = surge.App("own", clock=clock)

    @app.on(Job)
    async def work(ev: Job) -> None:
        pass

    @app.on(Other)
    async def other(ev: Other) -> None:
        pass

    app.http.post("/jobs", publish=Job, target_latency=0.5)
    app.http.post("/other", publish=Other, target_latency=math.inf)
    app.http.post("/nobody", publish=Step)  # no subscriber here: nothing to protect
    with pytest.raises(surge.ConfigurationError):
        app.http.post("/bad", publish=Job, target_latency=0)
    async with app:
        await asyncio.sleep(0.25)
        found = app.http.statistics().admission
        assert set(found) == {"POST /jobs"}
        assert found["POST /jobs"].target == 0.5
    plain = surge.App("plain", clock=clock)
    plain.on(Job)(work)
    plain.http.post("/jobs", publish=Job)
    plain.http.configure(Limits(target_latency=None))
    async with plain:
        await asyncio.sleep(0.25)
        assert plain.http.statistics().admission["POST /jobs"].limit is None
        assert all([(await _post(plain, "/jobs", b'{"n": 1}'))[0] == 202 for _ in range(50)])


# --- end to end, over a socket ------------------------------------------------


@pytest.mark.realtime
@pytest.mark.timeout(60)
async def test_a_flood_on_a_slow_pipeline_is_shed_retried_and_nothing_is_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """surge load against a 100/s pipeline: requests are shed with 503 and sent
    again after Retry-After until accepted; every accepted order is handled once."""
    monkeypatch.setattr(Admission, "initial_limit", 20)  # not a first burst of 1,000
    app = surge.App("e2e")
    handled: list[int] = []

    @app.on(Job, concurrency=1)
    async def work(ev: Job) -> None:
        await asyncio.sleep(0.01)
        handled.append(ev.n)

    app.http.post("/jobs", publish=Job)
    accepted: list[int] = []
    limits = Limits(target_latency=0.05)
    async with app, Server(app, port=0, limits=limits) as server:
        report = await run_load(
            f"{server.url}/jobs",
            300,
            60,
            body_factory=lambda i: b'{"n": %d}' % i,
            retries=200,
            max_backoff=0.2,
            on_response=lambda i, r: accepted.append(i) if r.status == 202 else None,
        )
        await asyncio.wait_for(app.drain(), 20)
        shed = app.http.statistics().admission["POST /jobs"].shed
    assert report.errors == {}
    assert report.statuses == {202: 300}
    assert report.retried == shed > 0
    assert sorted(handled) == sorted(accepted) == list(range(300))
