"""Dead letters of the Redis transport: burying a delivery, listing,
replaying and purging.

A group's dead letters live in the stream ``{prefix}:d:{group}``, one entry
per letter, its record msgpack-encoded in the field ``r`` (and the envelope
id in ``i``); on a cluster, a partition's letters in a stream of the
partition's slot (``_keys``). Burying is one script (XACK + XDEL + XADD), so
a delivery is settled and buried together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import redis.exceptions as rexc

from ..._codec import Codec
from ..._event import Envelope
from ..._transport import DeadLetter
from .._partitions import partition_of
from ._connection import Connection
from ._keys import GroupKeys

__all__ = ("DeadLetters",)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DeadLetter)


class DeadLetters:
    """The dead letters of every group under one prefix.

    ``touched`` is called when a replay gives a group work again (the
    transport is no longer idle).
    """

    __slots__ = ("_codec", "_conn", "_touched")

    def __init__(self, conn: Connection, codec: Codec, touched: Callable[[], None]) -> None:
        self._conn = conn
        self._codec = codec
        self._touched = touched

    async def bury(self, keys: GroupKeys, token: bytes, record: DeadLetter) -> None:
        """Settle the delivery ``token`` of ``keys``' group into its dead letters."""
        data = _encoder.encode(record)
        stream, entry = keys.locate(token)
        dead = keys.dead_of(token)

        def op() -> Any:
            return self._conn.run(
                "dead", keys=[stream, dead], args=[keys.name, entry, data, record.id]
            )

        await self._conn.retrying("dead-lettering", op)

    async def entries(self, keys: GroupKeys) -> list[tuple[str, bytes, DeadLetter]]:
        """(dead-letter stream, entry id, record) of each dead letter of the
        group, oldest first in each stream."""
        conn = self._conn
        out = []
        try:
            for dead, _ in keys.deads():
                # raw reply: the client parses XRANGE as [[id, [field, value, ...]], ...]
                entries: Any = await conn.client(dead).xrange(dead, "-", "+")
                for token, fields in entries:
                    f = dict(zip(fields[::2], fields[1::2], strict=True))
                    out.append((dead, token, _decoder.decode(f[b"r"])))
        except rexc.RedisError as exc:
            raise conn.error(exc, "reading dead letters") from exc
        return out

    async def replay(self, keys: GroupKeys, ids: Sequence[str] | None = None) -> int:
        """Put the chosen letters back into the group's streams (a keyed one
        into its partition), in one transaction per dead-letter stream; how
        many."""
        chosen = [e for e in await self.entries(keys) if ids is None or e[2].id in ids]
        if not chosen:
            return 0
        back = dict(keys.deads())
        self._touched()
        for dead in dict.fromkeys(d for d, _, _ in chosen):
            pipe = self._conn.client(dead).pipeline(transaction=True)
            for d, token, rec in chosen:
                if d != dead:
                    continue
                env = Envelope(rec.id, rec.topic, rec.key, 0.0, rec.headers, None, rec.body)
                # a cluster's letters go back within their slot; else by key
                stream = back[dead] or keys.stream
                if not back[dead] and rec.key is not None and keys.parts:
                    stream = keys.pstreams[partition_of(rec.key, keys.parts)]
                pipe.xadd(stream, {"e": self._codec.encode_envelope(env)})
                pipe.xdel(dead, token)
            try:
                await pipe.execute()
            except rexc.RedisError as exc:
                raise self._conn.error(exc, "replaying dead letters") from exc
        return len(chosen)

    async def purge(self, keys: GroupKeys, ids: Sequence[str] | None = None) -> int:
        chosen = [(d, t) for d, t, rec in await self.entries(keys) if ids is None or rec.id in ids]
        for dead in dict.fromkeys(d for d, _ in chosen):
            try:
                await self._conn.client(dead).xdel(dead, *(t for d, t in chosen if d == dead))
            except rexc.RedisError as exc:
                raise self._conn.error(exc, "purging dead letters") from exc
        return len(chosen)
