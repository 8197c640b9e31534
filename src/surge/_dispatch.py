"""The consumer of one subscription: lanes, bounded concurrency, settling.

A runner pulls batches from its transport group (at most ``prefetch``
unsettled) and hands each delivery to a worker coroutine. Without a key any
idle worker takes the next delivery; with a key, ``hash(key) % concurrency``
picks a lane and one worker drains a lane in order. Workers are started on
demand (doubling while work waits) and stop when their queue is empty (on a
``TakesNow`` transport, a shared worker first takes the next batch itself),
so an idle subscription costs nothing and a no-op handler runs without a
task per event. After the handler succeeds its events are published, then the
delivery is acknowledged in a batch; a failure is retried with a delayed
nack or dead-lettered.

A transport's own trouble (``TransportError``) while publishing a handler's
outputs or acknowledging is not the handler's failure: both are retried in
place (``_publish_outputs``, ``_flush_acks``) and never spend an attempt of
its ``Retry`` budget (docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import traceback
from collections import deque
from collections.abc import Callable, Coroutine, Hashable, Sequence
from concurrent.futures import Executor
from time import perf_counter as _perf_counter
from typing import TYPE_CHECKING, Any

from ._clock import VirtualClock, virtual_clock_of
from ._config import Retry
from ._context import Context
from ._errors import (
    BatchFailed,
    Closed,
    ConfigurationError,
    DecodeError,
    HandlerTimeout,
    KeyFailed,
    RetryLater,
    TransportError,
)
from ._event import Envelope, Event, derive_id
from ._transport import DeadLetter, Delivery, publishing_group

if TYPE_CHECKING:
    from ._app import Subscription
    from ._runtime import HandlerTimer, Runtime

__all__ = ("Runner",)

log = logging.getLogger("surge")

ASYNC, INLINE, THREAD, PROCESS = "async", "inline", "thread", "process"

# Waits between attempts to publish a handler's outputs or to acknowledge,
# while the transport reports trouble: doubling from the first to the last.
_TRANSIENT_FIRST, _TRANSIENT_LAST = 0.05, 2.0
# At most this many events of a per-event process handler cross to the pool
# in one round trip (fewer when the queue is shared by several workers).
_PROCESS_CHUNK = 64
# A shared worker that takes its next batch itself (TakesNow) lets the loop
# run once it has held it this long (seconds of real time) since it last did:
# fast handlers run many batches a turn, slow ones that never await still
# let others in after each batch.
_SLICE = 0.001


class Runner:
    """Consumes one subscription's group and runs its handler."""

    # Slots: the worker loop reads and writes these per event; past 30
    # attributes a plain instance loses CPython's inline attribute values
    # and every access is a dict lookup (BENCHMARKS.md, issue 17).
    __slots__ = (
        "_ack_waiter",
        "_acked",
        "_acker",
        "_acks",
        "_acks_in_flight",
        "_batch_full",
        "_chunked",
        "_consumer",
        "_growing",
        "_idle",
        "_lanes",
        "_queue",
        "_settle_now",
        "_starting",
        "_stopping",
        "_take",
        "_tasks",
        "_thread_slots",
        "_virtual_clock",
        "_waiting_lanes",
        "_workers",
        "batch",
        "concurrency",
        "dead_lettered",
        "failed",
        "group",
        "keyed",
        "received",
        "retried",
        "running",
        "runtime",
        "sub",
        "timed_out_threads",
        "timings",
        "transport",
    )

    def __init__(self, runtime: Runtime, sub: Subscription) -> None:
        self.runtime = runtime
        self.sub = sub
        self.transport = runtime.transport
        self.group = sub.name
        self.concurrency = sub.concurrency
        self.keyed = sub.key is not None
        # Batch handlers take lists from the shared queue, in delivery order,
        # `concurrency` batches at a time (no lanes); one worker at a time
        # lingers for a partial batch to fill, on `_batch_full`.
        self.batch = sub.batch
        self._batch_full: asyncio.Future[None] | None = None
        # Per-event process handlers cross to the pool in chunks: one round
        # trip for up to _PROCESS_CHUNK events (a timeout keeps one each, so
        # it bounds one event).
        self._chunked = sub.kind == PROCESS and not sub.batch and sub.timeout is None
        self._queue: deque[Delivery] = deque()  # unkeyed: shared by workers
        self._lanes: dict[int, deque[Delivery]] = {}  # keyed: one deque per busy lane
        self._waiting_lanes: deque[tuple[int, deque[Delivery]]] = deque()
        self._workers = 0
        self._starting = 0
        self._growing = False  # a _grow is scheduled
        self._tasks: set[asyncio.Task[None]] = set()
        self._acks_in_flight: asyncio.Future[None] | None = None
        self._acks: list[Delivery] = []
        self._ack_waiter: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._acker: asyncio.Task[None] | None = None
        # A transport that takes and settles without awaiting (TakesNow):
        # shared workers refill themselves (_more), and everything is
        # settled at once (_settle_acks), by the ack loop as ever (at the
        # loop's next turn: a stage's pending count stays true, which
        # admission reads) and by a worker before it takes or ends; set by
        # start().
        self._take: Callable[[int, Sequence[Delivery]], list[Delivery]] | None = None
        self._settle_now: Callable[[Sequence[Delivery]], None] | None = None
        self._stopping = False
        # counters, read by statistics()
        self.received = 0
        # succeeded = _acked + len(_acks): every delivery in _acks succeeded,
        # so a success costs an append, not a counter too
        self._acked = 0
        self.failed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.running = 0
        self.timed_out_threads = 0
        # A thread handler's events in flight (`concurrency`) include those
        # publishing their outputs on the loop; at most the pool's size of
        # them run in threads at once, and an attempt's timeout starts when
        # its thread slot is taken, not while it queues for one.
        self._thread_slots = (
            asyncio.Semaphore(min(self.concurrency, runtime.threads))
            if sub.kind == THREAD
            else None
        )
        # surge.observe's duration/latency recorder, when the app is
        # instrumented: called once per attempt, no Context needed
        timings = runtime.timings
        self.timings: HandlerTimer | None = timings(self.group) if timings is not None else None
        # A virtual clock stands still while a thread works for the loop.
        clock = runtime.clock
        # (the loop's own, when the app was given no clock: see
        # virtual_clock_of; runners are made as the app starts, on its loop)
        loop = asyncio.get_running_loop()
        self._virtual_clock = clock if isinstance(clock, VirtualClock) else virtual_clock_of(loop)

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        takes_now = self.runtime.takes_now
        taker = None
        if takes_now is not None and not self.keyed and not self.batch and not self._chunked:
            taker = takes_now.taker(self.group)
        if taker is not None:
            self._take, self._settle_now = taker
        self._consumer = loop.create_task(self._consume(), name=f"surge-consume-{self.group}")
        self._acker = loop.create_task(self._ack_loop(), name=f"surge-ack-{self.group}")

    async def stop_intake(self) -> None:
        """Stop fetching; hand back deliveries fetched but not started."""
        self._stopping = True
        full = self._batch_full
        if full is not None and not full.done():
            full.set_result(None)  # a lingering batch worker ends now
        if self._consumer is not None:
            self._consumer.cancel()
            # not `await consumer`: that would also swallow a cancel of this
            # stop (App.stop bounds it); the consumer's own end is not news
            await asyncio.wait((self._consumer,))
            if not self._consumer.cancelled() and (exc := self._consumer.exception()):
                log.error("%s: the consumer failed: %r", self.group, exc)
        # Lanes first: a key's deliveries in its lane came before any of that
        # key's still in the shared queue (shared workers divert each as they
        # pop it), and the hand-back keeps the order it is given.
        waiting: list[Delivery] = []
        for lane in self._lanes.values():
            waiting.extend(lane)
            lane.clear()
        self._waiting_lanes.clear()
        waiting.extend(self._queue)
        self._queue.clear()
        # Untouched deliveries go back in their place where the transport
        # can (a partition's next owner reads them before later entries);
        # elsewhere a nack, which counts an attempt.
        hands_back = self.runtime.hands_back
        if hands_back is not None:
            await hands_back.release(waiting)
            return
        for d in waiting:
            await self.transport.nack(d, 0.0)

    @property
    def stopping(self) -> bool:
        """Intake has stopped (the app is stopping)."""
        return self._stopping

    @property
    def queued(self) -> int:
        """Deliveries fetched and waiting for a worker."""
        return len(self._queue) + sum(len(q) for q in self._lanes.values())

    @property
    def idle(self) -> bool:
        """No worker runs and every handled delivery is settled."""
        return not self._workers and not self._acks

    @property
    def succeeded(self) -> int:
        """Deliveries handled successfully (acknowledged or about to be)."""
        return self._acked + len(self._acks)

    async def wait_idle(self) -> None:
        """Return once :attr:`idle`."""
        while self._workers or self._acks:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    async def cancel_workers(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        # An ack batch the ack loop took off _acks may still be on the wire
        # (idle already holds then): let it land before the loop is
        # cancelled, or the transport's close could give up a partition
        # whose last delivery was never settled (its next owner runs it again).
        while self._acks_in_flight is not None:
            await asyncio.wait((self._acks_in_flight,))
        await self._flush_acks(closing=True)
        if self._acker is not None:
            self._acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acker

    # --- intake --------------------------------------------------------------
    async def _consume(self) -> None:
        """Consume until stopped. A consume that fails (anything the
        transport did not turn into its own retries) is logged in one line
        and started again after a backoff, instead of leaving the
        subscription without a consumer while the app looks alive."""
        delay = 0.1
        while not self._stopping:
            seen = self.received
            try:
                await self._consume_once()
                return  # the transport ended the stream: it closed
            except Closed:
                if not self._stopping:
                    log.error("%s: the transport closed under its consumer", self.group)
                return
            except ConfigurationError as exc:  # trying again cannot help
                log.error("%s: cannot consume: %s", self.group, exc)
                return
            except Exception as exc:
                if self._stopping:
                    raise
                if self.received > seen:
                    delay = 0.1  # it had worked since the last failure
                log.error(
                    "%s: consuming failed (%s: %s); consuming again in %.1f s",
                    self.group,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)  # the loop's time: virtual under a VirtualClock
                delay = min(delay * 2, 5.0)

    async def _consume_once(self) -> None:
        batches = self.transport.consume(self.group, prefetch=self.sub.prefetch)
        keyed = self.keyed
        queue = self._queue
        try:
            async for batch in batches:
                if self._stopping:
                    # our cancel was swallowed by a client library (Python
                    # 3.11's wait_for does that): stop_intake hands it back
                    queue.extend(batch)
                    break
                self.received += len(batch)
                if self.batch:
                    queue.extend(batch)
                    self._feed_batches()
                elif keyed:
                    for d in batch:
                        self._push_keyed(d)
                else:
                    if self._chunked:
                        # Chunks cross to the pool unordered: an envelope
                        # key (publish(key=...)), which orders too even when
                        # the subscription itself names none, takes its lane
                        # here; the other workers check each delivery.
                        for d in batch:
                            if d.envelope.key is None:
                                queue.append(d)
                            else:
                                self._push_keyed(d)
                    else:
                        queue.extend(batch)
                    if queue and not self._starting and self._workers < self.concurrency:
                        self._spawn(self._work_shared)
        finally:
            aclose = getattr(batches, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _more(self, since: float) -> float | None:
        """Whether a shared worker that emptied its queue has work again
        (None: it has not, and ends): with ``TakesNow``, it settles what was
        handled and takes the next batch itself, instead of ending and
        leaving the refill to the consume loop (a task switch or four per
        batch, about a third of in-process dispatch's cost: BENCHMARKS.md,
        issue 17); the consume loop still waits for deliveries when none
        are left. A worker that has held the loop for ``_SLICE`` since
        ``since`` (when it last let the loop run, as far as it knows) lets
        it run first, and under a virtual clock always does (real time
        would make a seeded run's interleaving differ from one run to the
        next); it returns when it last did."""
        take = self._take
        if take is None or self._stopping or self._waiting_lanes:
            return None  # (a lane waiting for a slot gets this worker's as it ends)
        if self._virtual_clock is not None or _perf_counter() - since >= _SLICE:
            await asyncio.sleep(0)
            since = _perf_counter()
            if self.stopping or self._waiting_lanes:  # (they came meanwhile)
                return None
        queue = self._queue
        if queue:  # the consume loop queued some meanwhile
            return since
        acks = self._acks
        if acks:
            self._acks = []
            self._acked += len(acks)
        batch = take(self.sub.prefetch, acks)
        if not batch:
            return None
        self.received += len(batch)
        queue.extend(batch)
        return since

    def _settle_acks(self) -> None:
        """Settle the handled deliveries at once (``TakesNow``)."""
        acks = self._acks
        if acks:
            assert self._settle_now is not None
            self._acks = []
            self._acked += len(acks)
            self._settle_now(acks)

    def _feed_batches(self) -> None:
        queue = self._queue
        full = self._batch_full
        if full is not None:
            if len(queue) >= self.batch and not full.done():
                full.set_result(None)
            return  # a worker lingers: it takes what came
        if (
            queue
            and not self._starting
            and self._workers < self.concurrency
            and (not self._workers or len(queue) >= self.batch)
        ):
            self._spawn(self._work_batch)

    def _spawn_settle(self, settle: Coroutine[Any, Any, None]) -> None:
        """Run ``settle`` (a dead-letter) beside the workers; a stop cancels it
        with them (the delivery's lease then brings it back)."""
        task = asyncio.get_running_loop().create_task(settle)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        self._workers += 1
        self._starting += 1
        task = asyncio.get_running_loop().create_task(fn(*args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _push_keyed(self, d: Delivery) -> None:
        try:
            key = self._key_of(d)
        except DecodeError:
            key = d.envelope.id  # undecodable: any lane; the handler path dead-letters it
        except Exception as exc:
            # The subscription's key function raised on this event: no lane
            # can keep its order, and raising here would end the intake task
            # with every fetched delivery unsettled. Dead-letter it instead.
            env = d.envelope
            failed = KeyFailed(
                f"the key of {self.group} raised on {env.topic!r} ({type(exc).__name__}: {exc})",
                topic=env.topic,
            )
            failed.__cause__ = exc
            self._spawn_settle(self._failed(d, failed, None))
            return
        lane_id = hash(key) % self.concurrency
        lane = self._lanes.get(lane_id)
        if lane is None:
            lane = self._lanes[lane_id] = deque()
            lane.append(d)
            if self._workers < self.concurrency:
                self._spawn(self._work_lane, lane_id, lane)
            else:  # unkeyed workers hold every slot: the lane waits for one
                self._waiting_lanes.append((lane_id, lane))
        else:
            lane.append(d)

    def _key_of(self, d: Delivery) -> Hashable:
        key_fn = self.sub.key
        if key_fn is None:
            return d.envelope.key
        return key_fn(self._event(d))

    # --- workers -------------------------------------------------------------
    async def _work_shared(self) -> None:
        self._starting -= 1
        queue = self._queue
        popleft = queue.popleft
        handle = self._handle
        sub = self.sub
        # The fast path (a plain async or inline handler of a decoded event)
        # is inlined here; everything else goes through _handle. Middleware
        # keeps it: hooks cost a Context per event, not a slower path.
        fast = sub.kind in (ASYNC, INLINE) and not sub.wants_ctx and sub.timeout is None
        inline = sub.kind == INLINE
        fn = sub.handler
        middleware = self.runtime.middleware
        observer = self.runtime.observer
        app = self.runtime.app
        group = self.group
        ctx: Context | None = None
        # surge.observe times one attempt in `every`: the attempts not timed
        # cost a countdown, shared by the subscription's workers
        timings: Any = self.timings  # a HandlerTimer whenever every > 0
        every = timings.every if timings is not None else 0
        t0 = -1.0
        if self._chunked:
            try:
                while queue:
                    n = min(len(queue), _PROCESS_CHUNK, -(-len(queue) // self.concurrency))
                    chunk = [popleft() for _ in range(n)]
                    if queue and not self._starting and self._workers < self.concurrency:
                        self._spawn(self._work_shared)
                    await self._handle_in_process(chunk)
            finally:
                self._worker_done()
            return
        loop = asyncio.get_running_loop()
        if fast and not middleware and not every:
            await self._work_plain(fn, inline, loop)
            return
        try:
            since = _perf_counter()
            while True:
                if not queue:
                    more = await self._more(since)
                    if more is None:
                        break
                    since = more
                d = popleft()
                if queue and not self._growing:
                    # Work is waiting: once this worker lets the loop run
                    # (its handler awaits), more may be needed (_grow).
                    self._growing = True
                    loop.call_soon(self._grow)
                env = d.envelope
                if env.key is not None:  # publish(key=...): in order, in its lane
                    self._push_keyed(d)
                    continue
                ev = env.event
                if not fast or ev is None:
                    await handle(d)
                    continue
                self.running += 1
                if every:
                    countdown = timings.countdown - 1
                    if countdown:
                        timings.countdown = countdown
                    else:
                        timings.countdown = every
                        t0 = timings.now()
                try:
                    if middleware:
                        ctx = Context(app, d, group)
                        for mw in middleware:
                            mw.before_handle(ctx)
                        if observer is not None:
                            observer.handling(group, d)
                        result = fn(ev) if inline else await fn(ev)
                        for mw in reversed(middleware):
                            mw.after_handle(ctx, result)
                        if ctx.outbox:
                            await self._publish_children(d, result, ctx.outbox)
                            result = None
                    else:
                        if observer is not None:
                            observer.handling(group, d)
                        result = fn(ev) if inline else await fn(ev)
                    if result is not None:
                        await self._publish_children(d, result, None)
                except Exception as exc:
                    self.running -= 1
                    if t0 >= 0.0:
                        timings.done(t0, d.envelope.time)
                        t0 = -1.0
                    await self._failed(d, exc, ctx)
                    continue
                except asyncio.CancelledError:
                    self.running -= 1
                    if self._stopping:
                        await asyncio.shield(self.transport.nack(d, 0.0))
                    raise
                self.running -= 1
                if t0 >= 0.0:
                    timings.done(t0, d.envelope.time)
                    t0 = -1.0
                if observer is not None:
                    observer.handled(group, d)
                self._acks.append(d)
                waiter = self._ack_waiter
                if waiter is not None:
                    self._ack_waiter = None
                    waiter.set_result(None)
        finally:
            self._worker_done()

    async def _work_plain(
        self, fn: Callable[[Any], Any], inline: bool, loop: asyncio.AbstractEventLoop
    ) -> None:
        """_work_shared's loop for the most common subscription: an async or
        inline handler of the event alone, no timeout, no middleware, no
        timings; the same steps without per-event checks for what it lacks
        but an observer (``surge.testing.Harness``), which watches this loop
        rather than switching it off.

        ``running`` counts this worker once for its whole run of handlers
        rather than once per event: between two handlers it never lets the
        loop run, so no one can tell the difference, except while it waits
        for ``_failed``, which it steps out of the count for."""
        queue = self._queue
        popleft = queue.popleft
        observer = self.runtime.observer
        group = self.group
        counted = False
        more = self._more
        since = _perf_counter()
        try:
            while True:
                if queue:
                    self.running += 1
                    counted = True
                while queue:
                    d = popleft()
                    if queue and not self._growing:
                        self._growing = True
                        loop.call_soon(self._grow)
                    env = d.envelope
                    if env.key is not None:  # publish(key=...): in order, in its lane
                        self._push_keyed(d)
                        continue
                    ev = env.event
                    try:
                        if ev is None:  # off a wire: decoded here, once
                            ev = self._event(d)
                        if observer is not None:
                            observer.handling(group, d)
                        result = fn(ev) if inline else await fn(ev)
                        if result is not None:
                            await self._publish_children(d, result, None)
                    except Exception as exc:
                        self.running -= 1
                        counted = False
                        await self._failed(d, exc, None)
                        self.running += 1
                        counted = True
                        continue
                    except asyncio.CancelledError:
                        self.running -= 1
                        counted = False
                        if self._stopping:
                            await asyncio.shield(self.transport.nack(d, 0.0))
                        raise
                    if observer is not None:
                        observer.handled(group, d)
                    self._acks.append(d)
                    waiter = self._ack_waiter
                    if waiter is not None:
                        self._ack_waiter = None
                        waiter.set_result(None)
                if counted:
                    self.running -= 1
                    counted = False
                if (more_since := await more(since)) is None:
                    break
                since = more_since
        finally:
            if counted:
                self.running -= 1
            self._worker_done()

    def _grow(self) -> None:
        """Add shared workers, doubling, while work waits and nobody is coming
        for it, so a burst reaches full concurrency quickly. Called soon after
        a worker saw work waiting: a worker whose handlers never await has
        drained the queue by then, and no task is started for nothing."""
        self._growing = False
        queue = self._queue
        if queue and not self._stopping and not self._starting:
            n = min(len(queue), self.concurrency - self._workers, max(1, self._workers))
            for _ in range(n):
                self._spawn(self._work_shared)

    async def _work_lane(self, lane_id: int, lane: deque[Delivery]) -> None:
        self._starting -= 1
        handle = self._handle
        fences = self.runtime.fences
        fenced = fences.fenced if fences is not None else None
        try:
            if self._chunked:
                # in order: the chunk runs in one worker process, one by one
                while lane:
                    n = min(len(lane), _PROCESS_CHUNK)
                    chunk = [lane.popleft() for _ in range(n)]
                    if fenced is not None:
                        chunk = [d for d in chunk if not fenced(d)]
                    if chunk:
                        await self._handle_in_process(chunk)
            while lane:
                d = lane.popleft()
                # A delivery whose partition may have moved on is not started
                # (the transport forgot it: its partition's owner handles it).
                if fenced is None or not fenced(d):
                    await handle(d)
        finally:
            if self._lanes.get(lane_id) is lane:
                del self._lanes[lane_id]
            self._worker_done()

    async def _work_batch(self) -> None:
        self._starting -= 1
        queue = self._queue
        popleft = queue.popleft
        size = self.batch
        linger = self.sub.linger
        loop = asyncio.get_running_loop()
        try:
            while queue and not self._stopping:
                if len(queue) < size and linger > 0.0:
                    if self._batch_full is not None:
                        break  # another worker lingers for this partial batch
                    full = self._batch_full = loop.create_future()
                    try:
                        # the loop's time: virtual under a VirtualClock
                        await asyncio.wait((full,), timeout=linger)
                    finally:
                        self._batch_full = None
                    if self.stopping:  # stop_intake woke us
                        break
                n = min(size, len(queue))
                if not n:
                    continue
                taken = [popleft() for _ in range(n)]
                if len(queue) >= size and not self._starting and self._workers < self.concurrency:
                    self._spawn(self._work_batch)
                await self._handle_batch(taken)
        finally:
            self._worker_done()

    def _worker_done(self) -> None:
        self._workers -= 1
        if self._settle_now is not None:
            self._settle_acks()
        if not self._stopping:
            # A freed slot goes to a lane waiting for one, else to unkeyed
            # work that found every slot taken by lanes.
            if self.batch:
                self._feed_batches()
            elif self._waiting_lanes:
                self._spawn(self._work_lane, *self._waiting_lanes.popleft())
            elif self._queue and not self._starting:
                self._spawn(self._work_shared)
        if not self._workers and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    # --- handling ------------------------------------------------------------
    def _event(self, d: Delivery) -> Event:
        env = d.envelope
        ev = env.event
        if ev is None:
            ev = env.event = self.runtime.decode(env, self.sub)
        return ev  # type: ignore[no-any-return]

    async def _handle(self, d: Delivery) -> None:
        sub = self.sub
        middleware = self.runtime.middleware
        self.running += 1
        ctx: Context | None = None
        timings: Any = self.timings  # a HandlerTimer whenever t0 >= 0
        t0 = timings.sample() if timings is not None else -1.0
        try:
            ev = d.envelope.event
            if ev is None:
                ev = self._event(d)
            if sub.wants_ctx or middleware:
                ctx = Context(self.runtime.app, d, self.group)
                for mw in middleware:
                    mw.before_handle(ctx)
            observer = self.runtime.observer
            if observer is not None:
                observer.handling(self.group, d)
            kind = sub.kind
            fn = sub.handler
            if kind == ASYNC:
                if sub.timeout is None:
                    result = await (fn(ev, ctx) if sub.wants_ctx else fn(ev))
                else:
                    try:
                        async with asyncio.timeout(sub.timeout):
                            result = await (fn(ev, ctx) if sub.wants_ctx else fn(ev))
                    except TimeoutError:
                        raise HandlerTimeout(
                            f"{self.group} took longer than {sub.timeout}s on {d.envelope.id}"
                        ) from None
            elif kind == INLINE:
                result = fn(ev, ctx) if sub.wants_ctx else fn(ev)
            else:
                result = await self._off_loop(d, ev, ctx)
            if ctx is not None:
                for mw in reversed(middleware):
                    mw.after_handle(ctx, result)
                if ctx.outbox:
                    await self._publish_children(d, result, ctx.outbox)
                    result = None
            if result is not None:
                await self._publish_children(d, result, None)
        except asyncio.CancelledError:
            self.running -= 1
            if self._stopping:
                # Shutdown deadline passed: hand the delivery back untouched.
                await asyncio.shield(self.transport.nack(d, 0.0))
            raise
        except BaseException as exc:
            self.running -= 1
            if not isinstance(exc, Exception):
                raise
            if t0 >= 0.0:
                timings.done(t0, d.envelope.time)
            await self._failed(d, exc, ctx)
            return
        self.running -= 1
        if t0 >= 0.0:
            timings.done(t0, d.envelope.time)
        observer = self.runtime.observer
        if observer is not None:
            observer.handled(self.group, d)
        self._acks.append(d)
        waiter = self._ack_waiter
        if waiter is not None:
            self._ack_waiter = None
            waiter.set_result(None)

    def _decoded(self, ds: list[Delivery]) -> tuple[list[Delivery], list[Any], list[Any]]:
        """The deliveries whose events decode, the events, and the failures
        ``(delivery, error)`` of the others."""
        ok: list[Delivery] = []
        events: list[Any] = []
        bad: list[Any] = []
        for d in ds:
            try:
                events.append(self._event(d))
            except Exception as exc:
                bad.append((d, exc))
                continue
            ok.append(d)
        return ok, events, bad

    def _contexts(self, ds: list[Delivery]) -> list[Context] | None:
        """The middleware's contexts of ``ds`` (None without middleware),
        their ``before_handle`` hooks run, then the observer told."""
        middleware = self.runtime.middleware
        ctxs: list[Context] | None = None
        if middleware:
            app = self.runtime.app
            ctxs = [Context(app, d, self.group) for d in ds]
            for ctx in ctxs:
                for mw in middleware:
                    mw.before_handle(ctx)
        observer = self.runtime.observer
        if observer is not None:
            for d in ds:
                observer.handling(self.group, d)
        return ctxs

    def _succeeded(self, ds: list[Delivery]) -> None:
        observer = self.runtime.observer
        if observer is not None:
            for d in ds:
                observer.handled(self.group, d)
        self._acks.extend(ds)
        waiter = self._ack_waiter
        if waiter is not None:
            self._ack_waiter = None
            waiter.set_result(None)

    async def _handed_back(self, ds: list[Delivery]) -> None:
        """A stop's deadline cancelled handlers of ``ds``: hand them back."""
        if self._stopping:
            for d in ds:
                await asyncio.shield(self.transport.nack(d, 0.0))

    async def _handle_batch(self, ds: list[Delivery]) -> None:
        """One call of a batch handler with the events of ``ds``; they are
        settled together, but for those a ``BatchFailed`` names."""
        sub = self.sub
        self.running += len(ds)
        ds, events, bad = self._decoded(ds)
        for d, exc in bad:
            self.running -= 1
            await self._failed(d, exc, None)
        if not ds:
            return
        timings: Any = self.timings  # a HandlerTimer whenever t0 >= 0
        t0 = timings.sample() if timings is not None else -1.0
        failures: dict[int, BaseException] = {}
        ctxs: list[Context] | None = None
        try:
            ctxs = self._contexts(ds)
            fn = sub.handler
            if sub.kind == ASYNC:
                if sub.timeout is None:
                    result = await fn(events)
                else:
                    try:
                        async with asyncio.timeout(sub.timeout):
                            result = await fn(events)
                    except TimeoutError:
                        raise HandlerTimeout(
                            f"{self.group} took longer than {sub.timeout}s on a batch of "
                            f"{len(events)} from {ds[0].envelope.id}"
                        ) from None
            elif sub.kind == INLINE:
                result = fn(events)
            else:
                result = await self._off_loop(ds[0], events, None)
        except asyncio.CancelledError:
            self.running -= len(ds)
            await self._handed_back(ds)
            raise
        except BatchFailed as exc:
            failures = exc.failures
            result = exc.outputs or None
            wrong = [i for i in failures if not (isinstance(i, int) and 0 <= i < len(ds))]
            if wrong:
                failures = dict.fromkeys(
                    range(len(ds)),
                    TypeError(
                        f"handler {self.group} raised BatchFailed naming positions {wrong} "
                        f"of a batch of {len(ds)}"
                    ),
                )
                result = None
        except Exception as exc:
            failures = dict.fromkeys(range(len(ds)), exc)
            result = None
        if t0 >= 0.0:
            timings.done(t0, ds[0].envelope.time)
        done = [d for i, d in enumerate(ds) if i not in failures] if failures else ds
        if done:
            try:
                if ctxs is not None:
                    for i, ctx in enumerate(ctxs):
                        if i not in failures:
                            for mw in reversed(self.runtime.middleware):
                                mw.after_handle(ctx, result)
                if result is not None:
                    # ids derived from the batch's first and last events:
                    # the same batch again republishes the same ids
                    await self._publish_children(ds[0], result, None, f"{ds[-1].envelope.id}/")
            except asyncio.CancelledError:
                self.running -= len(ds)
                await self._handed_back(ds)
                raise
            except Exception as exc:
                failures = dict.fromkeys(range(len(ds)), exc)
                done = []
        self.running -= len(ds)
        for i, error in failures.items():
            if not isinstance(error, Exception):
                error = RuntimeError(f"{type(error).__name__}: {error}")
            await self._failed(ds[i], error, ctxs[i] if ctxs is not None else None)
        if done:
            self._succeeded(done)

    async def _handle_in_process(self, ds: list[Delivery]) -> None:
        """Run a per-event process handler on ``ds`` in one round trip to the
        pool; each event succeeds or fails on its own, as in ``_handle``."""
        self.running += len(ds)
        ds, events, bad = self._decoded(ds)
        for d, exc in bad:
            self.running -= 1
            await self._failed(d, exc, None)
        if not ds:
            return
        timings: Any = self.timings
        t0 = timings.sample() if timings is not None else -1.0
        ctxs: list[Context] | None = None
        try:
            ctxs = self._contexts(ds)
            outcomes = await self._run_in_pool(_call_each, self.sub.handler, events)
        except asyncio.CancelledError:
            self.running -= len(ds)
            await self._handed_back(ds)
            raise
        except Exception as exc:  # the pool itself failed (a worker died)
            outcomes = [(False, exc)] * len(ds)
        if t0 >= 0.0:
            timings.done(t0, ds[0].envelope.time)
        middleware = self.runtime.middleware
        for i, (d, (ok, value)) in enumerate(zip(ds, outcomes, strict=True)):
            ctx = ctxs[i] if ctxs is not None else None
            if ok:
                try:
                    if ctx is not None:
                        for mw in reversed(middleware):
                            mw.after_handle(ctx, value)
                    if value is not None:
                        await self._publish_children(d, value, None)
                except asyncio.CancelledError:
                    self.running -= len(ds) - i
                    await self._handed_back(ds[i:])
                    raise
                except Exception as exc:
                    ok, value = False, exc
            self.running -= 1
            if ok:
                self._succeeded([d])
            else:
                await self._failed(d, value, ctx)

    async def _run_in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the process pool (the virtual clock held meanwhile)."""
        loop = asyncio.get_running_loop()
        clock = self._virtual_clock
        if clock is not None:
            clock.hold()
        fut = loop.run_in_executor(self.runtime.process_pool(), fn, *args)
        if clock is not None:
            fut.add_done_callback(lambda _: clock.release())
        return await fut

    async def _off_loop(self, d: Delivery, ev: Any, ctx: Context | None) -> Any:
        sub = self.sub
        runtime = self.runtime
        loop = asyncio.get_running_loop()
        executor: Executor
        slots = self._thread_slots
        if slots is not None:
            executor = runtime.thread_pool()
            args: tuple[Any, ...] = (ev, ctx) if sub.wants_ctx else (ev,)
            await slots.acquire()
        else:
            executor = runtime.process_pool()
            args = (ev,)
        clock = self._virtual_clock
        if clock is not None:
            clock.hold()
        try:
            fut = loop.run_in_executor(executor, sub.handler, *args)
        except BaseException:
            if slots is not None:
                slots.release()
            if clock is not None:
                clock.release()
            raise
        if slots is not None:
            # held until the thread returns, also past a timeout or a cancel
            fut.add_done_callback(lambda _: slots.release())
        if clock is not None:
            fut.add_done_callback(lambda _: clock.release())
        if sub.timeout is None:
            return await fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), sub.timeout)
        except TimeoutError:
            # A thread cannot be cancelled: it keeps its pool slot until it
            # returns, and whatever it returns is dropped. Count it so the
            # lost capacity shows in statistics().
            self.timed_out_threads += 1
            fut.add_done_callback(self._thread_finished)
            raise HandlerTimeout(
                f"{self.group} took longer than {sub.timeout}s on {d.envelope.id}; "
                "its thread runs on until it returns"
            ) from None

    def _thread_finished(self, fut: asyncio.Future[Any]) -> None:
        self.timed_out_threads -= 1
        if not fut.cancelled():
            fut.exception()  # retrieved, so asyncio does not log it

    async def _publish_children(
        self,
        d: Delivery,
        result: Any,
        extra: list[tuple[Event, str | None, dict[str, str] | None]] | None,
        prefix: str = "",
    ) -> None:
        parent = d.envelope
        items: list[tuple[Event, str | None, dict[str, str] | None]] = []
        if extra:
            items.extend(extra)
        if result is not None:
            if isinstance(result, Event):
                items.append((result, None, None))
            elif isinstance(result, (list, tuple)):
                for r in result:
                    if not isinstance(r, Event):
                        raise TypeError(
                            f"handler {self.group} returned {type(r).__name__}; "
                            "return an Event, a sequence of Events, or None"
                        )
                    items.append((r, None, None))
            else:
                raise TypeError(
                    f"handler {self.group} returned {type(result).__name__}; "
                    "return an Event, a sequence of Events, or None"
                )
        inherited = _inherit(parent.headers)
        now = self.runtime.clock.time()
        envs = []
        for i, (ev, key, headers) in enumerate(items):
            h = inherited
            if headers:
                h = {**(inherited or {}), **headers}
            position = f"{prefix}{i}" if prefix else i
            envs.append(Envelope(derive_id(parent.id, position), ev.__topic__, key, now, h, ev))
        await self._publish_outputs(d, envs)

    async def _publish_outputs(self, d: Delivery, envs: list[Envelope]) -> None:
        """Publish a handler's outputs, waiting out the transport's trouble.

        The handler ran and succeeded; a ``TransportError`` is the broker's,
        so it is retried here (with a growing wait) instead of failing the
        attempt: the handler is not run again and its ``Retry`` budget is not
        spent. Publishing twice is harmless, the outputs' ids are derived
        from the delivery's and deduplicated. A stop's deadline cancels the
        wait, and the delivery is handed back as for any handler still running.
        """
        delay = _TRANSIENT_FIRST
        # this task's publishes only: a task started meanwhile (by middleware,
        # say) inherits the variable but is not this task
        token = publishing_group.set((self.group, asyncio.current_task()))
        try:
            while True:
                try:
                    await self.runtime.publish(envs)
                    return
                except TransportError as exc:
                    log.warning(
                        "handler %s succeeded on event %s but publishing its outputs failed: "
                        "%s; publishing again in %.2fs (the attempt is not counted)",
                        self.group,
                        d.envelope.id,
                        exc,
                        delay,
                        extra={"event_id": d.envelope.id, "subscription": self.group},
                    )
                await self.runtime.clock.sleep(delay)
                delay = min(_TRANSIENT_LAST, delay * 2)
        finally:
            publishing_group.reset(token)

    async def _failed(self, d: Delivery, exc: Exception, ctx: Context | None) -> None:
        sub = self.sub
        runtime = self.runtime
        env = d.envelope
        self.failed += 1
        if runtime.middleware:
            if ctx is None:
                ctx = Context(runtime.app, d, self.group)
            for mw in reversed(runtime.middleware):
                mw.on_error(ctx, exc)
        retry: Retry = sub.retry
        if isinstance(exc, DecodeError):
            retryable = False
        elif isinstance(exc, RetryLater):
            retryable = True
        else:
            retryable = retry.retries(exc)
        if retryable and d.attempt < retry.attempts:
            delay = exc.delay if isinstance(exc, RetryLater) and exc.delay is not None else None
            if delay is None:
                delay = retry.delay(d.attempt, runtime.rng)
            self.retried += 1
            log.warning(
                "handler %s failed on event %s (%s, attempt %d of %d): %r; retrying in %.3fs",
                self.group,
                env.id,
                env.topic,
                d.attempt,
                retry.attempts,
                exc,
                delay,
                extra={
                    "event_id": env.id,
                    "topic": env.topic,
                    "subscription": self.group,
                    "attempt": d.attempt,
                },
            )
            await self.transport.nack(d, delay)
            return
        self.dead_lettered += 1
        log.error(
            "handler %s failed on event %s (%s, attempt %d): %r; dead-lettered",
            self.group,
            env.id,
            env.topic,
            d.attempt,
            exc,
            exc_info=not isinstance(exc, DecodeError),
            extra={
                "event_id": env.id,
                "topic": env.topic,
                "subscription": self.group,
                "attempt": d.attempt,
            },
        )
        if env.body is not None:
            body = env.body
        else:
            try:
                body = runtime.codec.encode_event(env.event)
            except Exception:  # an event that will not encode still leaves a record
                body = b""
        record = DeadLetter(
            id=env.id,
            group=self.group,
            topic=env.topic,
            key=env.key,
            headers=env.headers,
            body=body,
            error_type=type(exc).__qualname__,
            error=str(exc),
            traceback="".join(traceback.format_exception(exc)),
            attempts=d.attempt,
            first_attempt_at=d.first_time or env.time,
            failed_at=runtime.clock.time(),
        )
        await self.transport.dead_letter(d, record)

    # --- acks ----------------------------------------------------------------
    async def _ack_loop(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        while True:
            if task.cancelling():
                # A cancel that a client library swallowed inside ack (redis-py
                # can turn one into an error it retries) must still end us.
                raise asyncio.CancelledError
            if not self._acks:
                self._ack_waiter = loop.create_future()
                await self._ack_waiter
            await self._flush_acks()

    async def _flush_acks(self, *, closing: bool = False) -> None:
        if self._settle_now is not None:
            self._settle_acks()  # at once: nothing to await or retry
            if not self._workers and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)
        elif self._acks:
            batch = self._acks
            self._acks = []
            self._acked += len(batch)
            landed = self._acks_in_flight = asyncio.get_running_loop().create_future()
            try:
                await self._ack_batch(batch, closing=closing)
            finally:
                self._acks_in_flight = None
                landed.set_result(None)
            if not self._workers and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)

    async def _ack_batch(self, batch: list[Delivery], *, closing: bool) -> None:
        """Acknowledge ``batch``, retrying a transient failure in place."""
        if batch:
            delay = _TRANSIENT_FIRST
            while True:
                try:
                    await self.transport.ack(batch)
                    break
                except TransportError as exc:
                    # Unacknowledged, the batch would come back after its
                    # lease as a further attempt of handlers that succeeded.
                    if closing:
                        log.warning("%s: could not acknowledge at close: %s", self.group, exc)
                        break
                    log.warning(
                        "%s: acknowledging %d deliveries failed: %s; again in %.2fs",
                        self.group,
                        len(batch),
                        exc,
                        delay,
                    )
                await self.runtime.clock.sleep(delay)
                delay = min(_TRANSIENT_LAST, delay * 2)


_PROPAGATED = (
    "surge-correlation-id",
    "surge-reply-to",
    "surge-expect",
    "surge-principal",
    "traceparent",
    "tracestate",
)


def _call_each(fn: Callable[[Any], Any], events: list[Any]) -> list[tuple[bool, Any]]:
    """In a worker process: ``fn`` on each event, in order; each outcome is
    ``(True, result)`` or ``(False, exception)``."""
    out: list[tuple[bool, Any]] = []
    for ev in events:
        try:
            out.append((True, fn(ev)))
        except Exception as exc:
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"{type(exc).__qualname__}: {exc}")
            out.append((False, exc))
    return out


def _inherit(headers: dict[str, str] | None) -> dict[str, str] | None:
    """The headers a child event inherits from its parent."""
    if not headers:
        return None
    out = {k: v for k, v in headers.items() if k in _PROPAGATED}
    return out or None
