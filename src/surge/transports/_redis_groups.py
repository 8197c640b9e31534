"""The groups of the Redis transport: their keys and local state, their
dead letters and their counts.

The functions take a :class:`~surge.transports._redis.RedisTransport` (its
methods delegate here). A group's dead letters live in the stream
``{prefix}:d:{group}``, one entry per letter, its record msgpack-encoded in
the field ``r``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aredis
import redis.exceptions as rexc

from .._event import Envelope
from .._transport import DeadLetter, Delivery, TransportStats
from ._partitions import Ownership, partition_of

if TYPE_CHECKING:
    from ._redis import RedisTransport

__all__ = (
    "CONNECTION_ERRORS",
    "GroupState",
    "dead_entries",
    "dead_letters",
    "partition_lease",
    "partition_stream",
    "purge",
    "replay",
    "stats",
    "sweep",
)

log = logging.getLogger("surge.redis")

_dead_decoder = msgspec.msgpack.Decoder(DeadLetter)

# What a lost or unreachable broker raises: retried, never fatal.
CONNECTION_ERRORS = (rexc.ConnectionError, rexc.TimeoutError, OSError)


class GroupState:
    """What this process knows of one declared group."""

    __slots__ = (
        "active",
        "alive",
        "backlog",
        "consuming",
        "dead",
        "due",
        "ephemeral",
        "held",
        "keeper",
        "members",
        "name",
        "own",
        "parts",
        "patterns",
        "pindex",
        "pstreams",
        "reading",
        "rescan",
        "room",
        "spread",
        "stream",
        "wake",
        "zset",
    )

    def __init__(
        self, name: str, prefix: str, patterns: list[str], ephemeral: bool, parts: int = 0
    ) -> None:
        self.name = name
        self.patterns = patterns
        self.ephemeral = ephemeral
        self.stream = f"{prefix}:s:{name}"
        self.zset = f"{prefix}:z:{name}"
        self.dead = f"{prefix}:d:{name}"
        self.alive = f"{prefix}:a:{name}"  # an ephemeral group's liveness
        self.held: dict[bytes, Delivery] = {}  # unsettled deliveries of this consumer
        self.room: asyncio.Future[None] | None = None  # a consumer waiting for room
        self.wake: asyncio.Event | None = None  # wakes the maintenance task
        self.due = 0.0  # when the sorted set next needs the mover (epoch s)
        self.consuming = False  # consume() was called: close() forgets the consumer
        self.active = False  # consume() is running: reading, owning partitions
        self.keeper: asyncio.Task[None] | None = None  # maintenance, until close
        # Partitions (keyed envelopes), none for an ephemeral group.
        self.parts = 0 if ephemeral else parts
        self.pstreams = [partition_stream(prefix, name, p) for p in range(self.parts)]
        self.pindex = {s.encode(): p for p, s in enumerate(self.pstreams)}
        self.members = f"{prefix}:m:{name}"
        self.own = Ownership(self.parts) if self.parts else None
        self.reading: frozenset[int] = frozenset()  # partitions of the read in flight
        self.backlog: list[Delivery] = []  # claimed from a partition's previous owner
        self.rescan: set[int] = set()  # owned partitions with entries pending, not held
        self.spread = 1  # how many streams the last read found entries in

    def settled(self, token: Any) -> None:
        self.held.pop(token, None)
        room = self.room
        if room is not None and not room.done():
            room.set_result(None)

    def locate(self, token: bytes) -> tuple[str, bytes]:
        """The stream of a delivery's ``token``, and its entry id there."""
        part, slash, entry = token.partition(b"/")
        if not slash:
            return self.stream, token
        return self.pstreams[int(part)], entry

    def streams(self) -> list[str]:
        """Every stream of the group: shared, then its partitions."""
        return [self.stream, *self.pstreams]


def partition_stream(prefix: str, group: str, p: int) -> str:
    # the number before the group name: no group name can forge another's key
    return f"{prefix}:p{p}:{group}"


def partition_lease(prefix: str, group: str, p: int) -> str:
    return f"{prefix}:o{p}:{group}"


async def dead_entries(self: RedisTransport, g: GroupState) -> list[tuple[bytes, DeadLetter]]:
    try:
        # raw reply: the client parses XRANGE as [[id, [field, value, ...]], ...]
        entries: Any = await self._redis().xrange(g.dead, "-", "+")
    except rexc.RedisError as exc:
        raise self._error(exc, "reading dead letters") from exc
    out = []
    for token, fields in entries:
        f = dict(zip(fields[::2], fields[1::2], strict=True))
        out.append((token, _dead_decoder.decode(f[b"r"])))
    return out


async def dead_letters(self: RedisTransport, group: str | None = None) -> list[DeadLetter]:
    if group is None:
        await self._load_registry()
        names = sorted(self._registry)
    else:
        names = [(await self._known(group)).name]
    out: list[DeadLetter] = []
    for name in names:
        g = await self._known(name)
        out.extend(rec for _, rec in await dead_entries(self, g))
    return sorted(out, key=lambda d: d.failed_at)


async def replay(self: RedisTransport, group: str, ids: Sequence[str] | None = None) -> int:
    g = await self._known(group)
    chosen = [(t, rec) for t, rec in await dead_entries(self, g) if ids is None or rec.id in ids]
    if not chosen:
        return 0
    pipe = self._redis().pipeline(transaction=True)
    for token, rec in chosen:
        env = Envelope(rec.id, rec.topic, rec.key, 0.0, rec.headers, None, rec.body)
        stream = g.stream
        if rec.key is not None and g.parts:
            stream = g.pstreams[partition_of(rec.key, g.parts)]
        pipe.xadd(stream, {"e": self.codec.encode_envelope(env)})
        pipe.xdel(g.dead, token)
    self._idle = False
    try:
        await pipe.execute()
    except rexc.RedisError as exc:
        raise self._error(exc, "replaying dead letters") from exc
    return len(chosen)


async def purge(self: RedisTransport, group: str, ids: Sequence[str] | None = None) -> int:
    g = await self._known(group)
    chosen = [t for t, rec in await dead_entries(self, g) if ids is None or rec.id in ids]
    if chosen:
        try:
            await self._redis().xdel(g.dead, *chosen)
        except rexc.RedisError as exc:
            raise self._error(exc, "purging dead letters") from exc
    return len(chosen)


async def stats(self: RedisTransport, group: str) -> TransportStats:
    g = await self._known(group)
    streams = g.streams()
    pipe = self._redis().pipeline(transaction=True)
    for stream in streams:
        pipe.xlen(stream)
        pipe.xpending(stream, g.name)
    pipe.zcard(g.zset)
    pipe.xlen(g.dead)
    try:
        *counts, scheduled, dead = await pipe.execute(raise_on_error=False)
    except rexc.RedisError as exc:
        raise self._error(exc, "reading stats") from exc
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


async def load_state(self: RedisTransport, key: str) -> bytes | None:
    try:
        value = await self._redis().get(self._key(f"state:{key}"))
    except rexc.RedisError as exc:
        raise self._error(exc, f"reading state {key!r}") from exc
    return value.encode() if isinstance(value, str) else value


async def save_state(self: RedisTransport, key: str, value: bytes) -> None:
    try:
        await self._redis().set(self._key(f"state:{key}"), value)
    except rexc.RedisError as exc:
        raise self._error(exc, f"writing state {key!r}") from exc


async def sweep(t: RedisTransport, r: aredis.Redis) -> None:
    """Delete the reply inboxes of processes that died (liveness expired)."""
    try:
        n = await t._scripts["sweep"](
            keys=[t._key("groups"), t._key("groups:v"), t._key("groups:p")],
            args=[t.prefix],
            client=r,
        )
    except rexc.RedisError as exc:  # housekeeping: never fatal
        log.warning("redis: could not sweep the inboxes of dead processes: %r", exc)
        return
    if n:
        log.info("redis: removed %d reply inboxes of processes that are gone", n)
