"""Partition ownership of the NATS transport: who reads which partition of
each group, and how a partition changes hands.

A keyed envelope is published on ``<stream>_k.<p>.<topic>`` (p =
``partition_of(key)``), an unkeyed one on ``<stream>.<topic>``, so the
subject alone routes it and publishing needs no knowledge of groups. Each
durable group has, besides its shared consumer (unkeyed subjects and its
replay subject, read by every worker), one durable pull consumer per
partition (``<durable>-p<p>``, filter ``<stream>_k.<p>.<topic>`` for each
topic), pulled only by the worker holding that partition's lease
(:class:`~._leases.Leases`). Ephemeral groups (reply inboxes) filter
``<stream>_k.*.<topic>`` too: never partitioned. All of them exist from
``declare`` on: under interest retention a message that no consumer
matches is not kept.

A leaver removes its membership before releasing its leases, and every
member listens to the bucket's subjects (core NATS): a lease released, or a
member not seen before, starts a round at once, so a graceful handover
does not wait for the next lease/3 round.

Order at a handover. JetStream hands a consumer's redeliveries (a NAK it
has processed, an expired AckWait, sorted by sequence) to the next pull
before anything new, so a partition consumer gives its owner the partition
in stream order, provided nothing of the previous owner is still
outstanding when the new owner starts pulling. Hence:

- giving up: no new pulls; the lease is released once the partition's pull
  has ended (pulls of a partition are short, ``part_expires``, one at a
  time) and nothing read from it is unsettled;
- stopping: deliveries handed back (``release``, what was fetched but not
  handed out, and what the open pull still brings) are NAKed in stream
  order once that pull has ended (a NAK while it is open would come
  straight back to it), each confirmed by the server, and before the lease
  is released, so they are the first redeliveries the next owner gets;
- taking over: if the consumer has deliveries pending with someone else
  (the previous owner died, or its lease lapsed in an election while it
  lived) or another pull waiting (the previous owner's, still open), the
  new owner holds what it reads from the partition; and from the takeover
  on it follows the consumer sequence of each delivery (``Group.follow``):
  one skipped went to another pull (the consumer hands deliveries to the
  waiting pulls in turn) or was lost on the way, and holds the partition
  too. A hold ends once every delivery the consumer made is settled or in
  this process's hands and no other pull waits on it (consumer info:
  ``delivered.consumer_seq``, ``num_ack_pending``, ``num_waiting``, each
  round), and hands everything out sorted by stream sequence; so a
  redelivery an election delays is waited for, however long. A NAK with a
  delay (a retry, a ``not_before`` deferral) is pending too, and JetStream
  does not say which pending delivery is one: once the consumer's leader
  has answered for a whole AckWait (a lease) since the hold began (or since
  the last skip seen, or the last change of leader) and a pull asked for
  after that has expired before its batch was full, whatever is still
  pending elsewhere can only be such a NAK, and the hold ends. (Expired
  unfilled, not just ended: JetStream serves redeliveries before anything
  new, so only such a pull says none is left queued on the server; one
  that filled its batch may have left expired deliveries of the previous
  owner queued behind it, older than what the hold kept, and ending the
  hold then broke order: 45 queued in a crash run.) Under a backlog every
  pull fills, so a pull that brought a first delivery (none was queued
  when the server served it) counts too, once it was asked for a second
  AckWait later: that margin covers the server's redelivery timer running
  up to an AckWait late, and bounds such a hold at about two AckWaits
  rather than ``max_ack_pending`` deliveries. That retried event may come after later
  ones of its key, as a retry may on one owner. That bound stands because
  an owner whose lease may have lapsed (2/3 of a lease after its last
  renewal was sent: ``Consumer.fenced``) neither pulls the partition nor
  extends its deliveries' AckWait any more. A partition being given up
  while held NAKs what its hold kept, in order, for the next owner, and
  after it what its open pull still brings (handed out here, that would
  start before them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo

from ..._clock import Clock
from ._connection import Connection
from ._groups import Group, Hold, Source
from ._leases import Leases
from ._options import NatsOptions
from ._released import Released

__all__ = ("Balancer", "ended")

log = logging.getLogger("surge.nats")


class Balancer:
    """Keeps each consuming group's partitions balanced among its live
    members, one task per group, and hands them over at close."""

    def __init__(
        self,
        conn: Connection,
        leases: Leases,
        options: NatsOptions,
        clock: Clock,
        released: Released,
    ) -> None:
        self._conn = conn
        self._leases = leases
        self._released = released
        self._stream = options.stream
        self._lease = options.lease
        self._part_expires = options.part_expires
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._members: set[str] = set()  # groups this process is a member of

    def start(self, g: Group) -> None:
        """Balance ``g`` (a consumer of it started) unless already at it."""
        task = self._tasks.get(g.name)
        if g.own is not None and (task is None or task.done()):
            self._tasks[g.name] = asyncio.get_running_loop().create_task(
                self._run(g), name=f"surge-nats-balance-{g.name}"
            )

    async def stop(self) -> None:
        """Stop balancing (partitions stay held: see :meth:`leave`)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await ended(tasks, "balancing")

    async def leave(self, groups: Sequence[Group]) -> None:
        """Hand every group's partitions over, all at once, within
        ``part_expires`` + 2 s: what is not handed over in time goes to the
        next owner after the lease."""
        try:
            async with asyncio.timeout(self._part_expires + 2.0):
                done = await asyncio.gather(
                    *(self._leave(g) for g in groups), return_exceptions=True
                )
        except TimeoutError:
            done = [TimeoutError()]
        for exc in done:
            if isinstance(exc, Exception):
                log.warning("could not hand every partition over at close: %r", exc)

    async def _run(self, g: Group) -> None:
        """Keep ``g``'s partitions balanced until the transport closes, or
        until its consumer ended and every partition is handed over.

        A round runs every lease/3, and at once when the bucket shows a
        lease released or a member unknown so far (a core subscription to
        the bucket's subjects: a handover does not wait for the next round).
        """
        period = self._lease / 3
        prefix = self._leases.prefix
        leases = self._leases

        async def on_change(msg: Msg) -> None:
            kind, _, rest = msg.subject[len(prefix) :].partition(".")
            if kind == "l":
                if (msg.headers or {}).get("KV-Operation") == "DEL":
                    g.rebalance.set()
            elif not leases.is_known(g.durable, rest.rpartition(".")[2]):
                g.rebalance.set()

        sub = await self._conn.client().subscribe(f"{prefix}*.{g.durable}.*", cb=on_change)
        task = asyncio.current_task()
        own = g.own
        assert own is not None
        try:
            while self._conn.open:
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError  # a cancel a client call swallowed
                g.rebalance.clear()
                try:
                    await self._round(g)
                except (nats.errors.Error, TimeoutError) as exc:
                    log.warning("balancing the partitions of %s failed: %r", g.name, exc)
                if not g.consuming and not own.owned and g.name not in self._members:
                    return
                busy = own.releasing or any(s.hold is not None for s in g.parts)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(period, 0.1) if busy else period):
                        await g.rebalance.wait()
        finally:
            if self._conn.open:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    async def _round(self, g: Group) -> None:
        """One round: membership, leases renewed, given up, taken."""
        own = g.own
        assert own is not None
        leases = self._leases
        if g.consuming:
            self._members.add(g.name)
            members = await leases.members(g.durable)
            acquire, give_up = own.plan(members, leases.me)
        else:
            if g.name in self._members:
                await leases.leave(g.durable)
                self._members.discard(g.name)
            acquire, give_up = [], sorted(own.owned)
            own.releasing = set(give_up)
        ready = g.returnable()
        if ready:
            await g.hand_back(self._conn, self._released, ready)
        # Fencing (``Consumer.fenced``): a lease written by a request sent at
        # ``sent`` lasts on the server until ``sent + lease`` at least.
        safe = self._lease * 2 / 3
        clock = self._clock
        lost = []
        for p in sorted(own.owned):
            sent = clock.monotonic()
            if await leases.renew(g.durable, p):
                g.parts[p].valid_until = sent + safe
            else:
                lost.append(p)
        if lost:
            # As at a fence: what this process read of them is forgotten,
            # unsettled, for their owner now. Left held, it would pass the
            # fence at its start if the partition came back here first, and
            # run after what the other owner started meanwhile.
            left = sum(g.fence(g.parts[p]) for p in lost)
            log.warning(
                "%s lost the lease of partitions %s: its %d deliveries here are left to "
                "their owner",
                g.name,
                lost,
                left,
            )
            own.lost(lost)
        gone = []
        for p in give_up:
            if p in own.owned and g.parts[p].drained:
                await leases.release(g.durable, p)
                own.lost((p,))
                gone.append(p)
        if gone:
            log.info("%s: gave partitions %s up", g.name, gone)
        for p in acquire:
            sent = clock.monotonic()
            if await leases.acquire(g.durable, p):
                g.parts[p].valid_until = sent + safe
                await self._take_over(g, g.parts[p])
                own.acquired((p,))
        if acquire:
            g.wake()
        await self._check_holds(g)

    async def _take_over(self, g: Group, src: Source) -> None:
        """Hold the partition back if its consumer has deliveries pending
        that this process does not hold, or another pull waiting (see the
        module docstring); from here on, a delivery of it missing here
        holds it too (``Group.follow``)."""
        info = await self._conn.js.consumer_info(self._stream, src.durable)
        src.cseq = info.delivered.consumer_seq if info.delivered is not None else 0
        src.given_back = False
        pending, waiting = info.num_ack_pending or 0, info.num_waiting or 0
        if pending > src.held or waiting > 0:
            src.hold = Hold(self._clock.monotonic(), _leader(info))
        log.info(
            "%s: took partition %d (%d deliveries pending, %d here, %d pulls waiting%s)",
            g.name,
            src.part,
            pending,
            src.held,
            waiting,
            "; holding it until they are back" if src.hold is not None else "",
        )

    async def _check_holds(self, g: Group) -> None:
        """End each hold whose deliveries have come back (every delivery its
        consumer made is settled or here, and no other pull waits on it), or
        that has waited out an AckWait of the consumer's leader and then a
        pull that found nothing left to give (it expired before its batch
        was full), or two AckWaits and then a pull that brought a first
        delivery (JetStream serves expired deliveries before new ones, and
        under a steady backlog every pull fills): what is still pending
        elsewhere then can only be a NAK with a delay (a retry, a
        ``not_before``), which may come after later events of its key. A
        partition being given up hands its hold's back."""
        own = g.own
        assert own is not None
        for src in g.parts:
            hold = src.hold
            if hold is None:
                continue
            if src.part in own.releasing:
                g.give_back_held(src)
                continue
            now = self._clock.monotonic()
            # what this process had before asking: the answer may predate
            # deliveries that arrive while it is on its way
            cseq, held, pulling = src.cseq, src.held, src.outstanding > 0
            try:
                info = await self._conn.js.consumer_info(self._stream, src.durable)
            except (nats.errors.Error, TimeoutError):
                hold.since = now  # its leader may be changing: its timers with it
                raise
            leader = _leader(info)
            if hold.leader is not None and leader != hold.leader:
                hold.since = now
            hold.leader = leader
            if src.hold is not hold:  # ended while we asked
                continue
            delivered = info.delivered.consumer_seq if info.delivered is not None else 0
            pending = info.num_ack_pending or 0
            if (
                cseq is not None
                and delivered <= cseq
                and pending <= held
                and (info.num_waiting or 0) <= (1 if pulling else 0)
            ):
                log.debug(
                    "%s: partition %d's deliveries are back: handing out the %d held",
                    g.name,
                    src.part,
                    len(hold.items),
                )
                g.end_hold(src)
            elif (
                src.pull_dry >= hold.since + self._lease
                or src.pull_fresh >= hold.since + 2 * self._lease
            ):
                log.info(
                    "%s: %d deliveries of %s still pending elsewhere after its AckWait: "
                    "taken for NAKs with a delay; handing out what was held",
                    g.name,
                    pending - src.held,
                    src.durable,
                )
                g.end_hold(src)

    async def _leave(self, g: Group) -> None:
        """At close: once the partitions' pulls ended, hand back what is left
        of them in stream order, remove the membership, release the leases."""
        g.handed_back = True
        clock = self._clock
        deadline = clock.monotonic() + self._part_expires + 0.5
        while any(s.outstanding for s in g.parts) and clock.monotonic() < deadline:
            await clock.sleep(0.02)
        await g.hand_back(self._conn, self._released, g.take_back())
        own = g.own
        if own is None:
            return
        leases = self._leases
        if g.name in self._members:  # first: whoever sees a lease released must not count us
            await leases.leave(g.durable)
            self._members.discard(g.name)
        parts = sorted(own.owned)
        for p in parts:
            await leases.release(g.durable, p)
        own.lost(parts)
        if parts:
            log.info("%s: released partitions %s at close", g.name, parts)


def _leader(info: ConsumerInfo) -> str | None:
    """The server leading a consumer (None on a single server)."""
    return info.cluster.leader if info.cluster is not None else None


async def ended(tasks: list[asyncio.Task[None]], what: str) -> None:
    """Wait, boundedly, for cancelled ``tasks`` to end: a cancel that a
    client library swallowed must not hold up a worker's exit."""
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=2.0)
    if stuck:
        log.warning("nats: %d %s tasks did not stop at close", len(stuck), what)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failure at close is not news
