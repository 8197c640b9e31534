"""Handler metrics: duration and latency histograms, and several processes.

The runner already counts received, succeeded, failed, retried and
dead-lettered deliveries (``app.statistics()``); what it does not know is
how long things take. :func:`instrument` adds two histograms per
subscription, kept as plain integer buckets (a prometheus-client
``Histogram`` takes a lock per observation; these are built at scrape
time instead, like the ingress's own counters).

Several worker processes (``--workers N``) each keep their own numbers.
When ``SURGE_METRICS_DIR`` names a directory (the supervisor sets it for its
workers), every instrumented process writes a snapshot file there each
second and when it exits, and a scrape served by any worker sums the files:
counters and histograms of all workers (also of workers that have exited),
gauges of the live ones. Another worker's numbers are at most a second old.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .._clock import RealClock
from .._errors import ConfigurationError
from .._stats import AppStats, SubscriptionStats
from ._state import state_of

if TYPE_CHECKING:
    from .._app import App

__all__ = (
    "BUCKETS",
    "METRICS_DIR_ENV",
    "DirectoryWriter",
    "HandlerTimings",
    "Histogram",
    "Instruments",
    "Snapshot",
    "SubscriptionSnapshot",
    "instrument",
    "read_directory",
    "snapshot",
)

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of the histogram buckets; one more bucket is +Inf."""

METRICS_DIR_ENV = "SURGE_METRICS_DIR"
COUNTERS = ("received", "succeeded", "failed", "retried", "dead_lettered")
GAUGES = ("in_flight", "queued", "stuck_threads")


class Histogram:
    """Counts of observations per bucket (not cumulative) and their sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds


class HandlerTimings:
    """Duration and publish-to-handle latency of one subscription's attempts.

    The runner calls :meth:`now` as an attempt starts and :meth:`done` as it
    ends (returned or raised), so no Context or middleware hook is needed.
    Duration covers the handler and the publishing of its events; latency
    runs from the event's publish time to the start of the attempt (a
    retried event's includes its retry delays). Both come from the app's
    clock, so they are exact on a virtual clock.
    """

    __slots__ = ("_wall", "countdown", "duration", "every", "latency", "now", "offset")

    def __init__(self, clock: Any, every: int = 1) -> None:
        self.duration = Histogram()
        self.latency = Histogram()
        self.every = every
        self.countdown = every
        # RealClock.monotonic is the loop's time, which is time.monotonic;
        # reading it directly saves a call per timed attempt
        self.now = time.monotonic if type(clock) is RealClock else clock.monotonic
        self._wall = clock.time
        self.offset = 0.0
        self.sync()

    def sample(self) -> float:
        """The start time of an attempt to time, or -1.0 for one not timed."""
        countdown = self.countdown - 1
        if countdown:
            self.countdown = countdown
            return -1.0
        self.countdown = self.every
        return self.now()

    def sync(self) -> None:
        """Re-read the wall clock's offset from the monotonic one (one read
        per attempt, not two; resynced at every snapshot)."""
        # RealClock.monotonic reads the running loop: none at exit
        with contextlib.suppress(RuntimeError):
            self.offset = self._wall() - self.now()

    def done(self, t0: float, published: float) -> None:
        d = self.now() - t0
        h = self.duration
        h.buckets[bisect_left(BUCKETS, d)] += 1
        h.sum += d
        lat = t0 + self.offset - published
        h = self.latency
        h.buckets[bisect_left(BUCKETS, lat)] += 1
        h.sum += lat


class Instruments:
    """The :class:`HandlerTimings` of every subscription of one app."""

    def __init__(self, app: App, every: int = 1) -> None:
        self.app = app
        self.every = every
        self.subscriptions: dict[str, HandlerTimings] = {}

    def __call__(self, subscription: str) -> HandlerTimings:
        # one per subscription, kept across restarts of the app
        timings = self.subscriptions.get(subscription)
        if timings is None:
            timings = self.subscriptions[subscription] = HandlerTimings(self.app.clock, self.every)
        return timings


def metrics_of(app: App) -> Instruments | None:
    """The app's :class:`Instruments`, if it is instrumented."""
    return state_of(app).instruments


def instrument(app: App, *, sample: int | None = None) -> Instruments:
    """Record handler duration and latency histograms for ``app``
    (idempotent) and, when ``SURGE_METRICS_DIR`` is set, write this
    process's snapshot there. Call it before the app starts.

    Counters (received, failed, ...) are always exact. The histograms time
    one attempt in ``sample`` (default 8; 1: every attempt; given again to
    an instrumented app, it changes the rate): a timed attempt costs two
    clock reads and two bucket increments, about as much as a no-op handler
    itself, so timing every one would double the cost of tiny handlers.
    Quantiles of a sample are unbiased; the histograms' ``_count`` is the
    number of attempts timed.
    """
    if sample is not None and sample < 1:
        raise ConfigurationError(f"sample must be 1 or more, not {sample}")
    found = metrics_of(app)
    if found is not None:
        if sample is not None:
            found.every = sample
            for timings in found.subscriptions.values():
                timings.every = timings.countdown = sample
        return found
    if app.state != "new":
        raise ConfigurationError("instrument the app before it starts")
    found = Instruments(app, 8 if sample is None else sample)
    app.use_timings(found)  # each Runner asks it for its subscription's timings
    state = state_of(app)
    state.instruments = found
    directory = os.environ.get(METRICS_DIR_ENV)
    if directory:
        state.writer = DirectoryWriter(app, Path(directory))
        state.writer.install()
    return found


# --- snapshots --------------------------------------------------------------
class SubscriptionSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One subscription's counters, gauges and histograms."""

    stats: SubscriptionStats
    duration: list[int] = msgspec.field(default_factory=list)
    duration_sum: float = 0.0
    latency: list[int] = msgspec.field(default_factory=list)
    latency_sum: float = 0.0


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What one process (or the sum of several) knows of an app."""

    app: str
    pid: int = 0
    time: float = 0.0
    subscriptions: dict[str, SubscriptionSnapshot]
    pending_requests: int = 0
    rejected_replies: int = 0
    processes: int = 1
    loop_lag_max: float = 0.0
    """The longest any of the processes' event loops was held (seconds)."""
    resident_memory: int | None = None
    """Resident memory in bytes: the process's, or the sum of the live
    processes' that told (None when none did)."""
    unroutable: dict[str, int] = msgspec.field(default_factory=dict)
    """Publishes no declared group received, by topic (summed over processes)."""

    def statistics(self) -> AppStats:
        return AppStats(
            subscriptions={n: s.stats for n, s in self.subscriptions.items()},
            unroutable=dict(self.unroutable),
            pending_requests=self.pending_requests,
            rejected_replies=self.rejected_replies,
            loop_lag_max=self.loop_lag_max,
            resident_memory=self.resident_memory,
        )


def snapshot(app: App) -> Snapshot:
    """This process's numbers for ``app``."""
    stats = app.statistics()
    found = metrics_of(app)
    subs = {}
    for name, st in stats.subscriptions.items():
        h = found.subscriptions.get(name) if found is not None else None
        if h is not None:
            h.sync()
        if h is None:
            subs[name] = SubscriptionSnapshot(stats=st)
        else:
            subs[name] = SubscriptionSnapshot(
                stats=st,
                duration=list(h.duration.buckets),
                duration_sum=h.duration.sum,
                latency=list(h.latency.buckets),
                latency_sum=h.latency.sum,
            )
    return Snapshot(
        app=app.name,
        pid=os.getpid(),
        time=app.clock.time(),
        subscriptions=subs,
        pending_requests=stats.pending_requests,
        rejected_replies=stats.rejected_replies,
        loop_lag_max=stats.loop_lag_max,
        resident_memory=stats.resident_memory,
        unroutable=stats.unroutable,
    )


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _add(a: list[int], b: list[int]) -> list[int]:
    if not a:
        return list(b)
    if not b:
        return a
    return [x + y for x, y in zip(a, b, strict=True)]


def merge(snapshots: Iterable[Snapshot]) -> Snapshot | None:
    """The sum of several processes' snapshots of one app: counters and
    histograms of all, gauges of the processes still alive."""
    items = list(snapshots)
    if not items:
        return None
    subs: dict[str, dict[str, Any]] = {}
    pending = rejected = 0
    lag = 0.0
    memory: int | None = None
    unroutable: dict[str, int] = {}
    for snap in items:
        rejected += snap.rejected_replies
        for topic, n in snap.unroutable.items():
            unroutable[topic] = unroutable.get(topic, 0) + n
        live = _alive(snap.pid)
        if live:
            pending += snap.pending_requests
            lag = max(lag, snap.loop_lag_max)
            if snap.resident_memory is not None:
                memory = (memory or 0) + snap.resident_memory
        for name, s in snap.subscriptions.items():
            acc = subs.setdefault(
                name,
                {"c": dict.fromkeys(COUNTERS + GAUGES, 0), "d": [], "ds": 0.0, "l": [], "ls": 0.0},
            )
            for field in COUNTERS:
                acc["c"][field] += getattr(s.stats, field)
            if live:
                for field in GAUGES:
                    acc["c"][field] += getattr(s.stats, field)
            acc["d"] = _add(acc["d"], s.duration)
            acc["ds"] += s.duration_sum
            acc["l"] = _add(acc["l"], s.latency)
            acc["ls"] += s.latency_sum
    return Snapshot(
        app=items[0].app,
        time=max(s.time for s in items),
        subscriptions={
            name: SubscriptionSnapshot(
                stats=SubscriptionStats(**acc["c"]),
                duration=acc["d"],
                duration_sum=acc["ds"],
                latency=acc["l"],
                latency_sum=acc["ls"],
            )
            for name, acc in sorted(subs.items())
        },
        pending_requests=pending,
        rejected_replies=rejected,
        processes=len(items),
        loop_lag_max=lag,
        resident_memory=memory,
        unroutable=unroutable,
    )


_decoder = msgspec.json.Decoder(Snapshot)


def read_directory(directory: str | os.PathLike[str], app: str | None = None) -> Snapshot | None:
    """The merged snapshots in ``directory`` (of ``app`` only, if given)."""
    snaps = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            snap = _decoder.decode(path.read_bytes())
        except (OSError, msgspec.DecodeError):
            continue  # a file being replaced, or not ours: skip it
        if app is None or snap.app == app:
            snaps.append(snap)
    return merge(snaps)


def current(app: App) -> Snapshot:
    """The app's numbers: this process's, or all workers' when writing to a
    metrics directory (this process's file is refreshed first)."""
    writer = state_of(app).writer
    if writer is None:
        return snapshot(app)
    writer.write()
    return read_directory(writer.directory, app.name) or snapshot(app)


class DirectoryWriter:
    """Writes one app's snapshot into a metrics directory each second, and
    at exit."""

    def __init__(self, app: App, directory: Path) -> None:
        self.app = app
        self.directory = directory
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.app.on_start(self._start)
        # at exit rather than on_stop: on_stop runs before the drain, and
        # the deliveries finished while draining must be counted too
        atexit.register(self.write)

    @property
    def path(self) -> Path:
        return self.directory / f"{self.app.name}-{os.getpid()}.json"

    def write(self) -> None:
        data = msgspec.json.encode(snapshot(self.app))
        tmp = self.path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_bytes(data)
            os.replace(tmp, self.path)

    async def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while self.app.state in ("new", "running", "stopping"):
            self.write()
            await self.app.clock.sleep(1.0)
        self.write()


def iter_cumulative(buckets: list[int]) -> Iterator[tuple[str, float]]:
    """Prometheus's cumulative ``(le, count)`` pairs of per-bucket counts."""
    acc = 0
    for bound, n in zip((*map(str, BUCKETS), "+Inf"), buckets, strict=True):
        acc += n
        yield bound, float(acc)


def quantile(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile of per-bucket counts, interpolated in its bucket
    (the top bucket answers its lower bound); None without observations."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    acc = 0
    for i, n in enumerate(buckets):
        if n and acc + n >= rank:
            lo = BUCKETS[i - 1] if i else 0.0
            if i >= len(BUCKETS):
                return lo
            return lo + (BUCKETS[i] - lo) * ((rank - acc) / n)
        acc += n
    return BUCKETS[-1]
