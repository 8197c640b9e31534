"""The groups of the Redis transport: their keys and local state, their
dead letters and their counts.

The functions take a :class:`~surge.transports._redis.RedisTransport` (its
methods delegate here). A group's dead letters live in the stream
``{prefix}:d:{group}``, one entry per letter, its record msgpack-encoded in
the field ``r``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import redis.exceptions as rexc

from .._event import Envelope
from .._transport import DeadLetter, Delivery, TransportStats

if TYPE_CHECKING:
    from ._redis import RedisTransport

__all__ = ("GroupState", "dead_entries", "dead_letters", "purge", "replay", "stats")

_dead_decoder = msgspec.msgpack.Decoder(DeadLetter)


class GroupState:
    """What this process knows of one declared group."""

    __slots__ = (
        "consuming",
        "dead",
        "due",
        "ephemeral",
        "held",
        "name",
        "patterns",
        "room",
        "stream",
        "wake",
        "zset",
    )

    def __init__(self, name: str, prefix: str, patterns: list[str], ephemeral: bool) -> None:
        self.name = name
        self.patterns = patterns
        self.ephemeral = ephemeral
        self.stream = f"{prefix}:s:{name}"
        self.zset = f"{prefix}:z:{name}"
        self.dead = f"{prefix}:d:{name}"
        self.held: dict[bytes, Delivery] = {}  # unsettled deliveries of this consumer
        self.room: asyncio.Future[None] | None = None  # a consumer waiting for room
        self.wake: asyncio.Event | None = None  # wakes the maintenance task
        self.due = 0.0  # when the sorted set next needs the mover (epoch s)
        self.consuming = False

    def settled(self, token: Any) -> None:
        self.held.pop(token, None)
        room = self.room
        if room is not None and not room.done():
            room.set_result(None)


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
        pipe.xadd(g.stream, {"e": self.codec.encode_envelope(env)})
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
    pipe = self._redis().pipeline(transaction=True)
    pipe.xlen(g.stream)
    pipe.xpending(g.stream, g.name)
    pipe.zcard(g.zset)
    pipe.xlen(g.dead)
    try:
        length, pending, scheduled, dead = await pipe.execute(raise_on_error=False)
    except rexc.RedisError as exc:
        raise self._error(exc, "reading stats") from exc
    if isinstance(pending, dict):
        n_pending = int(pending["pending"])
    elif isinstance(pending, list) and pending:
        n_pending = int(pending[0])
    else:
        n_pending = 0
    # Acknowledged entries are deleted, so the stream holds backlog + pending.
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
