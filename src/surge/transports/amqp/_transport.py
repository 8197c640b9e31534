"""RabbitMQ: a quorum queue per group, bound to a topic exchange.

See ``_topology`` for what is declared and why; each part owns its state:

============  ================================================================
``_link``     the connection, and reconnecting
``_topology`` exchanges, queues, bindings and their names; delay buckets
``_publish``  confirms, the window of unconfirmed messages, the dedup window
``_consume``  a channel per queue read, prefetch, acks, hand-over by closing
``_dead``     the dead-letter queue: records, listing, replay, purge
============  ================================================================

Retries: ``nack(d, 0)`` requeues in place (``basic.nack``); ``nack(d, t)``
publishes a copy (with confirm) to the delay queue for ``t`` and then acks
the delivery. A ``not_before`` publish goes the same way to every group.

Leases: RabbitMQ keeps a delivery with its consumer until that consumer's
channel or connection closes (a killed worker's deliveries return at once),
or until the broker's ``consumer_timeout`` (default 30 min, a node setting
RabbitMQ 3.10 cannot change per queue or extend per delivery). A handler
that outlives it loses its channel: this transport subscribes again, and a
delivery that comes back to it while its handler still runs is given the
new tag instead of being handed out twice; if another process took it
meanwhile, it runs twice. Set ``consumer_timeout`` above your longest
handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import urllib.parse
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence

import aiormq
import aiormq.exceptions as aexc

from ..._clock import Clock, RealClock
from ..._codec import Codec, MsgpackCodec
from ..._errors import Closed, ConfigurationError
from ..._event import Envelope
from ..._transport import DeadLetter, Delivery, TransportStats
from .._partitions import DEFAULT_PARTITIONS, Ownership
from ._consume import GroupReader, Source, Tag
from ._dead import DeadLetters
from ._link import LOST, Link, safe_url, translate
from ._partitions import Balancer, Members
from ._publish import Delayed, Outgoing, Publisher
from ._topology import GroupSpec, Topology
from ._wire import ATTEMPTS, FIRST, props

__all__ = ("AmqpTransport",)

log = logging.getLogger("surge.amqp")

_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
_PROBES = 8  # channels stats() asks queue lengths on at once
_DEAD_FOR = 1.0  # seconds a read of the dead-letter queue serves stats()


class AmqpTransport:
    """Groups as quorum queues on one RabbitMQ vhost (the URL's).

    Options (also in the URL's query, where they win): ``prefix`` (of every
    exchange and queue name), ``partitions`` (of keyed events; fixed per
    prefix), ``max_pending`` (unconfirmed publishes), ``dedup_window`` (s,
    this process's), ``max_deliver`` (``x-delivery-limit``, a safety net),
    ``publish_timeout``, ``connect_timeout``; ``heartbeat`` and other
    query parameters go to the client (aiormq). ``codec``, ``clock``.
    """

    durable = True

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        prefix: str = "surge",
        partitions: int | None = None,
        lease: float = 5.0,
        max_pending: int = 4096,
        dedup_window: float = 120.0,
        max_deliver: int = 100,
        publish_timeout: float = 60.0,
        connect_timeout: float = 5.0,
        close_timeout: float = 5.0,
        codec: Codec | None = None,
        clock: Clock | None = None,
    ) -> None:
        base, _, query = url.partition("?")
        q = dict(urllib.parse.parse_qsl(query))
        try:
            prefix = q.pop("prefix", prefix)
            if "partitions" in q:
                partitions = int(q.pop("partitions"))
            max_pending = int(q.pop("max_pending", max_pending))
            dedup_window = float(q.pop("dedup_window", dedup_window))
            max_deliver = int(q.pop("max_deliver", max_deliver))
            lease = float(q.pop("lease", lease))
            publish_timeout = float(q.pop("publish_timeout", publish_timeout))
            connect_timeout = float(q.pop("connect_timeout", connect_timeout))
        except ValueError as exc:
            raise ConfigurationError(f"bad option in the AMQP URL query {query!r}: {exc}") from None
        q.setdefault("heartbeat", "10")
        if not _NAME.match(prefix):
            raise ConfigurationError(f"prefix {prefix!r}: use letters, digits and _ . : -")
        if partitions is not None and partitions < 0:
            raise ConfigurationError("partitions must be 0 or more")
        if lease <= 0:
            raise ConfigurationError("lease must be positive")
        if max_pending < 1 or max_deliver < 2:
            raise ConfigurationError("max_pending must be positive and max_deliver at least 2")
        self.url = base
        self.prefix = prefix
        self.clock: Clock = clock or RealClock()
        self.codec: Codec = codec or MsgpackCodec()
        self.close_timeout = close_timeout
        self._link = Link(
            f"{base}?{urllib.parse.urlencode(q)}", clock=self.clock,
            connect_timeout=connect_timeout,
        )  # fmt: skip
        self._topology = Topology(
            prefix,
            partitions=DEFAULT_PARTITIONS if partitions is None else partitions,
            max_deliver=max_deliver,
            clock=self.clock,
        )
        self._pub = Publisher(
            self._link, self._topology, self.codec, self.clock,
            max_pending=max_pending, dedup_window=dedup_window,
            publish_timeout=publish_timeout,
        )  # fmt: skip
        self._dead = DeadLetters(self._link, self._topology, self._pub, self.codec, self.clock.time)
        self.partitions = self._topology.partitions
        """Partitions of each group's keyed events (``KeyRouting``; fixed per prefix)."""
        self._members = Members(
            self._link, self._topology, self.clock, uuid.uuid4().hex[:16], lease
        )
        self._readers: list[GroupReader] = []
        self._probes: list[aiormq.abc.AbstractChannel] = []  # idle, for _ready
        self._probes_open = 0  # probe channels opened (or opening), not seen closed
        self._probe_waiters: deque[asyncio.Future[None]] = deque()
        self._dead_counts: dict[str, int] = {}
        self._dead_read_at = -math.inf
        self._dead_reading: asyncio.Future[dict[str, int]] | None = None
        self._owners: dict[str, Ownership] = {}
        self._control: aiormq.abc.AbstractChannel | None = None
        self._busy = True
        self._closed = True

    def ownership(self, group: str) -> Ownership:
        """The partitions of ``group`` this process reads (for tests and
        tools: which it holds and which it is giving up)."""
        own = self._owners.get(group)
        if own is None:
            raise ConfigurationError(f"group {group!r} has no partitions here")
        return own

    # --- connection ------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return not self._closed and self._link.connected

    @property
    def last_error(self) -> str | None:
        return self._link.last_error

    async def _channel(self) -> aiormq.abc.AbstractChannel:
        """The channel for declarations (reopened after a channel error)."""
        ch = self._control
        if ch is None or ch.is_closed:
            await self._link.wait_up()
            ch = self._control = await self._link.channel()
        return ch

    async def start(self) -> None:
        if not self._closed:
            return
        await self._link.open()
        self._closed = False
        try:
            await self._topology.declare_base(await self._channel())
        except aexc.ChannelPreconditionFailed as exc:
            await self._link.close()
            self._closed = True
            raise ConfigurationError(
                f"exchange {self.prefix!r} at {safe_url(self.url)} was declared with other "
                f"settings (a different partition count?): {exc}"
            ) from exc
        except LOST as exc:
            await self._link.close()
            self._closed = True
            raise translate(exc, "declaring surge's exchanges") from exc
        if self._topology.partitions:
            try:
                await self._members.open()
            except LOST as exc:
                await self._link.close()
                self._closed = True
                raise translate(exc, "joining the members' gossip") from exc
        self._link.on_up(self._reconnected)

    async def _reconnected(self) -> None:
        self._control = None
        await self._topology.redeclare(await self._channel())
        if self._topology.partitions:
            await self._members.open()
        for r in list(self._readers):
            await r.reconnected()

    # --- groups --------------------------------------------------------------------------
    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        if self._closed:
            raise Closed("transport is closed")
        if not _NAME.match(group):
            raise ConfigurationError(f"group name {group!r}: use letters, digits and _ . : -")
        g = self._topology.group(group, ephemeral=ephemeral)
        if g.partitions and group not in self._owners:
            self._owners[group] = Ownership(g.partitions)
        try:
            await self._topology.declare_group(await self._channel(), g, topics)
        except LOST as exc:
            self._control = None
            raise translate(exc, f"declaring group {group!r}") from exc

    def _spec(self, group: str) -> GroupSpec:
        g = self._topology.groups.get(group)
        if g is None:
            raise ConfigurationError(f"group {group!r} was not declared")
        return g

    # --- publishing -----------------------------------------------------------------------
    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if self._closed:
            raise Closed("transport is closed")
        self._busy = True
        await self._pub.publish(envelopes)

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        if self._closed:
            raise Closed("transport is closed")
        self._pub.publish_nowait(envelopes)
        self._busy = True

    async def flush(self) -> None:
        """Wait until RabbitMQ confirmed everything published so far."""
        await self._pub.flush()

    # --- consuming -------------------------------------------------------------------------
    async def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        spec = self._spec(group)
        reader = GroupReader(
            spec,
            link=self._link,
            prefetch=max(1, prefetch),
            clock=self.clock,
            decode=self.codec.decode_envelope,
            on_early=self._early,
            on_poison=self._poison,
            came_due=self._pub.came_due,
            own=self._owners.get(group),
        )
        self._readers.append(reader)
        balancer = Balancer(reader, self._members) if spec.partitions else None
        try:
            await self._link.wait_up()
            try:
                await reader.open()
                if balancer is not None:
                    await balancer.start()
            except LOST as exc:
                raise translate(exc, f"consuming {group!r}") from exc
            async for batch in reader.batches():
                self._busy = True
                yield batch
        finally:
            reader.stop()
            if balancer is not None:
                await balancer.stop()

    async def _settle(self, tag: Tag) -> None:
        """Ack on the delivery's channel; a dead channel's deliveries were
        requeued by the broker already."""
        if tag.live:
            with contextlib.suppress(*LOST):
                await tag.source.ack([tag.delivery_tag])

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        # A delivery counts as settled (``reader.settled``) only once its
        # ack frame is written: a partition being given up closes its
        # channel as soon as nothing it handed out is unsettled, and a close
        # written before the ack makes the broker requeue an event that was
        # handled, for the next owner to run again (CI, the amqp keyed crash
        # test: a batch spanning partitions, acked source by source, while
        # a second worker joined and took half the partitions over).
        by_source: dict[Source, list[Delivery]] = {}
        for d in deliveries:
            by_source.setdefault(d.token.source, []).append(d)
        for src, ds in by_source.items():
            try:
                tags = [d.token.delivery_tag for d in ds if d.token.live]
                if tags:
                    with contextlib.suppress(*LOST):
                        await src.ack(tags)
            finally:
                for d in ds:
                    src.reader.settled(d)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        self._busy = True
        tag: Tag = delivery.token
        if delay <= 0:
            try:
                if tag.live:
                    with contextlib.suppress(*LOST):
                        await tag.source.nack(tag.delivery_tag)  # in place, before later events
            finally:
                tag.source.reader.settled(delivery)  # after the frame: see ack
            return
        due = self.clock.time() + delay
        self._pub.note_scheduled(delivery.group, delivery.envelope.id, due)
        await self._retry(delivery, delay, delivery.attempt)

    async def _retry(self, d: Delivery, delay: float, attempts: int) -> None:
        """Publish a copy of ``d`` to its queue's delay bucket, then ack it."""
        tag: Tag = d.token
        headers = {ATTEMPTS: attempts, FIRST: d.first_time}
        item = Delayed(delay, f"q.{tag.source.queue}", tag.body, props(d.envelope.id, headers))
        await self._link.wait_up()
        msgs = await self._pub.delayed([item])
        await self._pub.send(msgs)
        try:
            await self._settle(tag)
        finally:
            tag.source.reader.settled(d)  # after the frame: see ack

    async def _early(self, reader: GroupReader, d: Delivery, _: Exception | None) -> None:
        """Came before its ``not_before`` (a delay bucket rounds up, but
        clocks differ): back to a delay queue, no attempt counted."""
        nb = d.envelope.not_before or 0.0
        self._pub.note_scheduled(d.group, d.envelope.id, nb)
        await self._retry(d, nb - self.clock.time(), d.attempt - 1)

    async def _poison(self, reader: GroupReader, d: Delivery, exc: Exception | None) -> None:
        now = self.clock.time()
        rec = DeadLetter(
            id=d.envelope.id, group=d.group, topic=d.envelope.topic, key=None, headers=None,
            body=d.envelope.body or b"",
            error_type=type(exc).__qualname__ if exc else "DecodeError",
            error=str(exc), traceback="", attempts=d.attempt, first_attempt_at=d.first_time,
            failed_at=now,
        )  # fmt: skip
        log.error("amqp: a message on %s is not an envelope (%s); dead-lettered", d.group, exc)
        await self.dead_letter(d, rec)

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        # Stored (confirmed) before the delivery is settled: a crash in
        # between leaves the event delivered again, and a second record.
        await self._dead.store(record)
        self._dead_changed()
        tag: Tag = delivery.token
        try:
            await self._settle(tag)
        finally:
            tag.source.reader.settled(delivery)  # after the frame: see ack

    # --- dead letters ----------------------------------------------------------------------
    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        return await self._dead.list(group)

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        self._busy = True
        self._dead_changed()
        return await self._dead.replay(group, ids)

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        self._dead_changed()
        return await self._dead.purge(group, ids)

    # --- state ------------------------------------------------------------------------------
    async def _ready(self, queues: Sequence[str]) -> int:
        """Messages ready in ``queues`` (those that exist), asked on up to
        ``_PROBES`` channels at once: a channel answers one declare at a
        time, and admission asks for every stage's queues (a shared one and
        one per partition) ten times a second (the shop's four stages, one
        after another on one channel: 146 ms a sample at load 14 with the
        broker idle, 1.6 s between samples in the soak)."""
        found = await asyncio.gather(*(self._probe(q) for q in queues))
        return sum(found)

    async def _probe(self, queue: str) -> int:
        """Messages ready in ``queue`` (0: it does not exist)."""
        idle = self._probes
        while True:
            while idle and idle[-1].is_closed:
                idle.pop()
                self._probes_open -= 1
            if idle:
                ch = idle.pop()
                break
            if self._probes_open < _PROBES:
                self._probes_open += 1
                try:
                    await self._link.wait_up()
                    ch = await self._link.channel()
                except BaseException:
                    self._probes_open -= 1
                    self._wake_prober()
                    raise
                break
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._probe_waiters.append(fut)
            await fut
        try:
            ok = await ch.queue_declare(queue, passive=True)
        except aexc.ChannelNotFoundEntity:
            return 0  # the broker closed the channel with the error
        finally:
            if ch.is_closed:
                self._probes_open -= 1
            else:
                idle.append(ch)
            self._wake_prober()
        return ok.message_count or 0

    def _wake_prober(self) -> None:
        while self._probe_waiters:
            waiter = self._probe_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _queues(self, group: str) -> list[str]:
        g = self._topology.groups.get(group)
        if g is not None:
            return g.queues
        probe = GroupSpec(
            group, self._topology.group_queue(group), ephemeral=False,
            partitions=self._topology.partitions,
        )  # fmt: skip
        return probe.queues

    async def stats(self, group: str) -> TransportStats:
        """``backlog``: ready in the broker; ``pending``: held by this
        process (RabbitMQ does not say what others hold over AMQP);
        ``scheduled``: retries and delayed events this process sent;
        ``dead``: as of a read of the dead-letter queue at most
        ``_DEAD_FOR`` seconds old (or this process's own dead-letter,
        replay or purge since). ``settled`` and ``consumers`` are None:
        RabbitMQ does not count acknowledgements over AMQP (the management
        plugin's message rates are sampled every 5 s), and what the other
        consumers hold unacknowledged is not in ``pending``, so each
        process's admission reads its own held events and its own rate."""
        try:
            backlog, dead = await asyncio.gather(
                self._ready(self._queues(group)), self._dead_count(group)
            )
        except LOST as exc:
            raise translate(exc, f"reading the state of {group!r}") from exc
        pending = sum(r.held for r in self._readers if r.name == group)
        return TransportStats(backlog, pending, self._pub.scheduled_count(group), dead)

    async def _dead_count(self, group: str) -> int:
        """Dead letters of ``group``: one read of the whole dead-letter
        queue (a channel, a ``basic.get`` per message) serves every group's
        count for ``_DEAD_FOR`` seconds; admission asks ten times a second
        per stage, and the count is not what it reads."""
        now = self.clock.monotonic()
        if now - self._dead_read_at > _DEAD_FOR:
            reading = self._dead_reading
            if reading is None:
                reading = self._dead_reading = asyncio.ensure_future(self._dead.counts())
                reading.add_done_callback(self._dead_read)
            counts = await asyncio.shield(reading)
        else:
            counts = self._dead_counts
        return counts.get(group, 0)

    def _dead_read(self, fut: asyncio.Future[dict[str, int]]) -> None:
        self._dead_reading = None
        if not fut.cancelled() and fut.exception() is None:
            self._dead_counts = fut.result()
            self._dead_read_at = self.clock.monotonic()

    def _dead_changed(self) -> None:
        """This process changed the dead letters: the next count reads them."""
        self._dead_read_at = -math.inf

    @property
    def idle(self) -> bool:
        """Nothing published or handed out since :meth:`wait_idle` saw every
        group empty."""
        return not self._busy

    async def _settled(self) -> bool:
        if self._pub.busy:
            return False
        if any(r.buffer or r.held for r in self._readers if not r.stopping):
            return False
        if any(r.acks_waiting for r in self._readers):
            return False
        groups = list(self._topology.groups)
        if any(self._pub.scheduled_count(g) for g in groups):
            return False
        queues = [q for g in groups for q in self._queues(g)] + self._topology.delay_queues
        return await self._ready(queues) == 0

    async def wait_idle(self) -> None:
        """Return once no declared group holds anything this process can
        see: nothing ready in its queues or in the delay queues it used,
        nothing unconfirmed, held here or scheduled by this process."""
        while True:
            self._busy = False
            try:
                settled = await self._settled()
            except LOST as exc:
                raise translate(exc, "reading queue state") from exc
            if settled and not self._busy:
                return
            self._busy = True
            await self.clock.sleep(0.02)

    async def load_state(self, key: str) -> bytes | None:
        """The last value saved under ``key`` (a quorum queue of length 1,
        read with ``basic.get`` and put back; a load racing another load of
        the same key may see None)."""
        q = self._topology.state_queue(key)
        try:
            ch = await self._link.channel()
            try:
                await _declare_state(ch, q)
                msg = await ch.basic_get(q, no_ack=False)
                body = msg.body if isinstance(msg.delivery, aiormq.spec.Basic.GetOk) else None
            finally:
                with contextlib.suppress(BaseException):
                    await ch.close()  # the value goes back
        except LOST as exc:
            raise translate(exc, f"reading state {key!r}") from exc
        return body

    async def save_state(self, key: str, value: bytes) -> None:
        q = self._topology.state_queue(key)
        try:
            await _declare_state(await self._channel(), q)
        except LOST as exc:
            self._control = None
            raise translate(exc, f"writing state {key!r}") from exc
        await self._pub.send([Outgoing("", q, value, props(key))])

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self._pub.close(self.close_timeout)
            readers, self._readers = self._readers, []
            if readers:
                await asyncio.gather(
                    *(r.close(self.close_timeout) for r in readers), return_exceptions=True
                )
            await self._members.close()
            probes, self._probes = self._probes, []
            self._probes_open = 0
            for ch in probes:
                await self._link.close_channel(ch)
        except BaseException:
            # Cut short (a stop's deadline cancels the close it leaves
            # behind): the rest is abandoned as by a killed process, and the
            # connection still ends, or it reconnected forever behind the
            # app's back (a blackholed broker: a loop that never finished).
            self._closed = True
            self._link.abort()
            raise
        self._closed = True
        await self._link.close()


async def _declare_state(ch: aiormq.abc.AbstractChannel, queue: str) -> None:
    await ch.queue_declare(
        queue,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "drop-head"},
    )
