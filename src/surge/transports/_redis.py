"""Redis Streams: ``redis://host:port/db`` and ``rediss://`` (TLS).

Layout (every key starts with ``prefix``, ``surge`` by default)::

    {prefix}:groups        hash  group -> its topic patterns ("\\n"-joined)
    {prefix}:groups:v      int   bumped by every declare that changes the hash
    {prefix}:s:{group}     stream, read by the Redis consumer group ``group``
    {prefix}:p{n}:{group}  partition n of the group's keyed envelopes
    {prefix}:o{n}:{group}  the lease of partition n: its owner (SET NX PX)
    {prefix}:m:{group}     sorted set of the group's live consumers
    {prefix}:partitions    the partition count of every group under prefix
    {prefix}:z:{group}     sorted set of delayed entries (retries, not_before)
    {prefix}:d:{group}     stream of the group's dead letters
    {prefix}:dd:{id}       dedup marker of a derived event id (SET NX EX)

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

Publishing is a group commit: concurrent ``publish`` calls are gathered by
one flusher into a single Lua call that, atomically, checks the registry
version (a stale route makes it refuse, reload and retry, so a group declared
before the publish always receives it), drops derived ids seen within
``dedup_window`` seconds (``SET NX EX``) and XADDs (or ZADDs, for a future
``not_before``) to every matching group. ``await publish`` returns when its
batch is in Redis (as durable as Redis's AOF setting makes it).

Consuming: ``XREADGROUP COUNT <room> BLOCK`` with at most ``prefetch``
unsettled deliveries. A delivery idle for longer than ``lease`` seconds
belongs to a dead consumer: it is taken over (XPENDING IDLE + XCLAIM, which
also yields its delivery count for ``attempt``). A live consumer resets the
idle time of what it holds every ``heartbeat`` seconds (XCLAIM JUSTID), so a
slow handler is not run twice. ``nack(delay)`` moves the entry atomically
into the group's sorted set (XACK + XDEL + ZADD, in Lua); a mover moves due
entries back into the stream (ZRANGEBYSCORE + XADD + ZREM, in Lua). Each
script checks XACK's reply first, so a retried settle never duplicates.

Order: a group's keyed envelopes (``key`` set by the publisher, or by the
app from a keyed subscription) go to one of ``partitions`` streams
(``{prefix}:p{n}:{group}``, n = crc32(key) mod partitions, a count fixed per
prefix in ``{prefix}:partitions``), each read by the one consumer that holds
its lease; unkeyed envelopes stay in the shared stream every consumer reads.
Consumers renew a membership of the group every lease/3 and split the
partitions by the same rule (see ``_partitions`` and ``_redis_partitions``);
one gives a partition up only once nothing it read from it is unsettled, and
the next owner first claims whatever is still pending there, so one key's
events are handled one at a time, in order, across processes. A dead owner's
partitions wait out its lease, as its deliveries do.

Reconnects: every loop catches the broker's errors, logs a WARNING, marks the
transport unhealthy (``healthy``, ``last_error``) and retries with a backoff
capped at one second; acks and settles are retried until they succeed. A
publish keeps retrying for ``reconnect_timeout`` seconds, then raises
:class:`~surge.TransportError`. A broker that returns empty (no persistence)
gets each group declared again by its consumers (NOGROUP); what it held is
gone. ``await publish`` is only as durable as the server's ``appendonly`` /
``appendfsync`` settings (``always`` to lose nothing acknowledged).

Limits: Redis >= 6.2 (XPENDING IDLE); Redis Cluster is not supported (the
scripts touch keys of several slots). An ephemeral group (a reply inbox)
has a liveness key its consumer renews every lease/3; a process that starts
deletes the inboxes whose key expired (``alive_ms``: their process died).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import redis.asyncio as aredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry as _RedisRetry
from redis.backoff import NoBackoff

from .._clock import Clock, RealClock
from .._codec import Codec, MsgpackCodec
from .._errors import Closed, ConfigurationError, Overloaded, TransportError
from .._event import Envelope
from .._transport import DeadLetter, Delivery, TransportStats, topic_matches
from . import _redis_consume as _consume
from . import _redis_groups as _admin
from . import _redis_partitions as _parts
from ._partitions import DEFAULT_PARTITIONS, Ownership, partition_of
from ._redis_groups import CONNECTION_ERRORS, GroupState, partition_stream
from ._redis_lua import ACK, BALANCE, DEAD, DECLARE, FORGET, MOVE, NACK, OWN, PUBLISH, SWEEP

__all__ = ("RedisTransport",)

log = logging.getLogger("surge.redis")

# Options that may be given in the URL's query string (``?lease=5``).
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "prefix": str,
    "lease": float,
    "heartbeat": float,
    "block": float,
    "dedup_window": float,
    "max_len": int,
    "batch": int,
    "buffer": int,
    "poll": float,
    "reconnect_timeout": float,
    "partitions": int,
}

# topic, encoded envelope, dedup key ('' for a fresh id), not_before, key
_Item = tuple[str, bytes, str, float | None, str | None]

_dead_encoder = msgspec.msgpack.Encoder()


def _raw(response: Any, **options: Any) -> Any:
    return response


async def _cmd(r: aredis.Redis, *args: Any) -> Any:
    """A command whose raw reply we parse ourselves (see ``_raw``)."""
    return await r.execute_command(*args)  # type: ignore[no-untyped-call]


class _Pending:
    """One publish call waiting in the flusher's buffer."""

    __slots__ = ("future", "items")

    def __init__(self, items: list[_Item], future: asyncio.Future[None] | None) -> None:
        self.items = items
        self.future = future


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
    broker. Other keyword arguments go to ``redis.asyncio.Redis.from_url``.
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
        codec: Codec | None = None,
        clock: Clock | None = None,
        **redis_options: Any,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"{url!r} is not a redis:// or rediss:// URL")
        options: dict[str, Any] = {}
        rest: list[tuple[str, str]] = []
        for k, v in parse_qsl(parts.query):
            if k in _URL_OPTIONS:
                try:
                    options[k] = _URL_OPTIONS[k](v)
                except ValueError:
                    raise ConfigurationError(f"{url!r}: {k}={v!r} is not valid") from None
            else:
                rest.append((k, v))
        prefix = options.get("prefix", prefix)
        lease = options.get("lease", lease)
        heartbeat = options.get("heartbeat", heartbeat)
        block = options.get("block", block)
        dedup_window = options.get("dedup_window", dedup_window)
        max_len = options.get("max_len", max_len)
        batch = options.get("batch", batch)
        buffer = options.get("buffer", buffer)
        poll = options.get("poll", poll)
        reconnect_timeout = options.get("reconnect_timeout", reconnect_timeout)
        partitions = options.get("partitions", partitions)
        if partitions is not None and partitions < 1:
            raise ConfigurationError("partitions must be at least 1")
        if lease <= 0 or block <= 0 or poll <= 0 or dedup_window < 1:
            raise ConfigurationError("lease, block and poll must be positive, dedup_window >= 1")
        if batch < 1 or buffer < 1 or (max_len is not None and max_len < 1):
            raise ConfigurationError("batch, buffer and max_len must be at least 1")
        if not prefix or ":" in prefix:
            raise ConfigurationError(f"prefix {prefix!r}: a non-empty name without ':'")
        self.url = url
        self._redis_url = urlunsplit(parts._replace(query=urlencode(rest)))
        self.prefix = prefix
        self.lease = lease
        self.heartbeat = lease / 3 if heartbeat is None else heartbeat
        self.block = min(block, lease / 2)
        self.dedup_window = int(dedup_window)
        self.max_len = max_len
        self.batch = batch
        self.buffer = buffer
        self.poll = poll
        self.reconnect_timeout = reconnect_timeout
        self._asked_partitions = partitions
        self.partitions = partitions or DEFAULT_PARTITIONS
        """Partitions of every group's keyed envelopes (fixed per ``prefix``)."""
        self.codec = codec or MsgpackCodec()
        self.clock: Clock = clock or RealClock()
        self._redis_options = redis_options
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._r: aredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._groups: dict[str, GroupState] = {}
        self._registry: dict[str, list[str]] = {}
        self._version = b""
        self._parts: dict[str, int] = {}  # group -> its partitions (0: none)
        self._routes: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._keyed_routes: dict[tuple[str, int], tuple[str, ...]] = {}
        self._buf: list[_Pending] = []
        self._buffered = 0
        self._space: list[asyncio.Future[None]] = []
        self._flush_wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._writing = False  # a publish script is on the wire
        self._lead: asyncio.Future[None] | None = None  # an inline write's end
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = True
        self._closed = True
        self.healthy = False
        """False while the broker cannot be reached; see ``last_error``."""
        self.last_error: str | None = None

    # --- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        if self._r is not None:
            return
        options: dict[str, Any] = {
            "socket_connect_timeout": 5.0,
            "socket_timeout": max(10.0, 3 * self.block),
            "socket_keepalive": True,
            # the raw replies parsed here (XREADGROUP, XCLAIM...) are RESP2's shapes
            "protocol": 2,
            # retries are ours: a blind resend of a publish script could duplicate it
            "retry": _RedisRetry(NoBackoff(), 0),
        }
        options.update(self._redis_options)
        try:
            r = aredis.Redis.from_url(self._redis_url, **options)
        except ValueError as exc:
            raise ConfigurationError(f"{self.url!r}: {exc}") from None
        for cmd in ("XREADGROUP", "XCLAIM", "XPENDING", "XRANGE"):
            r.response_callbacks[cmd] = _raw
        self._scripts = {
            name: r.register_script(src)
            for name, src in (
                ("publish", PUBLISH),
                ("ack", ACK),
                ("declare", DECLARE),
                ("nack", NACK),
                ("dead", DEAD),
                ("move", MOVE),
                ("forget", FORGET),
                ("balance", BALANCE),
                ("own", OWN),
                ("sweep", SWEEP),
            )
        }
        try:
            await r.ping()
        except Exception as exc:
            await r.aclose()
            raise self._error(exc, "cannot connect") from exc
        self._r = r
        self._closed = False
        self._ok()
        await _parts.check_count(self, r)
        await _admin.sweep(self, r)
        await self._load_registry()
        self._flush_wake = asyncio.Event()
        self._flusher = asyncio.get_running_loop().create_task(
            self._flush_loop(), name="surge-redis-flush"
        )

    @property
    def alive_ms(self) -> int:
        """How long an ephemeral group outlives its last renewal (every
        lease/3 while consumed): then the next process to start deletes it."""
        return int(max(10 * self.lease, 1.0) * 1000)

    def ownership(self, group: str) -> Ownership | None:
        """Which partitions of ``group`` this consumer reads (None: not
        partitioned, or not declared here)."""
        g = self._groups.get(group)
        return None if g is None else g.own

    async def close(self) -> None:
        if self._r is None:
            return
        r = self._r
        # Let what was accepted reach Redis before the door shuts.
        if self._buf and self._flusher is not None and not self._flusher.done():
            waiters = [p.future for p in self._buf if p.future is not None]
            if waiters:
                await asyncio.gather(*waiters, return_exceptions=True)
        self._closed = True
        if self._flush_wake is not None:
            self._flush_wake.set()
        tasks = [t for t in (self._flusher, *self._tasks) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            # bounded: a task whose cancel redis-py swallowed ends at its next check
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            if stuck:
                log.warning("redis: %d background tasks did not stop at close", len(stuck))
            for t in tasks:
                if t.done() and not t.cancelled():
                    t.exception()  # retrieved: a failure at close is not news
        for p in self._buf:
            if p.future is not None and not p.future.done():
                p.future.set_exception(Closed("transport closed before the publish was written"))
        self._buf.clear()
        for fut in self._space:
            if not fut.done():
                fut.set_result(None)
        for g in self._groups.values():
            if g.room is not None and not g.room.done():
                g.room.set_result(None)
        try:
            for g in self._groups.values():
                if g.ephemeral:
                    pipe = r.pipeline(transaction=True)
                    pipe.hdel(self._key("groups"), g.name)
                    pipe.incr(self._key("groups:v"))
                    pipe.delete(g.stream, g.zset, g.dead, g.alive)
                    await pipe.execute()
                elif g.consuming:
                    if g.own is not None:
                        await _parts.leave(self, r, g)
                    for stream in g.streams():
                        await self._scripts["forget"](
                            keys=[stream], args=[g.name, self.consumer], client=r
                        )
        except Exception as exc:  # closing anyway: say so, do not raise
            log.warning("redis: cleanup at close failed: %r", exc)
        self._r = None
        await r.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def _redis(self) -> aredis.Redis:
        if self._r is None or self._closed:
            raise Closed("transport is closed")
        return self._r

    def _error(self, exc: BaseException, doing: str) -> TransportError:
        parts = urlsplit(self.url)
        return TransportError(f"redis at {parts.hostname}:{parts.port or 6379}: {doing}: {exc}")

    def _ok(self) -> None:
        if not self.healthy:
            if self.last_error is not None:
                log.warning("redis: connection restored")
            self.healthy = True

    def _failed(self, exc: BaseException, doing: str) -> None:
        msg = f"{doing}: {exc!r}"
        if self.healthy or msg != self.last_error:
            log.warning("redis: %s; retrying", msg)
        self.healthy = False
        self.last_error = msg

    async def _backoff(self, delay: float) -> float:
        await self.clock.sleep(delay)
        return min(1.0, delay * 2)

    # --- groups and routes ---------------------------------------------------
    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        r = self._redis()
        if not group or "\n" in group or any(not t or "\n" in t for t in topics):
            raise ConfigurationError(f"group {group!r} / topics {list(topics)!r}: invalid names")
        g = self._groups.get(group)
        if g is None:
            g = GroupState(group, self.prefix, list(topics), ephemeral, self.partitions)
            self._groups[group] = g
        else:
            g.patterns.extend(t for t in topics if t not in g.patterns)
        try:
            await self._scripts["declare"](
                keys=[
                    self._key("groups"),
                    self._key("groups:v"),
                    g.stream,
                    self._key("groups:p"),
                    g.alive,
                ],
                args=[group, g.parts, f"{self.prefix}:p", f":{group}", self.alive_ms, *g.patterns],
                client=r,
            )
        except Exception as exc:
            raise self._error(exc, f"declaring {group!r}") from exc
        await self._load_registry()

    async def _load_registry(self) -> None:
        pipe = self._redis().pipeline(transaction=True)
        pipe.get(self._key("groups:v"))
        pipe.hgetall(self._key("groups"))
        pipe.hgetall(self._key("groups:p"))
        version, groups, parts = await pipe.execute()
        self._version = version or b""
        self._registry = {
            k.decode(): [p for p in v.decode().split("\n") if p] for k, v in groups.items()
        }
        self._parts = {k.decode(): int(v) for k, v in parts.items()}
        self._routes.clear()
        self._keyed_routes.clear()

    def _route(self, topic: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        route = self._routes.get(topic)
        if route is None:
            names = self._route_names(topic)
            p = self.prefix
            route = self._routes[topic] = (
                tuple(f"{p}:s:{g}" for g in names),
                tuple(f"{p}:z:{g}" for g in names),
            )
        return route

    def _keyed_route(self, topic: str, part: int) -> tuple[str, ...]:
        """The streams a keyed envelope of partition ``part`` goes to."""
        route = self._keyed_routes.get((topic, part))
        if route is None:
            p = self.prefix
            route = self._keyed_routes[(topic, part)] = tuple(
                partition_stream(p, g, part) if self._parts.get(g) else s
                for g, s in zip(self._route_names(topic), self._route(topic)[0], strict=True)
            )
        return route

    def _route_names(self, topic: str) -> list[str]:
        return sorted(
            g for g, pats in self._registry.items() if any(topic_matches(p, topic) for p in pats)
        )

    def _group(self, name: str) -> GroupState:
        g = self._groups.get(name)
        if g is None:
            raise ConfigurationError(f"group {name!r} was not declared on this transport")
        return g

    async def _known(self, name: str) -> GroupState:
        """A group declared by any process (for dead letters and stats)."""
        g = self._groups.get(name)
        if g is not None:
            return g
        if not await self._redis().hexists(self._key("groups"), name):
            raise ConfigurationError(f"no group {name!r}; groups: {sorted(self._registry)}")
        await self._load_registry()
        return GroupState(name, self.prefix, [], False, self._parts.get(name, 0))

    # --- publishing ----------------------------------------------------------
    def _encode(self, envelopes: Sequence[Envelope]) -> list[_Item]:
        encode = self.codec.encode_envelope
        dedup = f"{self.prefix}:dd:"
        return [
            (
                env.topic,
                encode(env),
                dedup + env.id if env.id[12:13] == "8" else "",
                env.not_before,
                env.key,
            )
            for env in envelopes
        ]

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if self._closed:
            raise Closed("transport is closed")
        if not envelopes:
            return
        items = self._encode(envelopes)
        while self._buffered >= self.buffer:
            fut = asyncio.get_running_loop().create_future()
            self._space.append(fut)
            await fut
            if self._closed:
                raise Closed("transport is closed")
        if self._writing or self._buf:
            # A write is on the wire: join the next batch (group commit).
            fut = asyncio.get_running_loop().create_future()
            self._put(_Pending(items, fut))
            await fut
            return
        # Nobody is writing: write now, without a hop through the flusher.
        self._writing = True
        self._idle = False
        lead = self._lead = asyncio.get_running_loop().create_future()
        try:
            await self._write_or_raise(items)
        finally:
            self._writing = False
            self._lead = None
            lead.set_result(None)
            if self._buf:
                assert self._flush_wake is not None
                self._flush_wake.set()

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        if self._closed:
            raise Closed("transport is closed")
        if self._buffered + len(envelopes) > self.buffer or self._space:
            raise Overloaded(f"{self._buffered} envelopes wait to be written to redis")
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_log_failure)
        self._put(_Pending(self._encode(envelopes), fut))

    def _put(self, pending: _Pending) -> None:
        self._buf.append(pending)
        self._buffered += len(pending.items)
        self._idle = False
        assert self._flush_wake is not None
        self._flush_wake.set()

    async def _flush_loop(self) -> None:
        wake = self._flush_wake
        assert wake is not None
        task = asyncio.current_task()
        assert task is not None
        while not self._closed:
            if task.cancelling():  # see consume(): redis-py may swallow a cancel
                raise asyncio.CancelledError
            if not self._buf or self._writing:
                wake.clear()
                await wake.wait()
                continue
            # Take whole publish calls up to ``batch`` envelopes (at least one call).
            taken: list[_Pending] = []
            n = 0
            buf = self._buf
            while buf and (not taken or n + len(buf[0].items) <= self.batch):
                p = buf.pop(0)
                taken.append(p)
                n += len(p.items)
            self._writing = True
            try:
                await self._write_or_raise([item for p in taken for item in p.items])
            except Exception as exc:
                for p in taken:
                    if p.future is not None and not p.future.done():
                        p.future.set_exception(exc)
            else:
                for p in taken:
                    if p.future is not None and not p.future.done():
                        p.future.set_result(None)
            finally:
                self._writing = False
                self._buffered -= n
                while self._space and self._buffered < self.buffer:
                    fut = self._space.pop(0)
                    if not fut.done():
                        fut.set_result(None)

    async def _write_or_raise(self, items: list[_Item]) -> None:
        try:
            await self._write(items)
        except (TransportError, Closed):
            raise
        except Exception as exc:
            raise self._error(exc, "publish") from exc

    async def _write(self, items: list[_Item]) -> None:
        r = self._redis()
        script = self._scripts["publish"]
        deadline = self.clock.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            now = self.clock.time()
            args: list[Any] = [self._version, self.dedup_window, self.max_len or ""]
            later: list[float] = []
            for topic, payload, dkey, not_before, key in items:
                streams, zsets = self._route(topic)
                if not streams:
                    continue
                part = ""
                if key is not None:
                    n = partition_of(key, self.partitions)
                    streams = self._keyed_route(topic, n)
                    part = f"{n}/"
                if not_before is not None and not_before > now:
                    args += ("z", dkey, repr(not_before), part, len(zsets), *zsets, payload)
                    later.append(not_before)
                else:
                    args += ("s", dkey, "", "", len(streams), *streams, payload)
            if len(args) == 3:
                return
            try:
                added = await script(keys=[self._key("groups:v")], args=args, client=r)
            except CONNECTION_ERRORS as exc:
                if self._closed or self.clock.monotonic() > deadline:
                    raise self._error(exc, "publish") from exc
                self._failed(exc, "publish")
                delay = await self._backoff(delay)
                continue
            except rexc.RedisError as exc:
                raise self._error(exc, "publish") from exc
            self._ok()
            if added == -1:  # a group was declared since we routed: reroute
                await self._load_registry()
                continue
            if later:
                first = min(later)
                for g in self._groups.values():
                    if first < g.due and g.wake is not None:
                        g.due = first
                        g.wake.set()
            return

    # --- consuming (in _redis_consume) --------------------------------------
    def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        return _consume.consume(self, group, prefetch)

    # --- settling ------------------------------------------------------------
    async def _retrying(self, doing: str, op: Callable[[aredis.Redis], Any]) -> Any:
        """Run ``op`` until the broker answers: settles are idempotent."""
        delay = 0.05
        while True:
            r = self._redis()
            try:
                result = await op(r)
            except CONNECTION_ERRORS as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # a cancel redis-py swallowed
                if self._closed:
                    raise self._error(exc, doing) from exc
                self._failed(exc, doing)
                delay = await self._backoff(delay)
                continue
            except rexc.RedisError as exc:
                raise self._error(exc, doing) from exc
            self._ok()
            return result

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        by_group: dict[str, list[Any]] = {}
        for d in deliveries:
            by_group.setdefault(d.group, []).append(d.token)
        keys: list[str] = []
        args: list[Any] = []
        for name, tokens in by_group.items():
            shared = [t for t in tokens if b"/" not in t]
            if shared:
                keys.append(f"{self.prefix}:s:{name}")
                args += (name, b",".join(shared))
            if len(shared) < len(tokens):  # entries of partitions
                g = self._group(name)
                by_stream: dict[str, list[bytes]] = {}
                for t in tokens:
                    if b"/" in t:
                        stream, entry = g.locate(t)
                        by_stream.setdefault(stream, []).append(entry)
                for stream, entries in by_stream.items():
                    keys.append(stream)
                    args += (name, b",".join(entries))
        script = self._scripts["ack"]

        def op(r: aredis.Redis) -> Any:
            return script(keys=keys, args=args, client=r)

        await self._retrying("acknowledging", op)
        for name, tokens in by_group.items():
            g_ = self._groups.get(name)
            if g_ is not None:
                for t in tokens:
                    g_.settled(t)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        g = self._group(delivery.group)
        first = delivery.first_time or self.clock.time()
        due = self.clock.time() + delay
        stream, entry = g.locate(delivery.token)
        args: list[Any] = [g.name, entry, "1" if delay > 0 else "0", repr(due)]
        args += [delivery.attempt + 1, repr(first), delivery.token]
        self._idle = False
        await self._retrying(
            "handing back a delivery",
            lambda r: self._scripts["nack"](keys=[stream, g.zset], args=args, client=r),
        )
        g.settled(delivery.token)
        if delay > 0 and due < g.due and g.wake is not None:
            g.due = due
            g.wake.set()

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries untouched (at stop). A partition's entries
        stay pending where they are: its next owner claims them before
        anything newer. Others are handed back as by ``nack(d, 0)``."""
        for d in deliveries:
            g = self._group(d.group)
            if b"/" in d.token:
                g.settled(d.token)
                if g.own is not None and g.active and not self._closed:
                    part = int(d.token.partition(b"/")[0])
                    if part in g.own.owned:
                        g.rescan.add(part)  # still ours and read: deliver it again
            else:
                await self.nack(d, 0.0)

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        g = self._group(delivery.group)
        await self._dead(g, delivery.token, record)
        g.settled(delivery.token)

    async def _dead(self, g: GroupState, token: bytes, record: DeadLetter) -> None:
        data = _dead_encoder.encode(record)
        stream, entry = g.locate(token)
        await self._retrying(
            "dead-lettering",
            lambda r: self._scripts["dead"](
                keys=[stream, g.dead], args=[g.name, entry, data, record.id], client=r
            ),
        )

    # --- dead letters and counts (in _redis_groups) --------------------------
    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        return await _admin.dead_letters(self, group)

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        return await _admin.replay(self, group, ids)

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        return await _admin.purge(self, group, ids)

    async def stats(self, group: str) -> TransportStats:
        return await _admin.stats(self, group)

    async def load_state(self, key: str) -> bytes | None:
        """A small value kept under ``{prefix}:state:{key}`` (trigger state)."""
        return await _admin.load_state(self, key)

    async def save_state(self, key: str, value: bytes) -> None:
        await _admin.save_state(self, key, value)

    @property
    def idle(self) -> bool:
        """Nothing left to deliver or settle in this transport's groups, as of
        the last :meth:`wait_idle` (and nothing published or nacked since)."""
        return self._idle and not self._buf

    async def wait_idle(self) -> None:
        """Return once every group declared here holds no entry, pending or
        not, and nothing is scheduled (polls the broker every 20 ms)."""
        while True:
            if self._lead is not None:
                await self._lead
            while self._buf:
                await asyncio.gather(
                    *(p.future for p in list(self._buf) if p.future is not None),
                    return_exceptions=True,
                )
            self._idle = True
            counts = await self._retrying("checking for idle", self._counts)
            if not any(counts) and self._idle:
                return
            self._idle = False
            await self.clock.sleep(0.02)

    async def _counts(self, r: aredis.Redis) -> list[int]:
        pipe = r.pipeline(transaction=False)
        for g in self._groups.values():
            for stream in g.streams():
                pipe.xlen(stream)
            pipe.zcard(g.zset)
        result: list[int] = await pipe.execute()
        return result


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("redis: publish_nowait failed: %s", fut.exception())
