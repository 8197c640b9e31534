"""``PostgresTransport``: the parts of :mod:`surge.transports.postgres`
wired together, with the lifecycle and the consume loop."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..._clock import Clock, RealClock
from ..._errors import Closed, ConfigurationError, TransportError
from ..._event import Envelope
from ..._transport import DeadLetter, Delivery, TransportStats
from .._partitions import Ownership
from ._consume import Claimed, Consumer, Lease, Queue, held_of
from ._db import Database, retryable, translate
from ._dead import DeadLetters
from ._groups import Groups
from ._listen import Listener
from ._options import parse
from ._outbox import Outbox
from ._partitions import Member, leave
from ._publish import Publisher
from ._retention import Housekeeper
from ._schema import Schema

__all__ = ("PostgresTransport",)

log = logging.getLogger("surge.postgres")

_FIRST_POLL = 0.005
_CLOSE_BOUND = 5.0  # seconds close spends handing back leases and partitions


class PostgresTransport:
    """Groups, leases, partitions and dead letters in one PostgreSQL schema
    (see :mod:`surge.transports.postgres`).

    Besides ``Transport`` it implements ``HandsBack``, ``KeyRouting``,
    ``Fences``, ``IdleAware``, ``KnowsGroups``, ``Outbox``, ``StateStore`` and
    ``FencedState`` (``surge._transport``).
    """

    durable = True

    def __init__(self, url: str, *, clock: Clock | None = None, **options: Any) -> None:
        opts = parse(url, options)
        self.url = url
        self.options = opts
        self.clock: Clock = clock or RealClock()
        self.lease = opts.lease
        self.heartbeat = opts.heartbeat
        self.poll = opts.poll
        self.partitions = opts.partitions
        self.schema = Schema(opts.schema, partitions=opts.partitions, database=opts.database)
        label = f"postgres {opts.database}/{opts.schema}"
        self._db = Database(
            opts.dsn,
            size=opts.pool,
            clock=self.clock,
            reconnect_timeout=opts.reconnect_timeout,
            command_timeout=opts.command_timeout,
            label=label,
        )
        # Claims, settles and lease extensions need not wait for the WAL to
        # reach the disk: one lost in a server crash only makes a delivery
        # come back (a duplicate, which at-least-once allows). Publishes,
        # dead letters, groups and partition owners keep durable commits.
        # Their statements run with the plan made once per connection: the
        # server chose a custom plan for every ack (planning it cost twice
        # its execution).
        self._fast = Database(
            opts.dsn,
            size=opts.pool,
            clock=self.clock,
            reconnect_timeout=opts.reconnect_timeout,
            command_timeout=opts.command_timeout,
            label=label,
            settings={"synchronous_commit": "off", "plan_cache_mode": "force_generic_plan"},
        )
        self._queue = Queue(self._fast, self.schema)
        self._groups = Groups(self._db, self.schema)
        self._dead = DeadLetters(self._db, self.schema)
        self._publisher = Publisher(
            self._db,
            self.schema,
            codec=opts.codec,
            clock=self.clock,
            partitions=opts.partitions,
            dedup_window=opts.dedup_window,
            max_pending=opts.max_pending,
            batch=opts.batch,
            published=self._wake_groups,
        )
        self._outbox = Outbox(self.schema, self._publisher, self.clock, opts.dedup_window)
        self.listener = Listener(
            opts.dsn, self.schema.channel, clock=self.clock, woken=self._notified
        )
        self._housekeeper = Housekeeper(
            self._db,
            self.schema,
            self._groups,
            retention=opts.retention,
            dedup_window=opts.dedup_window,
        )
        # who this transport is among a group's members (processes, and
        # transports within one, are told apart)
        self.member_id = f"{os.getpid()}-{random.getrandbits(48):012x}"
        self._members: dict[str, Member] = {}
        self._consumers: dict[int, list[Consumer]] = {}
        self._leases: dict[int, Lease] = {}
        self._local: dict[str, int] = {}
        self._ephemeral: dict[str, int] = {}
        self._started = False
        self._closed = False
        self._changed: list[asyncio.Future[None]] = []
        self._activity = 0
        self._idle = True
        self._ticker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._claims: set[asyncio.Future[Claimed]] = set()
        # claimed by a consumer cancelled meanwhile, and the transport closed
        # before they came: close hands them back
        self._unseen: list[Lease] = []

    # --- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise Closed("a closed postgres transport cannot be started again")
        await self._db.open()
        await self._fast.open()
        try:
            # A connection lost while starting (a backend terminated, a
            # server restarting) is tried again as any statement is, once
            # the server has answered: a test's pg_terminate_backend 0.24 s
            # into a publisher's start failed it (issue 13, CI at load 15).
            await self._db.retry(self._prepare, "starting", once_reached=True)
        except BaseException as exc:
            await self.listener.close()
            await self._db.close()
            await self._fast.close()
            if isinstance(exc, TransportError) and retryable(exc):
                # the pool connects lazily: its first statement is the first
                # connection, so a server that cannot be reached shows here
                raise TransportError(
                    f"cannot connect to PostgreSQL at {_server_of(self.url)}: {exc}"
                ) from None
            raise
        self._started = True
        self._ticker = asyncio.get_running_loop().create_task(
            self._tick(), name="surge-postgres-ticker"
        )

    async def _prepare(self) -> None:
        """The schema created or checked, and the LISTEN connection up."""
        await self._db.call(self.schema.prepare)
        try:
            await self.listener.start()
        except Exception as exc:
            raise translate(exc, "LISTEN") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._started:
            await self._db.close()
            await self._fast.close()
            return
        tasks = [m.task for m in self._members.values() if m.task is not None]
        if self._ticker is not None:
            tasks.append(self._ticker)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for consumers in self._consumers.values():
            for c in consumers:
                c.wake_up()
        self._notify_changed()
        await self._publisher.close()
        # claims under way when close began (their consumers cancelled):
        # what they took is handed back below with the rest
        pending = [*self._background, *self._claims]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        # Hand back what this process holds, so others need not wait out leases.
        held = [lease for lease in self._leases.values() if not lease.settled]
        self._leases.clear()
        unseen, self._unseen = self._unseen, []
        # Bounded: a server that does not answer must not hold a worker's
        # exit past its supervisor's deadline (the leases run out anyway).
        try:
            async with asyncio.timeout(_CLOSE_BOUND):
                if unseen:
                    await self._queue.hand_back(held_of(unseen), self.clock.time())
                if held:
                    await self._queue.release(held_of(held), self.clock.time())
                if self._ephemeral:
                    await self._groups.drop(list(self._ephemeral.values()))
                await leave(self._db, self.schema, self.member_id)
        except (TransportError, TimeoutError) as exc:
            log.warning("postgres: could not hand back leases at close: %r", exc)
        finally:
            await self.listener.close()
            await self._db.close()
            await self._fast.close()

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("postgres transport is closed")
        if not self._started:
            raise Closed("postgres transport is not started")

    @property
    def healthy(self) -> bool:
        """The last statement reached the server."""
        return self._db.healthy and self._fast.healthy

    async def groups_for(self, topic: str) -> list[str]:
        """The groups of the schema, declared by any process, that receive
        ``topic`` (``KnowsGroups``)."""
        self._check_open()
        return await self._groups.groups_for(topic)

    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        self._check_open()
        alive = self.clock.time() + self._inbox_life() if ephemeral else None
        gid = await self._groups.declare(group, topics, ephemeral=ephemeral, alive_until=alive)
        self._local[group] = gid
        if ephemeral:
            self._ephemeral[group] = gid
        elif group not in self._members:
            self._members[group] = self._member(group, gid)

    def _inbox_life(self) -> float:
        return max(600.0, 10 * self.lease)

    def _member(self, group: str, gid: int) -> Member:
        def woken() -> None:  # partitions taken: there may be more to read
            for c in self._consumers.get(gid, ()):
                c.wake_up()

        return Member(
            group,
            gid,
            db=self._db,
            schema=self.schema,
            me=self.member_id,
            lease=self.lease,
            now=self.clock.time,
            monotonic=self.clock.monotonic,
            woken=woken,
            lapsed=self._forget,
        )

    def ownership(self, group: str) -> Ownership | None:
        """The partitions this transport holds of ``group`` (None: a reply
        inbox, or a group this transport has not declared)."""
        member = self._members.get(group)
        return None if member is None else member.own

    # --- publishing ----------------------------------------------------------
    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self._check_open()
        self._activity += 1
        self._idle = False
        await self._publisher.publish(envelopes)

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        self._check_open()
        self._activity += 1
        self._idle = False
        self._publisher.publish_nowait(envelopes)

    async def publish_in(self, connection: Any, envelopes: Sequence[Envelope]) -> None:
        """Write ``envelopes`` through ``connection`` (an asyncpg Connection
        or a psycopg AsyncConnection to this database), inside its open
        transaction: delivered once it commits, never if it rolls back."""
        self._check_open()
        await self._outbox.publish_in(connection, envelopes)

    def _wake_groups(self, gids: Any) -> None:
        for gid in gids:
            for c in self._consumers.get(gid, ()):
                c.wake_up()
        self._notify_changed()

    def _notified(self, gids: list[int] | None) -> None:
        self._activity += 1
        self._idle = False
        if gids is None:
            for consumers in self._consumers.values():
                for c in consumers:
                    c.wake_up()
            self._notify_changed()
        else:
            self._wake_groups(gids)

    def _notify_changed(self) -> None:
        waiters = self._changed
        if waiters:
            self._changed = []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    # --- consuming -----------------------------------------------------------
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
        retry = _FIRST_POLL
        try:
            while not self._closed:
                room = prefetch - c.unsettled
                if room <= 0:
                    c.full = True  # a settle wakes it
                    await c.nap(None)
                    continue
                now = self.clock.time()
                try:
                    claimed = await self._claim(c, group, room, now)
                    retry = _FIRST_POLL
                    if claimed.deliveries:
                        yield claimed.deliveries
                    if claimed.full:
                        continue  # there may be more at once
                    due = claimed.due
                    if member is not None:
                        due = min(due, member.next_ready(now))
                except TransportError as exc:
                    # the server is gone or restarting: wait, try again
                    log.warning("postgres: cannot claim for %s: %s", group, exc)
                    due = now + retry
                    retry = min(self.poll, retry * 2)
                # What this claim read is drained: a notification (a
                # publish, a replay, partitions taken, a nack here) wakes the
                # consumer; without one it looks again when the next delivery
                # is due, and at least every ``poll`` seconds. (A row another
                # consumer held locked, skipped, gets its lease then.)
                await c.nap(min(max(0.0, due - self.clock.time()), self.poll))
        finally:
            consumers = self._consumers.get(gid)
            if consumers is not None and c in consumers:
                consumers.remove(c)
            if member is not None:
                member.leave()

    async def _claim(self, c: Consumer, group: str, room: int, now: float) -> Claimed:
        member = c.member
        parts = [] if member is None else member.readable(now)
        # random reseeds itself in forked children, so workers forked from
        # one parent still draw different tokens
        token = random.getrandbits(62)
        fences = 0
        if member is not None:
            member.reads(parts, 1)
            fences = member.fencing.count
        claim = asyncio.ensure_future(
            self._queue.claim(c, group, room, now, now + self.lease, token, parts, self.member_id)
        )

        def claimed(fut: asyncio.Future[Claimed]) -> None:
            if member is not None:
                member.reads(parts, -1)
            if fut.cancelled() or fut.exception() is not None:
                return
            batch = fut.result().deliveries
            if member is not None and member.fencing.count != fences:
                # leased before a lapse of their partition: left to their
                # lease, as the deliveries forgotten at the lapse are
                batch[:] = [
                    d
                    for d in batch
                    if d.token[1] is None or not member.fencing.stale(d.token[1], fences)
                ]
            if not batch:
                return
            c.unsettled += len(batch)
            self._activity += 1
            self._idle = False
            for d in batch:
                did, part = d.token
                lease = Lease(did, token, c, part)
                d.token = lease
                self._leases[did] = lease

        claim.add_done_callback(claimed)
        self._claims.add(claim)
        claim.add_done_callback(self._claims.discard)
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            # Cancelled while the claim runs: the batch (if any) is ours, and
            # nobody will take it: hand it back, in its place.
            claim.add_done_callback(self._hand_back_claim)
            raise

    def _hand_back_claim(self, fut: asyncio.Future[Claimed]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        leases = [d.token for d in fut.result().deliveries if isinstance(d.token, Lease)]
        self._hand_back(leases)

    def _hand_back(self, leases: list[Lease]) -> None:
        held = [lease for lease in leases if self._settle_local(lease)]
        if self._closed:
            # close, which waits for claims under way, hands these back
            # (never seen by a handler: the attempt not counted), not
            # released with what handlers held (CI: an event claimed as the
            # app stopped came back as attempt 2)
            self._unseen.extend(held)
            return
        if held and not self._closed:
            task = asyncio.get_running_loop().create_task(self._handing_back(held))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(_log_failure)

    async def _handing_back(self, held: list[Lease]) -> None:
        await self._queue.hand_back(held_of(held), self.clock.time())
        self._wake_consumers(held)

    def _wake_consumers(self, held: list[Lease]) -> None:
        """Wake this process's consumers of the groups ``held`` came from:
        what was handed back is theirs to read again."""
        for gid in {lease.consumer.gid for lease in held}:
            for c in self._consumers.get(gid, ()):
                c.wake_up()

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries no handler has seen (the app is stopping):
        visible at once, the attempt not counted, a partition's in its place
        (before later entries, for whoever reads the partition next)."""
        held = self._settle_all(deliveries)
        if held:
            self._check_open()
            h = held_of(held)
            await self._settling(lambda: self._queue.hand_back(h, self.clock.time()))
            self._wake_consumers(held)

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
        held = [
            lease
            for lease in self._leases.values()
            if lease.part == part and lease.consumer.member is member
        ]
        for lease in held:
            self._settle_local(lease)
        log.warning(
            "postgres: %s: partition %d's lease was not renewed in time (the server "
            "unreachable or this process stalled): its %d deliveries here are left to its owner",
            member.group,
            part,
            len(held),
        )

    # --- settling ------------------------------------------------------------
    def _settle_local(self, lease: Lease) -> bool:
        if lease.settled:
            return False
        lease.settle()
        if self._leases.get(lease.did) is lease:
            del self._leases[lease.did]
        c = lease.consumer
        if c.full:  # it waits for room
            c.full = False
            c.wake_up()
        return True

    def _lease_of(self, d: Delivery) -> Lease:
        lease = d.token
        if not isinstance(lease, Lease):
            raise ConfigurationError(f"delivery {d.envelope.id} did not come from {self.url}")
        return lease

    def _settle_all(self, deliveries: Sequence[Delivery]) -> list[Lease]:
        """Settle ``deliveries`` here; the leases not settled before."""
        return [lease for d in deliveries if self._settle_local(lease := self._lease_of(d))]

    async def _settling(self, write: Callable[[], Awaitable[Any]]) -> None:
        # Settles name their lease's token, so trying one again is harmless.
        # One that cannot be written (the server stays away) loses nothing:
        # the delivery's lease runs out and it is delivered again. Raising
        # would stop the caller's consumer for good.
        try:
            await self._fast.retry(write, "settle")
        except TransportError as exc:
            log.warning("postgres: could not settle deliveries, they will come back: %s", exc)
        self._notify_changed()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        held = self._settle_all(deliveries)
        if held:
            self._check_open()
            h = held_of(held)
            await self._settling(lambda: self._queue.ack(h))

    async def nack(self, delivery: Delivery, delay: float) -> None:
        lease = self._lease_of(delivery)
        if not self._settle_local(lease):
            return
        self._check_open()
        self._activity += 1
        when = self.clock.time() + max(0.0, delay)
        h = held_of([lease])
        await self._settling(lambda: self._queue.retry(h, when))
        self._wake_consumers([lease])

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        lease = self._lease_of(delivery)
        if not self._settle_local(lease):
            return
        self._check_open()
        await self._settling(lambda: self._dead.move(lease.did, lease.token, record))

    # --- dead letters, state and statistics ----------------------------------
    async def _gid(self, group: str) -> int:
        gid = self._local.get(group)
        if gid is None:
            gid = await self._groups.gid(group)
        return gid

    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        self._check_open()
        gid = None if group is None else await self._gid(group)
        return await self._dead.letters(gid)

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        self._check_open()
        gid = await self._gid(group)
        self._activity += 1
        self._idle = False
        n = await self._dead.replay(gid, ids, self.clock.time())
        if n:
            await self._db.execute("SELECT pg_notify($1, $2)", self.schema.channel, str(gid))
        self._wake_groups([gid])
        return n

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        self._check_open()
        return await self._dead.purge(await self._gid(group), ids)

    async def load_state(self, key: str) -> bytes | None:
        """A small value kept in the schema under ``key`` (trigger state)."""
        self._check_open()
        value = await self._db.fetchval(
            self.schema.q("SELECT value FROM {s}.state WHERE key = $1"), key
        )
        return None if value is None else bytes(value)

    async def save_state(self, key: str, value: bytes) -> None:
        self._check_open()
        await self._db.execute(
            self.schema.q(
                "INSERT INTO {s}.state (key, value) VALUES ($1, $2) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ),
            key,
            value,
        )

    async def save_state_held(self, key: str, value: bytes, delivery: Delivery) -> bool:
        """``save_state`` fenced by ``delivery``'s lease (``FencedState``):
        the row is locked while its claim's token is still there, so a next
        owner's claim of it waits for this write and its load sees it."""
        lease = self._lease_of(delivery)
        if lease.settled:
            return False  # forgotten at a lapse of its partition
        self._check_open()
        saved = await self._db.fetchval(
            self.schema.q(
                "WITH held AS (SELECT id FROM {s}.deliveries WHERE id = $3 AND token = $4 "
                "AND visible_at > $5 FOR UPDATE) "
                "INSERT INTO {s}.state (key, value) SELECT $1, $2 FROM held "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value RETURNING true"
            ),
            key,
            value,
            lease.did,
            lease.token,
            self.clock.time(),
        )
        return saved is True

    async def stats(self, group: str) -> TransportStats:
        self._check_open()
        gid = await self._gid(group)
        backlog, pending, scheduled, settled, consumers = await self._queue.stats(
            gid, self.clock.time()
        )
        dead = await self._dead.count(gid)
        return TransportStats(backlog, pending, scheduled, dead, settled, consumers)

    @property
    def stale_settles(self) -> int:
        """Acks, nacks and dead letters ignored because the lease was lost."""
        return self._queue.stale

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
            fut = loop.create_future()
            self._changed.append(fut)
            try:
                due = await self._queue.busy(list(self._local.values()))
            except TransportError as exc:
                log.warning("postgres: cannot tell whether idle: %s", exc)
                due = self.clock.time()
            if due is None and seen == self._activity:
                self._idle = True
                return
            self._idle = False
            # visible but not yet claimed (due passed): look again after a poll
            left = (due or 0.0) - self.clock.time()
            wait = min(poll, left) if left > 0 else poll
            done, _ = await asyncio.wait((fut,), timeout=wait)
            poll = _FIRST_POLL if done else min(self.poll, poll * 2)

    # --- leases and housekeeping ---------------------------------------------
    async def _tick(self) -> None:
        clock = self.clock
        step = self.options.maintenance
        if self.heartbeat:
            step = min(self.heartbeat, step)
        next_beat = clock.monotonic() + self.heartbeat
        next_care = clock.monotonic() + self.options.maintenance
        while True:
            await clock.sleep(step)
            now = clock.monotonic()
            self._db.prune()
            self._fast.prune()
            try:
                if self.heartbeat and now >= next_beat:
                    next_beat = now + self.heartbeat
                    await self.extend()
                if now >= next_care:
                    next_care = now + self.options.maintenance
                    await self.compact()
            except TransportError as exc:
                log.warning("postgres housekeeping failed: %s", exc)

    async def extend(self) -> int:
        """Extend the lease of every delivery this process holds; how many."""
        held = list(self._leases.values())
        if not held:
            return 0
        # While the statement runs, its partitions count as being read: one
        # dropped at a lapse meanwhile (its deliveries forgotten here, their
        # rows still matching this statement) is not taken again before the
        # statement ended, so the round that takes it reads how long their
        # leases now run (CI: a stalled owner's retake read the leases'
        # ends before this extension moved them, and read the key's later
        # events first).
        reading: dict[Member, list[int]] = {}
        for lease in held:
            member = lease.consumer.member
            if lease.part is not None and member is not None:
                parts = reading.setdefault(member, [])
                if lease.part not in parts:
                    parts.append(lease.part)
        for member, parts in reading.items():
            member.reads(parts, 1)
        try:
            now = self.clock.time()
            return await self._queue.extend(held_of(held), now + self.lease, now, self.member_id)
        finally:
            for member, parts in reading.items():
                member.reads(parts, -1)

    async def compact(self) -> int:
        """Delete events settled by every group and older than ``retention``,
        expired dedup entries and abandoned reply groups; how many events."""
        self._check_open()
        now = self.clock.time()
        mine = list(self._ephemeral.values())
        return await self._housekeeper.compact(now, mine, now + self._inbox_life())

    def __repr__(self) -> str:
        o = self.options
        return f"<PostgresTransport {o.database}/{o.schema}>"


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("postgres: a background write failed: %s", fut.exception())


def _server_of(url: str) -> str:
    """``host:port/database`` of a postgres URL, without its credentials."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    host = parts.hostname or query.get("host") or "localhost"
    return f"{host}:{parts.port or query.get('port') or 5432}{parts.path}"
