"""Metrics: counters, histograms and gauges match a known workload."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import msgspec
import pytest

import surge
from surge.cli._supervisor import Supervisor
from surge.http import ADMIN_LISTENER
from surge.observe import (
    BUCKETS,
    METRICS_DIR_ENV,
    Instruments,
    Snapshot,
    instrument,
    merge,
    mount,
    quantile,
    read_directory,
    snapshot,
)
from surge.transports import open_transport

from ._metrics_app import APP_REF, GROUP, Job, expected

COUNT = 40


async def asgi_get(app: surge.App, path: str) -> tuple[int, bytes]:
    """One GET through the app's ingress, in process (no socket)."""
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": query.encode(),
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 1),
        ADMIN_LISTENER: True,
    }
    await app.http(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{want}}}" if want else name) + r" (\S+)"
    found = re.search(pattern, text)
    assert found, f"no {name}{{{want}}} in /metrics"
    return float(found.group(1))


def make_app(clock: surge.VirtualClock) -> tuple[surge.App, Any]:
    app = surge.App("metered", clock=clock)
    instrument(app, sample=1)
    mount(app.http)

    @app.on(Job, concurrency=COUNT, retry=surge.Retry(attempts=2, backoff=0.5, jitter=0.0))
    async def work(event: Job, ctx: surge.Context) -> None:
        await clock.sleep(0.02)
        if event.n % 5 == 0 or (event.n % 4 == 0 and ctx.attempt == 1):
            raise RuntimeError(f"job {event.n} failed on attempt {ctx.attempt}")

    return app, work


async def test_counters_and_histograms_match_a_workload(
    clock: surge.VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """After jobs with retries and dead letters, statistics() and /metrics count exactly."""
    caplog.set_level(logging.CRITICAL, "surge")
    app, _ = make_app(clock)
    async with app:
        for n in range(COUNT):
            await app.publish(Job(n=n))
        await app.drain()
        stats = app.statistics().subscriptions[GROUP]
        want = expected(COUNT)
        assert {k: getattr(stats, k) for k in want} == want
        assert (stats.in_flight, stats.queued) == (0, 0)

        snap = snapshot(app).subscriptions[GROUP]
        attempts = want["received"]
        assert sum(snap.duration) == attempts
        # every attempt took 0.02 s of virtual time: all in the 0.025 bucket
        assert snap.duration[BUCKETS.index(0.025)] == attempts
        assert snap.duration_sum == pytest.approx(0.02 * attempts)
        # first attempts start at once; each retry starts 0.5 s after the
        # failure that ended its 0.02 s first attempt
        assert sum(snap.latency) == attempts
        assert snap.latency_sum == pytest.approx(want["retried"] * 0.52)
        assert quantile(snap.duration, 0.99) == pytest.approx(0.01 + 0.015 * 0.99)

        status, body = await asgi_get(app, "/metrics")
        assert status == 200
        text = body.decode()
        labels = {"app": "metered", "subscription": GROUP}
        for name, value in want.items():
            assert metric(text, f"surge_subscription_{name}_total", **labels) == value
        assert metric(text, "surge_subscription_in_flight", **labels) == 0
        assert metric(text, "surge_subscription_backlog", **labels) == 0
        assert metric(text, "surge_subscription_dead_letters", **labels) == want["dead_lettered"]
        assert metric(text, "surge_handler_duration_seconds_count", **labels) == attempts
        bucket = "surge_handler_duration_seconds_bucket"
        assert metric(text, bucket, app="metered", le="0.01", subscription=GROUP) == 0
        assert metric(text, bucket, app="metered", le="0.025", subscription=GROUP) == attempts
        assert metric(text, "surge_handle_latency_seconds_count", **labels) == attempts


async def test_gauges_show_handlers_in_flight_and_the_backlog(clock: surge.VirtualClock) -> None:
    """While handlers are held, in_flight and backlog gauges show them."""
    app = surge.App("held", clock=clock)
    instrument(app, sample=1)
    mount(app.http)
    gate = asyncio.Event()
    started = asyncio.Event()

    @app.on(Job, concurrency=2, prefetch=2)
    async def hold(event: Job) -> None:
        started.set()
        await gate.wait()

    async with app:
        for n in range(10):
            await app.publish(Job(n=n))
        await started.wait()
        await asyncio.sleep(0)
        text = (await asgi_get(app, "/metrics"))[1].decode()
        labels = {"app": "held", "subscription": "held.hold"}
        assert metric(text, "surge_subscription_in_flight", **labels) == 2
        in_transport = metric(text, "surge_subscription_backlog", **labels)
        queued = metric(text, "surge_subscription_queued", **labels)
        assert in_transport + queued + 2 == 10
        assert in_transport >= 6
        gate.set()
        await app.drain()
        # a plain handler (the runner's fast path) is timed too
        assert sum(snapshot(app).subscriptions["held.hold"].duration) == 10


async def test_instrument_is_idempotent_and_refused_once_started() -> None:
    """instrument() instruments once, however often it is called, and only a new app."""
    app = surge.App("twice")
    first = instrument(app)
    assert isinstance(first, Instruments)
    assert instrument(app) is first
    assert app._middleware == ()
    late = surge.App("late")
    async with late:
        with pytest.raises(surge.ConfigurationError, match="before it starts"):
            instrument(late)


async def test_histograms_time_one_attempt_in_sample(clock: surge.VirtualClock) -> None:
    """With sample=4, a quarter of the attempts are timed; the counters stay exact."""
    app = surge.App("sampled", clock=clock)
    instrument(app, sample=4)

    @app.on(Job)
    async def quick(event: Job) -> None:
        await clock.sleep(0.002)

    async with app:
        for n in range(40):
            await app.publish(Job(n=n))
        await app.drain()
    snap = snapshot(app).subscriptions["sampled.quick"]
    assert snap.stats.succeeded == 40
    assert sum(snap.duration) == sum(snap.latency) == 10
    assert snap.duration[BUCKETS.index(0.0025)] == 10
    with pytest.raises(surge.ConfigurationError, match="sample must be 1 or more"):
        instrument(surge.App("bad"), sample=0)


async def test_stats_endpoint_reports_rates_and_quantiles(
    clock: surge.VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """/_surge/stats answers JSON with counters, a rate over the last second and p99."""
    caplog.set_level(logging.CRITICAL, "surge")
    app, _ = make_app(clock)
    async with app:
        status, body = await asgi_get(app, "/_surge/stats")
        assert status == 200
        first = msgspec.json.decode(body)["subscriptions"][GROUP]
        assert first["received"] == 0
        t0 = clock.monotonic()
        for n in range(COUNT):
            await app.publish(Job(n=n))
        await app.drain()
        await clock.sleep(2.0)
        t1 = clock.monotonic()
        view = msgspec.json.decode((await asgi_get(app, "/_surge/stats"))[1])
        sub = view["subscriptions"][GROUP]
        want = expected(COUNT)
        assert sub["dead_lettered"] == want["dead_lettered"] == sub["dead_letters"]
        # the rate is measured against the first sample, the newest one over a second old
        handled = want["succeeded"] + want["failed"]
        assert sub["rate"] == round(handled / (t1 - t0), 3)
        assert sub["error_rate"] == round(want["failed"] / (t1 - t0), 3)
        assert sub["p99"] == pytest.approx(0.01 + 0.015 * 0.99)
        status, body = await asgi_get(app, f"/_surge/dlq?subscription={GROUP}")
        letters = msgspec.json.decode(body)["dead_letters"]
        assert sorted(msgspec.json.decode(d["body"])["n"] for d in letters) == [
            n for n in range(COUNT) if n % 5 == 0
        ]
        assert {d["error_type"] for d in letters} == {"RuntimeError"}


@pytest.mark.realtime
async def test_two_workers_sum_their_metrics(tmp_path: Path) -> None:
    """Two supervised worker processes on sqlite: the metrics directory sums both exactly."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    directory = tmp_path / "metrics"
    env = dict(os.environ, **{METRICS_DIR_ENV: str(directory)})
    sup = Supervisor(APP_REF, url, 2, env=env, shutdown_timeout=10.0)
    running = asyncio.create_task(sup.run())
    try:
        await sup.wait_ready()
        pids = set(sup.ready_pids)
        producer = open_transport(url)
        await producer.start()
        try:
            await producer.declare(GROUP, (Job.__topic__,))
            app = surge.App("metered", transport=producer)
            for n in range(COUNT):
                await producer.publish((app._envelope(Job(n=n), None, None),))
            async with asyncio.timeout(60):
                await producer.wait_idle()  # type: ignore[attr-defined]
            stats = await producer.stats(GROUP)
        finally:
            await producer.close()
    finally:
        sup.request_stop()
    assert await running == 0
    assert (stats.backlog, stats.pending, stats.scheduled) == (0, 0, 0)
    merged = read_directory(directory, "metered")
    assert merged is not None
    assert merged.processes == 2
    assert {p.stem.rsplit("-", 1)[1] for p in directory.glob("*.json")} == {str(p) for p in pids}
    sub = merged.subscriptions[GROUP]
    want = expected(COUNT)
    assert {k: getattr(sub.stats, k) for k in want} == want
    assert sum(sub.duration) == want["received"]


async def test_resident_memory_is_reported_and_exported() -> None:
    """statistics() reads the process's resident memory, and /metrics
    exports it as surge_resident_memory_bytes."""
    app = surge.App("metered")
    mount(app.http)
    async with app:
        before = app.statistics().resident_memory
        held = b"\x01" * (16 << 20)  # resident: written, not just mapped
        stats = app.statistics()
        status, body = await asgi_get(app, "/metrics")
    assert status == 200
    assert before is not None
    assert stats.resident_memory is not None
    assert stats.resident_memory - before >= len(held) * 0.9
    exported = metric(body.decode(), "surge_resident_memory_bytes", app="metered")
    # read again at the scrape: the same process, within a few MiB
    assert abs(exported - stats.resident_memory) < 4 << 20


def test_workers_resident_memory_is_summed_over_the_live_ones() -> None:
    """Several workers' snapshots sum their resident memory over the live
    processes that told (an exited one's memory is gone); None when none did."""
    gone = subprocess.Popen(["true"])  # a pid that no longer runs
    gone.wait()
    me = os.getpid()
    snaps = [
        Snapshot(app="metered", pid=me, subscriptions={}, resident_memory=100),
        Snapshot(app="metered", pid=me, subscriptions={}, resident_memory=20),
        Snapshot(app="metered", pid=me, subscriptions={}),  # could not tell
        Snapshot(app="metered", pid=gone.pid, subscriptions={}, resident_memory=1000),
    ]
    merged = merge(snaps)
    assert merged is not None
    assert merged.resident_memory == 120
    assert merged.statistics().resident_memory == 120
    unknown = merge(snaps[2:])
    assert unknown is not None
    assert unknown.resident_memory is None
