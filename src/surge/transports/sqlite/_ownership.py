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

Fencing (``surge.Fences``): a round writes ``until = now + lease`` with
``now`` read before it is submitted, so no other consumer takes the
partition before then; this process starts the partition's deliveries only
until 2/3 of a lease after that moment (``Fencing.valid``), so a handler
shorter than lease/3 ends before the partition can pass on, even when this
process was stalled (SIGSTOP, a blocked loop, a write lock held for long).
At a lapse (:meth:`Member.fence`: seen by the runner's question, or by a
round that renewed the partition only after its window ended) the
deliveries of the partition held here are forgotten, unsettled (their rows
keep this process's leases, which run out), and the partition is dropped:
if it is still ours, the next round takes it again as a new owner does,
reading it only once those leases ended, oldest row first, so its keys keep
their order. A claim begun before a lapse is not taken again until it
ended, and what it leased of the partition is forgotten as well.

The statements of a round (``Database.keep_partitions``) run on the
connection's thread; :class:`Member` is the loop's side: it decides what
to give back and when to run the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from ..._errors import TransportError
from .._partitions import Fencing, Ownership, assignment
from ._database import Database

__all__ = ("Member",)

log = logging.getLogger("surge.sqlite")

# Between rounds while a wanted partition is not yet this member's (a small
# soft transaction each: see Database.soft).
_HANDOVER = 0.05

Submit = Callable[..., "asyncio.Future[Any]"]


class Member:
    """This transport's membership of one group, and the partitions it holds.

    Its task runs the rounds while the group has a consumer here, and until
    every partition is given back after the last one left. It counts, per
    partition, the deliveries this process holds (``held``/``settled``) and
    the claims under way (``reads``): a partition is released only when both
    are zero. A partition just taken becomes readable once its
    predecessor's leases end. ``fencing`` says until when a held
    partition's deliveries may start.
    """

    __slots__ = (
        "_consumers",
        "_database",
        "_kicked",
        "_lapsed",
        "_lease",
        "_me",
        "_monotonic",
        "_now",
        "_on_taken",
        "_reading",
        "_ready",
        "_submit",
        "_task",
        "_unsettled",
        "_wake",
        "fencing",
        "gid",
        "group",
        "own",
    )

    def __init__(
        self,
        group: str,
        gid: int,
        *,
        database: Database,
        submit: Submit,
        me: str,
        lease: float,
        now: Callable[[], float],
        monotonic: Callable[[], float],
        on_taken: Callable[[], None],
        lapsed: Callable[[Member, int], None],
    ) -> None:
        """``submit`` runs a ``database`` method on its thread; ``me`` names
        this transport among the group's members; ``on_taken`` is called
        when partitions were taken (there may be more to read), ``lapsed``
        when a partition's lease may have lapsed (forget what is held of it)."""
        self.group = group
        self.gid = gid
        self.own = Ownership(database.partitions)
        self._database = database
        self._submit = submit
        self._me = me
        self._lease = lease
        self._now = now
        self._monotonic = monotonic
        self._on_taken = on_taken
        self._lapsed = lapsed
        self._consumers = 0
        self._unsettled: dict[int, int] = {}
        self._reading: dict[int, int] = {}
        self._ready: dict[int, float] = {}
        self.fencing = Fencing(self.own, lease, monotonic)
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._kicked = False

    def join(self) -> None:
        """A consumer of the group starts: keep the membership and partitions."""
        self._consumers += 1
        self.kick()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"surge-sqlite-partitions-{self.group}"
            )

    def leave(self) -> None:
        """A consumer ends; with the last, the partitions go once settled."""
        self._consumers -= 1
        self.kick()

    async def stop(self) -> None:
        """End the rounds now (the transport closes: ``Database.leave``
        releases every partition at once, or a crash leaves them)."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def readable(self, now: float) -> tuple[int, ...]:
        """The partitions to claim from at ``now``."""
        ready = self._ready
        return tuple(sorted(p for p in self.own.readable if ready.get(p, 0.0) <= now))

    def reads(self, parts: tuple[int, ...], delta: int) -> None:
        """A claim of ``parts`` began (+1) or ended (-1)."""
        reading = self._reading
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
        """A delivery of ``part`` was claimed."""
        self._unsettled[part] = self._unsettled.get(part, 0) + 1

    def settled(self, part: int) -> None:
        """A delivery of ``part`` was settled (or handed back)."""
        n = self._unsettled[part] - 1
        self._unsettled[part] = n
        if not n and part in self.own.releasing:
            self.kick()

    def kick(self) -> None:
        """Run the next round now (a partition may be released)."""
        fut = self._wake
        if fut is None:
            self._kicked = True
        elif not fut.done():
            fut.set_result(None)

    async def _run(self) -> None:
        """Keep the membership and the partitions until no consumer is left
        and every partition is given back."""
        own = self.own
        me = self._me
        lease = self._lease
        loop = asyncio.get_running_loop()
        while True:
            leaving = self._consumers == 0
            if leaving:
                own.releasing = set(own.owned)
            give_back = [
                p for p in own.releasing if not self._unsettled.get(p) and not self._reading.get(p)
            ]
            # not a partition dropped at a lapse while a claim of it begun
            # before is under way: what that claim leases must be in ``ready``
            busy = [p for p, n in self._reading.items() if n and p not in own.owned]
            now = self._now()
            sent = self._monotonic()
            try:
                members, mine, taken = await self._submit(
                    self._database.keep_partitions,
                    self.gid,
                    me,
                    now,
                    lease,
                    sorted(own.owned),
                    give_back,
                    leaving,
                    busy,
                )
            except TransportError as exc:
                # the leases run on meanwhile: the next round renews them in
                # time, or learns which were lost (claims check them anyway)
                log.warning("sqlite: cannot keep the partitions of %s: %s", self.group, exc)
                wait = lease / 10
            else:
                own.lost([p for p in own.owned if p not in mine])
                for p in self.fencing.renewed(sent, mine, (p for p, _ in taken)):
                    self.fence(p)  # renewed only after its window ended
                for p, at in taken:
                    self._ready[p] = at
                    self._unsettled.setdefault(p, 0)
                own.acquired(p for p, _ in taken)
                if leaving:
                    if not own.owned:
                        return
                    own.releasing = set(own.owned)
                else:
                    own.plan(members, me)
                if taken:
                    self._on_taken()
                complete = not own.releasing and own.owned == assignment(
                    members, me, own.partitions
                )
                # every lease/3 from one round's start to the next: a slow
                # round must not eat into the window the fence counts
                since = self._monotonic() - sent
                # Incomplete: a partition this member wants is still another's
                # (it gives a partition back once what it read is settled,
                # and tells this process nothing): look again soon, or the
                # partition is nobody's until the next round (a worker
                # joining under load: lease/10, 3 s by default, in which
                # the partition's keys waited and the shop's admission shed)
                wait = (
                    max(lease / 30, lease / 3 - since) if complete else min(lease / 10, _HANDOVER)
                )
            if self._kicked:
                self._kicked = False
                continue
            self._wake = fut = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, wait)
            self._wake = None
            self._kicked = False
