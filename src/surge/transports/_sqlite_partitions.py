"""Partitions on ``sqlite://``: memberships and partition leases are rows of
the same file, kept by each process for each group it consumes.

Every consumer of a group is local to the host, so nothing but the file is
shared: a ``members`` row per (group, transport) says until when that
consumer is alive, an ``owners`` row per (group, partition) who holds the
partition until when. A transport consuming a group runs :class:`Member`'s
loop: every lease/3 (sooner while a partition it wants is not yet its own)
one transaction renews its membership, reads the live members, renews the
partitions it holds (one taken over by another is lost), releases those it
gives up and takes the free ones that :func:`assignment` gives it.

A delivery of a partition is claimed only under the partition's lease (the
claim checks the ``owners`` row in its transaction) and its lease is
extended only while the partition is held, so when a consumer takes over a
partition the leases its predecessor left on deliveries end at a time known
then (``ready``): the partition is read from that time on, oldest row first,
and no later event of a key starts while an earlier one may still run.
(The two leases being equally long is not enough: a delivery claimed or
extended after the partition's last renewal outlives the partition's lease
by up to the renewal interval.)
A graceful handover leaves no such lease (a partition is given up once
nothing read from it is unsettled, and ``close`` hands leases back), so the
next owner reads at once.

Here too: the tables and statements of partitions (schema version 2), and
the consumer-side records of who holds what (:class:`Consumer`,
:class:`Lease`), which count the unsettled deliveries of each partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ConfigurationError, TransportError
from ._partitions import Ownership, assignment

if TYPE_CHECKING:
    from ._sqlite_db import Database

__all__ = (
    "CLAIM",
    "SCHEMA",
    "UPGRADE_1",
    "Consumer",
    "Lease",
    "Member",
    "claim_rows",
    "extend_leases",
    "keep_count",
    "leave",
    "step",
)

log = logging.getLogger("surge.sqlite")

# (live members, partitions still held, (partition, readable from) taken)
Step = tuple[list[str], list[int], list[tuple[int, float]]]

# Version 2: partitions. The shared queue is read by (grp, part IS NULL,
# visible_at), a partition in publish order by (grp, part, id); unkeyed
# rows stay out of the second index, so they cost what they did.
SCHEMA = """
CREATE INDEX deliveries_due ON deliveries (grp, part, visible_at);
CREATE INDEX deliveries_part ON deliveries (grp, part) WHERE part IS NOT NULL;
CREATE TABLE members (
    grp INTEGER NOT NULL,
    member TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (grp, member)
) WITHOUT ROWID;
CREATE TABLE owners (
    grp INTEGER NOT NULL,
    part INTEGER NOT NULL,
    owner TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (grp, part)
) WITHOUT ROWID;
"""
UPGRADE_1 = """
ALTER TABLE deliveries ADD COLUMN part INTEGER;
DROP INDEX deliveries_due;
"""


def keep_count(conn: sqlite3.Connection, path: Path, partitions: int) -> None:
    """Write the partition count into a file that has none; refuse another
    count (read under it, a key's events would be split between partitions)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'partitions'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('partitions', ?)", (partitions,))
    elif row[0] != partitions:
        raise ConfigurationError(
            f"{path} keeps keyed events in {row[0]} partitions per group; this "
            f"transport was opened with partitions={partitions} (use {row[0]})"
        )


# The claim of the shared queue (the one statement of an unkeyed claim)...
CLAIM = (
    "UPDATE deliveries SET visible_at = ?, token = ?, attempt = attempt + 1, "
    "first_time = coalesce(first_time, ?) WHERE id IN (SELECT id FROM deliveries "
    "WHERE grp = ? AND part IS NULL AND visible_at <= ? ORDER BY visible_at, id LIMIT ?) "
    "RETURNING id, msg, attempt, first_time, part"
)
# ... and of a partition: its oldest visible rows in publish (row) order, so
# that what its last owner left comes before what was published after it.
_CLAIM_PART = (
    "UPDATE deliveries SET visible_at = ?, token = ?, attempt = attempt + 1, "
    "first_time = coalesce(first_time, ?) WHERE id IN (SELECT id FROM deliveries "
    "INDEXED BY deliveries_part WHERE grp = ? AND part = ? AND visible_at <= ? "
    "ORDER BY id LIMIT ?) RETURNING id, msg, attempt, first_time, part"
)
# The partitions a claim may read: held by ``me`` (the lease decides, not
# the caller's view of it, which may be stale) and holding a visible row,
# so that a claim of the shared queue alone costs what it did (the first
# EXISTS, one probe, answers at once for a group without keyed rows).
_LIVE = (
    "SELECT part FROM owners o WHERE EXISTS (SELECT 1 FROM deliveries WHERE grp = ?1 "
    "AND part >= 0) AND grp = ?1 AND owner = ?2 AND until > ?3 AND EXISTS "
    "(SELECT 1 FROM deliveries WHERE grp = o.grp AND part = o.part AND visible_at <= ?3)"
)


def claim_rows(
    conn: sqlite3.Connection,
    gid: int,
    n: int,
    now: float,
    until: float,
    token: int,
    parts: tuple[int, ...],
    me: str,
    turn: int,
) -> list[Any]:
    """Claim up to ``n`` rows of the shared queue and of ``parts``, one
    statement each, starting at another one each ``turn`` so that none
    waits behind the others' backlogs; (id, msg, attempt, first, part)."""
    live = {r[0] for r in conn.execute(_LIVE, (gid, me, now))}
    arms: list[int | None] = [None, *(p for p in parts if p in live)]
    turn %= len(arms)
    claimed: list[Any] = []
    for p in arms[turn:] + arms[:turn]:
        left = n - len(claimed)
        if p is None:
            got = conn.execute(CLAIM, (until, token, now, gid, now, left))
        else:
            got = conn.execute(_CLAIM_PART, (until, token, now, gid, p, now, left))
        claimed += got.fetchall()
        if len(claimed) >= n:
            break
    return claimed


def extend_leases(
    db: Database, held: list[tuple[int, int]], until: float, now: float, me: str
) -> int:
    """Extend leases; a partition's only while ``me`` holds the partition,
    so the next owner knows when what it inherits becomes its own."""
    assert db.conn is not None
    cur = db.conn.executemany(
        "UPDATE deliveries SET visible_at = ? WHERE id = ? AND token = ? AND "
        "(part IS NULL OR EXISTS (SELECT 1 FROM owners o WHERE o.grp = deliveries.grp "
        "AND o.part = deliveries.part AND o.owner = ? AND o.until > ?))",
        [(until, did, token, me, now) for did, token in held],
    )
    return cur.rowcount


def leave(db: Database, held: list[tuple[int, int]], now: float, me: str) -> None:
    """Hand back the last leases, then ``me``'s partitions and memberships
    (at close): the next owners need not wait for them to run out."""
    if held:
        db.release(held, now)
    conn = db.conn
    assert conn is not None
    conn.execute("DELETE FROM owners WHERE owner = ?", (me,))
    conn.execute("DELETE FROM members WHERE member = ?", (me,))


def step(
    db: Database,
    gid: int,
    me: str,
    now: float,
    lease: float,
    held: list[int],
    give_back: list[int],
    leaving: bool,
) -> Step:
    """One round of ``me``'s ownership of group ``gid``, in one transaction."""
    conn = db.conn
    assert conn is not None
    until = now + lease
    if leaving:
        conn.execute("DELETE FROM members WHERE grp = ? AND member = ?", (gid, me))
    else:
        conn.execute(
            "INSERT INTO members (grp, member, until) VALUES (?, ?, ?) "
            "ON CONFLICT (grp, member) DO UPDATE SET until = excluded.until",
            (gid, me, until),
        )
    conn.execute("DELETE FROM members WHERE grp = ? AND until <= ?", (gid, now))
    members = [r[0] for r in conn.execute("SELECT member FROM members WHERE grp = ?", (gid,))]
    if give_back:
        conn.executemany(
            "DELETE FROM owners WHERE grp = ? AND part = ? AND owner = ?",
            [(gid, p, me) for p in give_back],
        )
    keep = [p for p in held if p not in give_back]
    mine: list[int] = []
    if keep:
        mine = [
            r[0]
            for r in conn.execute(
                "UPDATE owners SET until = ? WHERE grp = ? AND owner = ? "
                f"AND part IN ({','.join('?' * len(keep))}) RETURNING part",
                (until, gid, me, *keep),
            )
        ]
    taken: list[tuple[int, float]] = []
    if not leaving:
        for p in sorted(assignment(members, me, db.partitions) - set(mine)):
            cur = conn.execute(
                "INSERT INTO owners (grp, part, owner, until) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (grp, part) DO UPDATE SET owner = excluded.owner, "
                "until = excluded.until WHERE owners.until <= ? OR owners.owner = excluded.owner",
                (gid, p, me, until, now),
            )
            if cur.rowcount != 1:
                continue
            # leases a predecessor left: no delivery of p is read before they end
            row = conn.execute(
                "SELECT max(visible_at) FROM deliveries WHERE grp = ? AND part = ? "
                "AND visible_at > ? AND token IS NOT NULL",
                (gid, p, now),
            ).fetchone()
            taken.append((p, now if row[0] is None else float(row[0])))
    return members, mine, taken


class Consumer:
    """One ``consume`` iterator: its room, its wake-up, its group's member."""

    __slots__ = ("gid", "kicked", "member", "prefetch", "unsettled", "wake")

    def __init__(self, gid: int, prefetch: int, member: Member | None) -> None:
        self.gid = gid
        self.prefetch = prefetch
        self.member = member
        self.unsettled = 0
        self.wake: asyncio.Future[None] | None = None
        self.kicked = False  # woken while not napping: the next nap returns at once


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


class Member:
    """This transport's membership of one group, and the partitions it holds.

    ``unsettled`` and ``reading`` count, per partition, the deliveries this
    process holds and the claims under way: a partition is released only
    when both are zero. ``ready`` is when a partition just taken becomes
    readable (its predecessor's leases end).
    """

    __slots__ = (
        "_keep",
        "_kicked",
        "_wake",
        "consumers",
        "gid",
        "group",
        "own",
        "reading",
        "ready",
        "task",
        "unsettled",
    )

    def __init__(
        self, group: str, gid: int, partitions: int, keep: Callable[[Member], Any]
    ) -> None:
        self.group = group
        self.gid = gid
        self._keep = keep  # the coroutine of run(...) for this member
        self.own = Ownership(partitions)
        self.consumers = 0
        self.unsettled: dict[int, int] = {}
        self.reading: dict[int, int] = {}
        self.ready: dict[int, float] = {}
        self.task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._kicked = False

    def join(self) -> None:
        """A consumer of the group starts: keep the membership and partitions."""
        self.consumers += 1
        self.kick()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(
                self._keep(self), name=f"surge-sqlite-partitions-{self.group}"
            )

    def leave(self) -> None:
        """A consumer ends; with the last, the partitions go once settled."""
        self.consumers -= 1
        self.kick()

    def readable(self, now: float) -> tuple[int, ...]:
        """The partitions to claim from at ``now``."""
        ready = self.ready
        return tuple(sorted(p for p in self.own.readable if ready.get(p, 0.0) <= now))

    def reads(self, parts: tuple[int, ...], delta: int) -> None:
        """A claim of ``parts`` began (+1) or ended (-1)."""
        reading = self.reading
        for p in parts:
            reading[p] = reading.get(p, 0) + delta
        if delta < 0 and self.own.releasing:
            self.kick()

    def held(self, part: int) -> None:
        self.unsettled[part] = self.unsettled.get(part, 0) + 1

    def settled(self, part: int) -> None:
        n = self.unsettled[part] - 1
        self.unsettled[part] = n
        if not n and part in self.own.releasing:
            self.kick()

    def kick(self) -> None:
        """Run the next round now (a partition may be released)."""
        fut = self._wake
        if fut is None:
            self._kicked = True
        elif not fut.done():
            fut.set_result(None)

    async def run(
        self,
        submit: Callable[..., asyncio.Future[Any]],
        db: Database,
        me: str,
        lease: float,
        now: Callable[[], float],
        woken: Callable[[], None],
    ) -> None:
        """Keep the membership and the partitions until no consumer is left
        and every partition is given back."""
        own = self.own
        loop = asyncio.get_running_loop()
        while True:
            leaving = self.consumers == 0
            if leaving:
                own.releasing = set(own.owned)
            give_back = [
                p for p in own.releasing if not self.unsettled.get(p) and not self.reading.get(p)
            ]
            try:
                members, mine, taken = await submit(
                    step, db, self.gid, me, now(), lease, sorted(own.owned), give_back, leaving
                )
            except TransportError as exc:
                # the leases run on meanwhile: the next round renews them in
                # time, or learns which were lost (claims check them anyway)
                log.warning("sqlite: cannot keep the partitions of %s: %s", self.group, exc)
                wait = lease / 10
            else:
                own.lost([p for p in own.owned if p not in mine])
                for p, at in taken:
                    self.ready[p] = at
                    self.unsettled.setdefault(p, 0)
                own.acquired(p for p, _ in taken)
                if leaving:
                    if not own.owned:
                        return
                    own.releasing = set(own.owned)
                else:
                    own.plan(members, me)
                if taken:
                    woken()
                complete = not own.releasing and own.owned == assignment(
                    members, me, own.partitions
                )
                wait = lease / 3 if complete else lease / 10
            if self._kicked:
                self._kicked = False
                continue
            self._wake = fut = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, wait)
            self._wake = None
            self._kicked = False
