"""Housekeeping on ``postgresql://``: retention of settled events, the
dedup window, and reply inboxes whose process is gone.

Every transport runs it every ``maintenance`` seconds, but one at a time per
schema (a transaction-level advisory lock; the others skip the round), and
each round deletes a bounded chunk, so it never holds locks for long.
An event is deleted once no group holds a delivery of it and it is older
than ``retention`` (its publish time); PostgreSQL's autovacuum reclaims the
space.
"""

from __future__ import annotations

import asyncpg

from ._db import Database
from ._groups import Groups
from ._schema import Schema

__all__ = ("Housekeeper",)

_CHUNK = 20_000


class Housekeeper:
    """One compaction round at a time (:meth:`compact`)."""

    def __init__(
        self, db: Database, schema: Schema, groups: Groups, *, retention: float, dedup_window: float
    ) -> None:
        self._db = db
        self._groups = groups
        self._retention = retention
        self._window = dedup_window
        q = schema.q
        self._lock = "SELECT pg_try_advisory_xact_lock(hashtext($1))"
        self._key = f"surge-compact:{schema.name}"
        self._messages = q(
            "DELETE FROM {s}.messages WHERE seq IN (SELECT m.seq FROM {s}.messages m "
            "WHERE m.time < $1 AND NOT EXISTS (SELECT 1 FROM {s}.deliveries d "
            f"WHERE d.msg = m.seq) ORDER BY m.seq LIMIT {_CHUNK})"
        )
        self._seen = q("DELETE FROM {s}.seen WHERE time < $1")

    async def compact(self, now: float, mine: list[int], alive_until: float) -> int:
        """One round; how many events were deleted (0: another ran it)."""
        await self._groups.keep_alive(mine, alive_until)

        async def run(conn: asyncpg.Connection) -> int:
            if not await conn.fetchval(self._lock, self._key):
                return 0
            status = await conn.execute(self._messages, now - self._retention)
            await conn.execute(self._seen, now - self._window)
            return int(status.rsplit(" ", 1)[-1])

        n: int = await self._db.transaction(run)
        await self._groups.drop_expired(now)
        return n
