"""A durable transport in one SQLite file, shared by the processes of a host.

``sqlite:///relative.db`` or ``sqlite:////absolute/path.db``, with options in
the query string (``?synchronous=normal&lease=10``) or as keyword arguments:

================  =========  ================================================
``synchronous``   ``full``   ``full`` or ``normal``, see below
``lease``         30         seconds a consumer holds a delivery unsettled
                             before another consumer may take it
``heartbeat``     lease / 3  seconds between lease extensions of deliveries
                             this process holds (0: never extend)
``retention``     600        seconds an event handled by every group is kept
``dedup_window``  600        seconds a derived event id is remembered
``poll``          0.025      longest wait before looking for events another
                             process published (5 ms at first, doubling)
``busy_timeout``  5          seconds to wait for another process's lock
                             before raising ``TransportError``
``check``         ``quick``  integrity check at start: quick, full or off
``max_size``      none       bytes the file may hold; past it publish raises
``max_pending``   10000      envelopes accepted but not yet committed;
                             ``publish`` waits and ``publish_nowait`` raises
                             ``Overloaded`` past it
``maintenance``   1          seconds between compactions
``codec``         msgpack    a ``Codec`` for events given as objects (the
                             App's codec must read what it writes)
``partitions``    8          partitions of each group's keyed events; the
                             file keeps the first count (another raises)
================  =========  ================================================

What ``publish`` promises when it returns (the file is in WAL mode):

- ``synchronous=full`` (the default): the transaction holding the envelopes
  is in the write-ahead log and the log is fsynced. The envelopes survive
  the process's crash, the operating system's crash and a power loss.
- ``synchronous=normal``: the transaction is in the write-ahead log, which
  is fsynced only at checkpoints. The envelopes survive the process's crash
  (SIGKILL included); an operating system crash or power loss may lose the
  transactions committed since the last checkpoint, never corrupting the
  file. Faster: no fsync per commit.

``publish_nowait`` only queues: its envelopes are durable once the batch
they joined commits (a failure is logged).

Concurrent publishes share one transaction (group commit): publishes made
in one turn of the event loop travel as one job to the thread that owns the
connection, and that thread commits everything queued at once, so many
publishes pay for one fsync. Consumers claim deliveries with a lease (a
token and a visibility deadline); acks, nacks and lease extensions name the
token, so a consumer that lost its lease (stopped, too slow) cannot settle a
delivery that another consumer now holds. Delivery is at-least-once; events
published by handlers carry derived ids and are deduplicated within
``dedup_window``. Dead letters live in the same file. Events that every
group has settled are deleted after ``retention`` (counted, for events
stored before this process started, from its start) and the freed pages are
reused or returned to the file system (incremental vacuum); the write-ahead
log is checkpointed after each compaction so it is reused, not grown.

Per-key order holds across processes: an envelope with a key goes to the
partition of its key in each group (but reply inboxes), and one consumer at
a time reads a partition, under a lease kept in the file; the next owner
reads first what its predecessor left unsettled (:mod:`._sqlite_partitions`).
Unkeyed envelopes go to the group's shared queue, read by every consumer.

Several processes may share the file, each with its own transport: claims
take the write lock (``BEGIN IMMEDIATE``), a process wakes its consumers at
once when it publishes itself and otherwise polls (5 to ``poll`` ms), and a
lock held too long by another process raises ``TransportError`` after
``busy_timeout``. Errors: a file that is not a surge database raises
``ConfigurationError``; a corrupt file (integrity check at start), a full
disk or ``max_size`` (the transaction is rolled back: what was committed
stays) and a lock held too long raise ``TransportError``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import sqlite3
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec

from .._clock import Clock, RealClock
from .._codec import Codec, MsgpackCodec
from .._errors import Closed, ConfigurationError, MessageTooLarge, Overloaded, TransportError
from .._event import Envelope
from .._transport import DeadLetter, Delivery, TransportStats
from . import _sqlite_db as db
from ._partitions import DEFAULT_PARTITIONS, Ownership
from ._sqlite_partitions import Consumer, Lease, Member, extend_leases, leave

__all__ = ("SqliteTransport",)

log = logging.getLogger("surge.sqlite")

_FIRST_POLL = 0.005
_encode_headers = msgspec.msgpack.Encoder().encode


def _options(url: str, given: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or not parts.path or parts.netloc:
        raise ConfigurationError(
            f"sqlite URL {url!r}: use sqlite:///relative.db or sqlite:////absolute/path.db"
        )
    path = parts.path[1:]
    if not path or path == ":memory:":
        raise ConfigurationError(f"sqlite URL {url!r} names no file (processes share a file)")
    opts: dict[str, Any] = dict(parse_qsl(parts.query))
    opts.update(given)
    return path, opts


def _number(opts: dict[str, Any], name: str, default: float, *, least: float = 0.0) -> float:
    raw = opts.pop(name, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigurationError(f"sqlite option {name}={raw!r} is not a number") from None
    if value < least:
        raise ConfigurationError(f"sqlite option {name}={raw!r} must be at least {least}")
    return value


class SqliteTransport:
    """Groups, leases and dead letters in one SQLite file (see the module)."""

    durable = True

    def __init__(self, url: str, *, clock: Clock | None = None, **options: Any) -> None:
        path, opts = _options(url, options)
        self.url = url
        self.path = Path(path)
        self.clock: Clock = clock or RealClock()
        sync = str(opts.pop("synchronous", "full")).lower()
        if sync not in ("full", "normal"):
            raise ConfigurationError(f"sqlite synchronous={sync!r}: use full or normal")
        self.synchronous = sync
        self.lease = _number(opts, "lease", 30.0, least=0.001)
        self.heartbeat = _number(opts, "heartbeat", self.lease / 3)
        if self.heartbeat >= self.lease:
            raise ConfigurationError(
                f"sqlite heartbeat={self.heartbeat:g} must be shorter than lease={self.lease:g} "
                "(or 0, never extend), or leases run out between extensions"
            )
        self.retention = _number(opts, "retention", 600.0)
        self.dedup_window = _number(opts, "dedup_window", 600.0)
        self.poll = _number(opts, "poll", 0.025, least=0.001)
        busy = _number(opts, "busy_timeout", 5.0)
        check = str(opts.pop("check", "quick")).lower()
        if check not in ("quick", "full", "off"):
            raise ConfigurationError(f"sqlite check={check!r}: use quick, full or off")
        max_size = _number(opts, "max_size", 0) or None
        self.max_pending = int(_number(opts, "max_pending", 10_000, least=1))
        self.maintenance = _number(opts, "maintenance", 1.0, least=0.001)
        self.partitions = int(_number(opts, "partitions", DEFAULT_PARTITIONS, least=1))
        codec = opts.pop("codec", None)
        self._codec: Codec = codec if isinstance(codec, Codec) else MsgpackCodec()
        if opts:
            raise ConfigurationError(f"unknown sqlite options: {sorted(opts)}")
        self._db = db.Database(
            self.path,
            synchronous=sync,
            busy_timeout=busy,
            check=check,
            max_size=None if max_size is None else int(max_size),
            dedup_window=self.dedup_window,
            partitions=self.partitions,
        )
        # who this transport is among a group's members (processes, and
        # transports within one, are told apart)
        self.member_id = f"{os.getpid()}-{random.getrandbits(48):012x}"
        self._members: dict[str, Member] = {}
        self._hold: Callable[[], None] | None = getattr(self.clock, "hold", None)
        self._release: Callable[[], None] | None = getattr(self.clock, "release", None)
        self._jobs: queue.SimpleQueue[db.Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False
        self._local: dict[str, int] = {}
        self._ephemeral: dict[str, int] = {}
        self._consumers: dict[int, list[Consumer]] = {}
        self._leases: dict[int, Lease] = {}
        self._queued = 0
        self._space: deque[asyncio.Future[None]] = deque()
        self._changed: list[asyncio.Future[None]] = []
        self._activity = 0
        self._idle = True
        self._ticker: asyncio.Task[None] | None = None
        self._checkpoints: deque[tuple[float, int]] = deque()
        self._batch_rows: list[db.Row] = []
        self._batch_waiters: list[asyncio.Future[Any]] = []

    # --- the connection's thread ---------------------------------------------
    @property
    def transactions(self) -> int:
        """Write transactions committed by this transport (for group commit)."""
        return self._db.transactions

    @property
    def stale_settles(self) -> int:
        """Acks, nacks and dead letters ignored because the lease was lost."""
        return self._db.stale

    def _settle(self, jobs: list[db.Job]) -> None:
        release = self._release
        for job in jobs:
            if release is not None:
                release()
            err = job.error
            if job.after is not None:
                try:
                    job.after(job.result if err is None else None)
                except Exception:
                    log.exception("sqlite: settling a %s job failed", job.fn)
            fut = job.fut
            if fut.done():
                continue
            if err is None:
                fut.set_result(job.result)
            else:
                fut.set_exception(self._translate(err))

    def _translate(self, err: BaseException) -> BaseException:
        if isinstance(err, sqlite3.Error):
            return db.translate(self.path, err)
        return err

    def _submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        write: bool = True,
        after: Callable[[Any], None] | None = None,
        fut: asyncio.Future[Any] | None = None,
    ) -> asyncio.Future[Any]:
        if self._thread is None:
            raise Closed("sqlite transport is not started")
        loop = self._loop
        assert loop is not None
        if fut is None:
            fut = loop.create_future()
        if self._hold is not None:
            self._hold()
        self._jobs.put(db.Job(fn, args, write, fut, after))
        return fut

    # --- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise Closed("a closed sqlite transport cannot be started again")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._db.serve,
            args=(self._jobs, self._loop, self._settle),
            name=f"surge-sqlite-{self.path.name}",
            daemon=True,
        )
        self._thread.start()
        try:
            await self._submit(self._db.open, write=False)
        except BaseException:
            await self._stop_thread()
            raise
        self._started = True
        self._ticker = self._loop.create_task(self._tick(), name="surge-sqlite-ticker")

    async def _stop_thread(self) -> None:
        if self._thread is None:
            return
        fut = self._submit(db.STOP)
        self._thread = None
        await fut

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [m.task for m in self._members.values() if m.task is not None]
        if self._ticker is not None:
            tasks.append(self._ticker)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for consumers in self._consumers.values():
            for c in consumers:
                self._wake(c)
        self._notify_changed()
        while self._space:
            fut = self._space.popleft()
            if not fut.done():
                fut.set_result(None)
        if self._thread is None:
            return
        # Hand back what this process holds, so others need not wait out leases.
        held = [(lease.did, lease.token) for lease in self._leases.values() if not lease.settled]
        self._leases.clear()
        try:
            await self._submit(
                self._db.shutdown, held, list(self._ephemeral.values()), self.clock.time()
            )
            # claims that were under way when close began, then the partitions
            late = [(lease.did, lease.token) for lease in self._leases.values()]
            self._leases.clear()
            await self._submit(leave, self._db, late, self.clock.time(), self.member_id)
        except TransportError as exc:
            log.warning("sqlite: could not hand back leases at close: %s", exc)
        finally:
            await self._stop_thread()

    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        self._check_open()
        gid: int = await self._submit(
            self._db.declare, group, list(topics), ephemeral, self.clock.time()
        )
        self._local[group] = gid
        if ephemeral:
            self._ephemeral[group] = gid
        elif group not in self._members:
            self._members[group] = self._member(group, gid)

    def _member(self, group: str, gid: int) -> Member:
        def woken() -> None:  # partitions taken: there may be more to read
            for c in self._consumers.get(gid, ()):
                self._wake(c)

        def keep(m: Member) -> Any:
            args = (self._db, self.member_id, self.lease, self.clock.time, woken)
            return m.run(self._submit, *args)

        return Member(group, gid, self.partitions, keep)

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
            gid = await self._submit(self._db.group_id, group, write=False)
        return gid

    # --- publishing ----------------------------------------------------------
    def _rows(self, envelopes: Sequence[Envelope]) -> list[db.Row]:
        encode = self._codec.encode_event
        limit = self._codec.max_message_size
        rows: list[db.Row] = []
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
        await self._enqueue(rows)

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        self._check_open()
        rows = self._rows(envelopes)
        if not rows:
            return
        if self._queued + len(rows) > self.max_pending or self._space:
            raise Overloaded(f"{self._queued} envelopes wait to be committed to {self.path}")
        self._enqueue(rows).add_done_callback(_log_failure)

    def _enqueue(self, rows: list[db.Row]) -> asyncio.Future[Any]:
        """Add ``rows`` to this loop iteration's batch; a future for them.

        Publishes made in one iteration of the loop go to the connection's
        thread as one job: one hand-off and one transaction for all of them.
        """
        self._queued += len(rows)
        self._activity += 1
        self._idle = False
        loop = self._loop
        assert loop is not None
        fut = loop.create_future()
        if not self._batch_waiters:
            loop.call_soon(self._flush)
        self._batch_rows.extend(rows)
        self._batch_waiters.append(fut)
        return fut

    def _flush(self) -> None:
        rows, waiters = self._batch_rows, self._batch_waiters
        self._batch_rows = []
        self._batch_waiters = []
        n = len(rows)
        loop = self._loop
        assert loop is not None
        done = loop.create_future()
        done.add_done_callback(lambda f: _resolve_all(f, waiters))

        def after(gids: set[int] | None) -> None:
            self._published(n, gids or ())

        if self._thread is None:
            self._published(n, ())
            done.set_exception(Closed("sqlite transport is closed"))
            return
        self._submit(self._db.publish, rows, self.clock.time(), after=after, fut=done)

    def _published(self, n: int, gids: Iterable[int]) -> None:
        self._queued -= n
        space = self._space
        while space and self._queued < self.max_pending:
            fut = space.popleft()
            if not fut.done():
                fut.set_result(None)
        for gid in gids:
            for c in self._consumers.get(gid, ()):
                self._wake(c)
        self._notify_changed()

    # --- consuming -----------------------------------------------------------
    def _wake(self, c: Consumer) -> None:
        fut = c.wake
        if fut is None:
            c.kicked = True
            return
        c.wake = None
        if not fut.done():
            fut.set_result(None)

    def _notify_changed(self) -> None:
        waiters = self._changed
        if waiters:
            self._changed = []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def _nap(self, c: Consumer, timeout: float | None) -> bool:
        """Wait for a wake-up or ``timeout`` seconds; True when woken."""
        if c.kicked:
            c.kicked = False
            return True
        fut = c.wake = asyncio.get_running_loop().create_future()
        if timeout is None:
            await fut
            return True
        done, _ = await asyncio.wait((fut,), timeout=max(0.0, timeout))
        c.wake = None
        return bool(done)

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
        if member is not None:
            member.join()
        poll = _FIRST_POLL
        due = 0.0
        try:
            while not self._closed:
                room = prefetch - c.unsettled
                if room <= 0:
                    await self._nap(c, None)
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
                if not await self._nap(c, wait):
                    poll = min(self.poll, poll * 2)
                    parts = () if member is None else member.readable(self.clock.time())
                    try:
                        due = await self._submit(self._db.next_due, gid, parts, write=False)
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
        if member is not None:
            member.reads(parts, 1)

        def after(result: tuple[list[Delivery], float, dict[int, int]] | None) -> None:
            if member is not None:
                member.reads(parts, -1)
            if not result or not result[0]:
                return
            batch, _, where = result
            c.unsettled += len(batch)
            self._activity += 1
            self._idle = False
            for d in batch:
                lease = Lease(d.token, token, c, where.get(d.token) if where else None)
                d.token = lease
                leases[lease.did] = lease
            if fut.cancelled():  # nobody will take this batch: hand it back
                self._hand_back(batch)

        args = (c.gid, group, room, now, now + self.lease, token, parts, self.member_id)
        fut = self._submit(self._db.claim, *args, after=after)
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
            if isinstance(lease, Lease) and self._settle_local(lease):
                held.append((lease.did, lease.token))
        if held and not self._closed:
            self._submit(self._db.hand_back, held, self.clock.time()).add_done_callback(
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
                self._submit(self._db.hand_back, held, self.clock.time(), after=self._after_settle)
            )

    # --- settling ------------------------------------------------------------
    def _settle_local(self, lease: Lease) -> bool:
        if lease.settled:
            return False
        lease.settle()
        if self._leases.get(lease.did) is lease:
            del self._leases[lease.did]
        self._wake(lease.consumer)
        return True

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
            if self._settle_local(lease):
                held.append((lease.did, lease.token))
        return held

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        held = self._settle_all(deliveries)
        if held:
            self._check_open()
            await self._settling(self._submit(self._db.ack, held, after=self._after_settle))

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
        if not self._settle_local(lease):
            return
        self._check_open()
        self._activity += 1
        when = self.clock.time() + max(0.0, delay)
        await self._settling(self._submit(self._db.release, [(lease.did, lease.token)], when))
        for c in self._consumers.get(lease.consumer.gid, ()):
            self._wake(c)
        self._notify_changed()

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        lease = self._lease_of(delivery)
        if not self._settle_local(lease):
            return
        self._check_open()
        await self._settling(
            self._submit(
                self._db.dead_letter,
                lease.did,
                lease.token,
                lease.consumer.gid,
                record,
                after=self._after_settle,
            )
        )

    # --- dead letters and statistics -----------------------------------------
    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        self._check_open()
        gid = None if group is None else await self._gid(group)
        letters: list[DeadLetter] = await self._submit(self._db.dead_letters, gid, write=False)
        return letters

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        self._check_open()
        gid = await self._gid(group)
        self._activity += 1
        self._idle = False
        n: int = await self._submit(
            self._db.replay, gid, None if ids is None else list(ids), self.clock.time()
        )
        for c in self._consumers.get(gid, ()):
            self._wake(c)
        return n

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        self._check_open()
        gid = await self._gid(group)
        n: int = await self._submit(self._db.purge, gid, None if ids is None else list(ids))
        return n

    async def load_state(self, key: str) -> bytes | None:
        """A small value kept in the file under ``key`` (trigger state)."""
        self._check_open()
        value: bytes | None = await self._submit(self._db.load_state, key, write=False)
        return value

    async def save_state(self, key: str, value: bytes) -> None:
        self._check_open()
        await self._submit(self._db.save_state, key, value)

    async def stats(self, group: str) -> TransportStats:
        self._check_open()
        gid = await self._gid(group)
        counts: tuple[int, int, int, int] = await self._submit(
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
            busy, due = await self._submit(self._db.busy, gids, write=False)
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
        held = [(lease.did, lease.token) for lease in self._leases.values()]
        if not held:
            return 0
        now = self.clock.time()
        n: int = await self._submit(
            extend_leases, self._db, held, now + self.lease, now, self.member_id
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
        deleted, top = await self._submit(
            self._db.compact, upto, now, list(self._ephemeral.values()), self.lease
        )
        if self.retention:
            marks.append((now, top))
        if deleted:
            await self._submit(self._db.checkpoint, write=False)
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
