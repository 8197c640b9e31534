"""Consumer groups on ``postgresql://``: their rows and topic patterns.

A group's patterns are rows of ``patterns`` with the regular expression
that routes a topic to it; the schema's ``publish`` function joins them, in
the publishing transaction, so a group declared before a publish (committed)
always receives it and no process caches a route.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from ..._errors import ConfigurationError
from ._db import Database
from ._schema import Schema, regex_of

__all__ = ("Groups",)


class Groups:
    """Declares, names and drops groups; remembers the ids it has seen."""

    def __init__(self, db: Database, schema: Schema) -> None:
        self._db = db
        q = schema.q
        self._upsert = q(
            "INSERT INTO {s}.groups (name, ephemeral, alive_until) VALUES ($1, $2, $3) "
            "ON CONFLICT (name) DO UPDATE SET alive_until = coalesce(excluded.alive_until, "
            "{s}.groups.alive_until) RETURNING id"
        )
        self._patterns = q(
            "INSERT INTO {s}.patterns (grp, pattern, regex) SELECT $1, p, r "
            "FROM unnest($2::text[], $3::text[]) AS u(p, r) ON CONFLICT DO NOTHING"
        )
        self._lookup = q("SELECT id FROM {s}.groups WHERE name = $1")
        self._names = q("SELECT name FROM {s}.groups ORDER BY name")
        self._routed = q(
            "SELECT DISTINCT g.name FROM {s}.patterns p JOIN {s}.groups g ON g.id = p.grp "
            "WHERE $1 ~ p.regex ORDER BY g.name"
        )
        self._alive = q("UPDATE {s}.groups SET alive_until = $1 WHERE id = ANY($2::int[])")
        self._gone = q("SELECT id FROM {s}.groups WHERE ephemeral AND alive_until < $1")
        self._drop = [
            q(f"DELETE FROM {{s}}.{table} WHERE grp = ANY($1::int[])")
            for table in (
                "deliveries",
                "patterns",
                "members",
                "owners",
                "dead_letters",
                "settled",
            )
        ] + [q("DELETE FROM {s}.groups WHERE id = ANY($1::int[])")]
        self.ids: dict[str, int] = {}

    async def declare(
        self, name: str, topics: Sequence[str], *, ephemeral: bool, alive_until: float | None
    ) -> int:
        patterns = list(dict.fromkeys(topics))
        regexes = [regex_of(p) for p in patterns]

        async def run(conn: asyncpg.Connection) -> int:
            gid: int = await conn.fetchval(self._upsert, name, ephemeral, alive_until)
            await conn.execute(self._patterns, gid, patterns, regexes)
            return gid

        gid = await self._db.transaction(run)
        self.ids[name] = gid
        return gid

    async def gid(self, name: str) -> int:
        """The id of group ``name``; ConfigurationError when there is none."""
        gid = self.ids.get(name)
        if gid is not None:
            return gid
        found = await self._db.fetchval(self._lookup, name)
        if found is None:
            names = [r[0] for r in await self._db.fetch(self._names)]
            raise ConfigurationError(f"no group {name!r} in postgres; groups: {names}")
        self.ids[name] = int(found)
        return int(found)

    async def groups_for(self, topic: str) -> list[str]:
        """The groups, declared by any process, whose patterns route ``topic``
        (the join the schema's ``publish`` makes)."""
        return [r[0] for r in await self._db.fetch(self._routed, topic)]

    async def keep_alive(self, gids: list[int], until: float) -> None:
        """Ephemeral ``gids`` are in use until ``until``."""
        if gids:
            await self._db.execute(self._alive, until, gids)

    async def drop_expired(self, now: float) -> int:
        """Drop the ephemeral groups whose process stopped renewing them."""
        gone = [r[0] for r in await self._db.fetch(self._gone, now)]
        if gone:
            await self.drop(gone)
        return len(gone)

    async def drop(self, gids: list[int]) -> None:
        """Delete ``gids`` with everything they hold."""

        async def run(conn: asyncpg.Connection) -> None:
            for sql in self._drop:
                await conn.execute(sql, gids)

        await self._db.transaction(run)
        for name, gid in list(self.ids.items()):
            if gid in gids:
                del self.ids[name]
