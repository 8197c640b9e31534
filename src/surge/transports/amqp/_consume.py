"""Consuming: one channel per queue read, manual acks, a prefetch window.

A :class:`GroupReader` is one ``consume()`` of one group: a
:class:`Source` for the group's shared queue and one per partition this
consumer owns. Each source has its own channel with ``basic.qos`` as its
prefetch, so RabbitMQ never sends it more than that unacknowledged, and a
channel can be closed on its own: closing it is how a partition is handed
over, since the broker then returns what it held to the queue ahead of
later messages, in order, before the next single active consumer starts.

Acks are coalesced: a settled delivery's tag waits in its source until a
quarter of the prefetch window is settled or ``ACK_DELAY`` has passed,
then goes out with the others in one ``multiple`` ack where the window
allows. The broker refills the window as acks come, so acking one or two
at a time locks both sides into one or two deliveries per frame, read,
wake-up and ack; acking in chunks keeps deliveries in chunks too. An ack
that waits is sent before its channel closes (a hand-over, a stop); one
lost with a dead connection means a redelivery, as any unsent ack does.

A delivery's token is its :class:`Tag`: the channel it came on and its
delivery tag. When a channel dies (the connection dropped; the broker's
``consumer_timeout`` ran out on a long handler) the broker requeues what it
held; the source opens a new channel, and a message that comes back while
this process still handles it is not handed out twice: its new tag is
given to the delivery in hand, whose ack then settles it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from ..._clock import Clock
from ..._errors import DecodeError
from ..._event import Envelope
from ..._transport import Delivery
from .._partitions import Ownership
from ._link import LOST, Link
from ._topology import GroupSpec
from ._wire import attempts_before, first_time

__all__ = ("ACK_DELAY", "GroupReader", "Source", "Tag")

log = logging.getLogger("surge.amqp")

ACK_DELAY = 0.05
"""Longest a settled delivery's ack waits for others to join it (s)."""


class Tag:
    """Where a delivery came from, to settle it there."""

    __slots__ = ("body", "channel", "delivery_tag", "source")

    def __init__(
        self, source: Source, channel: aiormq.abc.AbstractChannel, delivery_tag: int, body: bytes
    ) -> None:
        self.source = source
        self.channel = channel
        self.delivery_tag = delivery_tag
        self.body = body

    @property
    def live(self) -> bool:
        """Its channel is still open (else the broker requeued it already)."""
        return self.channel is self.source.channel and not self.channel.is_closed


class Source:
    """One queue, read by this consumer on a channel of its own."""

    def __init__(self, reader: GroupReader, queue: str, part: int | None, prefetch: int) -> None:
        self.reader = reader
        self.queue = queue
        self.part = part
        self.prefetch = prefetch
        self.channel: aiormq.abc.AbstractChannel | None = None
        self.held: set[Tag] = set()
        self.unacked: set[int] = set()
        """Delivery tags of the current channel not settled yet (held, and
        also those fetched but never handed out)."""
        self.to_ack: list[int] = []
        """Tags of the current channel settled here, their ack not sent yet."""
        self._ack_at = max(1, prefetch // 4)
        self._ack_timer: asyncio.TimerHandle | None = None
        self.active = False
        self.giving_up = False
        """Hands out nothing more; closes once what it handed out is settled."""
        self._closing = False

    async def open(self) -> None:
        """A new channel, its prefetch, and the subscription."""
        self._closing = False
        ch = await self.reader.link.channel()
        self.channel = ch
        self.unacked = set()
        self._forget_acks()  # the old channel's: the broker requeued those
        await ch.basic_qos(prefetch_count=self.prefetch)

        async def on_message(msg: DeliveredMessage) -> None:
            self.reader.arrived(self, ch, msg)

        await ch.basic_consume(self.queue, on_message)
        self.active = True
        ch.closing.add_done_callback(lambda _: self._dropped(ch))

    def _dropped(self, ch: aiormq.abc.AbstractChannel) -> None:
        """The channel closed under us (not by ``close``): subscribe again,
        unless the whole connection went (the link's hook does it then)."""
        if ch is not self.channel or self._closing:
            return
        self.active = False
        exc = ch.closing.exception() if not ch.closing.cancelled() else None
        if exc is not None and "timed out" in str(exc):
            log.warning(
                "amqp: RabbitMQ's consumer_timeout closed the channel of %s with deliveries "
                "unacknowledged (a handler ran longer): subscribing again; raise "
                "consumer_timeout above your longest handler",
                self.queue,
            )
        self.reader.reopen_later(self)

    async def ack(self, tags: list[int]) -> None:
        """Settle ``tags`` (of the current channel): their acks go out with
        the next ones, within ``ACK_DELAY`` (see the module's docstring)."""
        ch = self.channel
        if ch is None or ch.is_closed:
            return
        self.unacked.difference_update(tags)
        self.to_ack += tags
        if len(self.to_ack) >= self._ack_at:
            await self.flush()
        elif self._ack_timer is None:
            self._ack_timer = self.reader.clock.call_later(ACK_DELAY, self._flush_later)

    def _flush_later(self) -> None:
        self._ack_timer = None
        if self.to_ack:
            self.reader.spawn(self.flush())

    def _forget_acks(self) -> None:
        self.to_ack = []
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    async def flush(self) -> None:
        """Send the acks waiting here in as few frames as safe: one
        ``multiple`` ack up to the first tag still unsettled, then one frame
        each, written together."""
        tags = self.to_ack
        self._forget_acks()
        ch = self.channel
        if not tags or ch is None or ch.is_closed:
            return
        rest = self.unacked
        if rest:
            floor = min(rest)
            below = [t for t in tags if t < floor]
            above = [t for t in tags if t > floor]
        else:
            below, above = tags, []
        if below:
            await ch.basic_ack(max(below), multiple=len(below) > 1, wait=not above)
        for i, t in enumerate(above):
            await ch.basic_ack(t, wait=i == len(above) - 1)

    async def nack(self, tag: int) -> None:
        """Back to the queue, in its place (counts a delivery).

        While the source gives up (a stop, a partition handed over) no frame
        is sent: the channel's close returns the message, in its place. A
        nack would count it, and then, the subscription being still open,
        bring it straight back to this channel, whose close would return and
        count it a second time (a stop cost each untouched event two
        attempts). The tag stays unacked, so no ``multiple`` ack covers it."""
        ch = self.channel
        if ch is None or ch.is_closed or self.giving_up:
            return
        self.unacked.discard(tag)
        await ch.basic_nack(tag, requeue=True)

    async def close(self) -> None:
        """Close the channel, once the acks waiting here are sent: what it
        held and did not settle goes back to the queue, in order, ahead of
        later messages."""
        self._closing = True
        self.active = False
        await self.reader.link.close_channel(self.channel, self.flush, 2.0)
        self._forget_acks()


Hook = Callable[["GroupReader", Delivery, Exception | None], Awaitable[None]]


class GroupReader:
    """One ``consume()`` of one group on this process."""

    def __init__(
        self,
        spec: GroupSpec,
        *,
        link: Link,
        prefetch: int,
        clock: Clock,
        decode: Callable[[bytes], Envelope],
        on_early: Hook,
        on_poison: Hook,
        came_due: Callable[[str, str], None],
        own: Ownership | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.link = link
        self.prefetch = prefetch
        self.clock = clock
        self.now = clock.time
        self._decode = decode
        self._on_early = on_early
        self._on_poison = on_poison
        self._came_due = came_due
        self.shared = Source(self, spec.queue, None, prefetch)
        self.parts: dict[int, Source] = {}
        self.own = own
        """The partitions this reader holds (the transport's, per group)."""
        self.buffer: list[Delivery] = []
        self.inflight: dict[str, Delivery] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    # --- arrivals ------------------------------------------------------------------
    def arrived(self, src: Source, ch: aiormq.abc.AbstractChannel, msg: DeliveredMessage) -> None:
        tag = Tag(src, ch, msg.delivery_tag or 0, msg.body)
        if ch is src.channel:
            src.unacked.add(tag.delivery_tag)
        headers: dict[str, Any] = msg.header.properties.headers or {}
        now = self.now()
        attempt = attempts_before(headers) + 1
        first = first_time(headers) or now
        try:
            env = self._decode(msg.body)
        except DecodeError as exc:
            # Not an envelope at all (bytes published straight to the
            # queue): dead-lettered on its first delivery, with the reason.
            src.held.add(tag)
            mid = msg.header.properties.message_id or f"amqp-{src.queue}-{tag.delivery_tag}"
            raw = Envelope(mid, _topic_of(msg.routing_key or ""), None, now, None, None, msg.body)
            self.spawn(self._on_poison(self, Delivery(raw, self.name, attempt, tag, first), exc))
            return
        held = self.inflight.get(env.id)
        if held is not None and not held.token.live:
            # Requeued while we still handle it (its channel died): the
            # delivery in hand now settles this copy.
            old: Tag = held.token
            old.source.held.discard(old)
            held.token = tag
            src.held.add(tag)
            log.info("amqp: %s came back to %s while still handled here", env.id, self.name)
            return
        self._came_due(self.name, env.id)
        d = Delivery(env, self.name, attempt, tag, first)
        nb = env.not_before
        if nb is not None and nb > now + 0.001:
            src.held.add(tag)
            self.spawn(self._on_early(self, d, None))
            return
        if self.stopping or src.giving_up:
            # Arrived after we began to stop, or to give the partition up:
            # it goes back to the queue when the channel closes.
            return
        src.held.add(tag)
        self.inflight[env.id] = d
        buffer = self.buffer
        buffer.append(d)
        if len(buffer) == 1:
            # Only batches() waits for arrivals, and only on an empty
            # buffer: one wake-up per batch, not one per message.
            self.wake()

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` in a task of this reader (cancelled at close); a
        lost channel is nothing to report, other errors are logged."""

        async def run() -> None:
            try:
                await coro
            except LOST:
                pass  # the broker requeues it with the channel
            except Exception:
                log.exception("amqp: settling a delivery of %s failed", self.name)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- settling --------------------------------------------------------------------
    def settled(self, d: Delivery) -> Tag:
        tag: Tag = d.token
        tag.source.held.discard(tag)
        if self.inflight.get(d.envelope.id) is d:
            del self.inflight[d.envelope.id]
        if self.stopping or tag.source.giving_up:
            self.wake()  # a channel waiting to close may close now
        return tag

    @property
    def held(self) -> int:
        return len(self.shared.held) + sum(len(s.held) for s in self.parts.values())

    @property
    def acks_waiting(self) -> bool:
        """Some source has settled deliveries whose ack is not sent yet."""
        return any(s.to_ack for s in self.sources)

    # --- lifecycle -------------------------------------------------------------------
    @property
    def sources(self) -> list[Source]:
        return [self.shared, *self.parts.values()]

    async def open(self) -> None:
        await self.shared.open()

    def _share(self) -> int:
        """Prefetch of one partition: the group's prefetch split among
        them (so keyed and unkeyed deliveries together stay within about
        twice ``prefetch``)."""
        return max(1, self.prefetch // max(1, self.spec.partitions))

    async def take(self, part: int) -> None:
        """Subscribe to partition ``part`` (served once its previous
        reader, if any, let go)."""
        if self.stopping or part in self.parts:
            return
        src = Source(self, self.spec.partition_queue(part), part, self._share())
        self.parts[part] = src
        try:
            await src.open()
        except BaseException:
            del self.parts[part]
            raise
        if self.own is not None:
            self.own.acquired([part])
        self._close_if_stopped(src)

    def _close_if_stopped(self, src: Source) -> None:
        """A source opened while the reader stopped (a stop lets a take
        finish) closes as :meth:`stop` closes the others."""
        if self.stopping and not src.giving_up:
            src.giving_up = True
            self.spawn(self._close_when_settled(src))

    def give_up(self, part: int) -> None:
        """Hand partition ``part`` over: nothing more of it is handed out,
        and its channel closes once what was is settled."""
        src = self.parts.get(part)
        if src is None or src.giving_up:
            return
        src.giving_up = True
        self.unbuffer(part)
        self.spawn(self._close_when_settled(src))

    def reopen_later(self, src: Source) -> None:
        if self._closed or not self.link.connected:
            return
        self.spawn(self._reopen(src))

    async def _reopen(self, src: Source) -> None:
        if self._closed or self.stopping or src.active or src.giving_up:
            return
        if src.part is not None and self.parts.get(src.part) is not src:
            return
        src.held.clear()  # the broker requeued it with the channel
        await src.open()

    async def reconnected(self) -> None:
        """After a new connection: every source subscribes again (what
        was handed out from the old channels can no longer be settled:
        the broker requeued it)."""
        for src in list(self.sources):
            src.held.clear()
            src.active = False
            if src.giving_up or self.stopping:
                if src.part is not None:
                    self.parts.pop(src.part, None)
                    if self.own is not None:
                        self.own.lost([src.part])
                continue
            if not self._closed:
                await src.open()

    async def batches(self) -> AsyncIterator[list[Delivery]]:
        try:
            while not self.stopping:
                if self.buffer:
                    out, self.buffer = self.buffer, []
                    yield out
                    continue
                ev = self._wake
                if not self.buffer and not self.stopping:
                    await ev.wait()
        finally:
            self.stop()

    def wake(self) -> None:
        """Wake every waiter (each takes ``_wake`` before its check, and a
        set event is replaced, so no wake-up is lost between them)."""
        self._wake.set()
        self._wake = asyncio.Event()

    def unbuffer(self, part: int | None = None) -> None:
        """Forget deliveries fetched but never handed out (of ``part``, or
        all): they go back to their queue, in order, with their channel."""
        keep: list[Delivery] = []
        for d in self.buffer:
            tag: Tag = d.token
            if part is None or tag.source.part == part:
                tag.source.held.discard(tag)
                self.inflight.pop(d.envelope.id, None)
            else:
                keep.append(d)
        self.buffer = keep

    async def settled_all(self, src: Source) -> None:
        """Return once nothing handed out from ``src`` is unsettled."""
        while True:
            ev = self._wake
            if not src.held or self._closed:
                return
            await ev.wait()

    def stop(self) -> None:
        """Stop handing out deliveries; each channel closes once what it
        handed out is settled (so an ack after the stop still lands)."""
        if self.stopping:
            return
        self.stopping = True
        self.unbuffer()
        self.wake()
        for src in self.sources:
            if not src.giving_up:
                src.giving_up = True
                self.spawn(self._close_when_settled(src))

    async def _close_when_settled(self, src: Source) -> None:
        await self.settled_all(src)
        await src.close()
        if src.part is not None:
            if self.parts.get(src.part) is src:
                del self.parts[src.part]
            if self.own is not None:
                self.own.lost([src.part])

    async def close(self, timeout: float = 5.0) -> None:
        """Stop, wait (bounded) for what was handed out to be settled, and
        close every channel."""
        self.stop()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self._closed = True
        self.wake()
        for src in self.sources:
            await src.close()
        for t in list(self._tasks):
            t.cancel()
        self.buffer.clear()


def _topic_of(routing_key: str) -> str:
    if routing_key.startswith("u."):
        return routing_key[2:]
    if routing_key.startswith("k."):
        return routing_key.split(".", 2)[-1]
    return routing_key
