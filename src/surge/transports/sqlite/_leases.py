"""What this process holds: its consumers, and a lease per claimed delivery.

A claim gives each delivery a lease (its row, the claim's token): acks,
nacks and extensions name the token, so a consumer that lost its lease
cannot settle a row another consumer now holds. :class:`Leases` keeps the
unsettled leases of the transport (extended by the heartbeat, handed back
at close); each :class:`Lease` counts itself against its :class:`Consumer`'s
room and, for a partition's delivery, against the partition's
:class:`~._ownership.Member` (a partition is released only once nothing
read from it is unsettled).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._ownership import Member

__all__ = ("Consumer", "Lease", "Leases")


class Consumer:
    """One ``consume`` iterator: its room, its wake-up, its group's member."""

    __slots__ = ("_kicked", "_wake", "gid", "member", "prefetch", "unsettled")

    def __init__(self, gid: int, prefetch: int, member: Member | None) -> None:
        self.gid = gid
        self.prefetch = prefetch
        self.member = member
        self.unsettled = 0
        self._wake: asyncio.Future[None] | None = None
        self._kicked = False  # woken while not napping: the next nap returns at once

    def wake(self) -> None:
        """End the current nap, or the next one at once."""
        fut = self._wake
        if fut is None:
            self._kicked = True
            return
        self._wake = None
        if not fut.done():
            fut.set_result(None)

    async def nap(self, timeout: float | None) -> bool:
        """Wait for ``wake`` or ``timeout`` seconds; True when woken."""
        if self._kicked:
            self._kicked = False
            return True
        fut = self._wake = asyncio.get_running_loop().create_future()
        if timeout is None:
            await fut
            return True
        done, _ = await asyncio.wait((fut,), timeout=max(0.0, timeout))
        self._wake = None
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
        consumer.unsettled += 1
        if part is not None and consumer.member is not None:
            consumer.member.held(part)

    def settle(self) -> None:
        self.settled = True
        c = self.consumer
        c.unsettled -= 1
        if self.part is not None and c.member is not None:
            c.member.settled(self.part)
        c.wake()


class Leases:
    """The unsettled leases of one transport, by row."""

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows: dict[int, Lease] = {}

    def add(self, lease: Lease) -> None:
        self._rows[lease.did] = lease

    def settle(self, lease: Lease) -> bool:
        """Settle ``lease`` here (its consumer gets room); False when it was
        settled before (a second ack, a hand-back racing a nack)."""
        if lease.settled:
            return False
        lease.settle()
        if self._rows.get(lease.did) is lease:
            del self._rows[lease.did]
        return True

    def of(self, member: Member, part: int) -> list[Lease]:
        """The unsettled leases of ``member``'s partition ``part``."""
        return [
            lease
            for lease in self._rows.values()
            if lease.part == part and lease.consumer.member is member
        ]

    def held(self) -> list[tuple[int, int]]:
        """(row, token) of every unsettled lease."""
        return [(lease.did, lease.token) for lease in self._rows.values()]

    def drop_all(self) -> list[tuple[int, int]]:
        """Forget every lease (the transport is closing); (row, token) of
        those not settled, to hand back."""
        held = [(lease.did, lease.token) for lease in self._rows.values() if not lease.settled]
        self._rows.clear()
        return held
