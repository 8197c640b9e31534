"""The tables of ``postgresql://`` in their schema: creation, version checks
and migrations, all in one transaction (nothing is ever half-created).

Tables (schema ``surge`` by default)::

    meta          magic, schema version, the partition count
    groups        one row per consumer group; ephemeral ones (reply inboxes)
                  with the time their process was last seen alive
    patterns      the topic patterns of each group, with the regular
                  expression that routes topics to it
    messages      the events: seq, id, topic, key, time, headers, body
    deliveries    one row per (group, event) until settled; ``visible_at``
                  is when it may be claimed (publish time, ``not_before``, a
                  nack's delay, or a lease's end while ``token`` is set);
                  ``part`` is the partition of a keyed event (NULL: the
                  group's shared queue)
    dead_letters  what groups gave up on
    seen          derived ids published within the dedup window
    members       the live consumers of each group (_partitions)
    owners        who holds each partition of each group, until when
    state         small values shared by the app's processes (triggers)
    settled       attempts finished per group (acked, retried, dead-lettered),
                  summed over a few rows per group (``slot``) that settles
                  add to, so concurrent settles seldom wait for one row

and one function, ``publish``, which stores a batch of envelopes for every
group whose patterns match (deduplicating derived ids) and NOTIFYs the
groups it touched. The transport and the transactional outbox both call it,
so an envelope written through a caller's connection is routed exactly like
one published by the transport (:mod:`._outbox`).

The schema version lives in ``meta``. An older schema is migrated in place
(``MIGRATIONS``); a newer one, written by a later surge, is refused with a
:class:`~surge.ConfigurationError`, as is a schema holding tables that are
not surge's.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg

from ..._errors import ConfigurationError
from ._db import translate

__all__ = ("MAGIC", "VERSION", "Schema", "regex_of")

MAGIC = "surge-postgres"
VERSION = 2

_SETTLED = """
CREATE TABLE {s}.settled (
    grp int NOT NULL,
    slot int NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (grp, slot)
);
"""

# Statements that take a schema version n to n + 1. Each runs in the
# transaction that checked the version.
MIGRATIONS: dict[int, str] = {
    # 1 -> 2: the settled attempts of each group (TransportStats.settled),
    # counted from the upgrade on
    1: _SETTLED,
}

_TABLES = """
CREATE TABLE {s}.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE {s}.groups (
    id serial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    ephemeral boolean NOT NULL DEFAULT false,
    alive_until float8
);
CREATE TABLE {s}.patterns (
    grp int NOT NULL,
    pattern text NOT NULL,
    regex text NOT NULL,
    PRIMARY KEY (grp, pattern)
);
CREATE TABLE {s}.messages (
    seq bigserial PRIMARY KEY,
    id text NOT NULL,
    topic text NOT NULL,
    key text,
    time float8 NOT NULL,
    headers bytea,
    body bytea NOT NULL,
    not_before float8
);
CREATE TABLE {s}.deliveries (
    id bigserial PRIMARY KEY,
    grp int NOT NULL,
    msg bigint NOT NULL,
    visible_at float8 NOT NULL,
    attempt int NOT NULL DEFAULT 0,
    token bigint,
    first_time float8,
    part int
);
CREATE INDEX deliveries_due ON {s}.deliveries (grp, visible_at, id) WHERE part IS NULL;
CREATE INDEX deliveries_part ON {s}.deliveries (grp, part, id) WHERE part IS NOT NULL;
CREATE INDEX deliveries_msg ON {s}.deliveries (msg);
CREATE TABLE {s}.dead_letters (
    seq bigserial,
    grp int NOT NULL,
    id text NOT NULL,
    topic text NOT NULL,
    key text,
    headers bytea,
    body bytea NOT NULL,
    error_type text NOT NULL,
    error text NOT NULL,
    traceback text NOT NULL,
    attempts int NOT NULL,
    first_attempt_at float8 NOT NULL,
    failed_at float8 NOT NULL,
    PRIMARY KEY (grp, id)
);
CREATE TABLE {s}.seen (id text PRIMARY KEY, time float8 NOT NULL);
CREATE INDEX seen_time ON {s}.seen (time);
CREATE TABLE {s}.members (
    grp int NOT NULL,
    member text NOT NULL,
    until float8 NOT NULL,
    PRIMARY KEY (grp, member)
);
CREATE TABLE {s}.owners (
    grp int NOT NULL,
    part int NOT NULL,
    owner text NOT NULL,
    until float8 NOT NULL,
    PRIMARY KEY (grp, part)
);
CREATE TABLE {s}.state (key text PRIMARY KEY, value bytea NOT NULL);
"""

# One batch of envelopes, as parallel arrays (``part``: the partition of a
# keyed envelope, computed by the caller; inboxes are never partitioned).
# Derived ids (a "8" version nibble) are kept once per dedup window; the
# first of several copies in one batch wins. Returns the groups touched.
_PUBLISH = """
CREATE FUNCTION {s}.publish(
    p_now float8, p_window float8, p_ids text[], p_topics text[], p_keys text[],
    p_times float8[], p_headers bytea[], p_bodies bytea[], p_nbs float8[], p_parts int[]
) RETURNS int[] LANGUAGE plpgsql
-- one plan, made once per connection: planning this statement costs far
-- more than running it on a batch (custom plans would replan every call)
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    touched int[];
BEGIN
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_topics, p_keys, p_times, p_headers, p_bodies, p_nbs, p_parts)
            WITH ORDINALITY AS u(id, topic, key, time, headers, body, nb, part, ord)
    ), derived AS (
        SELECT DISTINCT ON (id) id, ord FROM input WHERE substr(id, 13, 1) = '8' ORDER BY id, ord
    ), fresh AS (
        INSERT INTO {s}.seen AS s (id, time) SELECT id, p_now FROM derived
        ON CONFLICT (id) DO UPDATE SET time = excluded.time WHERE s.time < p_now - p_window
        RETURNING id
    ), kept AS (
        SELECT i.* FROM input i WHERE substr(i.id, 13, 1) <> '8'
        UNION ALL
        SELECT i.* FROM input i JOIN derived d ON d.ord = i.ord JOIN fresh f ON f.id = d.id
    ), routed AS (
        SELECT DISTINCT k.ord, g.id AS grp,
               CASE WHEN g.ephemeral THEN NULL ELSE k.part END AS part,
               greatest(p_now, coalesce(k.nb, p_now)) AS visible
        FROM kept k JOIN {s}.patterns p ON k.topic ~ p.regex JOIN {s}.groups g ON g.id = p.grp
    ), msgs AS (
        SELECT k.*, nextval('{s}.messages_seq_seq') AS seq
        FROM (SELECT * FROM kept WHERE ord IN (SELECT ord FROM routed) ORDER BY ord) k
    ), stored AS (
        INSERT INTO {s}.messages (seq, id, topic, key, time, headers, body, not_before)
        SELECT seq, id, topic, key, time, headers, body, nb FROM msgs
    ), queued AS (
        INSERT INTO {s}.deliveries (grp, msg, visible_at, part)
        SELECT r.grp, m.seq, r.visible, r.part FROM routed r JOIN msgs m ON m.ord = r.ord
        ORDER BY m.seq, r.grp
    )
    SELECT array_agg(DISTINCT grp) INTO touched FROM routed;
    IF touched IS NOT NULL THEN
        PERFORM pg_notify({channel}, array_to_string(touched, ','));
    END IF;
    RETURN touched;
END
$fn$;
"""


def regex_of(pattern: str) -> str:
    """The anchored regular expression of a topic pattern (``*`` one token,
    a final ``>`` one or more), as ``topic_matches`` reads it."""
    out = []
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == "*":  # noqa: S105 - a subject's token, not a secret
            out.append("[^.]*")
        elif token == ">" and i == len(tokens) - 1:  # noqa: S105 - same
            out.append(".*")
        else:
            out.append(re.escape(token))
    return "^" + r"\.".join(out) + "$"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Schema:
    """Where surge's tables live, and how to make them ready.

    ``q`` renders a statement written with ``{s}`` for the quoted schema;
    ``channel`` is the LISTEN/NOTIFY channel of the schema.
    """

    def __init__(self, name: str, *, partitions: int, database: str) -> None:
        self.name = name
        self.quoted = f'"{name}"'
        self.channel = f"surge_{name}"
        self.partitions = partitions
        self.database = database

    def q(self, sql: str) -> str:
        return sql.replace("{s}", self.quoted)

    def _ddl(self) -> str:
        return self.q(_TABLES + _SETTLED) + self.q(_PUBLISH).replace(
            "{channel}", _literal(self.channel)
        )

    async def prepare(self, conn: asyncpg.Connection) -> None:
        """Create the schema and its tables, or check and migrate them, in
        one transaction under a lock (processes starting together wait)."""
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))", f"surge:{self.name}"
                )
                await self._prepare(conn)
        except asyncpg.InsufficientPrivilegeError as exc:
            user = await _current_user(conn)
            raise ConfigurationError(
                f"role {user!r} may not create surge's tables in schema {self.name!r} of "
                f"database {self.database!r} ({exc}): GRANT CREATE ON DATABASE "
                f"{self.database} TO {user} (or create the schema for it and GRANT "
                f"CREATE ON SCHEMA {self.name}), or name a schema it may use with ?schema="
            ) from None
        except asyncpg.PostgresError as exc:
            raise translate(exc) from None

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        exists = await conn.fetchval(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1", self.name
        )
        if not exists:
            await conn.execute(f"CREATE SCHEMA {self.quoted}")
        objects = await conn.fetch(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind IN ('r', 'v', 'm', 'p') "
            "UNION ALL SELECT p.proname, 'f' FROM pg_proc p JOIN pg_namespace n "
            "ON n.oid = p.pronamespace WHERE n.nspname = $1",
            self.name,
        )
        names = {r[0] for r in objects}
        if not names:
            await conn.execute(self._ddl())
            await conn.executemany(
                self.q("INSERT INTO {s}.meta (key, value) VALUES ($1, $2)"),
                [("magic", MAGIC), ("version", str(VERSION)), ("partitions", str(self.partitions))],
            )
            return
        magic = None
        if "meta" in names:
            try:
                magic = await conn.fetchval(
                    self.q("SELECT value FROM {s}.meta WHERE key = 'magic'")
                )
            except asyncpg.PostgresError:
                magic = None
        if magic != MAGIC:
            raise ConfigurationError(
                f"schema {self.name!r} of database {self.database!r} holds objects that are "
                f"not surge's ({', '.join(sorted(names)[:5])}): give surge a schema of its "
                "own with ?schema=NAME"
            )
        version = int(
            await conn.fetchval(self.q("SELECT value FROM {s}.meta WHERE key = 'version'"))
        )
        if version > VERSION:
            raise ConfigurationError(
                f"schema {self.name!r} has surge schema version {version}, written by a newer "
                f"surge; this surge reads version {VERSION}: upgrade surge"
            )
        while version < VERSION:
            await conn.execute(self.q(MIGRATIONS[version]))
            version += 1
            await conn.execute(
                self.q("UPDATE {s}.meta SET value = $1 WHERE key = 'version'"), str(version)
            )
        kept = await conn.fetchval(self.q("SELECT value FROM {s}.meta WHERE key = 'partitions'"))
        if int(kept) != self.partitions:
            raise ConfigurationError(
                f"schema {self.name!r} keeps keyed events in {kept} partitions per group; this "
                f"transport was opened with partitions={self.partitions} (use {kept})"
            )


async def _current_user(conn: asyncpg.Connection) -> Any:
    try:
        return await conn.fetchval("SELECT current_user")
    except asyncpg.PostgresError:  # the failed transaction is gone with its block
        return "?"
