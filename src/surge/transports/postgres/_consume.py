"""Consuming on ``postgresql://``: claims under leases, and settling them.

A claim leases up to ``room`` visible deliveries in one statement
(``FOR UPDATE SKIP LOCKED`` on a group's shared queue, so consumers of one
group never wait for each other; a partition in row order, under its
owner's lease, so one key's events come in publish order) and returns them
with their events. The lease is a random token and a deadline
(``visible_at``); acks, nacks, hand-backs and extensions name the token, so
a consumer that lost its lease (stopped, too slow) cannot settle a delivery
that another consumer holds now.

:class:`Consumer` and :class:`Lease` are the consumer side's records of
what it holds, counted per partition for :class:`._partitions.Member`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec

from ..._event import Envelope
from ..._transport import Delivery
from ._db import Database, rowcount
from ._partitions import Member
from ._schema import Schema

__all__ = ("COUNT_SETTLED", "Claimed", "Consumer", "Lease", "Queue", "slot")

_decode_headers = msgspec.msgpack.Decoder(dict[str, str]).decode

log = logging.getLogger("surge.postgres")

# One claim is one statement (one round trip): the shared queue's visible
# rows (``FOR UPDATE SKIP LOCKED``, so consumers of one group never wait for
# each other) and the readable partitions' (in row, that is publish, order,
# and no SKIP LOCKED: a row locked for a moment, its last owner's hand-back,
# is waited for, not overtaken; the owners row is checked here, not in the
# caller's view), the first arm taking up to ``room`` and the second what is
# left. A last row, its delivery id NULL, says when the next delivery is due
# (after ``now``), looked up only when the claim came back short: the loop
# then naps until a notification or that time, with no second look.
_SHARED = (
    "SELECT id FROM {s}.deliveries WHERE grp = $1 AND part IS NULL AND visible_at <= $2 "
    "ORDER BY visible_at, id LIMIT {limit} FOR UPDATE SKIP LOCKED"
)
_PARTS = (
    "SELECT d.id FROM {s}.deliveries d WHERE d.grp = $1 AND d.part = ANY($6::int[]) "
    "AND d.visible_at <= $2 AND EXISTS (SELECT 1 FROM {s}.owners o WHERE o.grp = $1 "
    "AND o.part = d.part AND o.owner = $7 AND o.until > $2) ORDER BY d.id LIMIT {limit} "
    "FOR UPDATE OF d"
)
_DUE_SHARED = (
    "(SELECT min(visible_at) FROM {s}.deliveries WHERE grp = $1 AND part IS NULL "
    "AND visible_at > $2)"
)
_DUE_PARTS = (
    "(SELECT min(visible_at) FROM {s}.deliveries WHERE grp = $1 AND part = ANY($6::int[]) "
    "AND visible_at > $2)"
)
_CLAIM = (
    "WITH {arms}, u AS (UPDATE {s}.deliveries d SET visible_at = $4, token = $5, "
    "attempt = d.attempt + 1, first_time = coalesce(d.first_time, $2) FROM ({chosen}) c, "
    "{s}.messages m WHERE d.id = c.id AND m.seq = d.msg RETURNING d.id, d.attempt, "
    "d.first_time, d.part, m.id AS eid, m.topic, m.key, m.time, m.headers, m.body, "
    "m.not_before) "
    "SELECT *, NULL::float8 AS due FROM u UNION ALL SELECT NULL::bigint, NULL::int, "
    "NULL::float8, NULL::int, NULL::text, NULL::text, NULL::text, NULL::float8, NULL::bytea, "
    "NULL::bytea, NULL::float8, CASE WHEN (SELECT count(*) FROM u) < $3 THEN {due} END"
)


def _claim_sql(arms: tuple[str, ...]) -> str:
    """The claim statement reading ``arms`` (``shared``, ``parts``) in order."""
    sql = {"shared": _SHARED, "parts": _PARTS}
    ctes = []
    for i, arm in enumerate(arms):
        limit = "$3" if not i else f"($3 - (SELECT count(*) FROM a{i - 1}))"
        ctes.append(f"a{i} AS MATERIALIZED ({sql[arm].replace('{limit}', limit)})")
    chosen = " UNION ALL ".join(f"SELECT id FROM a{i}" for i in range(len(arms)))
    dues = [_DUE_SHARED] + ([_DUE_PARTS] if "parts" in arms else [])
    due = dues[0] if len(dues) == 1 else f"least({', '.join(dues)})"
    return (
        _CLAIM.replace("{arms}", ", ".join(ctes)).replace("{chosen}", chosen).replace("{due}", due)
    )


_BUSY = "SELECT min(visible_at) FROM {s}.deliveries WHERE grp = ANY($1::int[])"
_HELD = (
    "FROM unnest($1::bigint[], $2::bigint[]) AS u(id, tok) WHERE d.id = u.id AND d.token = u.tok"
)
# A settle that finishes attempts (an ack, a retry's release) adds them to
# its groups' rows of ``settled`` in the same statement (no round trip of
# its own): on the row of one of SLOTS, drawn per statement ($3), so that
# settles running at once seldom wait for each other's row; in group order,
# so two that touch the same rows never deadlock. The aggregate reads every
# settled delivery before it writes a count.
SLOTS = 16
COUNT_SETTLED = (
    "c AS (INSERT INTO {s}.settled AS t (grp, slot, n) SELECT grp, {slot}, count(*) "
    "FROM done GROUP BY grp ORDER BY grp "
    "ON CONFLICT (grp, slot) DO UPDATE SET n = t.n + excluded.n)"
)
_ACK = (
    "WITH done AS (DELETE FROM {s}.deliveries d USING unnest($1::bigint[], $2::bigint[]) "
    "AS u(id, tok) WHERE d.id = u.id AND d.token = u.tok RETURNING d.grp), "
    + COUNT_SETTLED.replace("{slot}", "$3")
    + " SELECT count(*) FROM done"
)
_RETRY = (
    "WITH done AS (UPDATE {s}.deliveries d SET visible_at = $4, token = NULL "
    + _HELD
    + " RETURNING d.grp), "
    + COUNT_SETTLED.replace("{slot}", "$3")
    + " SELECT count(*) FROM done"
)
# handed back by a closing process: the attempts are not finished
_RELEASE = "UPDATE {s}.deliveries d SET visible_at = $3, token = NULL " + _HELD
_HAND_BACK = (
    "UPDATE {s}.deliveries d SET visible_at = $3, token = NULL, attempt = d.attempt - 1, "
    "first_time = CASE WHEN d.attempt > 1 THEN d.first_time END " + _HELD
)
# a partition's lease only while its owner still holds the partition, so the
# next owner knows when what it inherits becomes its own
_EXTEND = (
    "UPDATE {s}.deliveries d SET visible_at = $3 " + _HELD + " AND (d.part IS NULL OR EXISTS "
    "(SELECT 1 FROM {s}.owners o WHERE o.grp = d.grp AND o.part = d.part AND o.owner = $4 "
    "AND o.until > $5))"
)
# a claimed delivery whose message no surge wrote, to the dead letters
_FOREIGN = (
    "WITH done AS (DELETE FROM {s}.deliveries WHERE id = $1 AND token = $2 RETURNING grp), "
    + COUNT_SETTLED.replace("{slot}", "$11")
    + " INSERT INTO {s}.dead_letters (grp, id, topic, key, headers, body, error_type, error, "
    "traceback, attempts, first_attempt_at, failed_at) "
    "SELECT done.grp, $3, $4, $5, NULL, $6, 'DecodeError', $7, '', $8, $9, $10 FROM done "
    "ON CONFLICT (grp, id) DO NOTHING"
)
# (backlog, pending, scheduled, settled, consumers): the consumers are the
# group's live members (a row per consuming transport, kept by _partitions)
_STATS = (
    "SELECT count(*) FILTER (WHERE visible_at <= $2), "
    "count(*) FILTER (WHERE visible_at > $2 AND token IS NOT NULL), "
    "count(*) FILTER (WHERE visible_at > $2 AND token IS NULL), "
    "(SELECT coalesce(sum(n), 0) FROM {s}.settled WHERE grp = $1), "
    "(SELECT count(*) FROM {s}.members WHERE grp = $1 AND until > $2) "
    "FROM {s}.deliveries WHERE grp = $1"
)

Held = tuple[list[int], list[int]]  # delivery ids, their lease tokens


class Claimed(NamedTuple):
    """What one claim leased, whether it took all the room it was given
    (there may be more to read at once), and when, if it did not, the next
    delivery of what it read is due (inf: none, or not looked up)."""

    deliveries: list[Delivery]
    full: bool
    due: float


class Consumer:
    """One ``consume`` iterator: its room, its wake-up, its group's member."""

    __slots__ = ("full", "gid", "kicked", "member", "prefetch", "turn", "unsettled", "wake")

    def __init__(self, gid: int, prefetch: int, member: Member | None) -> None:
        self.gid = gid
        self.prefetch = prefetch
        self.member = member
        self.unsettled = 0
        self.turn = 0
        self.wake: asyncio.Future[None] | None = None
        self.kicked = False  # woken while not napping: the next nap returns at once
        self.full = False  # napping until a settle makes room

    def wake_up(self) -> None:
        fut = self.wake
        if fut is None:
            self.kicked = True
            return
        self.wake = None
        if not fut.done():
            fut.set_result(None)

    async def nap(self, timeout: float | None) -> bool:
        """Wait for a wake-up or ``timeout`` seconds; True when woken."""
        if self.kicked:
            self.kicked = False
            return True
        fut = self.wake = asyncio.get_running_loop().create_future()
        if timeout is None:
            await fut
            return True
        done, _ = await asyncio.wait((fut,), timeout=max(0.0, timeout))
        self.wake = None
        return bool(done)


class Lease:
    """A claimed delivery: its row, the claim's token, who holds it, and
    the partition it came from (None: the shared queue)."""

    __slots__ = ("consumer", "did", "part", "settled", "token")

    def __init__(self, did: int, token: int, consumer: Consumer, part: int | None) -> None:
        self.did = did
        self.token = token
        self.consumer = consumer
        self.part = part
        self.settled = False
        if part is not None and consumer.member is not None:
            consumer.member.held(part)

    def settle(self) -> None:
        self.settled = True
        c = self.consumer
        c.unsettled -= 1
        if self.part is not None and c.member is not None:
            c.member.settled(self.part)


def held_of(leases: Sequence[Lease]) -> Held:
    return [lease.did for lease in leases], [lease.token for lease in leases]


class Queue:
    """The statements on ``deliveries``: claim, settle, extend, look ahead."""

    def __init__(self, db: Database, schema: Schema) -> None:
        self._db = db
        q = schema.q
        self._shared = q(_claim_sql(("shared",)))
        self._shared_first = q(_claim_sql(("shared", "parts")))
        self._parts_first = q(_claim_sql(("parts", "shared")))
        self._busy = q(_BUSY)
        self._ack = q(_ACK)
        self._retry = q(_RETRY)
        self._release = q(_RELEASE)
        self._hand_back = q(_HAND_BACK)
        self._extend = q(_EXTEND)
        self._stats = q(_STATS)
        self._foreign = q(_FOREIGN)
        self.stale = 0
        """Settles ignored because the lease was lost meanwhile."""

    async def claim(
        self,
        c: Consumer,
        group: str,
        room: int,
        now: float,
        until: float,
        token: int,
        parts: list[int],
        me: str,
    ) -> Claimed:
        """Lease up to ``room`` deliveries of the shared queue and of
        ``parts``, starting with another each turn so that neither waits
        behind the other's backlog; sorted by row, token = (row, part)."""
        if parts:
            sql = self._parts_first if c.turn % 2 else self._shared_first
            c.turn += 1
            rows = await self._db.fetch(sql, c.gid, now, room, until, token, parts, me)
        else:
            rows = await self._db.fetch(self._shared, c.gid, now, room, until, token)
        last = rows.pop()  # the due row
        due = float("inf") if last[11] is None else float(last[11])
        rows.sort(key=lambda r: r[0])
        out = []
        for did, attempt, first, part, eid, topic, key, time, headers, body, nb, _ in rows:
            h = None
            if headers is not None:
                try:
                    h = _decode_headers(headers)
                except msgspec.DecodeError as exc:
                    await self._bury_foreign(
                        did, token, eid, topic, key, body, attempt, first, now, exc
                    )
                    continue
            env = Envelope(eid, topic, key, time, h, None, body, nb)
            out.append(Delivery(env, group, attempt, (did, part), first))
        return Claimed(out, len(rows) >= room, due)

    async def _bury_foreign(
        self,
        did: int,
        token: int,
        eid: str,
        topic: str,
        key: str | None,
        body: bytes,
        attempt: int,
        first: float | None,
        now: float,
        exc: Exception,
    ) -> None:
        """Dead-letter a claimed delivery whose message row no surge wrote
        (its headers are not a msgpack map of strings): it cannot even be
        handed to the runner, which dead-letters undecodable bodies itself.
        The headers are dropped (a dead letter's must decode); the body kept."""
        reason = f"message {eid!r}: its headers are not a map of strings ({exc})"
        log.error("postgres: %s; dead-lettered", reason)
        await self._db.execute(
            self._foreign,
            did,
            token,
            eid,
            topic,
            key,
            body,
            reason,
            attempt,
            first or now,
            now,
            slot(),
        )

    async def busy(self, gids: list[int]) -> float | None:
        """When the first delivery of ``gids`` is (or was) due; None: none held."""
        due = await self._db.fetchval(self._busy, gids)
        return None if due is None else float(due)

    async def _settle(self, sql: str, held: Held, *args: Any) -> int:
        n = rowcount(await self._db.execute(sql, held[0], held[1], *args))
        self.stale += len(held[0]) - n
        return n

    async def _finish(self, sql: str, held: Held, *args: Any) -> int:
        """A settle that finishes attempts: counted in ``settled``."""
        n = int(await self._db.fetchval(sql, held[0], held[1], slot(), *args))
        self.stale += len(held[0]) - n
        return n

    async def ack(self, held: Held) -> int:
        return await self._finish(self._ack, held)

    async def retry(self, held: Held, when: float) -> int:
        """Make deliveries visible again at ``when``: their attempt failed."""
        return await self._finish(self._retry, held, when)

    async def release(self, held: Held, when: float) -> int:
        """Make deliveries visible again at ``when``, their attempts not
        finished (handed back by a closing process)."""
        return await self._settle(self._release, held, when)

    async def hand_back(self, held: Held, now: float) -> int:
        """Release deliveries never handed to a handler: visible at once, in
        their place, and the claim's attempt not counted."""
        return await self._settle(self._hand_back, held, now)

    async def extend(self, held: Held, until: float, now: float, me: str) -> int:
        return rowcount(await self._db.execute(self._extend, held[0], held[1], until, me, now))

    async def stats(self, gid: int, now: float) -> tuple[int, int, int, int, int]:
        """(backlog, pending, scheduled, settled, consumers) of ``gid``."""
        row = (await self._db.fetch(self._stats, gid, now))[0]
        return int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4])


def slot() -> int:
    """The row of ``settled`` a settle adds to (see ``COUNT_SETTLED``)."""
    return random.randrange(SLOTS)  # noqa: S311 - a spread, not a secret
