"""Per-key order across processes: partitions of a group, each owned by one
consumer at a time.

A durable transport splits each group's keyed envelopes into ``partitions``
(``partition_of(envelope.key)``); unkeyed envelopes stay in the group's
shared queue, which every consumer reads. A partition is read by the one
consumer that holds its lease, so two events of one key are never handled
by two processes at once, and its owner hands them to the runner in order
(whose lanes keep that order within the process).

Who owns what is decided by every consumer on its own from the same facts:
the live members of the group (each renews a membership every lease/3) are
sorted, and partition ``p`` belongs to ``members[p % len(members)]``
(:func:`assignment`). A consumer releases a partition that is no longer its
own only once nothing it read from it is unsettled and no read of it is in
flight; the next owner then takes the lease and first claims whatever the
previous owner left pending (it died, or its lease ran out), so the next
events of a key wait for the earlier ones. A consumer that dies holds its
partitions until its lease runs out, as it holds its deliveries.

:class:`Ownership` is the local bookkeeping that the transports share; each
stores leases and memberships in its own broker. :class:`Fencing` is the
fence's (``surge.Fences``) for transports whose rounds renew every lease
at once (sqlite, postgres).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Literal

__all__ = ("DEFAULT_PARTITIONS", "Fencing", "Ownership", "assignment", "partition_of")

DEFAULT_PARTITIONS = 8


def partition_of(key: str, partitions: int) -> int:
    """The partition of ``key``: the same on every process and every run."""
    return zlib.crc32(key.encode()) % partitions


def assignment(members: Sequence[str], me: str, partitions: int) -> frozenset[int]:
    """The partitions ``me`` should own among ``members`` (any order)."""
    live = sorted(set(members) | {me})
    i = live.index(me)
    n = len(live)
    return frozenset(p for p in range(partitions) if p % n == i)


class Ownership:
    """One consumer's partitions of one group, and how they change.

    ``owned`` are the partitions whose lease this consumer holds and reads;
    ``releasing`` those it holds but should give up, read no more, and
    release once nothing of them is unsettled or being read.
    """

    __slots__ = ("_changed", "owned", "partitions", "releasing")

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.owned: set[int] = set()
        self.releasing: set[int] = set()
        self._changed = asyncio.Event()

    @property
    def readable(self) -> frozenset[int]:
        """The partitions to read from now."""
        return frozenset(self.owned - self.releasing)

    def plan(
        self, members: Sequence[str], me: str, *, leaving: bool = False
    ) -> tuple[list[int], list[int]]:
        """(to acquire, to give up) so as to own what ``assignment`` says,
        or nothing when ``leaving`` (the consumer stopped reading)."""
        want = frozenset() if leaving else assignment(members, me, self.partitions)
        acquire = sorted(p for p in want if p not in self.owned)
        give_up = sorted(p for p in self.owned if p not in want)
        self.releasing = set(give_up)
        return acquire, give_up

    def acquired(self, parts: Iterable[int]) -> None:
        new = set(parts) - self.owned
        if new:
            self.owned |= new
            self._notify()

    def lost(self, parts: Iterable[int]) -> None:
        """Released, or a lease that could not be renewed."""
        gone = set(parts) & self.owned
        if gone:
            self.owned -= gone
            self.releasing -= gone
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def changed(self) -> Coroutine[Any, Any, Literal[True]]:
        """An awaitable that returns at the next change of ``owned`` after
        this call (the call, not the await, marks the start: a change in
        between is not missed)."""
        return self._changed.wait()


class Fencing:
    """Until when each held partition's deliveries may start here, for
    ``surge.Fences``, and the lapses seen.

    A round that renews or takes a partition's lease, begun at ``sent``
    (the monotonic time it read before writing ``until = now + lease``),
    keeps the partition from any other consumer until ``sent + lease``;
    its deliveries start here only until ``sent + 2/3 lease``, so a handler
    shorter than lease/3 ends before then. ``count`` numbers the lapses, so
    a claim begun before a partition's lapse is told apart (:meth:`stale`).
    """

    __slots__ = ("_fenced_at", "_monotonic", "_safe", "_until", "count", "own")

    def __init__(self, own: Ownership, lease: float, monotonic: Callable[[], float]) -> None:
        self.own = own
        self._safe = lease * 2 / 3
        self._monotonic = monotonic
        self._until: dict[int, float] = {}
        self._fenced_at: dict[int, int] = {}
        self.count = 0

    def valid(self, part: int) -> bool:
        """Deliveries of ``part`` may start here now: it is held, and less
        than 2/3 of a lease passed since its lease was last written."""
        return part in self.own.owned and self._monotonic() < self._until.get(part, 0.0)

    def lapse(self, part: int) -> None:
        """``part``'s lease may have lapsed: count it, and drop the partition."""
        self.count += 1
        self._fenced_at[part] = self.count
        self._until.pop(part, None)
        self.own.lost((part,))

    def stale(self, part: int, count: int) -> bool:
        """A delivery of ``part`` leased by a claim begun when ``count``
        lapses were counted is from before a lapse of ``part``."""
        return self._fenced_at.get(part, 0) > count

    def renewed(self, sent: float, mine: Iterable[int], taken: Iterable[int]) -> list[int]:
        """A round begun at ``sent`` renewed ``mine`` (those still held count)
        and took ``taken``: their windows now end 2/3 of a lease after
        ``sent``. The partitions renewed only after their window had ended
        (they lapsed meanwhile: to fence) are returned."""
        until, owned = self._until, self.own.owned
        for p in [p for p in until if p not in owned]:
            del until[p]  # released, lost or fenced
        end = sent + self._safe
        late = []
        for p in mine:
            if p not in owned:
                continue  # dropped at a lapse during the round
            if sent >= until.get(p, 0.0):
                late.append(p)
            else:
                until[p] = end
        for p in taken:
            until[p] = end
        return late
