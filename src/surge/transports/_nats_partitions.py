"""Partitions of the NATS transport: subjects, consumers, leases, handing over.

A keyed envelope is published on ``<stream>_k.<p>.<topic>`` (p =
``partition_of(key)``), an unkeyed one on ``<stream>.<topic>`` as before, so
the subject alone routes it and publishing needs no knowledge of groups.
Each durable group has, besides its shared consumer (unkeyed subjects and
its replay subject, read by every worker), one durable pull consumer per
partition (``<durable>-p<p>``, filter ``<stream>_k.<p>.<topic>`` for each
topic), pulled only by the worker holding that partition's lease. Ephemeral
groups (reply inboxes) filter ``<stream>_k.*.<topic>`` too: never
partitioned. All of them exist from ``declare`` on: under interest
retention a message that no consumer matches is not kept.

Leases and memberships live in the key-value bucket ``<stream>_parts``
whose entries expire ``lease`` after their last write (the bucket's max
age, on the server's clock). A consumer ``put``s ``m.<durable>.<me>`` every
lease/3 while it consumes and lists the live members with one stream-info
request (purged, not deleted, at leave: no tombstone to skip). The lease
of partition p is ``l.<durable>.<p>``: taken with ``create`` (only if
absent), renewed with ``update(last=revision)``, released with
``delete(last=revision)``; a lease that cannot be renewed is lost. A
leaver removes its membership before releasing its leases, and every
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
  (the previous owner died, or a late pull reached it) the new owner holds
  what it reads from the partition until the expected redeliveries have
  arrived (at most a lease: the dead owner's AckWait ran out by then), then
  hands everything out sorted by stream sequence. A NAK with a delay
  (retries, ``not_before``) is pending too: it can hold a takeover for up
  to a lease, and a retried event may come after later ones of its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import StorageType

from .._transport import Delivery

if TYPE_CHECKING:
    from ._nats import NatsTransport
    from ._nats_consume import Group

__all__ = ("Hold", "Leases", "Source", "balance_loop", "leave", "partition_durable")

log = logging.getLogger("surge.nats")


def partition_durable(durable: str, part: int) -> str:
    """The consumer name of partition ``part`` of the group named ``durable``."""
    return f"{durable}-p{part}"


class Hold:
    """Deliveries of a newly acquired partition kept back until the previous
    owner's pending ones have come back (or a lease has passed)."""

    __slots__ = ("expect", "floor", "items", "seen", "until")

    def __init__(self, until: float, floor: int, expect: int) -> None:
        self.until = until
        self.floor = floor  # the consumer's last delivered stream seq at takeover
        self.expect = expect  # deliveries pending elsewhere at takeover
        self.seen: set[int] = set()
        self.items: list[tuple[int, Delivery]] = []


class Source:
    """One JetStream consumer a group pulls from: the shared one (``part``
    None) or one partition's."""

    __slots__ = (
        "durable",
        "held",
        "hold",
        "last_seen",
        "outstanding",
        "part",
        "recreate",
        "stalled",
        "token",
    )

    def __init__(self, durable: str, part: int | None) -> None:
        self.durable = durable
        self.part = part
        self.token = "s" if part is None else str(part)  # last token of its pulls' reply
        self.outstanding = 0
        self.held = 0  # deliveries read from it and not settled
        self.hold: Hold | None = None
        self.last_seen = 0.0
        self.stalled = False
        self.recreate = False


class Leases:
    """Memberships and partition leases of one transport in its bucket."""

    def __init__(self, t: NatsTransport) -> None:
        self.t = t
        self.bucket = f"{t.stream}_parts"
        self.kv_stream = f"KV_{self.bucket}"
        self.me = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._kv: Any = None
        self._revs: dict[str, int] = {}
        self.known: dict[str, set[str]] = {}  # durable -> members seen last

    async def _open(self) -> Any:
        if self._kv is not None:
            return self._kv
        js = self.t._js
        try:
            kv = await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(
                bucket=self.bucket, ttl=self.t.lease, history=1, storage=StorageType.FILE
            )
        info = await js.stream_info(self.kv_stream)
        if info.config.max_age != self.t.lease:
            info.config.max_age = self.t.lease
            info.config.duplicate_window = min(self.t.lease, 120.0)
            await js.update_stream(info.config)
        self._kv = kv
        return kv

    def lease_key(self, durable: str, part: int) -> str:
        return f"l.{durable}.{part}"

    async def members(self, durable: str) -> list[str]:
        """Renew this consumer's membership; the live members (with it)."""
        kv = await self._open()
        await kv.put(f"m.{durable}.{self.me}", b"")
        prefix = f"$KV.{self.bucket}.m.{durable}."
        info = await self.t._js.stream_info(self.kv_stream, subjects_filter=prefix + "*")
        members = [s[len(prefix) :] for s in info.state.subjects or ()]
        known = self.known.setdefault(durable, set())
        known.clear()
        known.update(members)
        return members

    async def leave(self, durable: str) -> None:
        await self._open()
        await self.t._js.purge_stream(
            self.kv_stream, subject=f"$KV.{self.bucket}.m.{durable}.{self.me}"
        )

    async def _mine(self, kv: Any, key: str) -> int | None:
        """The revision of ``key`` if it holds this consumer's lease: a write
        whose answer was lost (cancelled at close, a dropped reply) left it
        at a revision this consumer did not see."""
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        rev: int = entry.revision
        return rev if entry.value == self.me.encode() else None

    async def acquire(self, durable: str, part: int) -> bool:
        kv = await self._open()
        key = self.lease_key(durable, part)
        try:
            self._revs[key] = await kv.create(key, self.me.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            rev = await self._mine(kv, key)
            if rev is None:
                return False
            self._revs[key] = rev
        return True

    async def renew(self, durable: str, part: int) -> bool:
        kv = await self._open()
        key = self.lease_key(durable, part)
        rev = self._revs.pop(key, None)
        for _ in range(2):
            if rev is None:
                return False
            try:
                self._revs[key] = await kv.update(key, self.me.encode(), last=rev)
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
                rev = await self._mine(kv, key)
                continue
            return True
        return False

    async def release(self, durable: str, part: int) -> None:
        """Compare-and-delete: a lease someone else holds now stays theirs."""
        kv = await self._open()
        key = self.lease_key(durable, part)
        rev = self._revs.pop(key, None) or await self._mine(kv, key)
        for _ in range(2):
            if rev is None:
                return
            try:
                await kv.delete(key, last=rev)
            except nats.js.errors.APIError:
                rev = await self._mine(kv, key)
                continue
            return


async def _return(t: NatsTransport, g: Group) -> None:
    """NAK, in stream order, what came back to partitions whose pull ended."""
    if not g.returning or not (g.consuming or g.handed_back):
        return
    ready = [tok for tok in g.returning if tok in g.held and not g.held[tok].outstanding]
    if ready:
        done = set(ready)
        g.returning = [tok for tok in g.returning if tok not in done and tok in g.held]
        await t._hand_back(g, ready)


def drained(src: Source) -> bool:
    """Nothing read from ``src`` is unsettled and no pull of it is open."""
    return src.held == 0 and src.outstanding == 0


async def balance(t: NatsTransport, g: Group) -> None:
    """One round: membership, leases renewed, given up, taken."""
    own = g.own
    assert own is not None
    leases = t._leases
    if g.consuming:
        g.member = True
        members = await leases.members(g.durable)
        acquire, give_up = own.plan(members, leases.me)
    else:
        if g.member:
            await leases.leave(g.durable)
            g.member = False
        acquire, give_up = [], sorted(own.owned)
        own.releasing = set(give_up)
    await _return(t, g)
    lost = [p for p in sorted(own.owned) if not await leases.renew(g.durable, p)]
    if lost:
        log.warning("%s lost the lease of partitions %s", g.name, lost)
        own.lost(lost)
    for p in give_up:
        if p in own.owned and drained(g.parts[p]):
            await leases.release(g.durable, p)
            own.lost((p,))
    for p in acquire:
        if await leases.acquire(g.durable, p):
            await _take_over(t, g, g.parts[p])
            own.acquired((p,))
    if acquire:
        g.wake()
    await _check_holds(t, g)


async def _take_over(t: NatsTransport, g: Group, src: Source) -> None:
    """Hold the partition back if its consumer has deliveries pending that
    this process does not hold (see the module docstring)."""
    info = await t._js.consumer_info(t.stream, src.durable)
    elsewhere = (info.num_ack_pending or 0) - src.held
    if elsewhere > 0:
        floor = info.delivered.stream_seq if info.delivered is not None else 0
        src.hold = Hold(t.clock.monotonic() + t.lease, floor, elsewhere)


async def _check_holds(t: NatsTransport, g: Group) -> None:
    for src in g.parts:
        hold = src.hold
        if hold is None:
            continue
        if t.clock.monotonic() < hold.until:
            info = await t._js.consumer_info(t.stream, src.durable)
            if (info.num_ack_pending or 0) > src.held:
                continue
        end_hold(g, src)


def take(g: Group, src: Source, seq: int, d: Delivery) -> bool:
    """Keep ``d`` back if ``src`` is held; True when kept."""
    hold = src.hold
    if hold is None:
        return False
    hold.items.append((seq, d))
    if seq <= hold.floor:
        hold.seen.add(seq)
        if len(hold.seen) >= hold.expect:
            end_hold(g, src)
    return True


def end_hold(g: Group, src: Source) -> None:
    """Hand out what the hold kept, in stream order."""
    hold, src.hold = src.hold, None
    if hold is not None and hold.items:
        hold.items.sort(key=lambda item: item[0])
        g.buffer.extend(d for _, d in hold.items)
        g.wake()


async def balance_loop(t: NatsTransport, g: Group) -> None:
    """Keep ``g``'s partitions balanced until the transport closes, or until
    its consumer ended and every partition is handed over.

    A round runs every lease/3, and at once when the bucket shows a lease
    released or a member unknown so far (a core subscription to the
    bucket's subjects: a handover does not wait for the next round).
    """
    period = t.lease / 3
    prefix = f"$KV.{t._leases.bucket}."
    known = t._leases.known.setdefault(g.durable, set())

    async def on_change(msg: Msg) -> None:
        kind, _, rest = msg.subject[len(prefix) :].partition(".")
        if kind == "l":
            if (msg.headers or {}).get("KV-Operation") == "DEL":
                g.rebalance.set()
        elif rest.rpartition(".")[2] not in known:
            g.rebalance.set()

    sub = await t._nats().subscribe(f"{prefix}*.{g.durable}.*", cb=on_change)
    task = asyncio.current_task()
    try:
        while not t._closed:
            if task is not None and task.cancelling():
                raise asyncio.CancelledError  # a cancel a client call swallowed
            g.rebalance.clear()
            try:
                await balance(t, g)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("balancing the partitions of %s failed: %r", g.name, exc)
            own = g.own
            assert own is not None
            if not g.consuming and not own.owned and not g.member:
                return
            busy = own.releasing or any(s.hold is not None for s in g.parts)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(period, 0.1) if busy else period):
                    await g.rebalance.wait()
    finally:
        if not t._closed:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


async def leave(t: NatsTransport, g: Group) -> None:
    """At close: once the partitions' pulls ended, hand back what is left of
    them in stream order, remove the membership, release the leases."""
    g.handed_back = True
    deadline = t.clock.monotonic() + t.part_expires + 0.5
    while any(s.outstanding for s in g.parts) and t.clock.monotonic() < deadline:
        await t.clock.sleep(0.02)
    for src in g.parts:
        if src.hold is not None:
            end_hold(g, src)
    back = {d.token for d in g.buffer}
    back.update(tok for tok, src in g.held.items() if src.part is not None)
    g.buffer.clear()
    g.returning.clear()
    await t._hand_back(g, list(back))
    own = g.own
    if own is None:
        return
    leases = t._leases
    if g.member:  # first: whoever sees a lease released must not count us
        await leases.leave(g.durable)
        g.member = False
    for p in sorted(own.owned):
        await leases.release(g.durable, p)
    own.lost(list(own.owned))
