"""The consuming half of :class:`~surge.transports._nats.NatsTransport`: a
group's state in this process, pulling from its consumers (the shared one
and the partitions this process owns), and handing deliveries back.

Pulling keeps pull requests outstanding for at most ``prefetch`` messages
of the shared consumer (credit counted down per message, and by the
server's ``Nats-Pending-Messages`` when a request expires); idle heartbeats
let a silent pull be detected and reissued, so a consumer resumes by itself
after a reconnect or a server restart. An owned partition gets a share of
``prefetch`` and one short pull at a time, without heartbeats (its expiry
status is the sign of life), so that a partition to give up knows when
nothing more can come (see ``_nats_partitions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .._clock import Clock
from .._codec import Codec
from .._errors import Closed, ConfigurationError, DecodeError, TransportError
from .._event import Envelope
from .._transport import Delivery
from . import _nats_partitions as _parts
from ._nats_dlq import consumer_name
from ._nats_partitions import Source, partition_durable
from ._nats_publish import translate
from ._partitions import Ownership

if TYPE_CHECKING:
    from ._nats import NatsTransport

__all__ = ("Consuming", "Group", "ack_info", "ack_meta", "forget")

log = logging.getLogger("surge.nats")


def ack_meta(reply: str) -> tuple[int, int, float]:
    """(num_delivered, stream sequence, stored time) from an ack subject."""
    return ack_info(reply)[1:]


def ack_info(reply: str) -> tuple[str, int, int, float]:
    """(consumer, num_delivered, stream sequence, stored time) from an ack subject."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or
    # the v2 form with domain and account hash tokens after ACK.
    t = reply.split(".")
    if len(t) == 9:
        return t[3], int(t[4]), int(t[5]), int(t[7]) / 1e9
    return t[5], int(t[6]), int(t[7]), int(t[9]) / 1e9


def forget(g: Group, token: str) -> None:
    """A delivery of ``g`` is settled (or handed back)."""
    src = g.held.pop(token, None)
    if src is not None:
        src.held -= 1
        if src.part is not None and not src.held:
            g.rebalance.set()  # a partition being given up may be free now


class Group:
    """One consumer group as this process sees it."""

    __slots__ = (
        "balancer",
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
        "member",
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
        self.member = False
        self.buffer: deque[Delivery] = deque()
        self.held: dict[str, Source] = {}  # token -> source, read and not settled
        self.deferred: dict[int, int] = {}  # stream seq -> not_before deferrals
        self.scheduled: dict[int, float] = {}  # stream seq -> due (wall clock)
        self.prefetch = 0
        self.errors = 0
        self.waiter: asyncio.Future[None] | None = None
        self.rebalance = asyncio.Event()
        self.balancer: asyncio.Task[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)


class Consuming:
    """Pulling and handing back, for :class:`NatsTransport` (a mixin: it uses
    the transport's connection, options and groups)."""

    stream: str
    lease: float
    heartbeat: float
    pull_expires: float
    part_expires: float
    ack_timeout: float
    clock: Clock
    codec: Codec
    _nc: Client | None
    _closed: bool
    _busy: bool
    _groups: dict[str, Group]

    def _nats(self) -> Client:
        raise NotImplementedError

    def _group(self, name: str) -> Group:
        raise NotImplementedError

    async def _ensure_consumer(self, g: Group, src: Source) -> None:
        raise NotImplementedError

    async def _send_ack(self, reply: str, payload: bytes) -> None:
        raise NotImplementedError

    def ownership(self, group: str) -> Ownership | None:
        """Which partitions of ``group`` this consumer reads (None: an
        ephemeral group, or not declared here)."""
        g = self._groups.get(group)
        return None if g is None else g.own

    async def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        g = self._group(group)
        if g.consuming:
            raise ConfigurationError(f"group {group!r} is already consumed by this transport")
        if prefetch < 1:
            raise ConfigurationError("prefetch must be at least 1")
        nc = self._nats()
        g.prefetch = prefetch
        try:
            # A message names its consumer in its ack subject; a status
            # message (heartbeat, expiry) comes on the reply subject of the
            # pull it ends: ``<inbox>.<partition>`` for partitions. Those
            # stay subscribed until close: a partition is handed over only
            # once its last pull has ended.
            inbox = nc.new_inbox()
            g.sub = await nc.subscribe(
                inbox, cb=self._on_msg(g, {inbox: g.shared}), pending_msgs_limit=-1
            )
            if g.parts and g.psub is None:
                g.inbox = nc.new_inbox()
                sources = {f"{g.inbox}.{src.token}": src for src in g.parts}
                g.psub = await nc.subscribe(
                    g.inbox + ".*", cb=self._on_msg(g, sources), pending_msgs_limit=-1
                )
        except nats.errors.Error as exc:
            raise translate(exc, f"consuming {group!r}") from exc
        g.consuming = True
        g.handed_back = False
        now = self.clock.monotonic()
        for src in g.sources.values():
            src.last_seen = now
        if g.own is not None and (g.balancer is None or g.balancer.done()):
            g.balancer = asyncio.get_running_loop().create_task(
                _parts.balance_loop(cast("NatsTransport", self), g),
                name=f"surge-nats-balance-{group}",
            )
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                if g.buffer:
                    batch = list(g.buffer)
                    g.buffer.clear()
                    yield batch
                    continue
                try:
                    await self._pull(g)
                except Closed:
                    return
                except (nats.errors.Error, TransportError) as exc:
                    g.errors += 1
                    log.warning("pull for %s failed: %r; retrying", g.name, exc)
                if g.errors:
                    # back off while the server or the consumer is unhappy
                    await self.clock.sleep(min(0.05 * 2 ** min(g.errors, 6), 2.0))
                    if g.buffer:
                        continue
                fut = g.waiter = loop.create_future()
                try:
                    async with asyncio.timeout(self.heartbeat):
                        await fut
                except TimeoutError:
                    pass
                self._check_silence(g)
        finally:
            g.consuming = False
            sub, g.sub = g.sub, None
            g.shared.outstanding = 0
            g.wake()
            g.rebalance.set()  # leave the group, hand the partitions over
            if sub is not None and not self._closed:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    def _on_msg(self, g: Group, by_reply: dict[str, Source]) -> Any:
        async def on_msg(msg: Msg) -> None:
            if msg.reply:
                await self._on_delivery(g, msg)
                return
            src = by_reply.get(msg.subject)
            if src is not None:
                src.last_seen = self.clock.monotonic()
                src.stalled = False
                self._on_status(g, src, msg.headers or {})

        return on_msg

    def _check_silence(self, g: Group) -> None:
        """No message and no heartbeat (no expiry status for a partition's
        pull): a pull died with a connection or a server; forget its credit
        so that it is asked again."""
        now = self.clock.monotonic()
        for src in g.sources.values():
            hb = src.part is None
            silence = 3 * self.heartbeat + 0.5 if hb else self.part_expires + 1.0
            if src.outstanding and now - src.last_seen > silence:
                if not src.stalled:
                    log.warning(
                        "consumer %s got no heartbeat for %.1fs; pulling again",
                        src.durable,
                        silence,
                    )
                src.stalled = True
                src.outstanding = 0

    async def _pull(self, g: Group) -> None:
        nc = self._nats()
        if not nc.is_connected:
            return
        await self._pull_from(nc, g, g.shared)
        if g.own is None:
            return
        readable = g.own.readable
        if not readable:
            return
        share = max(1, g.prefetch // len(readable))
        for p in readable:
            src = g.parts[p]
            if not src.outstanding:  # one pull at a time (see _pull_from)
                await self._pull_from(nc, g, src, share)

    async def _pull_from(self, nc: Client, g: Group, src: Source, share: int = 0) -> None:
        if src.recreate:
            await self._ensure_consumer(g, src)
            log.warning("consumer %s was gone from the server; declared it again", src.durable)
        if src.part is None:
            if g.sub is None:
                return
            free = g.prefetch - len(g.held) - src.outstanding
            if free <= 0 or (src.outstanding and free < max(1, g.prefetch // 4)):
                return
            request = {
                "batch": free,
                "expires": int(self.pull_expires * 1e9),
                "idle_heartbeat": int(self.heartbeat * 1e9),
            }
            inbox = g.sub.subject
        else:
            # One pull at a time, so that a partition to give up knows when
            # nothing more can come; a held partition keeps pulling for the
            # redeliveries it waits for (the server's max_ack_pending bounds it).
            if src.outstanding:
                return
            free = share if src.hold is not None else share - src.held
            if free <= 0:
                return
            request = {"batch": free, "expires": int(self.part_expires * 1e9)}
            inbox = f"{g.inbox}.{src.token}"
        if not src.outstanding:
            src.last_seen = self.clock.monotonic()  # silence counts from this pull
        src.outstanding += free
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{src.durable}",
            json.dumps(request).encode(),
            reply=inbox,
        )

    async def _on_delivery(self, g: Group, msg: Msg) -> None:
        reply = msg.reply
        try:
            consumer, delivered, seq, stored = ack_info(reply)
            src = g.by_durable[consumer]
        except (ValueError, IndexError, KeyError):
            log.error("unexpected JetStream ack subject %r on %s", reply, g.name)
            return
        src.last_seen = self.clock.monotonic()
        src.stalled = False
        g.errors = 0
        self._busy = True
        if src.outstanding:
            src.outstanding -= 1
            if not src.outstanding and src.part is not None:
                g.rebalance.set()  # a partition being given up may be free now
        try:
            env = self.codec.decode_envelope(msg.data)
        except DecodeError:
            # Not ours (published by something else): hand it on as an
            # undecodable event, so the runner dead-letters it with a reason.
            keyed = msg.subject.startswith(f"{self.stream}_k.")
            topic = msg.subject.split(".", 2 if keyed else 1)[-1]
            env = Envelope(f"nats-{self.stream}-{seq}", topic, None, stored, None, None, msg.data)
        deferrals = g.deferred.pop(seq, 0)
        g.scheduled.pop(seq, None)
        nb = env.not_before
        if nb is not None:
            wait = nb - self.clock.time()
            if wait > 0:
                g.deferred[seq] = deferrals + 1
                g.scheduled[seq] = nb
                await self._send_ack(reply, b'-NAK {"delay": %d}' % int(wait * 1e9 + 1e6))
                self._check_pull(g, src)
                return
            if not deferrals and stored < nb:
                deferrals = 1  # deferred by another process, most likely
        d = Delivery(env, g.name, max(1, delivered - deferrals), reply)
        g.held[reply] = src
        src.held += 1
        if src.part is not None and (
            not g.consuming or g.own is None or src.part not in g.own.owned
        ):
            # Late: the consumer ended, or the partition is not ours now.
            # NAKed once this pull ended (a NAK now would come straight back
            # to it), before the lease goes.
            g.returning.append(reply)
            return
        if src.hold is not None and _parts.take(g, src, seq, d):
            return
        g.buffer.append(d)
        g.wake()

    def _check_pull(self, g: Group, src: Source) -> None:
        if src.outstanding <= 0:
            g.wake()

    def _on_status(self, g: Group, src: Source, headers: dict[str, str]) -> None:
        status = headers.get("Status", "")
        if status == "100":
            g.errors = 0  # idle heartbeat: the pull is alive
            return
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None:
            src.outstanding = max(0, src.outstanding - int(pending))
        else:
            src.outstanding = 0
        if status not in ("404", "408"):
            desc = headers.get("Description", "")
            g.errors += 1
            if "deleted" in desc.lower() or "not found" in desc.lower() or status == "503":
                src.recreate = True
            log.warning("pull for %s answered %s %s", src.durable, status, desc)
        if src.part is not None and not src.outstanding:
            g.rebalance.set()
        g.wake()

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand deliveries back untouched, at stop, with what the group's
        ended consumer fetched and did not hand out. A partition's are NAKed
        in stream order once the partition's pull has ended, and before its
        lease is released, so that its next owner reads them first."""
        for name in {d.group for d in deliveries} | set(self._groups):
            g = self._groups.get(name)
            if g is None:
                continue
            mine = [d for d in deliveries if d.group == name]
            if g.consuming:  # not at stop: as nack(d, 0)
                await self._hand_back(g, [d.token for d in mine])
                continue
            back = [d.token for d in (*mine, *g.buffer) if d.token in g.held]
            g.buffer.clear()
            shared = [t for t in back if g.held[t].part is None]
            g.returning += [t for t in back if g.held[t].part is not None]
            await self._hand_back(g, shared)
            g.handed_back = True
            g.rebalance.set()

    async def _hand_back(self, g: Group, tokens: list[str]) -> None:
        """NAK ``tokens`` (read from ``g``, not settled) in stream order, and
        wait until the server has processed them: it takes acks off a queue
        of their own, so a pull (or a lease released) right after a plain
        NAK can overtake it and get newer messages first."""
        back = sorted((t for t in tokens if t in g.held), key=lambda t: ack_meta(t)[1])
        nc = self._nc
        if not back or nc is None or nc.is_closed:
            for token in back:
                forget(g, token)
            return
        # Tasks start in order, so the NAKs go out in order. They count as
        # settled (forget, which may let a partition go) only once confirmed.
        try:
            done = await asyncio.gather(
                *(nc.request(token, b"-NAK", timeout=self.ack_timeout) for token in back),
                return_exceptions=True,
            )
        finally:
            for token in back:
                forget(g, token)
        failed = [r for r in done if isinstance(r, BaseException)]
        if failed:
            # The server redelivers after the lease: at-least-once holds.
            log.warning(
                "%d of %d NAKs for %s unconfirmed: %r", len(failed), len(back), g.name, failed[0]
            )
