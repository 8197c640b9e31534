"""``SqliteTransport``: the event loop's side of ``sqlite://``.

It owns the loop-side state and calls its parts through their methods:
the :class:`~._thread.DatabaseThread` runs every statement, a
:class:`~._ownership.Member` per consumed group keeps its partitions, and
:class:`~._leases.Leases` holds what this process claimed. Here live:

- group commit: publishes made in one turn of the loop are collected
  (``_enqueue``) and sent to the thread as one job (``_flush``), bounded
  by ``max_pending`` envelopes not yet committed;
- the consume loop: claim up to the consumer's room, else nap until woken
  (a local publish, a settle, a partition taken) or until the next row is
  due, polling (5 ms doubling to ``poll``) for other processes' publishes;
- settling through the leases (a lost lease settles nothing);
- fencing: ``fenced`` asks the partition's ``Member`` whether its lease is
  still safely ours, and at a lapse the partition's leases are forgotten;
- idleness for ``App.drain`` (``idle``, ``wait_idle``);
- housekeeping: lease extension every ``heartbeat``, compaction every
  ``maintenance``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import Any

import msgspec

from ..._clock import Clock, RealClock
from ..._errors import Closed, ConfigurationError, MessageTooLarge, Overloaded, TransportError
from ..._event import Envelope
from ..._transport import DeadLetter, Delivery, TransportStats
from .._partitions import Ownership
from ._database import Database, Row
from ._leases import Consumer, Lease, Leases
from ._options import Options
from ._ownership import Member
from ._thread import DatabaseThread
from ._wakeups import Wakeups

__all__ = ("SqliteTransport",)

log = logging.getLogger("surge.sqlite")

_FIRST_POLL = 0.005
_encode_headers = msgspec.msgpack.Encoder().encode


class SqliteTransport:
    """Groups, leases and dead letters in one SQLite file (see the package).

    Capabilities: ``HandsBack`` (``release``), ``KeyRouting``
    (``partitions``), ``Fences`` (``fenced``), ``IdleAware`` (``idle``,
    ``wait_idle``), ``StateStore`` (``load_state``, ``save_state``) and
    ``FencedState`` (``save_state_held``).
    """

    durable = True

    def __init__(self, url: str, *, clock: Clock | None = None, **options: Any) -> None:
        opts = Options.parse(url, options)
        self.url = url
        self.options = opts
        self.path = opts.path
        self.synchronous = opts.synchronous
        self.lease = opts.lease
        self.heartbeat = opts.heartbeat
        self.retention = opts.retention
        self.dedup_window = opts.dedup_window
        self.poll = opts.poll
        self.max_pending = opts.max_pending
        self.maintenance = opts.maintenance
        self.partitions = opts.partitions
        self.clock: Clock = clock or RealClock()
        self._codec = opts.codec
        self._db = Database(
            opts.path,
            synchronous=opts.synchronous,
            busy_timeout=opts.busy_timeout,
            check=opts.check,
            max_size=opts.max_size,
            dedup_window=opts.dedup_window,
            partitions=opts.partitions,
        )
        self._thread = DatabaseThread(self._db, self.clock)
        # who this transport is among a group's members (processes, and
        # transports within one, are told apart)
        self.member_id = f"{os.getpid()}-{random.getrandbits(48):012x}"
        self._members: dict[str, Member] = {}
        self._started = False
        self._closed = False
        self._local: dict[str, int] = {}
        self._ephemeral: dict[str, int] = {}
        self._consumers: dict[int, list[Consumer]] = {}
        self._leases = Leases()
        self._queued = 0
        self._space: deque[asyncio.Future[None]] = deque()
        self._changed: list[asyncio.Future[None]] = []
        self._activity = 0
        self._idle = True
        self._ticker: asyncio.Task[None] | None = None
        self._checkpoints: deque[tuple[float, int]] = deque()
        self._batch_rows: list[Row] = []
        self._batch_waiters: list[asyncio.Future[Any]] = []
        # other processes' commits wake this one's consumers (_wakeups.py)
        self._wakeups = Wakeups(str(opts.path))

    @property
    def transactions(self) -> int:
        """Write transactions committed by this transport (for group commit)."""
        return self._db.transactions

    @property
    def stale_settles(self) -> int:
        """Acks, nacks and dead letters ignored because the lease was lost."""
        return self._db.stale

    # --- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise Closed("a closed sqlite transport cannot be started again")
        loop = asyncio.get_running_loop()
        self._thread.start(loop)
        try:
            await self._thread.submit(self._db.open, write=False)
        except BaseException:
            await self._thread.stop()
            raise
        self._started = True
        self._ticker = loop.create_task(self._tick(), name="surge-sqlite-ticker")

    async def close(self) -> None:
        if self._closed:
            return
        await self._stop_tasks()
        for consumers in self._consumers.values():
            for c in consumers:
                c.wake()
        self._notify_changed()
        while self._space:
            fut = self._space.popleft()
            if not fut.done():
                fut.set_result(None)
        if not self._thread.running:
            return
        # Hand back what this process holds, so others need not wait out leases.
        held = self._leases.drop_all()
        submit = self._thread.submit
        try:
            await submit(self._db.shutdown, held, list(self._ephemeral.values()), self.clock.time())
            # claims that were under way when close began, then the partitions
            late = self._leases.drop_all()
            await submit(self._db.leave, late, self.clock.time(), self.member_id)
        except TransportError as exc:
            log.warning("sqlite: could not hand back leases at close: %s", exc)
        finally:
            await self._thread.stop()

    async def abandon(self) -> None:
        """Stop as SIGKILL would, for tests of recovery: memberships,
        partitions and leases stay in the file as they were, nothing is
        handed back. The transport is closed afterwards."""
        if self._closed:
            return
        await self._stop_tasks()
        await self._thread.stop()

    async def _stop_tasks(self) -> None:
        self._closed = True
        self._wakeups.close()
        stopping: list[Awaitable[Any]] = [m.stop() for m in self._members.values()]
        if self._ticker is not None:
            self._ticker.cancel()
            stopping.append(asyncio.gather(self._ticker, return_exceptions=True))
        await asyncio.gather(*stopping)

    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        self._check_open()
        gid: int = await self._thread.submit(
            self._db.declare, group, list(topics), ephemeral, self.clock.time()
        )
        self._local[group] = gid
        if ephemeral:
            self._ephemeral[group] = gid
        elif group not in self._members:
            self._members[group] = self._member(group, gid)

    async def groups_for(self, topic: str) -> list[str]:
        """The groups of the file, declared by any process, that receive
        ``topic`` (``KnowsGroups``)."""
        self._check_open()
        names: list[str] = await self._thread.submit(self._db.groups_for, topic, write=False)
        return names

    def _member(self, group: str, gid: int) -> Member:
        return Member(
            group,
            gid,
            database=self._db,
            submit=self._thread.submit,
            me=self.member_id,
            lease=self.lease,
            now=self.clock.time,
            monotonic=self.clock.monotonic,
            on_taken=lambda: self._wake_consumers(gid),
            lapsed=self._forget,
        )

    def ownership(self, group: str) -> Ownership | None:
        """The partitions this transport holds of ``group`` (None: a reply
        inbox, or a group this transport has not declared)."""
        member = self._members.get(group)
        return None if member is None else member.own

    def _running(self) -> bool:
        return not self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("sqlite transport is closed")
        if not self._started:
            raise Closed("sqlite transport is not started")

    async def _gid(self, group: str) -> int:
        gid = self._local.get(group)
        if gid is None:
            gid = await self._thread.submit(self._db.group_id, group, write=False)
        return gid

    async def pragma(self, name: str) -> Any:
        """The value of ``PRAGMA name`` on this transport's connection
        (diagnostics: ``synchronous``, ``journal_mode``, ...)."""
        self._check_open()
        return await self._thread.submit(self._db.pragma, name, write=False)

    # --- publishing ----------------------------------------------------------
    def _rows(self, envelopes: Sequence[Envelope]) -> list[Row]:
        encode = self._codec.encode_event
        limit = self._codec.max_message_size
        rows: list[Row] = []
        for env in envelopes:
            body = env.body
            if body is None:
                body = encode(env.event) if env.event is not None else b""
            if len(body) > limit:
                raise MessageTooLarge(
                    f"event {env.id} on {env.topic!r} is {len(body)} bytes; the limit is {limit}"
                )
            headers = _encode_headers(env.headers) if env.headers else None
            rows.append((env.id, env.topic, env.key, env.time, headers, body, env.not_before))
        return rows

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self._check_open()
        rows = self._rows(envelopes)
        if not rows:
            return
        loop = asyncio.get_running_loop()
        while self._queued >= self.max_pending:
            fut = loop.create_future()
            self._space.append(fut)
            await fut
            self._check_open()
        await self._enqueue(rows, loop)

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        self._check_open()
        rows = self._rows(envelopes)
        if not rows:
            return
        if self._queued + len(rows) > self.max_pending or self._space:
            raise Overloaded(f"{self._queued} envelopes wait to be committed to {self.path}")
        self._enqueue(rows, asyncio.get_running_loop()).add_done_callback(_log_failure)

    def _enqueue(self, rows: list[Row], loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        """Add ``rows`` to this loop iteration's batch; a future for them.

        Publishes made in one iteration of the loop go to the connection's
        thread as one job: one hand-off and one transaction for all of them.
        """
        self._queued += len(rows)
        self._activity += 1
        self._idle = False
        fut = loop.create_future()
        if not self._batch_waiters:
            loop.call_soon(self._flush, loop)
        self._batch_rows.extend(rows)
        self._batch_waiters.append(fut)
        return fut

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        rows, waiters = self._batch_rows, self._batch_waiters
        self._batch_rows = []
        self._batch_waiters = []
        n = len(rows)
        done = loop.create_future()
        done.add_done_callback(lambda f: _resolve_all(f, waiters))

        def after(gids: set[int] | None) -> None:
            self._published(n, gids or ())

        if not self._thread.running:
            self._published(n, ())
            done.set_exception(Closed("sqlite transport is closed"))
            return
        self._thread.submit(self._db.publish, rows, self.clock.time(), after=after, fut=done)

    def _published(self, n: int, gids: Iterable[int]) -> None:
        self._queued -= n
        space = self._space
        while space and self._queued < self.max_pending:
            fut = space.popleft()
            if not fut.done():
                fut.set_result(None)
        woke = False
        for gid in gids:
            self._wake_consumers(gid)
            woke = True
        if woke and not self._closed:
            self._wakeups.notify()
        self._notify_changed()

    # --- consuming -----------------------------------------------------------
    def _wake_consumers(self, gid: int) -> None:
        for c in self._consumers.get(gid, ()):
            c.wake()

    def _woken(self) -> None:
        """Another process committed publishes: every consumer looks."""
        for consumers in self._consumers.values():
            for c in consumers:
                c.wake()

    def _notify_changed(self) -> None:
        waiters = self._changed
        if waiters:
            self._changed = []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        self._check_open()
        if prefetch < 1:
            raise ConfigurationError("prefetch must be at least 1")
        gid = await self._gid(group)
        member = self._members.get(group)
        if member is None and group not in self._ephemeral:
            member = self._members[group] = self._member(group, gid)
        c = Consumer(gid, prefetch, member)
        self._consumers.setdefault(gid, []).append(c)
        if not self._wakeups.listening and self.options.wakeups and not self._closed:
            self._wakeups.listen(asyncio.get_running_loop(), self._woken)
        if member is not None:
            member.join()
        poll = _FIRST_POLL
        due = 0.0
        try:
            while not self._closed:
                room = prefetch - c.unsettled
                if room <= 0:
                    await c.nap(None)
                    continue
                now = self.clock.time()
                if due <= now:
                    # random reseeds itself in forked children, so workers
                    # forked from one parent still draw different tokens
                    token = random.getrandbits(62)
                    try:
                        batch, due = await self._claim(c, group, room, now, token)
                    except TransportError as exc:
                        # a lock held past busy_timeout, a full disk: wait, try again
                        log.warning("sqlite: cannot claim for %s: %s", group, exc)
                        batch, due = [], now + self.poll * 20
                    if batch:
                        poll = _FIRST_POLL
                        yield batch
                        continue
                if not self._running():
                    break
                # a due time already past (a race) must not spin the loop
                wait = min(poll, due - now) if due > now else poll
                if not await c.nap(wait):
                    poll = min(self.poll, poll * 2)
                    parts = () if member is None else member.readable(self.clock.time())
                    try:
                        due = await self._thread.submit(self._db.next_due, gid, parts, write=False)
                    except TransportError:
                        due = 0.0
                else:
                    due = 0.0
        finally:
            consumers = self._consumers.get(gid)
            if consumers is not None and c in consumers:
                consumers.remove(c)
            if member is not None:
                member.leave()

    async def _claim(
        self, c: Consumer, group: str, room: int, now: float, token: int
    ) -> tuple[list[Delivery], float]:
        leases = self._leases
        fut: asyncio.Future[Any]
        member = c.member
        parts = () if member is None else member.readable(now)
        fences = 0
        if member is not None:
            member.reads(parts, 1)
            fences = member.fencing.count

        def after(result: tuple[list[Delivery], float, dict[int, int]] | None) -> None:
            if member is not None:
                member.reads(parts, -1)
            if not result or not result[0]:
                return
            batch, _, where = result
            if member is not None and where and member.fencing.count != fences:
                # leased before a lapse of their partition: left to their
                # lease, as the deliveries forgotten at the lapse are
                batch[:] = [
                    d
                    for d in batch
                    if (p := where.get(d.token)) is None or not member.fencing.stale(p, fences)
                ]
            self._activity += 1
            self._idle = False
            for d in batch:
                lease = Lease(d.token, token, c, where.get(d.token) if where else None)
                d.token = lease
                leases.add(lease)
            if fut.cancelled():  # nobody will take this batch: hand it back
                self._hand_back(batch)

        args = (c.gid, group, room, now, now + self.lease, token, parts, self.member_id)
        fut = self._thread.submit(self._db.claim, *args, after=after)
        try:
            result: tuple[list[Delivery], float, dict[int, int]] = await fut
        except asyncio.CancelledError:
            # Cancelled just as the claim resolved: the batch is ours, hand it back.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._hand_back(fut.result()[0])
            raise
        return result[0], result[1]

    def _hand_back(self, batch: list[Delivery]) -> None:
        held = []
        for d in batch:
            lease = d.token
            if isinstance(lease, Lease) and self._leases.settle(lease):
                held.append((lease.did, lease.token))
        # Also while closing: close has already collected the leases it
        # hands back, and this batch was not among them.
        if held and self._thread.running:
            self._thread.submit(self._db.hand_back, held, self.clock.time()).add_done_callback(
                _log_failure
            )

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries no handler has seen (the app is stopping):
        visible at once, the attempt not counted, a partition's in its place
        (before later entries, for whoever reads the partition next)."""
        held = self._settle_all(deliveries)
        if held:
            self._check_open()
            await self._settling(
                self._thread.submit(
                    self._db.hand_back, held, self.clock.time(), after=self._after_settle
                )
            )

    # --- fencing -------------------------------------------------------------
    def fenced(self, delivery: Delivery) -> bool:
        """A keyed delivery whose partition lease may have lapsed is not to
        start (``Fences``): see ``Fencing.valid``. At the first lapse seen the
        partition's deliveries held here are forgotten (``_forget``)."""
        lease: Lease = delivery.token  # the runner asks of this transport's own
        part = lease.part
        if part is None:
            return False
        if lease.settled:
            return True  # forgotten at a lapse
        member = lease.consumer.member
        if member is None or member.fencing.valid(part):
            return False
        member.fence(part)
        return True

    def _forget(self, member: Member, part: int) -> None:
        """Forget, unsettled, every delivery of ``member``'s partition
        ``part`` held here: their rows keep this process's leases, which run
        out unextended, and the partition's owner then reads them again."""
        held = self._leases.of(member, part)
        for lease in held:
            self._leases.settle(lease)
        log.warning(
            "sqlite: %s: partition %d's lease was not renewed in time (this process "
            "stalled): its %d deliveries here are left to its owner",
            member.group,
            part,
            len(held),
        )

    # --- settling ------------------------------------------------------------
    def _lease_of(self, d: Delivery) -> Lease:
        lease = d.token
        if not isinstance(lease, Lease):
            raise ConfigurationError(f"delivery {d.envelope.id} did not come from {self.url}")
        return lease

    def _settle_all(self, deliveries: Sequence[Delivery]) -> list[tuple[int, int]]:
        """Settle ``deliveries`` here; (row, lease token) of those not settled before."""
        held = []
        for d in deliveries:
            lease = self._lease_of(d)
            if self._leases.settle(lease):
                held.append((lease.did, lease.token))
        return held

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        by_group: dict[int, list[tuple[int, int]]] = {}
        for d in deliveries:
            lease = self._lease_of(d)
            if self._leases.settle(lease):
                by_group.setdefault(lease.consumer.gid, []).append((lease.did, lease.token))
        if by_group:
            self._check_open()
            submit = self._thread.submit
            acks = [
                submit(self._db.ack, held, gid, after=self._after_settle)
                for gid, held in by_group.items()
            ]
            for fut in acks:
                await self._settling(fut)

    async def _settling(self, fut: asyncio.Future[Any]) -> None:
        # A settle that cannot be written (a lock held past busy_timeout, a
        # full disk) loses nothing: the delivery's lease runs out and it is
        # delivered again. Raising would stop the caller's consumer for good.
        try:
            await fut
        except TransportError as exc:
            log.warning("sqlite: could not settle deliveries, they will come back: %s", exc)

    def _after_settle(self, _: object) -> None:
        self._notify_changed()

    async def nack(self, delivery: Delivery, delay: float) -> None:
        lease = self._lease_of(delivery)
        if not self._leases.settle(lease):
            return
        self._check_open()
        self._activity += 1
        when = self.clock.time() + max(0.0, delay)
        await self._settling(
            self._thread.submit(
                self._db.release, [(lease.did, lease.token)], when, lease.consumer.gid
            )
        )
        self._wake_consumers(lease.consumer.gid)
        self._notify_changed()

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        lease = self._lease_of(delivery)
        if not self._leases.settle(lease):
            return
        self._check_open()
        await self._settling(
            self._thread.submit(
                self._db.dead_letter,
                lease.did,
                lease.token,
                lease.consumer.gid,
                record,
                after=self._after_settle,
            )
        )

    # --- dead letters, statistics, trigger state -----------------------------
    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        self._check_open()
        gid = None if group is None else await self._gid(group)
        letters: list[DeadLetter] = await self._thread.submit(
            self._db.dead_letters, gid, write=False
        )
        return letters

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        self._check_open()
        gid = await self._gid(group)
        self._activity += 1
        self._idle = False
        n: int = await self._thread.submit(
            self._db.replay, gid, None if ids is None else list(ids), self.clock.time()
        )
        self._wake_consumers(gid)
        return n

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        self._check_open()
        gid = await self._gid(group)
        n: int = await self._thread.submit(self._db.purge, gid, None if ids is None else list(ids))
        return n

    async def load_state(self, key: str) -> bytes | None:
        """A small value kept in the file under ``key`` (trigger state)."""
        self._check_open()
        value: bytes | None = await self._thread.submit(self._db.load_state, key, write=False)
        return value

    async def save_state(self, key: str, value: bytes) -> None:
        self._check_open()
        await self._thread.submit(self._db.save_state, key, value)

    async def save_state_held(self, key: str, value: bytes, delivery: Delivery) -> bool:
        """``save_state`` fenced by ``delivery``'s lease (``FencedState``)."""
        lease = self._lease_of(delivery)
        if lease.settled:
            return False  # forgotten at a lapse of its partition
        self._check_open()
        saved: bool = await self._thread.submit(
            self._db.save_state_held, key, value, lease.did, lease.token, self.clock.time
        )
        return saved

    async def stats(self, group: str) -> TransportStats:
        self._check_open()
        gid = await self._gid(group)
        counts: tuple[int, int, int, int, int, int] = await self._thread.submit(
            self._db.stats, gid, self.clock.time(), write=False
        )
        return TransportStats(*counts)

    # --- idleness (App.drain) ------------------------------------------------
    @property
    def idle(self) -> bool:
        """No group this process declared held anything at the last look."""
        return self._idle

    async def wait_idle(self) -> None:
        """Return once no group this process declared holds a delivery."""
        poll = _FIRST_POLL
        loop = asyncio.get_running_loop()
        while not self._closed:
            seen = self._activity
            gids = list(self._local.values())
            busy, due = await self._thread.submit(self._db.busy, gids, write=False)
            if not busy and seen == self._activity:
                self._idle = True
                return
            self._idle = False
            fut = loop.create_future()
            self._changed.append(fut)
            # visible but not yet claimed (due passed): look again after a poll
            left = due - self.clock.time()
            wait = min(poll, left) if left > 0 else poll
            done, _ = await asyncio.wait((fut,), timeout=wait)
            poll = _FIRST_POLL if done else min(self.poll, poll * 2)

    # --- leases and housekeeping ---------------------------------------------
    async def _tick(self) -> None:
        clock = self.clock
        step = self.maintenance if not self.heartbeat else min(self.heartbeat, self.maintenance)
        next_beat = clock.monotonic() + self.heartbeat
        next_care = clock.monotonic() + self.maintenance
        while True:
            await clock.sleep(step)
            now = clock.monotonic()
            try:
                if self.heartbeat and now >= next_beat:
                    next_beat = now + self.heartbeat
                    await self.extend()
                if now >= next_care:
                    next_care = now + self.maintenance
                    await self.compact()
            except TransportError as exc:
                log.warning("sqlite housekeeping failed: %s", exc)

    async def extend(self) -> int:
        """Extend the lease of every delivery this process holds; how many."""
        held = self._leases.held()
        if not held:
            return 0
        now = self.clock.time()
        n: int = await self._thread.submit(
            self._db.extend, held, now + self.lease, now, self.member_id
        )
        return n

    async def compact(self) -> int:
        """Delete events settled by every group and older than ``retention``,
        expired dedup entries and abandoned reply groups; how many events."""
        self._check_open()
        now = self.clock.time()
        # (time, highest seq then): every event at or below that seq was
        # stored before that time, so it is old enough once time is.
        marks = self._checkpoints
        upto = -1 if self.retention == 0 else 0
        while marks and marks[0][0] <= now - self.retention:
            upto = marks.popleft()[1]
        deleted, top = await self._thread.submit(
            self._db.compact, upto, now, list(self._ephemeral.values()), self.lease
        )
        if self.retention:
            marks.append((now, top))
        if deleted:
            await self._thread.submit(self._db.checkpoint, write=False)
        n: int = deleted
        return n

    def __repr__(self) -> str:
        return f"<SqliteTransport {str(self.path)!r} synchronous={self.synchronous}>"


def _resolve_all(done: asyncio.Future[Any], waiters: list[asyncio.Future[Any]]) -> None:
    exc = done.exception()
    for fut in waiters:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("sqlite: a background write failed: %s", fut.exception())
