"""Partitions of the Redis transport: who reads which, and handing over.

A group's keyed envelopes go to ``{prefix}:p{n}:{group}`` (n =
``partition_of(key)``), each a stream with the group's consumer group, read
only by the consumer holding the lease ``{prefix}:o{n}:{group}`` (a key set
with NX and a PX expiry, renewed every lease/3). Members of the group renew
their score in the sorted set ``{prefix}:m:{group}`` (expiry on the server's
clock); each computes the same assignment from it (see
``surge.transports._partitions``). A partition is given up only once nothing
read from it is unsettled here and no read of it is in flight; the next owner
first claims whatever is still pending there, so one key's events are handled
one at a time, in order, across processes. A dead owner's partitions wait out
its lease, as its deliveries do.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aredis

from ..._clock import Clock
from .._partitions import Ownership
from ._connection import Connection
from ._inflight import Inflight
from ._keys import GroupKeys

__all__ = ("PartitionOwner",)

_CLAIM_PAGE = 1000


class PartitionOwner:
    """One consumer's partitions of one group: its membership, its leases,
    the read in flight, and the partitions whose pending entries it must
    claim again before reading them (``rescan``)."""

    __slots__ = (
        "_clock",
        "_conn",
        "_consumer",
        "_inflight",
        "_keys",
        "_lease_ms",
        "_own",
        "_reading",
        "_rescan",
        "_safe_for",
        "_valid",
        "_warned",
    )

    def __init__(
        self,
        conn: Connection,
        keys: GroupKeys,
        *,
        consumer: str,
        lease: float,
        inflight: Inflight,
        clock: Clock,
    ) -> None:
        self._conn = conn
        self._keys = keys
        self._consumer = consumer
        self._lease_ms = int(lease * 1000)
        self._inflight = inflight
        self._clock = clock
        self._own = Ownership(keys.parts)
        self._reading: set[int] = set()  # partitions of the reads in flight
        self._rescan: set[int] = set()  # owned partitions with entries pending, not held
        # Fencing: a lease renewed by a call sent at t expires on the server
        # no sooner than t + lease; this process starts a partition's
        # delivery only until t + 2/3 lease (renewals come every lease/3), so
        # a handler shorter than lease/3 ends before any other consumer can
        # own the partition, even when this one was cut off from Redis.
        self._safe_for = lease * 2 / 3
        self._valid: dict[int, float] = {}  # partition -> monotonic time its starts stop
        self._warned: set[int] = set()  # fenced partitions already logged

    @property
    def ownership(self) -> Ownership:
        return self._own

    def still_ours(self, token: bytes) -> bool:
        """The partition of ``token`` (a partition's entry) is still ours."""
        return int(token.partition(b"/")[0]) in self._own.owned

    def fenced(self, p: int) -> bool:
        """Partition ``p``'s lease may have expired (not renewed in time):
        start nothing more of it here."""
        return self._clock.monotonic() >= self._valid.get(p, 0.0)

    def first_fenced(self, p: int) -> bool:
        """True once per lapse of ``p``'s lease (to log it once)."""
        if p in self._warned:
            return False
        self._warned.add(p)
        return True

    # --- reads -----------------------------------------------------------------
    def readable(self) -> list[int]:
        """The partitions to read: owned, not being given up, with nothing
        pending to claim first, and not fenced (a lease that may have
        lapsed: what a read took then would be left pending to this
        consumer, after the next owner's takeover claim)."""
        now = self._clock.monotonic()
        valid = self._valid
        return sorted(p for p in self._own.readable - self._rescan if valid.get(p, 0.0) > now)

    def valid_ms(self, parts: list[int]) -> int:
        """Milliseconds until the first of ``parts`` is fenced: a blocking
        read of them must end by then (at least 1; Redis reads BLOCK 0 as
        for ever)."""
        now = self._clock.monotonic()
        valid = self._valid
        return max(1, int(min(valid.get(p, 0.0) - now for p in parts) * 1000))

    def begin_read(self, parts: list[int]) -> None:
        """A read of ``parts`` is on its way (they are not given up meanwhile)."""
        self._reading.update(parts)

    def end_read(self, parts: list[int], *, lost: bool) -> bool:
        """The read of ``parts`` is over. When its reply was ``lost`` (the read
        may have run on the server), their entries are pending to us but not
        held: claim them, in order, before reading these again. True when
        there is something to claim (wake the keeper)."""
        self._reading.difference_update(parts)
        rescan = lost and bool(parts)
        if rescan:
            self._rescan.update(parts)
        return rescan

    def redeliver(self, p: int) -> None:
        """A delivery of ``p`` was handed back and stays pending where it is:
        claim it again if ``p`` is still ours."""
        if p in self._own.owned:
            self._rescan.add(p)

    # --- membership and leases ---------------------------------------------------
    async def balance(self, r: aredis.Redis, *, leaving: bool) -> bool:
        """Renew membership and leases; take, keep and give up partitions
        (all of them when ``leaving``: the consumer stopped reading).

        True when the split is not done yet (a wanted partition is still held
        by its previous owner, or ours is to be given up): tick again soon."""
        own = self._own
        conn = self._conn
        me = self._consumer
        members = await conn.run(
            "balance",
            keys=[self._keys.members],
            args=[me, self._lease_ms, "1" if leaving else "0"],
            client=r,
        )
        acquire, give_up = own.plan([m.decode() for m in members], me, leaving=leaving)
        holds = self._inflight.holds_partition
        release = [p for p in give_up if p not in self._reading and not holds(p)]
        keep = [p for p in own.owned if p not in release]
        ops = [(p, "r") for p in keep] + [(p, "a") for p in acquire] + [(p, "d") for p in release]
        if not ops:
            return False
        sent = self._clock.monotonic()
        # With wait=N the leases are written as publishes and acks are: a
        # renewal counts once N replicas have it. Else a master's failover
        # can revert a lease to an older copy that runs out while its owner
        # still starts deliveries, and the partition has two owners at once
        # (seen: 8 per-key order violations through a slot master's kill).
        done = await conn.run(
            "own",
            keys=[self._keys.leases[p] for p, _ in ops],
            args=[me, self._lease_ms, *(op for _, op in ops)],
            client=r,
            replicated=True,
        )
        results = list(zip(ops, done, strict=True))
        lost = [p for (p, op), ok in results if op != "a" and (op == "d" or not ok)]
        gained = [p for (p, op), ok in results if op == "a" and ok]
        valid_until = sent + self._safe_for
        for (p, op), ok in results:
            if ok and op != "d":
                self._valid[p] = valid_until
                self._warned.discard(p)
        if lost:
            for p in lost:
                self._valid.pop(p, None)
            own.lost(lost)
            self._rescan -= set(lost)  # the next owner claims what is pending there
        for p in gained:
            # What the previous owner left unsettled comes before anything new.
            await self._claim_pending(p)
            own.acquired((p,))
        if leaving:
            self._rescan.clear()  # nobody reads a backlog now: the next owner claims them
        if not leaving:
            self._rescan.update(await self._stranded(gained))
        for p in sorted(self._rescan):
            if p in own.owned and p not in own.releasing:
                await self._claim_pending(p)
            self._rescan.discard(p)  # only once claimed: a failure leaves it for the next round
        if self._inflight.backlogged or gained:
            # wake the consumer: there is work, or a partition to read
            self._inflight.make_room()
        return len(gained) < len(acquire) or bool(own.releasing)

    async def _stranded(self, gained: list[int]) -> set[int]:
        """Owned partitions with entries pending to another consumer (one
        XPENDING summary each, pipelined per master). Only a partition's
        owner reads it, and a new owner claims what was pending at its
        takeover; but a previous owner that still believed in its lease
        can read entries after that claim (a failover that reverted the
        leases to an older copy), and, fenced, leave them pending to itself
        and never run them: nobody would. Seen: a Redis Cluster slot
        master killed under load, 8 entries of 4 partitions pending to the
        other worker for good, the drain stuck (CI, load 16)."""
        own = self._own
        parts = [p for p in sorted(own.owned) if p not in own.releasing and p not in gained]
        if not parts:
            return set()
        keys = self._keys
        replies = await self._conn.each([("XPENDING", keys.pstreams[p], keys.name) for p in parts])
        me = self._consumer.encode()
        stranded: set[int] = set()
        for p, reply in zip(parts, replies, strict=True):
            if isinstance(reply, dict):  # as redis-py parses the summary
                names = [c.get("name") for c in reply.get("consumers") or ()]
            elif isinstance(reply, list) and len(reply) == 4:
                names = [c[0] for c in reply[3] or ()]
            else:  # an error (the keeper's next round asks again)
                continue
            if any(name != me for name in names):
                stranded.add(p)
        return stranded

    async def _claim_pending(self, p: int) -> None:
        """Every unsettled entry of partition ``p`` not held here, oldest first,
        onto the backlog (page by page: a failure keeps what was taken)."""
        keys = self._keys
        stream = keys.pstreams[p]
        r = self._conn.client(stream)
        prefix = b"%d/" % p
        inflight = self._inflight
        start = "-"
        while True:
            pending: Any = await self._conn.cmd(
                r, "XPENDING", stream, keys.name, start, "+", _CLAIM_PAGE
            )
            counts = {e[0]: int(e[3]) for e in pending if prefix + e[0] not in inflight}
            if counts:
                me = self._consumer.encode()
                own = {e[0] for e in pending if e[1] == me}
                claimed: Any = await self._conn.cmd(
                    r, "XCLAIM", stream, keys.name, self._consumer, 0, *counts
                )
                inflight.queue(await inflight.take(claimed, counts, prefix, own))
            if len(pending) < _CLAIM_PAGE:
                return
            start = "(" + pending[-1][0].decode()

    async def leave(self) -> None:
        """Give up every partition and the membership (at close)."""
        r = self._conn.node()
        # Every partition, not only those we know we own: a lease taken by a
        # round that close() cancelled before it saw the reply is ours too. The
        # script deletes a lease only if it is ours.
        parts = range(self._own.partitions)
        await self._conn.run(
            "own",
            keys=[self._keys.leases[p] for p in parts],
            args=[self._consumer, self._lease_ms, *("d" for _ in parts)],
            client=r,
        )
        self._own.lost(parts)
        await self._conn.run(
            "balance",
            keys=[self._keys.members],
            args=[self._consumer, self._lease_ms, "1"],
            client=r,
        )
