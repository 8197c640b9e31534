"""Admission from downstream state: a route admits a request only while the
pipeline behind it keeps up.

The pipeline of a route is every subscription its event reaches
(:func:`surge._graph.downstream`: the subscriptions of its topic, then of
what their handlers return, and so on). Every ``interval`` seconds an
:class:`Admission` part reads, for each stage, the events its transport
holds for it (waiting, or fetched and not yet settled) and how many
attempts it has finished (every process's, where the transport counts them:
``TransportStats.settled``; else this process's). What is beyond the
stage's ``concurrency`` times its consumers is queued; Little's law gives
how long an event admitted now would queue::

    delay = sum over stages of  share * queued / throughput

(throughput over the last ``window`` seconds), each stage weighted by the
share of the route's events that reach it so far (a branch that 5% of
them take adds 5% of its delay). A stage with events queued that finished
nothing for a while counts at least that while: stalled, or starting (a
process pool comes up in seconds on a busy machine).

:class:`AdaptiveLimit` bounds the queued events (at the last sample, plus
the requests admitted since, less what the pipeline passed on since at the
rate of its slowest stage) by ``limit``; a request over it is answered
503 with ``Retry-After: 1``. After each sample::

    delay > target                       limit = queued * target / delay
    delay <= target, and requests shed   limit *= min(2, target / delay)   (+1 at least)

The first is what Little's law says would queue for ``target`` at the
measured throughput (computed from the sample, so a backlog that takes a
while to drain is not cut again at every sample); the second grows the
limit only while it is what refused requests, fast while the pipeline is
far under its target and slowly near it, so an idle route does not earn a
limit it never tested. Both stay within ``[minimum, maximum]``; it starts
at the stages' summed ``concurrency`` (at least 1,000: a client's first
burst is admitted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from .._graph import downstream

if TYPE_CHECKING:
    from .._runtime import Runtime

__all__ = ("AdaptiveLimit", "Admission", "AdmissionStats", "RouteKey")

RouteKey = tuple[str, str]
"""(method, path)"""

log = logging.getLogger("surge.http")


class AdmissionStats(msgspec.Struct, frozen=True, kw_only=True):
    """A route's admission at the last sample."""

    target: float
    """``target_latency`` (seconds)."""
    limit: int | None
    """Events the pipeline may hold before the route sheds (None: no
    target, no limit)."""
    waiting: int
    """Events waiting or being handled in the pipeline, at the last sample."""
    queued: int
    """Of those, the ones no worker holds (what the limit bounds)."""
    delay: float
    """The estimated queueing delay through the pipeline (seconds)."""
    admitted: int
    shed: int
    """Requests admitted / answered 503 since the app started."""
    stages: tuple[str, ...]
    """The subscriptions of the pipeline."""


class AdaptiveLimit:
    """The limit on the events in one pipeline, and its adjustment.

    :meth:`admit` is the hot path (two integer comparisons);
    :meth:`update` takes one sample of the pipeline's stages. It reads no
    clock of its own: the sample says when it was taken.
    """

    __slots__ = (
        "_history",
        "_progress",
        "_refused",
        "admitted",
        "clock",
        "concurrency",
        "consumers",
        "delay",
        "initial",
        "limit",
        "maximum",
        "minimum",
        "queued",
        "rate",
        "sampled_at",
        "shed",
        "since",
        "stages",
        "target",
        "waiting",
        "window",
    )

    def __init__(
        self,
        target: float,
        *,
        initial: float = 100.0,
        minimum: float = 10.0,
        maximum: float = 1_000_000.0,
        window: float = 1.0,
        stages: tuple[str, ...] = (),
        concurrency: tuple[int, ...] = (),
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not target > 0:
            raise ValueError("target_latency must be positive")
        self.target = target
        self.stages = stages
        """The subscriptions of the pipeline (for statistics)."""
        self.concurrency = concurrency
        """Per stage, the events its workers handle at once (not queued)."""
        self.consumers: tuple[int, ...] = ()
        """Per stage, the processes consuming it (from the transport; 1
        when it cannot tell): each handles ``concurrency`` at once."""
        self.clock = clock
        """Read only when a request is over the limit (see :meth:`admit`)."""
        self.rate = 0.0
        """The route's events per second the pipeline's slowest stage
        passed on, at the last sample."""
        self.sampled_at = 0.0
        self.minimum = minimum
        self.maximum = maximum
        self.window = window
        self.initial = min(max(initial, minimum), maximum)
        self.limit = self.initial
        self.waiting = 0
        """Events in the pipeline at the last sample."""
        self.queued = 0
        """Of those, the ones no worker holds: queued."""
        self.since = 0
        """Requests admitted since the last sample."""
        self.delay = 0.0
        self.admitted = 0
        self.shed = 0
        self._refused = False
        self._history: deque[tuple[float, tuple[int, ...]]] = deque()
        self._progress: list[float] = []  # per stage: when it last had nothing queued or moved

    def statistics(self) -> AdmissionStats:
        return AdmissionStats(
            target=self.target,
            limit=None if math.isinf(self.limit) else int(self.limit),
            waiting=self.waiting,
            queued=self.queued,
            delay=self.delay,
            admitted=self.admitted + self.since,
            shed=self.shed,
            stages=self.stages,
        )

    def open(self, target: float | None) -> None:
        """Aim at ``target`` from now on; None: admit everything (no limit)
        until a target is set again."""
        if target is None:
            self.limit = math.inf
            return
        if math.isinf(self.limit):
            self.limit = self.initial
        self.target = target

    def admit(self) -> bool:
        """Take one more event into the pipeline, if the limit allows."""
        if self.queued + self.since < self.limit:
            self.since += 1
            return True
        clock = self.clock
        if clock is not None and self.queued + self.since < self.limit + self.rate * (
            clock() - self.sampled_at
        ):
            # What the pipeline passed on since the sample (at its measured
            # rate) no longer waits in it: a sample that comes late (a busy
            # loop) does not turn a pipeline that keeps up into a shed.
            self.since += 1
            return True
        self.shed += 1
        self._refused = True
        return False

    def update(self, now: float, stages: Sequence[tuple[int, int]]) -> None:
        """One sample at ``now`` (seconds): per stage, (events waiting or
        being handled, attempts finished since the start)."""
        history = self._history
        history.append((now, tuple(done for _, done in stages)))
        while len(history) > 2 and now - history[1][0] >= self.window:
            history.popleft()
        then, before = history[0]
        elapsed = now - then
        delay = 0.0
        queued = 0
        concurrency = self.concurrency
        progress = self._progress
        if len(progress) != len(stages):
            progress[:] = [now] * len(stages)
        # The share of the route's events that reach each stage (a branch
        # taken by 5% of them adds 5% of its delay to the typical event's).
        reached = max(max((w + d for w, d in stages), default=0), 1)
        consumers = self.consumers
        for k, (waiting, done) in enumerate(stages):
            # what the stage's workers hold is being handled, not waiting
            held = concurrency[k] if k < len(concurrency) else 0
            q = waiting - held * (consumers[k] if k < len(consumers) else 1)
            if q <= 0 or (len(history) > 1 and done != history[-2][1][k]):
                progress[k] = now
            if q <= 0:
                continue
            queued += q
            # A stage that finished nothing since `progress` has kept its
            # oldest event waiting at least that long (stalled, or a cold
            # process pool): a lower bound that needs no rate.
            stalled = now - progress[k]
            rate = (done - before[k]) / elapsed if elapsed > 0 else 0.0
            share = min(1.0, (waiting + done) / reached)
            delay += share * max(q / rate if rate > 0 else 0.0, stalled)
        self.delay = delay
        self.sampled_at = now
        if elapsed > 0:
            # The route's events leave the pipeline as fast as its slowest
            # stage passes them on (a stage's rate over its share); an idle
            # stage, which nothing waits for, holds nothing up.
            rate = math.inf
            for k, (waiting, done) in enumerate(stages):
                passed = (done - before[k]) / elapsed
                if waiting > 0 or passed > 0:
                    rate = min(rate, passed * reached / max(waiting + done, 1))
            self.rate = 0.0 if math.isinf(rate) else max(0.0, rate)
        self.admitted += self.since
        self.since = 0
        self.waiting = sum(w for w, _ in stages)
        self.queued = queued
        target = self.target
        if math.isinf(self.limit):
            pass
        elif delay > target:
            # Little's law: queues that would wait `target` hold
            # queued * target / delay events. From one sample's figures, so
            # a backlog that takes a while to drain is not cut again and again.
            self.limit = max(self.minimum, min(self.limit, queued * target / delay))
        elif self._refused:
            factor = min(2.0, target / delay) if delay > 0 else 2.0
            self.limit = min(self.maximum, max(self.limit * factor, self.limit + 1))
        self._refused = False


class _Pipeline:
    """The limit of the routes that feed one pipeline with one target."""

    __slots__ = ("groups", "limit", "target")

    def __init__(self, groups: tuple[str, ...], target: float | None) -> None:
        self.groups = groups
        self.target = target  # the route's own, or None: the ingress's
        self.limit: AdaptiveLimit | None = None


class Admission:
    """A part of the app (``App.attach``) that samples the pipelines behind
    an ingress's routes and keeps their :class:`AdaptiveLimit`.

    ``routes`` lists, when the app starts, each route's key, topics and own
    ``target_latency`` (None: the app-wide one); ``app_target`` gives the
    app-wide one (``Limits.target_latency``, None: no admission); ``bind``
    hands each route its limit (None: admit by ``max_in_flight`` alone).
    """

    initial_limit = 1000
    """The least a route's limit starts at (a client's first burst is
    admitted; the first samples correct it)."""

    def __init__(
        self,
        routes: Callable[[], list[tuple[RouteKey, tuple[str, ...], float | None]]],
        bind: Callable[[RouteKey, AdaptiveLimit | None], None],
        app_target: Callable[[], float | None],
        interval: Callable[[], float],
    ) -> None:
        self._routes = routes
        self._bind = bind
        self._app_target = app_target
        self._interval = interval
        self._pipelines: list[_Pipeline] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self, runtime: Runtime) -> None:
        subs = runtime.app.subscriptions.values()
        shared: dict[tuple[tuple[str, ...], float | None], _Pipeline] = {}
        for key, topics, own in self._routes():
            reached = downstream(subs, *topics)
            groups = tuple(s.name for s in reached)
            if (own is not None and math.isinf(own)) or not groups:
                self._bind(key, None)
                continue
            pipeline = shared.get((groups, own))
            if pipeline is None:
                pipeline = shared[(groups, own)] = _Pipeline(groups, own)
                # What the stages' workers take at once queues nowhere: a
                # burst of that many is admitted before the first sample.
                concurrency = tuple(s.concurrency for s in reached)
                pipeline.limit = AdaptiveLimit(
                    own or 1.0,
                    initial=max(self.initial_limit, sum(concurrency)),
                    stages=groups,
                    concurrency=concurrency,
                    clock=runtime.clock.monotonic,
                )
                # the app-wide target is read at each sample (a server may
                # configure its limits after the app started)
                pipeline.limit.open(self._app_target() if own is None else own)
            self._bind(key, pipeline.limit)
        self._pipelines = list(shared.values())
        if self._pipelines:
            self._task = asyncio.get_running_loop().create_task(
                self._sample(runtime), name="surge-http-admission"
            )

    async def stop(self) -> None:
        for key, _, _ in self._routes():
            self._bind(key, None)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sample(self, runtime: Runtime) -> None:
        clock = runtime.clock
        transport = runtime.transport
        app = runtime.app
        while True:
            await clock.sleep(self._interval())
            app_target = self._app_target()
            for p in self._pipelines:
                lim = p.limit
                assert lim is not None
                lim.open(app_target if p.target is None else p.target)
                try:
                    found = await asyncio.gather(*(transport.stats(g) for g in p.groups))
                except Exception as exc:  # keep the last sample; the broker may come back
                    log.debug("admission: the transport's stats failed: %r", exc)
                    continue
                counters = app.statistics().subscriptions
                stages = []
                workers = []
                for g, st in zip(p.groups, found, strict=True):
                    if st.settled is not None:
                        # every process's attempts: the queue is every
                        # process's too (a keyed stage's partitions may all
                        # be read by another worker, and this one's own
                        # count would call the stage stalled)
                        done = st.settled
                    else:
                        c = counters.get(g)
                        done = c.succeeded + c.failed if c is not None else 0
                    stages.append((st.backlog + st.pending, done))
                    workers.append(st.consumers or 1)
                lim.consumers = tuple(workers)
                lim.update(clock.monotonic(), stages)
