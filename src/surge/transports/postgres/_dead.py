"""Dead letters on ``postgresql://``: what a group gave up on, kept per
group until replayed (as a new delivery of the same envelope) or purged."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import msgspec

from ..._transport import DeadLetter
from .._partitions import partition_of
from ._consume import COUNT_SETTLED, slot
from ._db import Database
from ._schema import Schema

__all__ = ("DeadLetters",)

_decode_headers = msgspec.msgpack.Decoder(dict[str, str]).decode
_encode_headers = msgspec.msgpack.Encoder().encode

_COLUMNS = (
    "id, topic, key, headers, body, error_type, error, traceback, attempts, "
    "first_attempt_at, failed_at"
)


class DeadLetters:
    """Moves deliveries to the dead letters, lists, replays and purges them."""

    def __init__(self, db: Database, schema: Schema) -> None:
        self._db = db
        self._partitions = schema.partitions
        q = schema.q
        # settled only by the lease's holder: a stale consumer moves nothing
        self._move = q(
            "WITH done AS (DELETE FROM {s}.deliveries WHERE id = $1 AND token = $2 "
            "RETURNING grp), "
            + COUNT_SETTLED.replace("{slot}", "$14")
            + f" INSERT INTO {{s}}.dead_letters (grp, {_COLUMNS}) "
            "SELECT done.grp, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13 FROM done "
            "ON CONFLICT (grp, id) DO UPDATE SET topic = excluded.topic, key = excluded.key, "
            "headers = excluded.headers, body = excluded.body, error_type = excluded.error_type, "
            "error = excluded.error, traceback = excluded.traceback, "
            "attempts = excluded.attempts, first_attempt_at = excluded.first_attempt_at, "
            "failed_at = excluded.failed_at, seq = excluded.seq RETURNING 1"
        )
        listing = f"SELECT g.name, {', '.join('d.' + c for c in _COLUMNS.split(', '))} "
        listing += "FROM {s}.dead_letters d JOIN {s}.groups g ON g.id = d.grp"
        self._all = q(listing + " ORDER BY d.failed_at, d.seq")
        self._of = q(listing + " WHERE d.grp = $1 ORDER BY d.failed_at, d.seq")
        self._take = q(
            "DELETE FROM {s}.dead_letters WHERE grp = $1 AND ($2::text[] IS NULL "
            "OR id = ANY($2::text[])) RETURNING id, topic, key, headers, body, seq"
        )
        self._ephemeral = q("SELECT ephemeral FROM {s}.groups WHERE id = $1")
        self._message = q(
            "INSERT INTO {s}.messages (id, topic, key, time, headers, body) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], "
            "$5::bytea[], $6::bytea[]) RETURNING seq"
        )
        self._deliveries = q(
            "INSERT INTO {s}.deliveries (grp, msg, visible_at, part) "
            "SELECT $1, m, $2, p FROM unnest($3::bigint[], $4::int[]) AS u(m, p) ORDER BY m"
        )
        self._count = q("SELECT count(*) FROM {s}.dead_letters WHERE grp = $1")

    async def move(self, did: int, token: int, rec: DeadLetter) -> bool:
        """Settle delivery ``did`` into the dead letters; False: lease lost."""
        headers = _encode_headers(rec.headers) if rec.headers else None
        done = await self._db.fetchval(
            self._move,
            did,
            token,
            rec.id,
            rec.topic,
            rec.key,
            headers,
            rec.body,
            rec.error_type,
            rec.error,
            rec.traceback,
            rec.attempts,
            rec.first_attempt_at,
            rec.failed_at,
            slot(),
        )
        return done is not None

    async def letters(self, gid: int | None) -> list[DeadLetter]:
        rows = await (self._db.fetch(self._all) if gid is None else self._db.fetch(self._of, gid))
        return [
            DeadLetter(
                group=r[0],
                id=r[1],
                topic=r[2],
                key=r[3],
                headers=_decode_headers(r[4]) if r[4] is not None else None,
                body=bytes(r[5]),
                error_type=r[6],
                error=r[7],
                traceback=r[8],
                attempts=r[9],
                first_attempt_at=r[10],
                failed_at=r[11],
            )
            for r in rows
        ]

    async def replay(self, gid: int, ids: Sequence[str] | None, now: float) -> int:
        """Deliver dead letters of ``gid`` (all, or ``ids``) again, in the
        order they failed, each to its partition; how many."""
        wanted = None if ids is None else list(ids)

        async def run(conn: asyncpg.Connection) -> int:
            taken = sorted(await conn.fetch(self._take, gid, wanted), key=lambda r: r[5])
            if not taken:
                return 0
            flat = bool(await conn.fetchval(self._ephemeral, gid))
            seqs = [
                r[0]
                for r in await conn.fetch(
                    self._message,
                    [r[0] for r in taken],
                    [r[1] for r in taken],
                    [r[2] for r in taken],
                    [now] * len(taken),
                    [r[3] for r in taken],
                    [r[4] for r in taken],
                )
            ]
            parts = [
                None if r[2] is None or flat else partition_of(r[2], self._partitions)
                for r in taken
            ]
            await conn.execute(self._deliveries, gid, now, seqs, parts)
            return len(taken)

        n: int = await self._db.transaction(run)
        return n

    async def purge(self, gid: int, ids: Sequence[str] | None) -> int:
        wanted = None if ids is None else list(ids)
        rows = await self._db.fetch(self._take, gid, wanted)
        return len(rows)

    async def count(self, gid: int) -> int:
        return int(await self._db.fetchval(self._count, gid))
