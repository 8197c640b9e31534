"""One group as this process consumes it: reading its streams, taking over a
dead consumer's deliveries, and settling one delivery at a time.

Reading is ``XREADGROUP COUNT <room> BLOCK`` over the shared stream and the
partitions this consumer owns (on a Redis Cluster, per master and per slot:
``_start_reads``), with at most ``prefetch`` unsettled deliveries (plus one
per owned partition). A delivery idle
for longer than ``lease`` seconds belongs to a dead consumer: it is taken
over (XPENDING IDLE + XCLAIM, which also yields its delivery count for
``attempt``). ``nack(delay)`` moves the entry atomically into the group's
sorted set (XACK + XDEL + ZADD, in Lua), from where the keeper moves it back
when due. Each script checks XACK's reply first, so a retried settle never
duplicates.

Handing back (``HandsBack``) keeps the attempt: what the runner releases at
a stop, and at close whatever is still pending to this consumer that no
handler got (a read cut off by the stop's cancel after Redis answered it, a
partition's claimed backlog), goes back through the ``handback`` script,
which sets the delivery count back so that the next claim (or read) gives
the attempt it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import redis.asyncio as aredis
import redis.exceptions as rexc

from ..._clock import Clock
from ..._codec import Codec
from ..._errors import ConfigurationError, TransportError
from ..._transport import DeadLetter, Delivery
from .._partitions import Ownership
from ._connection import CONNECTION_ERRORS, Connection
from ._dead_letters import DeadLetters
from ._inflight import Inflight
from ._keeper import Keeper
from ._keys import GroupKeys
from ._options import RedisOptions
from ._partitions import PartitionOwner
from ._registry import Registry

__all__ = ("Group",)

log = logging.getLogger("surge.redis")


class Group:
    """A group declared in this process: its keys and patterns, what this
    consumer holds of it (``Inflight``), its partitions (``PartitionOwner``,
    none for an inbox) and its background task (``Keeper``)."""

    __slots__ = (
        "_batch",
        "_block_ms",
        "_busy",
        "_clock",
        "_conn",
        "_consuming",
        "_dead",
        "_inflight",
        "_keeper",
        "_lease",
        "_left",
        "_owner",
        "_reads",
        "_registry",
        "_spread",
        "_touched",
        "consumer",
        "ephemeral",
        "keys",
        "name",
        "patterns",
    )

    def __init__(
        self,
        keys: GroupKeys,
        patterns: Sequence[str],
        *,
        ephemeral: bool,
        conn: Connection,
        registry: Registry,
        dead: DeadLetters,
        options: RedisOptions,
        codec: Codec,
        clock: Clock,
        consumer: str,
        touched: Callable[[], None],
    ) -> None:
        self.keys = keys
        self.name = keys.name
        self.patterns = list(patterns)
        self.ephemeral = ephemeral
        self.consumer = consumer
        self._conn = conn
        self._registry = registry
        self._dead = dead
        self._clock = clock
        self._touched = touched
        self._lease = options.lease
        self._batch = options.batch
        self._block_ms = max(1, int(options.block * 1000))
        self._inflight = Inflight(keys, codec=codec, clock=clock, dead=dead)
        self._owner = (
            PartitionOwner(
                conn,
                keys,
                consumer=consumer,
                lease=options.lease,
                inflight=self._inflight,
                clock=clock,
            )
            if keys.parts
            else None
        )
        self._keeper = Keeper(
            conn,
            keys,
            options,
            clock=clock,
            consumer=consumer,
            inflight=self._inflight,
            owner=self._owner,
            ephemeral=ephemeral,
        )
        self._consuming = False  # consume() was called: close() forgets the consumer
        self._spread = 1  # how many streams the last read found entries in
        self._reads: dict[str, _Read] = {}  # lane (or stream) -> its read in flight
        self._busy: dict[str, bool] = {}  # a cluster lane -> its reads find entries
        # reads their consumer's end left running (see _read_group)
        self._left: list[asyncio.Task[Any]] = []

    @property
    def ownership(self) -> Ownership | None:
        """Which partitions this consumer reads (None: not partitioned)."""
        return None if self._owner is None else self._owner.ownership

    def add_patterns(self, topics: Sequence[str]) -> None:
        self.patterns.extend(t for t in topics if t not in self.patterns)

    # --- reading ---------------------------------------------------------------
    async def consume(self, prefetch: int) -> AsyncIterator[list[Delivery]]:
        self._conn.client()  # raises Closed
        if prefetch < 1:
            raise ConfigurationError("prefetch must be at least 1")
        conn = self._conn
        clock = self._clock
        inflight = self._inflight
        self._consuming = True
        self._keeper.start()
        next_scan = 0.0
        delay = 0.05
        reads = self._reads
        try:
            while not conn.closed:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # A cancel that redis-py swallowed (into an empty reply or
                    # a connection error) must still end this consumer.
                    raise asyncio.CancelledError
                if inflight.backlogged:  # left by a partition's previous owner: first
                    yield inflight.take_backlog()
                    continue
                room = prefetch - len(inflight)
                if room <= 0 and not reads:
                    await inflight.wait_room()
                    continue
                batch: list[Delivery] = []
                error: BaseException | None = None
                # the broker's answer to a request sent since the last failure
                # (a read's reply can be read after the broker went away;
                # waking for room is no answer at all)
                answered: int | None = None
                try:
                    if room > 0 and clock.monotonic() >= next_scan:
                        next_scan = clock.monotonic() + self._lease / 2
                        answered = conn.epoch
                        batch = await self.reclaim(conn.client(self.keys.stream), room)
                    if not batch:
                        if room > 0:
                            self._start_reads(reads, room, prefetch)
                        batch, error, read_at = await self._read_some(reads)
                        if read_at is not None:
                            answered = read_at if answered is None else max(answered, read_at)
                except (rexc.RedisError, OSError) as exc:
                    error = exc
                if error is not None:
                    if self._conn.closed:  # closed while reading
                        return
                    delay = await self._read_failed(error, delay)
                else:
                    delay = 0.05
                    if answered is not None:
                        conn.ok(answered)
                if batch:
                    yield batch
        finally:
            self._left_reads(reads)
            # Stop owning partitions: each is handed over once what this
            # consumer read from it is settled (the keeper sees to it).
            self._keeper.stop_reading()

    def _lanes(self) -> list[tuple[str, list[str], list[int]]]:
        """What to read: (lane, its streams, their partitions). One lane on a
        single node: the shared stream and the partitions it owns, in one
        XREADGROUP. On a cluster, a lane per master (Redis reads several
        streams at once only within one slot): the streams of the slots it
        serves (see ``_start_reads``)."""
        keys = self.keys
        parts = self._owner.readable() if self._owner is not None else []
        if not keys.slotted:
            return [("", [keys.stream, *(keys.pstreams[p] for p in parts)], parts)]
        client = self._conn.client
        lanes: dict[int, tuple[str, list[str], list[int]]] = {}
        for stream, p in [(keys.stream, -1), *((keys.pstreams[p], p) for p in parts)]:
            r = client(stream)
            lane = lanes.get(id(r))
            if lane is None:
                lane = lanes[id(r)] = (f"m{id(r)}", [], [])
            lane[1].append(stream)
            if p >= 0:
                lane[2].append(p)
        return list(lanes.values())

    def _start_reads(self, reads: dict[str, _Read], room: int, prefetch: int) -> None:
        """Start the reads of the lanes without one (``room`` > 0).

        Redis applies COUNT to each stream of a read. When the last read found
        entries in one stream only (the common case: unkeyed events, or one
        busy partition), the whole room goes to each stream, for big batches;
        when it found several, the room is split among them (at least one
        each). So a consumer holds at most ``prefetch`` plus one per partition
        it owns, except right after events start flowing into several streams
        at once (up to ``prefetch`` per stream, for one read).

        On a cluster a stream is in one read at a time, and a master's lane
        is busy or idle. Busy (at first, and while its reads find entries):
        one pipeline of XREADGROUPs without BLOCK over its streams not being
        read, one round trip. Idle (its last pipeline found nothing): one
        XREADGROUP BLOCK per such stream, each on its own, so an entry in any
        is read at once and makes the lane busy again. Each stream's COUNT is
        its fair share of the prefetch, at least one."""
        lanes = self._lanes()
        if not self.keys.slotted:
            ((lane, streams, parts),) = lanes
            if lane in reads:
                return
            room = max(1, min(room - sum(rd.count for rd in reads.values()), self._batch))
            count = room if self._spread <= 1 else max(1, room // len(streams))
            read = self._read_group(streams, count, parts)
            self._start(reads, lane, streams, parts, count, read)
            return
        reading = {s for rd in reads.values() for s in rd.streams}
        share = max(1, min(prefetch, self._batch) // sum(len(ln[1]) for ln in lanes))
        pindex = self.keys.pindex
        for lane, streams, _ in lanes:
            free = [s for s in streams if s not in reading]
            if not free:
                continue
            if self._busy.get(lane, True):
                if lane not in reads:
                    parts = [pindex[s.encode()] for s in free if s.encode() in pindex]
                    read = self._read_master(free, share)
                    self._start(reads, lane, free, parts, share, read)
                continue
            for stream in free:
                p = pindex.get(stream.encode())
                parts = [] if p is None else [p]
                read = self._read_group([stream], share, parts)
                self._start(reads, stream, [stream], parts, share, read, idle=lane)

    def _start(
        self,
        reads: dict[str, _Read],
        key: str,
        streams: list[str],
        parts: list[int],
        count: int,
        read: Coroutine[Any, Any, Any],
        idle: str = "",
    ) -> None:
        if self._owner is not None:
            self._owner.begin_read(parts)
        since = self._conn.epoch
        task = asyncio.get_running_loop().create_task(read)
        reads[key] = _Read(task, streams, parts, count * len(streams), idle, since)

    async def _read_some(
        self, reads: dict[str, _Read]
    ) -> tuple[list[Delivery], BaseException | None, int | None]:
        """Wait for a read to end (or for room, or a partition to read), and
        take what the ended ones read; the first failure among them; the
        latest ``epoch`` at which an ended read was sent (None: none ended)."""
        room = self._inflight.room()
        done, _ = await asyncio.wait(
            [room, *(rd.task for rd in reads.values())], return_when=asyncio.FIRST_COMPLETED
        )
        batch: list[Delivery] = []
        error: BaseException | None = None
        answered: int | None = None
        owner = self._owner
        for lane, rd in list(reads.items()):
            if rd.task not in done:
                continue
            del reads[lane]
            exc = _CancelledRead() if rd.task.cancelled() else rd.task.exception()
            if exc is not None:
                error = error or exc
                # A read whose reply was lost may have run on the server:
                # those entries are pending to us but not held. Claim them
                # (in order) before reading these again.
                if owner is not None and owner.end_read(rd.parts, lost=True):
                    self._keeper.poke()
                continue
            reply = rd.task.result()
            answered = rd.since if answered is None else max(answered, rd.since)
            if reply:
                self._spread = len(reply)
            if lane.startswith("m"):  # a cluster lane's pipeline: busy while it finds entries
                self._busy[lane] = bool(reply)
            elif reply and rd.idle:  # an idle lane's blocking read found some
                self._busy[rd.idle] = True
            for stream, entries in reply or ():
                part = self.keys.pindex.get(stream)
                prefix = b"" if part is None else b"%d/" % part
                batch += await self._inflight.take(entries, None, prefix)
            if owner is not None:
                owner.end_read(rd.parts, lost=False)
        return batch, error, answered

    async def _read_failed(self, exc: BaseException, delay: float) -> float:
        """Say why a read failed and back off (never let the consumer die
        silently); the next delay. A group the broker lost (restarted without
        persistence) is declared again."""
        conn = self._conn
        if isinstance(exc, CONNECTION_ERRORS):
            conn.failed(exc, f"reading {self.name!r}")
        elif isinstance(exc, rexc.ResponseError) and "NOGROUP" in str(exc):
            with contextlib.suppress(TransportError, *CONNECTION_ERRORS):
                names = await self._registry.declare_again()
                log.warning(
                    "redis: group %r was gone from the broker (restarted without persistence?); "
                    "declared this process's groups again: %s",
                    self.name,
                    ", ".join(repr(n) for n in names),
                )
        elif isinstance(exc, rexc.RedisError):
            conn.failed(exc, f"reading {self.name!r}")
        else:
            raise exc
        return await conn.backoff(delay)

    async def _read_group(self, streams: list[str], count: int, parts: list[int]) -> Any:
        """XREADGROUP ... BLOCK, run in a task of its own, so that a cancel
        ends the consumer at once: redis-py can swallow one (while it opens a
        connection), and the read then runs its whole BLOCK, which held up
        a stop's intake past its bound. A read left running this way is
        awaited at close (``cancel``); what it took is pending to this
        consumer, and close hands it back (``leave``). It blocks no longer
        than the leases of ``parts`` are safe: entries it takes are this
        consumer's while the partitions are, and a next owner's takeover
        claim finds them pending."""
        r = self._conn.client(streams[0])
        block = self._block_ms
        if parts and self._owner is not None:
            block = min(block, self._owner.valid_ms(parts))
        return await self._conn.cmd(r,
            "XREADGROUP", "GROUP", self.name, self.consumer,
            "COUNT", count, "BLOCK", block,
            "STREAMS", *streams, *(">" for _ in streams),
        )  # fmt: skip

    async def _read_master(self, streams: list[str], count: int) -> Any:
        """A busy cluster lane's read: one XREADGROUP per stream (each in its
        own slot of one master) in one pipeline, without BLOCK."""
        r = self._conn.client(streams[0])
        pipe = r.pipeline(transaction=False)
        for stream in streams:
            pipe.execute_command(
                "XREADGROUP", "GROUP", self.name, self.consumer,
                "COUNT", count, "STREAMS", stream, ">",
            )  # fmt: skip
        return [e for reply in await pipe.execute() if reply for e in reply]

    def _left_reads(self, reads: dict[str, _Read]) -> None:
        """The consumer ends with reads in flight: each is cancelled and left
        for close to await; their partitions are claimed again before being
        read (their replies are lost), and close hands back what they took."""
        owner = self._owner
        lost = False
        for rd in reads.values():
            if not rd.task.done():
                rd.task.cancel()
            rd.task.add_done_callback(_retrieve)
            self._left.append(rd.task)
            if owner is not None:
                lost = owner.end_read(rd.parts, lost=True) or lost
        reads.clear()
        if lost:
            self._keeper.poke()

    async def reclaim(self, r: aredis.Redis, room: int) -> list[Delivery]:
        """Take over deliveries whose consumer has been silent for a lease."""
        keys = self.keys
        lease_ms = int(self._lease * 1000)
        inflight = self._inflight
        pending = await self._conn.cmd(
            r, "XPENDING", keys.stream, keys.name, "IDLE", lease_ms, "-", "+", room
        )
        counts = {p[0]: int(p[3]) for p in pending if p[0] not in inflight}
        if not counts:
            return []
        me = self.consumer.encode()
        own = {p[0] for p in pending if p[1] == me}
        claimed = await self._conn.cmd(
            r, "XCLAIM", keys.stream, keys.name, self.consumer, lease_ms, *counts
        )
        out = await inflight.take(claimed, counts, own=own)
        if out:
            log.warning(
                "redis: took over %d deliveries of %s idle for more than %.1fs",
                len(out),
                keys.name,
                self._lease,
            )
        return out

    # --- settling --------------------------------------------------------------
    def settled(self, token: bytes) -> None:
        self._inflight.settled(token)

    def due_by(self, when: float) -> None:
        """An entry of the group's sorted set is due at ``when`` (epoch s)."""
        self._keeper.due_by(when)

    async def nack(self, delivery: Delivery, delay: float, *, counted: bool = True) -> None:
        """Hand ``delivery`` back for another attempt after ``delay``; with
        ``counted=False`` (a hand-back of an untouched delivery) the next
        delivery keeps its attempt."""
        keys = self.keys
        now = self._clock.time()
        first = delivery.first_time or now
        due = now + delay
        stream, entry = keys.locate(delivery.token)
        args: list[Any] = [keys.name, entry, "1" if delay > 0 else "0", repr(due)]
        args += [delivery.attempt + 1 if counted else delivery.attempt, repr(first), delivery.token]
        self._touched()

        zset = keys.zset_of(delivery.token)

        def op() -> Any:
            return self._conn.run("nack", keys=[stream, zset], args=args)

        await self._conn.retrying("handing back a delivery", op)
        self._inflight.settled(delivery.token)
        if delay > 0:
            self._keeper.due_by(due)

    async def release(self, delivery: Delivery) -> None:
        """Hand back a delivery untouched (at stop), its attempt not counted.
        A partition's entry stays pending where it is, its delivery count
        set back (the ``release`` script): its next owner claims it before
        anything newer, as the attempt it was. Another goes to the end of
        the group's stream as by ``nack(d, 0)``, with the attempt it had
        (unkeyed entries keep no order to keep)."""
        token = delivery.token
        if b"/" not in token:
            await self.nack(delivery, 0.0, counted=False)
            return
        keys = self.keys
        stream, entry = keys.locate(token)
        conn = self._conn
        args = [keys.name, self.consumer, "p", entry, delivery.attempt]

        def op() -> Any:
            return conn.run("handback", keys=[stream], args=args)

        await conn.retrying("handing back a delivery", op)
        self._inflight.released(token, delivery.attempt)
        if self._owner is not None and self._keeper.reading and not self._conn.closed:
            # still ours and read: deliver it again
            self._owner.redeliver(int(token.partition(b"/")[0]))

    async def save_state_held(self, state_key: str, value: bytes, delivery: Delivery) -> bool:
        """``SET state_key value`` while ``delivery`` is still this
        consumer's: held here, pending to it on the server, and (a
        partition's entry) the partition's lease ours (``FencedState``)."""
        token = delivery.token
        if token not in self._inflight:
            return False  # settled, or forgotten at a lapse of its partition
        keys = self.keys
        stream, entry = keys.locate(token)
        part, slash, _ = token.partition(b"/")
        conn = self._conn
        if slash and keys.slotted:
            # The stream is in another slot than the lease and the state: the
            # entry is checked first, the lease and the save in one script.
            # (Between the two, the entry could go only to a next owner of a
            # lease that comes back to us: the lease is checked at the save.)
            async def pending() -> Any:
                r = conn.client(stream)
                return await conn.cmd(
                    r, "XPENDING", stream, keys.name, entry, entry, 1, self.consumer
                )

            if not await conn.retrying("saving state", pending):
                return False
            lease = keys.leases[int(part)]
            script_keys = [lease, lease, state_key]
            args = [self.consumer, keys.name, entry, value, "1", "0"]
        else:
            lease = keys.leases[int(part)] if slash else stream
            script_keys = [lease, stream, state_key]
            args = [self.consumer, keys.name, entry, value, "1" if slash else "0", "1"]

        def op() -> Any:
            return conn.run("save_held", keys=script_keys, args=args)

        saved = await conn.retrying("saving state", op)
        return bool(saved)

    def fenced(self, delivery: Delivery) -> bool:
        """A partition's delivery whose lease may have lapsed (see
        ``PartitionOwner.fenced``) is forgotten here, unsettled: pending to
        this consumer on the server, it is claimed again if the partition is
        still ours once a renewal succeeds, else by its next owner."""
        token = delivery.token
        owner = self._owner
        if owner is None or b"/" not in token:
            return False
        p = int(token.partition(b"/")[0])
        if not owner.fenced(p):
            return False
        if token in self._inflight:
            if owner.first_fenced(p):
                log.warning(
                    "redis: %s: partition %d's lease was not renewed in time (Redis "
                    "unreachable or this process stalled): its deliveries are left to its owner",
                    self.keys.name,
                    p,
                )
            self._inflight.settled(token)
            owner.redeliver(p)
        return True

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        await self._dead.bury(self.keys, delivery.token, record)
        self._inflight.settled(delivery.token)

    # --- close -----------------------------------------------------------------
    def cancel(self) -> list[asyncio.Task[Any]]:
        """Cancel the keeper (close); the tasks to await: the keeper's if it
        was running, and a read that a consumer's cancel left running."""
        tasks: list[asyncio.Task[Any]] = []
        keeper = self._keeper.cancel()
        if keeper is not None:
            tasks.append(keeper)
        # a consumer waiting at a yield may have reads in flight (a cluster's
        # other lanes): their replies are lost, their entries handed back
        self._left_reads(self._reads)
        left, self._left = self._left, []
        tasks.extend(t for t in left if not t.done())
        return tasks

    def wake(self) -> None:
        """A consumer waiting for room wakes (to see the connection closed)."""
        self._inflight.make_room()

    async def leave(self) -> None:
        """Give up partitions and membership, and forget this consumer in
        every stream where it holds nothing (at close)."""
        if not self._consuming:
            return
        await self._hand_back_unseen()
        if self._owner is not None:
            await self._owner.leave()
        for stream in self.keys.streams():
            await self._conn.run(
                "forget",
                keys=[stream],
                args=[self.name, self.consumer],
                client=self._conn.node(stream),
            )

    async def _hand_back_unseen(self) -> None:
        """At close, before the partitions go: every entry still pending to
        this consumer that no handler has (read by a read whose reply never
        came, claimed into the backlog and not handed out, released in
        place) goes back as the attempt it had (``handback``: a partition's
        in place, the shared stream's to its end). What a handler still
        holds (a stop cut it off) stays pending, for a takeover."""
        inflight = self._inflight
        unseen = {d.token: d.attempt for d in inflight.take_backlog()}
        keys = self.keys
        for stream in keys.streams():
            r = self._conn.node(stream)
            part = keys.pindex.get(stream.encode())
            prefix = b"" if part is None else b"%d/" % part
            start = "-"
            while True:
                pending: Any = await self._conn.cmd(
                    r, "XPENDING", stream, keys.name, start, "+", _PAGE, self.consumer
                )
                args: list[Any] = []
                for entry in pending:
                    token = prefix + entry[0]
                    if token in unseen:
                        attempt = unseen[token]
                    elif token in inflight:
                        continue  # a handler has it
                    else:
                        attempt = inflight.released_attempt(token) or 0
                    args += [entry[0], attempt]
                if args:
                    mode = "s" if part is None else "p"
                    await self._conn.run(
                        "handback",
                        keys=[stream],
                        args=[keys.name, self.consumer, mode, *args],
                        client=r,
                    )
                if len(pending) < _PAGE:
                    break
                start = "(" + pending[-1][0].decode()
        inflight.forget_released()


_PAGE = 500
"""Pending entries looked at per request at close."""


class _CancelledRead(ConnectionError):
    """A read cancelled before its reply came (taken as a lost reply)."""


class _Read:
    """A read in flight: its task, its streams and their partitions, the
    most it can take, and (a blocking read of an idle cluster lane) that
    lane."""

    __slots__ = ("count", "idle", "parts", "since", "streams", "task")

    def __init__(
        self,
        task: asyncio.Task[Any],
        streams: list[str],
        parts: list[int],
        count: int,
        idle: str,
        since: int,
    ) -> None:
        self.task = task
        self.streams = streams
        self.parts = parts
        self.count = count
        self.idle = idle
        self.since = since
        """The connection's ``epoch`` when it was sent."""


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A read left running: its outcome is not news."""
    if not task.cancelled():
        task.exception()
