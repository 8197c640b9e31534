"""Redis Streams: ``redis://host:port/db`` and ``rediss://`` (TLS).

Why one stream per *subscription* rather than one per topic. The transport
promise is per group: each group receives every envelope whose topic matches
one of its patterns. With a stream per topic, a pattern group (``orders.*``)
would have to discover new topic streams and read many of them, a retry or
a replay would need a per-group stream anyway (putting it back on the topic
stream would redeliver it to every group), and trimming could only remove
what the slowest of several groups had acknowledged. With a stream per group
the publisher resolves the route once (topic -> groups, cached per registry
version) and each group reads exactly one stream. An acknowledged entry has
no other reader, so ``ack`` deletes it (XACK + XDEL): acknowledged history
never accumulates and there is nothing else to trim. ``max_len`` adds a hard
cap (``XADD MAXLEN ~``) for deployments that prefer dropping the oldest
backlog to unbounded memory when consumers stay away.

Order: a group's keyed envelopes (``key`` set by the publisher, or by the
app) go to one of ``partitions`` streams (n = crc32(key) mod partitions, a
count fixed per prefix), each read by the one consumer that holds its lease;
unkeyed envelopes stay in the shared stream every consumer reads.

The parts, each an object that owns its state (file: what it holds):

- ``_options``: ``RedisOptions``, the options from keywords and the URL.
- ``_keys``: ``Keys`` / ``GroupKeys``, where everything lives in Redis.
- ``_connection``: ``Connection``, the client, its scripts, health, retries.
- ``_scripts``: the Lua scripts (each settle or move is atomic).
- ``_registry``: ``Registry``, the groups of the prefix and topic routes.
- ``_publisher``: ``Publisher``, the group-commit publisher.
- ``_group``: ``Group``, one group read and settled by this process.
- ``_inflight``: ``Inflight``, the deliveries one consumer holds of a group.
- ``_partitions``: ``PartitionOwner``, memberships, leases, handing over.
- ``_keeper``: ``Keeper``, a group's background task (delayed entries,
  lease extension, partition balance, an inbox's liveness).
- ``_dead_letters``: ``DeadLetters``, burying, listing, replay and purge.

Reconnects: every loop catches the broker's errors, logs a WARNING, marks the
transport unhealthy (``healthy``, ``last_error``) and retries with a backoff
capped at one second; acks and settles are retried until they succeed. A
publish keeps retrying for ``reconnect_timeout`` seconds, then raises
:class:`~surge.TransportError`. A broker that returns empty (no persistence)
gets each group declared again by its consumers (NOGROUP); what it held is
gone. ``await publish`` is only as durable as the server's ``appendonly`` /
``appendfsync`` settings (``always`` to lose nothing acknowledged).

Redis Cluster: found from a plain URL of any node (``INFO cluster``); the
keys are laid out by slot (``_keys``): the prefix's own under one hash tag,
each partition's under another, so a group's partitions spread over the
shards while every script stays in one slot (a publish batch is one script
per slot it touches, pipelined per master; a consumer reads per master, see
``Group._start_reads``). Unkeyed
events stay in the prefix's slot: spread those with several prefixes. Lost
masters and moved slots are followed (see ``_connection``); ``wait=1``
makes publishes and acks wait until a replica has them, so a failover
loses none of them. On one redis-server the keys keep the names they
always had.

Limits: Redis >= 6.2 (XPENDING IDLE). An ephemeral group (a reply inbox)
has a liveness key its consumer renews every lease/3; a process that starts
deletes the inboxes whose key expired (``alive_ms``: their process died).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.exceptions as rexc

from ..._clock import Clock, RealClock
from ..._codec import Codec, MsgpackCodec
from ..._errors import ConfigurationError
from ..._event import Envelope
from ..._transport import DeadLetter, Delivery, TransportStats
from .._partitions import DEFAULT_PARTITIONS, Ownership
from ._connection import Connection
from ._dead_letters import DeadLetters
from ._group import Group
from ._keys import GroupKeys, Keys
from ._options import RedisOptions
from ._publisher import Publisher
from ._registry import Registry

__all__ = ("RedisTransport",)

log = logging.getLogger("surge.redis")


class RedisTransport:
    """Redis Streams, one stream and consumer group per subscription.

    Options (also accepted in the URL's query string, ``redis://h/0?lease=5``):
    ``prefix`` of every key; ``lease`` seconds after which an unsettled
    delivery of a silent consumer is taken over; ``heartbeat`` seconds
    between lease extensions (default ``lease / 3``; 0 turns them off);
    ``block`` seconds a read waits for entries; ``dedup_window`` seconds a
    derived id is remembered; ``max_len`` caps each group's stream
    (approximately; the oldest entries go first); ``batch`` envelopes per
    round trip; ``buffer`` envelopes waiting to be written before ``publish``
    waits; ``poll`` seconds between checks for delayed entries scheduled by
    other processes; ``reconnect_timeout`` seconds a publish retries a lost
    broker; ``partitions`` of every group's keyed envelopes (fixed per
    ``prefix`` by its first user); ``wait`` replicas that must confirm each
    publish and ack (``WAIT``; 0, the default, waits for none), each ``WAIT``
    blocking ``wait_timeout`` seconds and repeated up to
    ``reconnect_timeout``. Other keyword arguments go to
    ``redis.asyncio.Redis.from_url``.

    Implements ``Transport`` and the capabilities ``HandsBack``,
    ``KeyRouting``, ``Fences``, ``IdleAware``, ``StateStore`` and
    ``FencedState`` (``surge._transport``).
    """

    durable = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "surge",
        lease: float = 30.0,
        heartbeat: float | None = None,
        block: float = 1.0,
        dedup_window: float = 3600.0,
        max_len: int | None = None,
        batch: int = 1000,
        buffer: int = 10_000,
        poll: float = 0.25,
        reconnect_timeout: float = 30.0,
        partitions: int | None = None,
        wait: int = 0,
        wait_timeout: float = 1.0,
        codec: Codec | None = None,
        clock: Clock | None = None,
        **redis_options: Any,
    ) -> None:
        o = RedisOptions.parse(
            url,
            prefix=prefix,
            lease=lease,
            heartbeat=heartbeat,
            block=block,
            dedup_window=dedup_window,
            max_len=max_len,
            batch=batch,
            buffer=buffer,
            poll=poll,
            reconnect_timeout=reconnect_timeout,
            partitions=partitions,
            wait=wait,
            wait_timeout=wait_timeout,
        )
        self.url = url
        self.prefix = o.prefix
        self.lease = o.lease
        self.heartbeat = o.heartbeat
        self.block = o.block
        self.dedup_window = o.dedup_window
        self.max_len = o.max_len
        self.batch = o.batch
        self.buffer = o.buffer
        self.poll = o.poll
        self.reconnect_timeout = o.reconnect_timeout
        self.partitions = o.partitions or DEFAULT_PARTITIONS
        """Partitions of every group's keyed envelopes (fixed per ``prefix``)."""
        self.codec = codec or MsgpackCodec()
        self.clock: Clock = clock or RealClock()
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._options = o
        self._conn = Connection(o, redis_options, self.clock)
        self._registry = Registry(self._conn, Keys(o.prefix), o, self.partitions)
        self._dead = DeadLetters(self._conn, self.codec, self._touched)
        self._publisher = Publisher(
            self._conn,
            self._registry,
            o,
            codec=self.codec,
            clock=self.clock,
            scheduled=self._scheduled,
            touched=self._touched,
        )
        self._groups: dict[str, Group] = {}
        self._idle = True

    # --- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        if self._conn.connected:
            return
        await self._conn.open()
        # on a cluster the keys are laid out by slot (see _keys)
        self._registry.use_keys(Keys(self.prefix, slotted=self._conn.cluster))
        try:
            await self._registry.fix_partitions()
        except BaseException:
            await self._conn.aclose()
            raise
        self.partitions = self._registry.partitions
        await self._registry.sweep()
        await self._registry.load()
        self._publisher.start()

    async def close(self) -> None:
        if not self._conn.connected:
            return
        # Let what was accepted reach Redis before the door shuts.
        await self._publisher.flush()
        self._conn.shut()
        try:
            running: list[asyncio.Task[Any]] = [
                t for g in self._groups.values() for t in g.cancel()
            ]
            publisher = self._publisher.cancel()
            if publisher is not None:
                running.append(publisher)
            if running:
                # bounded: a task whose cancel redis-py swallowed ends at its next check
                _, stuck = await asyncio.wait(running, timeout=5.0)
                if stuck:
                    log.warning("redis: %d background tasks did not stop at close", len(stuck))
                for t in running:
                    if t.done() and not t.cancelled():
                        t.exception()  # retrieved: a failure at close is not news
            self._publisher.fail_pending()
            for g in self._groups.values():
                g.wake()
            try:
                for g in self._groups.values():
                    if g.ephemeral:
                        await self._registry.drop(g.keys)
                    else:
                        await g.leave()
            except Exception as exc:  # closing anyway: say so, do not raise
                log.warning("redis: cleanup at close failed: %s: %s", type(exc).__name__, exc)
        finally:
            # Even when the close is cut (an app's stop bounds it and cancels
            # it at its deadline): the pool's sockets are closed, and a
            # background task still running gets Closed, not a new socket
            # (the unclosed connections CI's ResourceWarnings pinned on
            # whichever test ran next).
            await self._conn.aclose()

    async def abandon(self) -> None:
        """Stop as a killed process would (for crash tests): background
        tasks end, the connection drops; nothing is settled, handed over or
        deleted, so leases, memberships and inboxes are left to expire."""
        self._conn.shut()
        self._publisher.cancel()
        for g in self._groups.values():
            g.cancel()
        await self._conn.aclose()

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def healthy(self) -> bool:
        """False while the broker cannot be reached; see ``last_error``."""
        return self._conn.healthy

    @property
    def last_error(self) -> str | None:
        return self._conn.last_error

    @property
    def alive_ms(self) -> int:
        """How long an ephemeral group outlives its last renewal (every
        lease/3 while consumed): then the next process to start deletes it."""
        return self._options.alive_ms

    def ownership(self, group: str) -> Ownership | None:
        """Which partitions of ``group`` this consumer reads (None: not
        partitioned, or not declared here)."""
        g = self._groups.get(group)
        return None if g is None else g.ownership

    # --- groups ----------------------------------------------------------------
    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        self._conn.client()  # Closed, when it is
        if not group or "\n" in group or any(not t or "\n" in t for t in topics):
            raise ConfigurationError(f"group {group!r} / topics {list(topics)!r}: invalid names")
        g = self._groups.get(group)
        if g is None:
            keys = self._registry.keys.group(group, 0 if ephemeral else self.partitions)
            g = self._groups[group] = Group(
                keys,
                topics,
                ephemeral=ephemeral,
                conn=self._conn,
                registry=self._registry,
                dead=self._dead,
                options=self._options,
                codec=self.codec,
                clock=self.clock,
                consumer=self.consumer,
                touched=self._touched,
            )
        else:
            g.add_patterns(topics)
        await self._registry.declare(g.keys, g.patterns)

    async def groups_for(self, topic: str) -> list[str]:
        """The groups of the prefix, declared by any process, that receive
        ``topic`` (``KnowsGroups``)."""
        self._conn.client()  # Closed, when it is
        return await self._registry.groups_for(topic)

    def _group(self, name: str) -> Group:
        g = self._groups.get(name)
        if g is None:
            raise ConfigurationError(f"group {name!r} was not declared on this transport")
        return g

    async def _keys_of(self, name: str) -> GroupKeys:
        """The keys of a group declared by any process (for dead letters and stats)."""
        g = self._groups.get(name)
        return g.keys if g is not None else await self._registry.known(name)

    # --- publishing ------------------------------------------------------------
    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        await self._publisher.publish(envelopes)

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        self._publisher.publish_nowait(envelopes)

    def _scheduled(self, when: float) -> None:
        for g in self._groups.values():
            g.due_by(when)

    # --- consuming and settling ------------------------------------------------
    def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        return self._group(group).consume(prefetch)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        by_group: dict[str, list[Any]] = {}
        for d in deliveries:
            by_group.setdefault(d.group, []).append(d.token)
        # one script per slot (a cluster's partitions have slots of their
        # own), all of a single node's in one
        calls: dict[str, tuple[list[str], list[Any]]] = {}
        slotted = self._registry.keys.slotted
        for name, tokens in by_group.items():
            shared = [t for t in tokens if b"/" not in t]
            if shared:
                stream = self._registry.keys.stream(name)
                keys, args = calls.setdefault(_slot_of(stream, slotted), ([], []))
                keys.append(stream)
                args += (name, b",".join(shared))
            if len(shared) < len(tokens):  # entries of partitions
                g = self._group(name)
                by_stream: dict[str, list[bytes]] = {}
                for t in tokens:
                    if b"/" in t:
                        stream, entry = g.keys.locate(t)
                        by_stream.setdefault(stream, []).append(entry)
                for stream, entries in by_stream.items():
                    keys, args = calls.setdefault(_slot_of(stream, slotted), ([], []))
                    keys.append(stream)
                    args += (name, b",".join(entries))
        conn = self._conn

        async def op() -> Any:
            if len(calls) == 1:
                ((keys, args),) = calls.values()
                return await conn.run("ack", keys=keys, args=args, replicated=True)
            outcomes = await conn.run_each("ack", list(calls.values()), replicated=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome  # all again: acks are idempotent
            return sum(outcomes)

        await self._conn.retrying("acknowledging", op)
        for name, tokens in by_group.items():
            g_ = self._groups.get(name)
            if g_ is not None:
                for t in tokens:
                    g_.settled(t)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        await self._group(delivery.group).nack(delivery, delay)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries untouched (at stop), their attempts not
        counted (``Group.release``). A partition's entries stay pending
        where they are: its next owner claims them before anything newer.
        Others go to the end of their group's stream."""
        for d in deliveries:
            await self._group(d.group).release(d)

    def fenced(self, delivery: Delivery) -> bool:
        g = self._groups.get(delivery.group)
        return g is not None and g.fenced(delivery)

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        await self._group(delivery.group).dead_letter(delivery, record)

    # --- dead letters and counts -----------------------------------------------
    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        names = await self._registry.names() if group is None else [group]
        out: list[DeadLetter] = []
        for name in names:
            keys = await self._keys_of(name)
            out.extend(rec for _, _, rec in await self._dead.entries(keys))
        return sorted(out, key=lambda d: d.failed_at)

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        return await self._dead.replay(await self._keys_of(group), ids)

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        return await self._dead.purge(await self._keys_of(group), ids)

    async def stats(self, group: str) -> TransportStats:
        keys = await self._keys_of(group)
        streams = keys.streams()
        commands: list[tuple[Any, ...]] = []
        for stream in streams:
            commands.append(("XLEN", stream))
            commands.append(("XPENDING", stream, keys.name))
        zsets = [z for z, _ in keys.zsets()]
        deads = [d for d, _ in keys.deads()]
        commands += [("ZCARD", z) for z in zsets]
        commands += [("XLEN", d) for d in deads]
        try:
            replies = await self._conn.each(commands)
        except rexc.RedisError as exc:
            raise self._conn.error(exc, "reading stats") from exc
        counts = replies[: 2 * len(streams)]
        scheduled = sum(n for n in replies[2 * len(streams) : -len(deads)] if isinstance(n, int))
        dead = sum(n for n in replies[-len(deads) :] if isinstance(n, int))
        length = n_pending = 0
        for k in range(len(streams)):
            n, pending = counts[2 * k], counts[2 * k + 1]
            length += n if isinstance(n, int) else 0
            if isinstance(pending, dict):
                n_pending += int(pending["pending"])
            elif isinstance(pending, list) and pending:
                n_pending += int(pending[0])
        # Acknowledged entries are deleted, so the streams hold backlog + pending.
        return TransportStats(max(0, length - n_pending), n_pending, scheduled, dead)

    # --- trigger state -----------------------------------------------------------
    async def load_state(self, key: str) -> bytes | None:
        """A small value kept under ``{prefix}:state:{key}`` (trigger state)."""
        try:
            value = await self._conn.client().get(self._registry.keys.state(key))
        except rexc.RedisError as exc:
            raise self._conn.error(exc, f"reading state {key!r}") from exc
        return value.encode() if isinstance(value, str) else value

    async def save_state(self, key: str, value: bytes) -> None:
        try:
            await self._conn.client().set(self._registry.keys.state(key), value)
        except rexc.RedisError as exc:
            raise self._conn.error(exc, f"writing state {key!r}") from exc

    async def save_state_held(self, key: str, value: bytes, delivery: Delivery) -> bool:
        """``save_state`` fenced by ``delivery`` (``FencedState``): saved in
        one script only while its partition's lease is this consumer's and
        its entry still pending to it."""
        group = self._group(delivery.group)
        return await group.save_state_held(self._registry.keys.state(key), value, delivery)

    # --- idle ------------------------------------------------------------------
    def _touched(self) -> None:
        self._idle = False

    @property
    def idle(self) -> bool:
        """Nothing left to deliver or settle in this transport's groups, as of
        the last :meth:`wait_idle` (and nothing published or nacked since)."""
        return self._idle and not self._publisher.buffered

    async def wait_idle(self) -> None:
        """Return once every group declared here holds no entry, pending or
        not, and nothing is scheduled (polls the broker every 20 ms)."""
        while True:
            await self._publisher.written()
            self._idle = True
            counts = await self._conn.retrying("checking for idle", self._counts)
            if not any(counts) and self._idle:
                return
            self._idle = False
            await self.clock.sleep(0.02)

    async def _counts(self) -> list[int]:
        commands: list[tuple[Any, ...]] = []
        for g in self._groups.values():
            commands += [("XLEN", stream) for stream in g.keys.streams()]
            commands += [("ZCARD", zset) for zset, _ in g.keys.zsets()]
        result = await self._conn.each(commands)
        for n in result:
            if isinstance(n, Exception):
                raise n
        return result


def _slot_of(key: str, slotted: bool) -> str:
    """What decides ``key``'s slot: its hash tag (``{surge:3}``) in a slotted
    layout, else nothing (one server: one slot for all)."""
    return key[: key.index("}") + 1] if slotted else ""
