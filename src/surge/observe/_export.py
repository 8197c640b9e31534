"""The app's numbers as Prometheus families and as the JSON of ``/_surge/stats``."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from ._metrics import COUNTERS, GAUGES, Snapshot, current, iter_cumulative, quantile
from ._state import state_of

if TYPE_CHECKING:
    from .._app import App

__all__ = ("AppCollector", "StatsHistory", "families", "refresh_backlogs")


async def refresh_backlogs(app: App, timeout: float = 1.0) -> dict[str, tuple[int, int]]:
    """Ask the transport for each subscription's backlog and dead letters.

    Backlogs are a property of the shared transport, read by a round trip
    (async) before a scrape; the Prometheus collector itself is synchronous
    and exports what was read last."""
    state = state_of(app)
    if app.state != "running":
        return state.backlogs
    out: dict[str, tuple[int, int]] = {}
    for name in list(app.subscriptions):
        # A transport that cannot tell (or a slow broker) leaves the gauge out
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                st = await app.transport.stats(name)
            out[name] = (st.backlog + st.scheduled, st.dead)
    state.backlogs = out
    return out


class AppCollector(Collector):
    """The app's subscriptions as Prometheus families (a prometheus-client
    collector, added to the ingress's ``/metrics``)."""

    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        return families(self.app)

    async def refresh(self) -> None:
        """Read the backlogs the next scrape exports."""
        await refresh_backlogs(self.app)


def families(app: App) -> Iterator[Any]:
    """Prometheus metric families of every subscription of ``app``."""
    snap = current(app)
    labels = ("app", "subscription")
    counters = {
        name: CounterMetricFamily(
            f"surge_subscription_{name}", f"Deliveries {name.replace('_', ' ')}", labels=labels
        )
        for name in COUNTERS
    }
    gauges = {
        name: GaugeMetricFamily(
            f"surge_subscription_{name}", f"Deliveries {name.replace('_', ' ')} now", labels=labels
        )
        for name in GAUGES
    }
    backlog = GaugeMetricFamily(
        "surge_subscription_backlog",
        "Events waiting in the transport (ready or scheduled for retry)",
        labels=labels,
    )
    dead = GaugeMetricFamily(
        "surge_subscription_dead_letters", "Dead letters kept by the transport", labels=labels
    )
    duration = HistogramMetricFamily(
        "surge_handler_duration_seconds", "Time a handler ran, per attempt", labels=labels
    )
    latency = HistogramMetricFamily(
        "surge_handle_latency_seconds",
        "Time from an event's publish to the start of its handling, per attempt",
        labels=labels,
    )
    app_name = snap.app
    known = state_of(app).backlogs
    for sub, s in snap.subscriptions.items():
        key = (app_name, sub)
        for name, family in counters.items():
            family.add_metric(key, getattr(s.stats, name))
        for name, gauge in gauges.items():
            gauge.add_metric(key, getattr(s.stats, name))
        if sub in known:
            backlog.add_metric(key, known[sub][0])
            dead.add_metric(key, known[sub][1])
        if s.duration:
            duration.add_metric(key, list(iter_cumulative(s.duration)), s.duration_sum)
        if s.latency:
            latency.add_metric(key, list(iter_cumulative(s.latency)), s.latency_sum)
    yield from counters.values()
    yield from gauges.values()
    yield backlog
    yield dead
    yield duration
    yield latency
    pending = GaugeMetricFamily(
        "surge_pending_requests", "app.request calls waiting for their reply", labels=("app",)
    )
    pending.add_metric((app_name,), snap.pending_requests)
    yield pending
    rejected = CounterMetricFamily(
        "surge_rejected_replies",
        "Replies to the app's requests refused for their signature",
        labels=("app",),
    )
    rejected.add_metric((app_name,), snap.rejected_replies)
    yield rejected
    lag = GaugeMetricFamily(
        "surge_loop_lag_max_seconds",
        "The longest an event loop of the app was held by code that did not await",
        labels=("app",),
    )
    lag.add_metric((app_name,), snap.loop_lag_max)
    yield lag
    if snap.resident_memory is not None:
        memory = GaugeMetricFamily(
            "surge_resident_memory_bytes",
            "Resident memory of the app's processes now (summed over the live workers)",
            labels=("app",),
        )
        memory.add_metric((app_name,), snap.resident_memory)
        yield memory
    unroutable = CounterMetricFamily(
        "surge_unroutable",
        "Publishes that no group declared on the transport received (dropped), by topic",
        labels=("app", "topic"),
    )
    for topic, n in sorted(snap.unroutable.items()):
        unroutable.add_metric((app_name, topic), n)
    yield unroutable
    yield GaugeMetricFamily(
        "surge_processes", "Worker processes whose numbers are summed here", value=snap.processes
    )


# --- JSON stats -------------------------------------------------------------
class SubscriptionView(msgspec.Struct, frozen=True, kw_only=True):
    """One subscription as ``/_surge/stats`` shows it."""

    received: int
    succeeded: int
    failed: int
    retried: int
    dead_lettered: int
    in_flight: int
    queued: int
    stuck_threads: int
    backlog: int | None
    dead_letters: int | None
    rate: float
    """Deliveries handled (succeeded + failed) per second, recently."""
    error_rate: float
    """Failed attempts per second, recently."""
    p50: float | None
    p99: float | None
    """Handler duration quantiles (seconds), recent when there was traffic."""
    latency_p99: float | None
    mean: float | None


class StatsView(msgspec.Struct, frozen=True, kw_only=True):
    app: str
    time: float
    processes: int
    pending_requests: int
    rejected_replies: int
    subscriptions: dict[str, SubscriptionView]


class StatsHistory:
    """Samples of recent snapshots, to turn counters into rates."""

    def __init__(self, app: App, *, keep: float = 120.0) -> None:
        self.app = app
        self.keep = keep
        self._samples: deque[tuple[float, Snapshot]] = deque()

    async def view(self) -> StatsView:
        app = self.app
        known = await refresh_backlogs(app)
        now = app.clock.monotonic()
        snap = current(app)
        samples = self._samples
        while samples and now - samples[0][0] > self.keep:
            samples.popleft()
        # the newest sample at least a second old, else the oldest one
        ref: tuple[float, Snapshot] | None = None
        for t, sample in reversed(samples):
            ref = (t, sample)
            if now - t >= 1.0:
                break
        if not samples or now - samples[-1][0] >= 0.5:
            samples.append((now, snap))
        subs = {}
        for name, s in snap.subscriptions.items():
            st = s.stats
            rate = error_rate = 0.0
            recent = s.duration
            prev = ref[1].subscriptions.get(name) if ref is not None else None
            if ref is not None and prev is not None and now > ref[0]:
                dt = now - ref[0]
                done = st.succeeded + st.failed - prev.stats.succeeded - prev.stats.failed
                rate = done / dt
                error_rate = (st.failed - prev.stats.failed) / dt
                if prev.duration and s.duration:
                    delta = [a - b for a, b in zip(s.duration, prev.duration, strict=True)]
                    if any(delta):
                        recent = delta
            count = sum(s.duration)
            backlog, dead = known.get(name, (None, None))
            subs[name] = SubscriptionView(
                received=st.received,
                succeeded=st.succeeded,
                failed=st.failed,
                retried=st.retried,
                dead_lettered=st.dead_lettered,
                in_flight=st.in_flight,
                queued=st.queued,
                stuck_threads=st.stuck_threads,
                backlog=backlog,
                dead_letters=dead,
                rate=round(rate, 3),
                error_rate=round(error_rate, 3),
                p50=quantile(recent, 0.5),
                p99=quantile(recent, 0.99),
                latency_p99=quantile(s.latency, 0.99) if s.latency else None,
                mean=s.duration_sum / count if count else None,
            )
        return StatsView(
            app=snap.app,
            time=snap.time,
            processes=snap.processes,
            pending_requests=snap.pending_requests,
            rejected_replies=snap.rejected_replies,
            subscriptions=subs,
        )
