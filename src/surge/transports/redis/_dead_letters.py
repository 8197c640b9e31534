"""Dead letters of the Redis transport: burying a delivery, listing,
replaying and purging.

A group's dead letters live in the stream ``{prefix}:d:{group}``, one entry
per letter, its record msgpack-encoded in the field ``r`` (and the envelope
id in ``i``). Burying is one script (XACK + XDEL + XADD), so a delivery is
settled and buried together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import redis.asyncio as aredis
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

        def op(r: aredis.Redis) -> Any:
            return self._conn.run(
                "dead", keys=[stream, keys.dead], args=[keys.name, entry, data, record.id], client=r
            )

        await self._conn.retrying("dead-lettering", op)

    async def entries(self, keys: GroupKeys) -> list[tuple[bytes, DeadLetter]]:
        """(entry id, record) of each dead letter of the group, oldest first."""
        try:
            # raw reply: the client parses XRANGE as [[id, [field, value, ...]], ...]
            entries: Any = await self._conn.client().xrange(keys.dead, "-", "+")
        except rexc.RedisError as exc:
            raise self._conn.error(exc, "reading dead letters") from exc
        out = []
        for token, fields in entries:
            f = dict(zip(fields[::2], fields[1::2], strict=True))
            out.append((token, _decoder.decode(f[b"r"])))
        return out

    async def replay(self, keys: GroupKeys, ids: Sequence[str] | None = None) -> int:
        """Put the chosen letters back into the group's streams (a keyed one
        into its partition), in one transaction; how many."""
        chosen = [(t, rec) for t, rec in await self.entries(keys) if ids is None or rec.id in ids]
        if not chosen:
            return 0
        pipe = self._conn.client().pipeline(transaction=True)
        for token, rec in chosen:
            env = Envelope(rec.id, rec.topic, rec.key, 0.0, rec.headers, None, rec.body)
            stream = keys.stream
            if rec.key is not None and keys.parts:
                stream = keys.pstreams[partition_of(rec.key, keys.parts)]
            pipe.xadd(stream, {"e": self._codec.encode_envelope(env)})
            pipe.xdel(keys.dead, token)
        self._touched()
        try:
            await pipe.execute()
        except rexc.RedisError as exc:
            raise self._conn.error(exc, "replaying dead letters") from exc
        return len(chosen)

    async def purge(self, keys: GroupKeys, ids: Sequence[str] | None = None) -> int:
        chosen = [t for t, rec in await self.entries(keys) if ids is None or rec.id in ids]
        if chosen:
            try:
                await self._conn.client().xdel(keys.dead, *chosen)
            except rexc.RedisError as exc:
                raise self._conn.error(exc, "purging dead letters") from exc
        return len(chosen)
