"""Consuming: the groups declared in this process, pulling from their
JetStream consumers (the shared one and the partitions this process owns),
settling deliveries, extending their leases, and handing them back.

Pulling keeps pull requests outstanding for at most ``prefetch`` messages
of the shared consumer (credit counted down per message, and by the
server's ``Nats-Pending-Messages`` when a request expires); idle heartbeats
let a silent pull be detected and reissued, so a consumer resumes by itself
after a reconnect or a server restart. An owned partition gets a share of
``prefetch`` and one short pull at a time, without heartbeats (its expiry
status is the sign of life), so that a partition to give up knows when
nothing more can come (see ``_balancer``).

``not_before``: JetStream cannot hold a message back, so a delivery that
arrives early is NAKed with a delay for the remainder and not handed out.
That delivery still counts in ``num_delivered``; the attempt handed to the
runner subtracts the deferrals (counted here when this process deferred it,
otherwise inferred from the stored time being before ``not_before``), and
the hand-backs (``release``; counted on the server, see ``_released``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..._clock import Clock
from ..._codec import Codec
from ..._errors import Closed, ConfigurationError, DecodeError, TransportError
from ..._event import Envelope
from ..._transport import Delivery, topic_matches
from .._partitions import Ownership
from ._balancer import Balancer, ended
from ._connection import ELECTION_ERRORS, CancelGuard, Connection, Election, translate
from ._groups import Group, Source, ack_info, ack_meta
from ._layout import Layout, consumer_name, partition_durable
from ._options import NatsOptions
from ._released import Released

__all__ = ("Consumer",)

log = logging.getLogger("surge.nats")


class Consumer:
    """The groups of one transport in this process, and everything that
    reads or settles their deliveries."""

    def __init__(
        self,
        conn: Connection,
        layout: Layout,
        options: NatsOptions,
        clock: Clock,
        codec: Codec,
        balancer: Balancer,
        released: Released,
        *,
        touched: Callable[[], None],
    ) -> None:
        self._conn = conn
        self._released = released
        self._layout = layout
        self._options = options
        self._stream = options.stream
        self._heartbeat = options.pull_heartbeat
        self._pull_expires = options.pull_expires
        self._part_expires = options.part_expires
        self._clock = clock
        self._codec = codec
        self._balancer = balancer
        self._touched = touched
        self._groups: dict[str, Group] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._redeclaring: dict[str, asyncio.Task[None]] = {}  # durable -> its declare

    # --- groups ----------------------------------------------------------------------
    def get(self, name: str) -> Group | None:
        """Group ``name`` if declared here."""
        return self._groups.get(name)

    def group(self, name: str) -> Group:
        g = self._groups.get(name)
        if g is None:
            raise ConfigurationError(f"group {name!r} was not declared")
        return g

    def groups(self) -> list[Group]:
        return list(self._groups.values())

    def by_durable(self, durable: str) -> Group | None:
        """The group one of whose consumers is named ``durable``."""
        return next((g for g in self._groups.values() if durable in g.by_durable), None)

    def ownership(self, name: str) -> Ownership | None:
        g = self._groups.get(name)
        return None if g is None else g.own

    async def declare(
        self, name: str, topics: Sequence[str], *, ephemeral: bool, partitions: int
    ) -> None:
        self._conn.client()
        for t in topics:
            if not t or any(c in t for c in " \t\r\n") or ".." in f".{t}.":
                raise ConfigurationError(f"topic {t!r} is not a valid NATS subject")
        g = self._groups.get(name)
        if g is None:
            g = self._groups[name] = Group(name, ephemeral, partitions)
        new = [t for t in topics if t not in g.topics]
        if new or not g.subjects:
            layout = self._layout
            g.topics.extend(new)
            g.subjects = [layout.subject(t) for t in g.topics]
            if ephemeral:  # never partitioned: keyed envelopes too
                g.subjects += [layout.keyed("*", t) for t in g.topics]
            g.subjects.append(layout.replay(g.durable))
            for src in g.sources.values():
                await self._ensure_consumer(g, src)

    async def groups_for(self, topic: str) -> list[str]:
        """The groups of the stream, declared by any process, whose shared
        consumer's filters take unkeyed envelopes of ``topic`` (a group's
        partition consumers filter the same topics): the group's name, kept
        in the consumer's description, or its consumer's name."""
        subject = self._layout.subject(topic)
        js = self._conn.js
        found: list[str] = []
        offset = 0
        try:
            while True:
                page = await js.consumers_info(self._stream, offset or None)
                for info in page:
                    config = info.config
                    filters = config.filter_subjects or (
                        [config.filter_subject] if config.filter_subject else []
                    )
                    if any(topic_matches(f, subject) for f in filters):
                        found.append(config.description or info.name)
                if len(page) < 256:
                    break
                offset += len(page)
        except nats.errors.Error as exc:
            raise translate(exc, f"listing the groups of {topic!r}") from exc
        return sorted(set(found))

    def _filter(self, g: Group, src: Source) -> list[str]:
        if src.part is None:
            return g.subjects
        return [self._layout.keyed(src.part, t) for t in g.topics]

    async def _ensure_consumer(self, g: Group, src: Source) -> None:
        o = self._options
        js = self._conn.js
        config = ConsumerConfig(
            durable_name=None if g.ephemeral else src.durable,
            name=src.durable,
            description=g.name,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=o.lease,
            max_deliver=o.max_deliver,
            deliver_policy=DeliverPolicy.NEW,
            filter_subjects=self._filter(g, src),
            max_ack_pending=o.max_ack_pending,
            inactive_threshold=o.ephemeral_ttl if g.ephemeral else None,
        )
        doing = f"declaring group {g.name!r}"
        electing = Election(self._clock, doing)
        while True:
            try:
                try:
                    await js.add_consumer(self._stream, config)
                except nats.js.errors.BadRequestError:
                    # It exists with settings we may not change (its deliver
                    # policy, say): keep those, update what we can.
                    info = await js.consumer_info(self._stream, src.durable)
                    old = info.config
                    old.filter_subject = None
                    old.filter_subjects = sorted(
                        set(old.filter_subjects or ()) | set(config.filter_subjects or ())
                    )
                    old.ack_wait = o.lease
                    await js.add_consumer(self._stream, old)
                break
            except ELECTION_ERRORS as exc:
                # a cluster electing the new consumer's leader, or still
                # settling after a node came back (CI: the quorum test's
                # first declare once its nodes were back): ask again; adding
                # the same consumer twice is no change
                await electing.wait_out(exc)
            except nats.errors.Error as exc:
                raise translate(exc, doing) from exc
        src.recreate = False

    # --- pulling ---------------------------------------------------------------------
    async def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        g = self.group(group)
        if g.consuming:
            raise ConfigurationError(f"group {group!r} is already consumed by this transport")
        if prefetch < 1:
            raise ConfigurationError("prefetch must be at least 1")
        conn = self._conn
        nc = conn.client()
        g.prefetch = prefetch
        try:
            # A message names its consumer in its ack subject; a status
            # message (heartbeat, expiry) comes on the reply subject of the
            # pull it ends: ``<inbox>.<partition>.<pull number>`` for
            # partitions. Those stay subscribed until close: a partition is
            # handed over only once its last pull has ended.
            inbox = nc.new_inbox()
            g.sub = await nc.subscribe(
                inbox, cb=self._on_msg(g, {inbox: g.shared}), pending_msgs_limit=-1
            )
            if g.parts and g.psub is None:
                g.inbox = nc.new_inbox()
                sources = {f"{g.inbox}.{src.token}": src for src in g.parts}
                g.psub = await nc.subscribe(
                    g.inbox + ".*.*", cb=self._on_msg(g, sources), pending_msgs_limit=-1
                )
        except nats.errors.Error as exc:
            raise translate(exc, f"consuming {group!r}") from exc
        g.consuming = True
        g.handed_back = False
        now = self._clock.monotonic()
        for src in g.sources.values():
            src.last_seen = now
        self._balancer.start(g)
        loop = asyncio.get_running_loop()
        try:
            while conn.open:
                if g.buffer:
                    batch = list(g.buffer)
                    g.buffer.clear()
                    yield batch
                    continue
                try:
                    with CancelGuard():
                        await self._pull(g)
                except Closed:
                    return
                except (nats.errors.Error, TransportError) as exc:
                    g.errors += 1
                    log.warning("pull for %s failed: %r; retrying", g.name, exc)
                if g.errors:
                    # back off while the server or the consumer is unhappy
                    await self._clock.sleep(min(0.05 * 2 ** min(g.errors, 6), 2.0))
                    if g.buffer:
                        continue
                fut = g.waiter = loop.create_future()
                try:
                    async with asyncio.timeout(self._heartbeat):
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
            if sub is not None and conn.open:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    def _on_msg(self, g: Group, by_reply: dict[str, Source]) -> Any:
        async def on_msg(msg: Msg) -> None:
            if msg.reply:
                await self._on_delivery(g, msg)
                return
            subject, pull = msg.subject, None
            src = by_reply.get(subject)
            if src is None:  # a partition's pull: <inbox>.<partition>.<pull number>
                subject, _, pull = subject.rpartition(".")
                src = by_reply.get(subject)
            if src is None:
                return
            if pull is not None and pull != str(src.pull_no):
                # The status of a pull the silence check gave up on, come
                # late: it says nothing of the current pull (a 408 of it
                # would count as the current one's finding nothing queued).
                log.debug("%s: a status of an earlier pull of %s: ignored", g.name, src.durable)
                return
            src.last_seen = self._clock.monotonic()
            src.stalled = False
            self._on_status(g, src, msg.headers or {})

        return on_msg

    def _check_silence(self, g: Group) -> None:
        """No message and no heartbeat (no expiry status for a partition's
        pull): a pull died with a connection or a server; forget its credit
        so that it is asked again."""
        now = self._clock.monotonic()
        for src in g.sources.values():
            hb = src.part is None
            silence = 3 * self._heartbeat + 0.5 if hb else self._part_expires + 1.0
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
        nc = self._conn.client()
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
            # one pull at a time (see _pull_from); none once the lease may
            # have lapsed: what it brought would be another owner's
            if not src.outstanding and self._leased(g, src):
                await self._pull_from(nc, g, src, share)

    async def _pull_from(self, nc: Client, g: Group, src: Source, share: int = 0) -> None:
        if src.recreate:
            self._redeclare(g, src)
            return
        if src.part is None:
            if g.sub is None:
                return
            free = g.prefetch - len(g.held) - src.outstanding
            if free <= 0 or (src.outstanding and free < max(1, g.prefetch // 4)):
                return
            request = {
                "batch": free,
                "expires": int(self._pull_expires * 1e9),
                "idle_heartbeat": int(self._heartbeat * 1e9),
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
            request = {"batch": free, "expires": int(self._part_expires * 1e9)}
            src.pull_no += 1
            inbox = f"{g.inbox}.{src.token}.{src.pull_no}"
        if not src.outstanding:
            src.last_seen = src.pull_sent = self._clock.monotonic()  # silence counts from this pull
        src.outstanding += free
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{src.durable}",
            json.dumps(request).encode(),
            reply=inbox,
        )

    def _redeclare(self, g: Group, src: Source) -> None:
        """Declare ``src``'s consumer again, in the background; it is not
        pulled meanwhile. Its pull was answered 503 (no responders: the
        consumer is gone, or its leader died with a cluster node and another
        is being elected) or said it was deleted. The declare waits out an
        election, which must not hold up the pulls of the group's other
        consumers, whose leaders live (before: the NATS cluster test handled
        nothing for 10 s after the stream leader's node was killed, every
        partition waiting on two 5 s declares of one consumer)."""
        task = self._redeclaring.get(src.durable)
        if task is not None and not task.done():
            return

        async def redeclare() -> None:
            try:
                await self._ensure_consumer(g, src)
            except Exception as exc:  # said; tried again at the next pull
                g.errors += 1
                log.warning("declaring consumer %s again failed: %r; retrying", src.durable, exc)
            else:
                log.warning(
                    "consumer %s did not answer a pull (gone, or its leader being elected); "
                    "declared it again",
                    src.durable,
                )
            g.wake()

        self._redeclaring[src.durable] = asyncio.get_running_loop().create_task(
            redeclare(), name=f"surge-nats-redeclare-{src.durable}"
        )

    async def _on_delivery(self, g: Group, msg: Msg) -> None:
        reply = msg.reply
        try:
            consumer, delivered, seq, cseq, stored = ack_info(reply)
            src = g.by_durable[consumer]
        except (ValueError, IndexError, KeyError):
            log.error("unexpected JetStream ack subject %r on %s", reply, g.name)
            return
        src.last_seen = self._clock.monotonic()
        if src.part is not None and g.consuming and g.own is not None and src.part in g.own.owned:
            g.follow(src, cseq, src.last_seen)
            if delivered == 1 and src.outstanding:
                src.pull_fresh = src.pull_sent
        src.stalled = False
        g.errors = 0
        self._touched()
        try:
            env = self._codec.decode_envelope(msg.data)
        except DecodeError:
            # Not ours (published by something else): hand it on as an
            # undecodable event, so the runner dead-letters it with a reason.
            topic = self._layout.topic_of(msg.subject)
            env = Envelope(f"nats-{self._stream}-{seq}", topic, None, stored, None, None, msg.data)
        deferrals = g.deferred.pop(seq, 0)
        g.scheduled.pop(seq, None)
        nb = env.not_before
        if nb is not None:
            wait = nb - self._clock.time()
            if wait > 0:
                self._arrived(g, src)
                g.deferred[seq] = deferrals + 1
                g.scheduled[seq] = nb
                await self._conn.send(reply, b'-NAK {"delay": %d}' % int(wait * 1e9 + 1e6))
                if src.outstanding <= 0:
                    g.wake()
                return
            if not deferrals and stored < nb:
                deferrals = 1  # deferred by another process, most likely
        attempt = delivered - deferrals
        if attempt > 1:
            # Handed back untouched before (a stop): not an attempt. Looked
            # up while its pull still counts it outstanding, so a partition
            # is not given up under it.
            attempt -= await self._released.times(reply)
        self._arrived(g, src)
        d = Delivery(env, g.name, max(1, attempt), reply)
        g.held[reply] = src
        src.held += 1
        if src.part is not None and (
            not g.consuming
            or g.own is None
            or src.part not in g.own.owned
            or (src.given_back and src.part in g.own.releasing)
        ):
            # Late: the consumer ended, or the partition is not ours now, or
            # is being given up and what its hold kept was given back (the
            # next owner gets those first: this one goes after them).
            # NAKed once this pull ended (a NAK now would come straight back
            # to it), before the lease goes.
            log.debug("%s: partition %d: delivery %d came late: handed back", g.name, src.part, seq)
            g.returning.append(reply)
            return
        if src.hold is not None and g.take(src, seq, d):
            return
        g.buffer.append(d)
        g.wake()

    @staticmethod
    def _arrived(g: Group, src: Source) -> None:
        """A message of an open pull of ``src`` arrived."""
        if src.outstanding:
            src.outstanding -= 1
            if not src.outstanding and src.part is not None:
                g.rebalance.set()  # a partition being given up may be free now
                g.wake()  # its next pull (a held one's own wake-up: it buffers nothing)

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
            if status in ("404", "408"):
                src.pull_dry = src.pull_sent
            g.rebalance.set()
        g.wake()

    def reconnected(self) -> None:
        """Pull requests may have died with the old connection (or server):
        forget their credit and ask again."""
        for g in self._groups.values():
            for src in g.sources.values():
                src.outstanding = 0
            g.wake()

    @property
    def stalled(self) -> bool:
        """Some consuming group's pulls have gone silent."""
        return any(
            src.stalled for g in self._groups.values() if g.consuming for src in g.sources.values()
        )

    # --- fencing ---------------------------------------------------------------------
    def fenced(self, d: Delivery) -> bool:
        """``d`` must not start here: its partition's lease may have passed
        to another consumer (``surge.Fences``).

        A lease written by a request sent at t expires on the server no
        sooner than t + lease (the bucket's max age), and renewals go out
        every lease/3; this process starts a partition's deliveries only
        until t + 2/3 lease, so a handler shorter than lease/3 ends before
        another consumer can own the partition, even when this one was cut
        off from NATS or stalled. At the first lapse seen, every delivery of
        the partition read here is forgotten, unsettled (JetStream
        redelivers it after its AckWait, to the partition's owner then), and
        the partition is dropped here: if it is still ours, the balancer
        takes it again as a new owner does, keeping back what it reads until
        those redeliveries came, so its keys keep their order."""
        g = self._groups.get(d.group)
        if g is None or g.own is None:
            return False
        src = g.held.get(d.token)
        if src is None:
            # A delivery is held from its arrival until it is settled: one
            # handed out and not held was forgotten at a lapse.
            return self._of_partition(g, d.token)
        p = src.part
        if p is None or self._leased(g, src):
            return False
        n = g.fence(src)
        g.own.lost((p,))
        g.rebalance.set()
        log.warning(
            "nats: %s: partition %d's lease was not renewed in time (NATS unreachable or "
            "this process stalled): its %d deliveries here are left to its owner",
            g.name,
            p,
            n,
        )
        return True

    def _leased(self, g: Group, src: Source) -> bool:
        """Partition ``src`` is this process's, its lease surely not lapsed."""
        return (
            g.own is not None
            and src.part in g.own.owned
            and self._clock.monotonic() < src.valid_until
        )

    @staticmethod
    def _of_partition(g: Group, token: str) -> bool:
        try:
            src = g.by_durable.get(ack_info(token)[0])
        except (ValueError, IndexError):
            return False
        return src is not None and src.part is not None

    # --- settling --------------------------------------------------------------------
    def _settled(self, d: Delivery) -> Group | None:
        g = self._groups.get(d.group)
        if g is not None:
            g.forget(d.token)
        return g

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """``+ACK`` each, then delete the hand-back counts of those that had
        one, all at once. The acks go first: a count's delete is a round
        trip, and waiting for each before the next ack left handled
        deliveries unacknowledged for as long (the keyed crash test: a
        worker that had just taken over two partitions, 317 redeliveries
        with counts, handled 154 of them and acked a few before its kill,
        so 154 were handled again elsewhere)."""
        released = self._released
        groups: dict[str, Group] = {}
        counted: list[str] = []
        with CancelGuard():
            for d in deliveries:
                g = self._settled(d)
                if g is not None:
                    groups[g.name] = g
                await self._conn.ack(d.token)
                if released.has(d.token):
                    counted.append(d.token)
            for g in groups.values():
                g.wake()
            if counted:
                await asyncio.gather(*(released.settled(t) for t in counted))

    async def nack(self, delivery: Delivery, delay: float) -> None:
        g = self._settled(delivery)
        self._released.moved(delivery.token)
        with CancelGuard():
            if delay > 0:
                if g is not None:
                    g.scheduled[ack_meta(delivery.token)[1]] = self._clock.time() + delay
                await self._conn.send(delivery.token, b'-NAK {"delay": %d}' % int(delay * 1e9))
            else:
                await self._conn.send(delivery.token, b"-NAK")
        if g is not None:
            g.wake()

    async def terminate(self, delivery: Delivery) -> None:
        """Settle ``delivery`` for good (its dead letter is written)."""
        g = self._settled(delivery)
        with CancelGuard():
            await self._conn.send(delivery.token, b"+TERM")
            await self._released.settled(delivery.token)
        if g is not None:
            g.wake()

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand deliveries back untouched, at stop, with what the group's
        ended consumer fetched and did not hand out. A partition's are NAKed
        in stream order once the partition's pull has ended, and before its
        lease is released, so that its next owner reads them first."""
        conn = self._conn
        for name in {d.group for d in deliveries} | set(self._groups):
            g = self._groups.get(name)
            if g is None:
                continue
            mine = [d for d in deliveries if d.group == name]
            if g.consuming:  # not at stop: NAKed now
                await g.hand_back(conn, self._released, [d.token for d in mine])
                continue
            back = [d.token for d in (*mine, *g.buffer) if d.token in g.held]
            g.buffer.clear()
            shared = [t for t in back if g.held[t].part is None]
            g.returning += [t for t in back if g.held[t].part is not None]
            await g.hand_back(conn, self._released, shared)
            g.handed_back = True
            g.rebalance.set()

    # --- leases of deliveries -----------------------------------------------------------
    def start(self) -> None:
        """Extend the leases of held deliveries (when ``extend_leases``)."""
        if self._options.extend_leases:
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep_leases(), name="surge-nats-leases"
            )

    async def _keep_leases(self) -> None:
        """Send in-progress acks for every delivery this process holds (not
        for a partition whose lease it lost, or may have lost: those go to
        the next owner, whose takeover waits for them until their AckWait
        has run out, counted from the last of these; see ``_balancer``)."""
        while self._conn.open:
            await self._clock.sleep(self._options.lease / 3)
            for g in list(self._groups.values()):
                held = list(g.held.items())
                with CancelGuard():
                    for reply, src in held:
                        if src.part is None or self._leased(g, src):
                            await self._conn.send(reply, b"+WPI")

    async def stop(self) -> None:
        """Stop extending leases and declaring consumers again."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await ended([keeper], "lease keeping")
        redeclaring = list(self._redeclaring.values())
        self._redeclaring.clear()
        for task in redeclaring:
            task.cancel()
        await ended(redeclaring, "redeclaring")

    # --- state -----------------------------------------------------------------------
    @property
    def unsettled(self) -> bool:
        """Some delivery read here is not settled (or not handed out yet)."""
        return any(g.unsettled for g in self._groups.values())

    def durables(self, group: str, partitions: int) -> list[str]:
        """The JetStream consumers of ``group`` (declared here or not)."""
        g = self._groups.get(group)
        if g is not None:
            return [src.durable for src in g.sources.values()]
        durable = consumer_name(group)
        return [durable, *(partition_durable(durable, p) for p in range(partitions))]

    async def counts(self, group: str, partitions: int) -> tuple[int, int]:
        """(undelivered, unacknowledged) of ``group``, from the server."""
        js = self._conn.js
        backlog = pending = 0
        for durable in self.durables(group, partitions):
            try:
                info = await js.consumer_info(self._stream, durable)
            except nats.js.errors.NotFoundError:
                continue  # a partition of a group declared before partitions
            backlog += info.num_pending or 0
            pending += info.num_ack_pending or 0
        return backlog, pending

    def scheduled(self, group: str) -> int:
        """Deliveries of ``group`` NAKed with a delay here and not due yet."""
        g = self._groups.get(group)
        if g is None:
            return 0
        # Entries another process took over are never seen again here:
        # forget them a lease after they were due.
        stale = self._clock.time() - self._options.lease
        for seq in [s for s, due in g.scheduled.items() if due < stale]:
            del g.scheduled[seq]
        return len(g.scheduled)

    async def settled_on_server(self) -> bool:
        """No consumer of a group declared here has anything undelivered or
        unacknowledged (asks the server)."""
        js = self._conn.js
        for g in list(self._groups.values()):
            for src in list(g.sources.values()):
                info = await js.consumer_info(self._stream, src.durable)
                if info.num_pending or info.num_ack_pending:
                    return False
        return True

    async def close(self) -> None:
        """After the hand-over (the connection is closing): wake the consume
        loops, delete the ephemeral consumers (each bounded), forget the groups."""
        await self.stop()
        self._released.forget()
        for g in self._groups.values():
            g.wake()
            if g.ephemeral:
                with contextlib.suppress(nats.errors.Error, TimeoutError, Closed):
                    async with asyncio.timeout(self._options.ack_timeout):
                        await self._conn.js.delete_consumer(self._stream, g.durable)

    def forget_groups(self) -> None:
        self._groups.clear()
