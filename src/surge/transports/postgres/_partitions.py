"""Partitions on ``postgresql://``: memberships and partition leases are rows
of the schema, kept by each transport for each group it consumes.

A ``members`` row per (group, transport) says until when that consumer is
alive, an ``owners`` row per (group, partition) who holds the partition
until when. A transport consuming a group runs :class:`Member`'s loop:
every lease/3 (sooner while a partition it wants is not yet its own) one
transaction renews its membership, reads the live members, renews the
partitions it holds (one taken over by another is lost), releases those it
gives up and takes the free ones that ``assignment`` gives it.

A delivery of a partition is claimed only under the partition's lease (the
claim checks the ``owners`` row in its statement) and its lease is extended
only while the partition is held, so when a consumer takes a partition over,
the leases its predecessor left on deliveries end at a time known then
(``ready``): the partition is read from that time on, oldest row first, and
no later event of a key starts while an earlier one may still run. A
graceful hand-over leaves no such lease (a partition is given up once
nothing read from it is unsettled, and ``close`` hands leases back), so the
next owner reads at once. (The same design as ``sqlite://``, whose
``_sqlite_partitions`` says more; here the rows live in PostgreSQL.)

Fencing (``surge.Fences``): a round that renews or takes a partition writes
``until = now + lease`` with ``now`` read as its transaction starts, so no
other consumer takes the partition before then; this process starts the
partition's deliveries only until 2/3 of a lease after that moment
(``Fencing.valid``), so a handler shorter than lease/3 ends before the
partition can pass on, even when this process was cut off from the server
or stalled. At a lapse (:meth:`Member.fence`: seen by the runner's question,
or by a round that renewed the partition only after its window ended) the
deliveries of the partition held here are forgotten, unsettled (their rows
keep this process's leases, which run out), and the partition is dropped:
if it is still ours, the next round takes it again as a new owner does,
reading it only once those leases ended, oldest row first, so its keys
keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from math import inf

import asyncpg

from ..._errors import TransportError
from .._partitions import Fencing, Ownership, assignment
from ._db import Database
from ._schema import Schema

__all__ = ("Member", "Step")

log = logging.getLogger("surge.postgres")

# (live members, partitions still held, (partition, readable from) taken,
# the monotonic time the round's leases count from)
Step = tuple[list[str], list[int], list[tuple[int, float]], float]


class _Statements:
    def __init__(self, s: Schema) -> None:
        q = s.q
        self.leave = q("DELETE FROM {s}.members WHERE grp = $1 AND member = $2")
        self.join = q(
            "INSERT INTO {s}.members (grp, member, until) VALUES ($1, $2, $3) "
            "ON CONFLICT (grp, member) DO UPDATE SET until = excluded.until"
        )
        self.expire = q("DELETE FROM {s}.members WHERE grp = $1 AND until <= $2")
        self.members = q("SELECT member FROM {s}.members WHERE grp = $1 ORDER BY member")
        self.give_back = q(
            "DELETE FROM {s}.owners WHERE grp = $1 AND part = ANY($2::int[]) AND owner = $3"
        )
        self.renew = q(
            "UPDATE {s}.owners SET until = $1 WHERE grp = $2 AND owner = $3 "
            "AND part = ANY($4::int[]) RETURNING part"
        )
        self.take = q(
            "INSERT INTO {s}.owners AS o (grp, part, owner, until) "
            "SELECT $1, p, $2, $3 FROM unnest($4::int[]) AS p ORDER BY p "
            "ON CONFLICT (grp, part) DO UPDATE SET owner = excluded.owner, "
            "until = excluded.until WHERE o.until <= $5 OR o.owner = excluded.owner "
            "RETURNING part"
        )
        # leases a predecessor left: no delivery of p is read before they end
        self.ready = q(
            "SELECT part, max(visible_at) FROM {s}.deliveries WHERE grp = $1 "
            "AND part = ANY($2::int[]) AND visible_at > $3 AND token IS NOT NULL GROUP BY part"
        )
        self.leave_all = q("DELETE FROM {s}.owners WHERE owner = $1")
        self.leave_groups = q("DELETE FROM {s}.members WHERE member = $1")


class Member:
    """This transport's membership of one group, and the partitions it holds.

    ``unsettled`` and ``reading`` count, per partition, the deliveries this
    process holds and the claims under way: a partition is released only
    when both are zero. ``ready`` is when a partition just taken becomes
    readable (its predecessor's leases end). ``fencing`` says until when a
    held partition's deliveries may start.
    """

    def __init__(
        self,
        group: str,
        gid: int,
        *,
        db: Database,
        schema: Schema,
        me: str,
        lease: float,
        now: Callable[[], float],
        monotonic: Callable[[], float],
        woken: Callable[[], None],
        lapsed: Callable[[Member, int], None],
    ) -> None:
        self.group = group
        self.gid = gid
        self._db = db
        self._sql = _Statements(schema)
        self._me = me
        self._lease = lease
        self._now = now
        self._monotonic = monotonic
        self._woken = woken  # partitions taken: there may be more to read
        self._lapsed = lapsed  # forget what this process holds of a partition
        self.own = Ownership(schema.partitions)
        self.consumers = 0
        self.unsettled: dict[int, int] = {}
        self.reading: dict[int, int] = {}
        self.ready: dict[int, float] = {}
        self.fencing = Fencing(self.own, lease, monotonic)
        self.task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._kicked = False

    def join(self) -> None:
        """A consumer of the group starts: keep the membership and partitions."""
        self.consumers += 1
        self.kick()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(
                self.run(), name=f"surge-postgres-partitions-{self.group}"
            )

    def leave(self) -> None:
        """A consumer ends; with the last, the partitions go once settled."""
        self.consumers -= 1
        self.kick()

    def readable(self, now: float) -> list[int]:
        """The partitions to claim from at ``now``."""
        ready = self.ready
        return sorted(p for p in self.own.readable if ready.get(p, 0.0) <= now)

    def next_ready(self, now: float) -> float:
        """When the first partition held but not yet readable becomes
        readable (its predecessor's leases end; inf: none waits)."""
        ready = self.ready
        return min((ready[p] for p in self.own.readable if ready.get(p, 0.0) > now), default=inf)

    def reads(self, parts: list[int], delta: int) -> None:
        """A claim of ``parts`` began (+1) or ended (-1)."""
        reading = self.reading
        for p in parts:
            reading[p] = reading.get(p, 0) + delta
        if delta < 0:
            own = self.own
            # released, or dropped at a lapse (taken again once no claim
            # begun before is under way)
            if own.releasing or not own.owned.issuperset(parts):
                self.kick()

    def fence(self, part: int) -> None:
        """``part``'s lease may have lapsed: forget what this process holds
        of it and drop it (the next round takes it again if it is ours)."""
        self.fencing.lapse(part)
        self._lapsed(self, part)
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

    async def _step(
        self, conn: asyncpg.Connection, held: list[int], give_back: list[int], leaving: bool
    ) -> Step:
        """One round of this member's ownership, in one transaction."""
        sql, gid, me = self._sql, self.gid, self._me
        now = self._now()
        sent = self._monotonic()
        until = now + self._lease
        if leaving:
            await conn.execute(sql.leave, gid, me)
        else:
            await conn.execute(sql.join, gid, me, until)
        await conn.execute(sql.expire, gid, now)
        members = [r[0] for r in await conn.fetch(sql.members, gid)]
        if give_back:
            await conn.execute(sql.give_back, gid, give_back, me)
        keep = [p for p in held if p not in give_back]
        mine: list[int] = []
        if keep:
            mine = [r[0] for r in await conn.fetch(sql.renew, until, gid, me, keep)]
        taken: list[tuple[int, float]] = []
        if not leaving:
            # not a partition dropped at a lapse while a claim of it begun
            # before is under way: what that claim leases must be in ``ready``
            reading = self.reading
            want = sorted(
                p
                for p in assignment(members, me, self.own.partitions) - set(mine)
                if not reading.get(p)
            )
            if want:
                got = [r[0] for r in await conn.fetch(sql.take, gid, me, until, want, now)]
                if got:
                    ends = dict(await conn.fetch(sql.ready, gid, got, now))
                    taken = [(p, float(ends.get(p) or now)) for p in sorted(got)]
        return members, mine, taken, sent

    async def run(self) -> None:
        """Keep the membership and the partitions until no consumer is left
        and every partition is given back."""
        own = self.own
        lease = self._lease
        loop = asyncio.get_running_loop()
        while True:
            leaving = self.consumers == 0
            if leaving:
                own.releasing = set(own.owned)
            give_back = [
                p for p in own.releasing if not self.unsettled.get(p) and not self.reading.get(p)
            ]
            held = sorted(own.owned)
            try:
                members, mine, taken, sent = await self._db.transaction(
                    functools.partial(self._step, held=held, give_back=give_back, leaving=leaving)
                )
            except TransportError as exc:
                # the leases run on meanwhile: the next round renews them in
                # time, or learns which were lost (claims check them anyway)
                log.warning("postgres: cannot keep the partitions of %s: %s", self.group, exc)
                wait = lease / 10
            else:
                own.lost([p for p in own.owned if p not in mine])
                for p in self.fencing.renewed(sent, mine, (p for p, _ in taken)):
                    self.fence(p)  # renewed only after its window ended
                for p, at in taken:
                    self.ready[p] = at
                    self.unsettled.setdefault(p, 0)
                own.acquired(p for p, _ in taken)
                if leaving:
                    if not own.owned:
                        return
                    own.releasing = set(own.owned)
                else:
                    own.plan(members, self._me)
                if taken:
                    self._woken()
                complete = not own.releasing and own.owned == assignment(
                    members, self._me, own.partitions
                )
                # every lease/3 from one round's start to the next: a slow
                # round must not eat into the window the fence counts
                since = self._monotonic() - sent
                wait = max(lease / 30, lease / 3 - since) if complete else lease / 10
            if self._kicked:
                self._kicked = False
                continue
            self._wake = fut = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, wait)
            self._wake = None
            self._kicked = False


async def leave(db: Database, schema: Schema, me: str) -> None:
    """Give up every partition and membership of ``me`` (at close): the next
    owners need not wait for their leases to run out."""
    sql = _Statements(schema)

    async def run(conn: asyncpg.Connection) -> None:
        await conn.execute(sql.leave_all, me)
        await conn.execute(sql.leave_groups, me)

    await db.transaction(run)
