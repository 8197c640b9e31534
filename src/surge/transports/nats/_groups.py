"""A consumer group as this process sees it: the JetStream consumers it
pulls from (:class:`Source`), what it read and has not settled, what a
newly taken partition keeps back (:class:`Hold`), and its partition
ownership. Shared by the consumer (which pulls and settles) and the
balancer (which moves partitions), each through these methods."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from nats.aio.subscription import Subscription

from ..._transport import Delivery
from .._partitions import Ownership
from ._connection import Connection
from ._layout import consumer_name, partition_durable

if TYPE_CHECKING:
    from ._released import Released

__all__ = ("Group", "Hold", "Source", "ack_info", "ack_meta")

log = logging.getLogger("surge.nats")


def ack_meta(reply: str) -> tuple[int, int, float]:
    """(num_delivered, stream sequence, stored time) from an ack subject."""
    _, delivered, seq, _, stored = ack_info(reply)
    return delivered, seq, stored


def ack_info(reply: str) -> tuple[str, int, int, int, float]:
    """(consumer, num_delivered, stream sequence, consumer sequence, stored
    time) from an ack subject."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or
    # the v2 form with domain and account hash tokens after ACK.
    t = reply.split(".")
    i = 3 if len(t) == 9 else 5
    return t[i], int(t[i + 1]), int(t[i + 2]), int(t[i + 3]), int(t[i + 4]) / 1e9


class Hold:
    """Deliveries of a partition kept back, while some delivery of its
    consumer may be in another process's hands (just taken over, or one of
    its deliveries went to another pull), until they have come back (see
    ``_balancer``)."""

    __slots__ = ("items", "leader", "since")

    def __init__(self, since: float, leader: str | None) -> None:
        # since when the consumer's leader (``leader``) has been answering:
        # a delivery in another process's hands then is redelivered within
        # its AckWait (a lease) of it
        self.since = since
        self.leader = leader
        self.items: list[tuple[int, Delivery]] = []


class Source:
    """One JetStream consumer a group pulls from: the shared one (``part``
    None) or one partition's."""

    __slots__ = (
        "cseq",
        "durable",
        "given_back",
        "held",
        "hold",
        "last_seen",
        "outstanding",
        "part",
        "pull_dry",
        "pull_fresh",
        "pull_no",
        "pull_sent",
        "recreate",
        "stalled",
        "token",
        "valid_until",
    )

    def __init__(self, durable: str, part: int | None) -> None:
        self.durable = durable
        self.part = part
        self.token = "s" if part is None else str(part)  # last token of its pulls' reply
        self.outstanding = 0  # messages asked for by open pulls
        self.held = 0  # deliveries read from it and not settled
        self.hold: Hold | None = None
        # A partition's, while owned: the consumer sequence of the last
        # delivery of it seen here (from the takeover's consumer info on);
        # a delivery past the next one shows that one went to another pull.
        self.cseq: int | None = None
        # A partition's, while being given up: its hold was given back
        # (``Group.give_back_held``), so what its open pull still brings
        # goes back too, after it.
        self.given_back = False
        self.pull_sent = 0.0  # when the last pull was asked for (monotonic)
        # A partition's: the number of its last pull, the last token of that
        # pull's reply subject, so that the status of a pull given up (the
        # silence check) is told from the current one's
        self.pull_no = 0
        # when the last pull that expired before its batch was full was
        # asked for: the consumer had nothing left for it then, no
        # redelivery either (JetStream serves those first)
        self.pull_dry = 0.0
        # when the last pull that brought a first delivery was asked for: no
        # redelivery was queued when the server served it (it serves those
        # first), if its redelivery timer was on time
        self.pull_fresh = 0.0
        self.last_seen = 0.0
        self.stalled = False
        self.recreate = False
        # A partition's: the monotonic time until which its deliveries may
        # start here (fencing: 2/3 of a lease after its lease's last write
        # was sent; see ``Consumer.fenced``).
        self.valid_until = 0.0

    @property
    def drained(self) -> bool:
        """Nothing read from it is unsettled and no pull of it is open."""
        return self.held == 0 and self.outstanding == 0


class Group:
    """One consumer group as this process sees it."""

    __slots__ = (
        "buffer",
        "by_durable",
        "consuming",
        "deferred",
        "durable",
        "ephemeral",
        "errors",
        "handed_back",
        "held",
        "inbox",
        "name",
        "own",
        "parts",
        "prefetch",
        "psub",
        "rebalance",
        "returning",
        "scheduled",
        "shared",
        "sources",
        "sub",
        "subjects",
        "topics",
        "waiter",
    )

    def __init__(self, name: str, ephemeral: bool, partitions: int) -> None:
        self.name = name
        self.durable = consumer_name(name)
        self.ephemeral = ephemeral
        self.topics: list[str] = []
        self.subjects: list[str] = []
        self.shared = Source(self.durable, None)
        self.parts: list[Source] = []
        self.own: Ownership | None = None
        if not ephemeral:
            self.parts = [Source(partition_durable(self.durable, p), p) for p in range(partitions)]
            self.own = Ownership(partitions)
        self.sources = {s.token: s for s in (self.shared, *self.parts)}
        self.by_durable = {s.durable: s for s in self.sources.values()}
        self.sub: Subscription | None = None  # the shared consumer's pulls, while consuming
        self.psub: Subscription | None = None  # the partitions' pulls, until close
        self.inbox = ""
        self.consuming = False
        self.handed_back = False  # the consumer ended and the runner released its rest
        self.returning: list[str] = []  # partition deliveries to NAK once their pull ended
        self.buffer: deque[Delivery] = deque()
        self.held: dict[str, Source] = {}  # token -> source, read and not settled
        self.deferred: dict[int, int] = {}  # stream seq -> not_before deferrals
        self.scheduled: dict[int, float] = {}  # stream seq -> due (wall clock)
        self.prefetch = 0
        self.errors = 0
        self.waiter: asyncio.Future[None] | None = None
        self.rebalance = asyncio.Event()  # wakes the balancer: something may move

    def wake(self) -> None:
        """Wake the consume loop (a pull may be due, or a batch is ready)."""
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    @property
    def unsettled(self) -> bool:
        return bool(self.buffer or self.held)

    def forget(self, token: str) -> None:
        """A delivery is settled (or handed back)."""
        src = self.held.pop(token, None)
        if src is not None:
            src.held -= 1
            if src.part is not None and not src.held:
                self.rebalance.set()  # a partition being given up may be free now

    def fence(self, src: Source) -> int:
        """Forget every delivery of partition ``src`` read here and not
        settled (handed out, buffered or kept by its hold; not those waiting
        to be NAKed), unsettled on the server: its lease may have lapsed, so
        its next owner gets them. The count forgotten."""
        back = set(self.returning)
        tokens = [t for t, s in self.held.items() if s is src and t not in back]
        src.hold = None
        src.cseq = None
        if tokens:
            gone = set(tokens)
            self.buffer = deque(d for d in self.buffer if d.token not in gone)
            for t in tokens:
                self.forget(t)
        return len(tokens)

    def take(self, src: Source, seq: int, d: Delivery) -> bool:
        """Keep ``d`` back if ``src`` is held; True when kept."""
        hold = src.hold
        if hold is None:
            return False
        hold.items.append((seq, d))
        return True

    def follow(self, src: Source, cseq: int, now: float) -> None:
        """A delivery of owned partition ``src`` with consumer sequence
        ``cseq`` arrived: if one before it is missing here, the consumer
        handed it to another pull (an old owner's still open) or it was lost
        on the way; it comes back only once that process NAKs it or its
        AckWait ends, so hold the partition until then."""
        last = src.cseq
        if last is not None and cseq <= last:
            # a late one of a pull from before the takeover (or a consumer
            # leader that lost its last deliveries' state): no news
            return
        src.cseq = cseq
        if last is None or cseq == last + 1:
            return
        if src.hold is not None:
            src.hold.since = now  # its AckWait runs from now
        else:
            src.hold = Hold(now, None)
            self.rebalance.set()  # the balancer ends holds
            log.info(
                "%s: deliveries %d-%d of %s went elsewhere; holding the partition until "
                "they come back",
                self.name,
                last + 1,
                cseq - 1,
                src.durable,
            )

    def give_back_held(self, src: Source) -> None:
        """A held partition being given up: what its hold kept is NAKed once
        its pull ended (``returning``), for the next owner, rather than
        handed out here."""
        hold, src.hold = src.hold, None
        if hold is not None:
            # what the open pull still brings follows them (``Consumer._on_delivery``):
            # handed out here, it would start before them
            src.given_back = True
            self.returning += [d.token for _, d in sorted(hold.items, key=lambda i: i[0])]

    def end_hold(self, src: Source) -> None:
        """Hand out what the hold kept, in stream order."""
        hold, src.hold = src.hold, None
        if hold is not None and hold.items:
            hold.items.sort(key=lambda item: item[0])
            self.buffer.extend(d for _, d in hold.items)
            self.wake()

    def take_back(self) -> list[str]:
        """At close, what to hand back: every delivery fetched and not handed
        out (the buffer, what the holds kept) and every partition delivery
        read and not settled (what the open pulls brought)."""
        for src in self.parts:
            if src.hold is not None:
                self.end_hold(src)
        back = {d.token for d in self.buffer}
        back.update(tok for tok, src in self.held.items() if src.part is not None)
        self.buffer.clear()
        self.returning.clear()
        return list(back)

    def returnable(self) -> list[str]:
        """What came back to partitions whose pull has ended, to NAK now
        (taken off ``returning``)."""
        if not self.returning or not (self.consuming or self.handed_back):
            return []
        ready = [t for t in self.returning if t in self.held and not self.held[t].outstanding]
        if ready:
            done = set(ready)
            self.returning = [t for t in self.returning if t not in done and t in self.held]
        return ready

    async def hand_back(self, conn: Connection, released: Released, tokens: Iterable[str]) -> None:
        """NAK ``tokens`` (read from this group, not settled, untouched) in
        stream order, and wait until the server has processed them: it takes
        acks off a queue of their own, so a pull (or a lease released) right
        after a plain NAK can overtake it and get newer messages first. Each
        hand-back is counted first (``released``), so that the redelivery it
        causes is not counted as an attempt."""
        back = sorted((t for t in tokens if t in self.held), key=lambda t: ack_meta(t)[1])
        # They count as settled (forget, which may let a partition go) only
        # once confirmed.
        try:
            await released.record(back)
            failed = await conn.nak_confirmed(back)
        finally:
            for token in back:
                self.forget(token)
        if failed:
            # The server redelivers after the lease: at-least-once holds.
            log.warning(
                "%d of %d NAKs for %s unconfirmed: %r", len(failed), len(back), self.name, failed[0]
            )
