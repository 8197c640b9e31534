"""NATS JetStream: a stream per app, a durable pull consumer per group.

Layout on the server, for ``stream="surge"`` (the default):

==========================  ================================================
stream ``surge``            subjects ``surge.<topic>`` (topic dots are subject
                            tokens, so ``orders.*`` / ``orders.>`` are NATS
                            wildcards), ``surge_k.<p>.<topic>`` (keyed
                            envelopes, partition p) and
                            ``surge_replay.<group>``; file storage, interest
                            retention (a message goes once every group that
                            wanted it has acked it); the partition count in
                            its metadata
consumer per group          durable, pull, explicit acks; AckWait is the
                            lease; filter subjects = the group's topics plus
                            its own replay subject
consumer per partition      ``<group>-p<p>``: the group's keyed envelopes of
                            partition p, read by the lease holder only
bucket ``surge_parts``      partition leases and group memberships
stream ``surge_dlq``        dead letters, ``surge_dlq.<group>`` (JetStream
                            has no dead-letter queue of its own)
==========================  ================================================

Why it is built this way:

- Publishing fires many messages, each with a reply inbox, and awaits all
  the acks (``publish_async`` style) with a bounded number outstanding, so
  ``await publish()`` returns when JetStream stored the batch. ``Nats-Msg-Id``
  carries the event id, so a republish after a lost ack, or a redelivered
  handler republishing derived ids, is dropped by the server within
  ``dedup_window``.
- Pulling keeps pull requests outstanding for at most ``prefetch`` messages
  of the shared consumer, and a share of ``prefetch`` per owned partition
  (so up to about twice ``prefetch`` when keyed and unkeyed events both
  flow); a silent pull is detected and reissued, so a consumer resumes by
  itself after a reconnect or a server restart (see ``_nats_consume``).
- Deliveries held by this process get an in-progress ack every third of the
  lease, so a slow handler is not redelivered to another worker.
- ``not_before``: JetStream cannot hold a message back, so a delivery that
  arrives early is NAKed with a delay for the remainder and not handed out.
  That delivery still counts in ``num_delivered``; the attempt handed to the
  runner subtracts the deferrals (counted here when this process deferred
  it, otherwise inferred from the stored time being before ``not_before``).
- Replay republishes a dead letter to ``surge_replay.<group>``: a topic
  subject would fan it out to every group, the replay subject reaches only
  the consumer of the group that gave up on it.
- MaxDeliver is only a safety net (``max_deliver``, default 100) against a
  message that kills its worker every time; retries and dead letters are the
  runner's. JetStream's MaxDeliver advisory makes it a dead letter here too;
  the message itself stays in the stream (other groups may still want it)
  until ``max_age`` (seconds, default: no limit) removes it.

- Several workers on one group share its unkeyed work: JetStream hands
  each message to whichever worker pulls next. Keyed envelopes (``key=``,
  or the key of the app's keyed subscription) go to one of ``partitions``
  (default 8, fixed per stream) partitions, each read by the one worker
  holding its lease, so one key is handled one event at a time and in
  publish order across workers, while workers join and leave; a killed
  worker's partitions move after its lease, its unsettled deliveries first.
  A retried event (nack with a delay) may come after later ones of its key.
  Unkeyed events take the same path as without partitions. See
  ``_nats_partitions``.
- Interest retention: a message stays until every group it matched acked
  it; one that no declared group matches is not kept (as on every surge
  transport), so workers declare their groups before producers publish.

Needs nats-server 2.10 or later (consumers with several filter subjects,
stream metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import urllib.parse
from collections import deque
from collections.abc import Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from .._clock import Clock, RealClock
from .._codec import Codec, MsgpackCodec
from .._errors import Closed, ConfigurationError, TransportError
from .._event import Envelope
from .._transport import DeadLetter, Delivery, TransportStats
from . import _nats_partitions as _parts
from ._nats_consume import Consuming, Group, ack_meta, forget
from ._nats_dlq import _UNSAFE, DeadLetters, consumer_name
from ._nats_partitions import Leases, Source, partition_durable
from ._nats_publish import Item, Publisher, safe_url, translate
from ._partitions import DEFAULT_PARTITIONS, partition_of

__all__ = ("NatsTransport", "consumer_name")

log = logging.getLogger("surge.nats")

_PARTITIONS = "surge_partitions"  # the stream's metadata key for the partition count


class NatsTransport(DeadLetters, Consuming):
    """Groups as durable JetStream pull consumers on one stream.

    Options: ``stream`` (name, and subject prefix), ``lease`` (AckWait, s),
    ``dedup_window`` (s), ``max_pending`` (publish acks outstanding),
    ``max_deliver``, ``max_ack_pending`` (per consumer, all workers),
    ``heartbeat`` (s, idle heartbeat of pulls), ``max_age`` (s, the
    stream's retention limit; default none), ``partitions`` (of keyed
    envelopes, per stream: the first process fixes it), credentials ``user`` /
    ``password`` / ``token`` (or in the URL), ``nkeys_seed``, ``creds`` (a
    ``.creds`` file), TLS via a ``tls://`` URL or ``tls`` (an SSLContext) or
    ``tls_ca`` / ``tls_cert`` / ``tls_key`` files; ``extend_leases``
    (in-progress acks for held deliveries), ``codec``, ``clock``.

    Simple options may also come in the URL's query, and win there:
    ``nats://host:4222?stream=shop&lease=10``.
    """

    durable = True

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        stream: str = "surge",
        lease: float = 30.0,
        dedup_window: float = 120.0,
        max_pending: int = 4096,
        max_deliver: int = 100,
        max_ack_pending: int = 20_000,
        heartbeat: float = 1.0,
        ack_timeout: float = 5.0,
        publish_timeout: float = 60.0,
        ephemeral_ttl: float = 60.0,
        max_age: float | None = None,
        partitions: int | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        nkeys_seed: str | None = None,
        creds: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        connect_timeout: float = 5.0,
        extend_leases: bool = True,
        name: str | None = None,
        codec: Codec | None = None,
        clock: Clock | None = None,
    ) -> None:
        url, _, query = url.partition("?")
        q = dict(urllib.parse.parse_qsl(query))
        try:
            stream = q.pop("stream", stream)
            lease = float(q.pop("lease", lease))
            dedup_window = float(q.pop("dedup_window", dedup_window))
            heartbeat = float(q.pop("heartbeat", heartbeat))
            max_pending = int(q.pop("max_pending", max_pending))
            max_deliver = int(q.pop("max_deliver", max_deliver))
            max_ack_pending = int(q.pop("max_ack_pending", max_ack_pending))
            if "max_age" in q:
                max_age = float(q.pop("max_age"))
            if "partitions" in q:
                partitions = int(q.pop("partitions"))
        except ValueError as exc:
            raise ConfigurationError(f"bad option in the NATS URL query {query!r}: {exc}") from None
        if q:
            raise ConfigurationError(f"unknown options in the NATS URL: {sorted(q)}")
        if _UNSAFE.search(stream):
            raise ConfigurationError(f"stream name {stream!r}: use letters, digits, _ and -")
        if lease <= 0 or heartbeat <= 0 or max_pending < 1:
            raise ConfigurationError("lease, heartbeat and max_pending must be positive")
        if partitions is not None and partitions < 1:
            raise ConfigurationError("partitions must be at least 1")
        self.url = url
        self.stream = stream
        self.dlq_stream = f"{stream}_dlq"
        self.lease = lease
        self.dedup_window = dedup_window
        self.max_pending = max_pending
        self.max_deliver = max_deliver
        self.max_ack_pending = max_ack_pending
        # A pull request lives at most half a lease: a consumer that stops
        # asking (its process hangs) stops receiving before its deliveries
        # time out and go elsewhere. Heartbeats come 4 times per request.
        self.pull_expires = min(5 * heartbeat, lease / 2)
        self.heartbeat = min(heartbeat, self.pull_expires / 4)
        # A partition's pull is short, and ends with a status rather than
        # heartbeats: a partition to give up (or a stopping app) waits for it.
        self.part_expires = min(self.pull_expires, 1.0)
        self._asked_partitions = partitions
        self.partitions = partitions or DEFAULT_PARTITIONS
        """Partitions of keyed envelopes (the stream's, once started)."""
        self.ack_timeout = ack_timeout
        self.publish_timeout = publish_timeout
        self.ephemeral_ttl = ephemeral_ttl
        self.max_age = max_age
        self.extend_leases = extend_leases
        self.codec: Codec = codec or MsgpackCodec()
        self.clock: Clock = clock or RealClock()
        self._connect: dict[str, Any] = {
            "servers": [s.strip() for s in url.split(",")],
            "user": user,
            "password": password,
            "token": token,
            "nkeys_seed": nkeys_seed,
            "user_credentials": creds,
            "tls": tls or _ssl_context(url, tls_ca, tls_cert, tls_key),
            "connect_timeout": connect_timeout,
            "name": name,
        }
        self._nc: Client | None = None
        self._js: Any = None
        self._groups: dict[str, Group] = {}
        self._closed = True
        self._connected = False
        self._pub = Publisher(self)
        self._leases = Leases(self)
        self._recent_acks: deque[str] = deque(maxlen=4096)
        self._background: set[asyncio.Task[None]] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._busy = True  # cleared only by wait_idle's observation
        self.last_error: str | None = None
        """The last connection error, until the connection is back."""

    # --- connection ------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """Connected, and no consumer's pulls have gone silent."""
        return (
            not self._closed
            and self._connected
            and not any(
                src.stalled
                for g in self._groups.values()
                if g.consuming
                for src in g.sources.values()
            )
        )

    def _nats(self) -> Client:
        if self._nc is None or self._closed:
            raise Closed("transport is closed")
        return self._nc

    async def start(self) -> None:
        if not self._closed:
            return
        opts = {k: v for k, v in self._connect.items() if v is not None}
        nc = Client()
        try:
            # A failed TLS handshake can leave nats-py's connect hanging:
            # bound it, then clean up what it left.
            async with asyncio.timeout(4 * self._connect["connect_timeout"] + 1):
                await nc.connect(
                    **opts,
                    allow_reconnect=True,
                    # Each server twice at first (so bad credentials fail
                    # fast); forever once connected, set below.
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # a float works; typed int
                    ping_interval=5,
                    max_outstanding_pings=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise TransportError(
                f"cannot connect to NATS at {safe_url(self.url)}: {exc!r}"
            ) from exc
        self._nc = nc
        nc.options["max_reconnect_attempts"] = -1
        self._closed = False
        self._connected = True
        version = nc.connected_server_version
        if (version.major, version.minor) < (2, 10):
            await nc.close()
            self._closed = True
            raise TransportError(
                f"nats-server {version} at {safe_url(self.url)} is too old: "
                "surge needs 2.10 or later"
            )
        self._js = nc.jetstream()
        try:
            await self._ensure_stream(
                self.stream,
                [f"{self.stream}.>", f"{self.stream}_k.>", f"{self.stream}_replay.>"],
                interest=True,
            )
            await self._ensure_stream(self.dlq_stream, [f"{self.stream}_dlq.>"], interest=False)
            await self._pub.open(nc)
            await nc.subscribe(
                f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.*",
                cb=self._on_max_deliveries,
            )
        except nats.errors.Error as exc:
            raise translate(exc, "setting up JetStream") from exc
        except ConfigurationError:
            await nc.close()
            self._closed = True
            raise
        self._keeper = asyncio.get_running_loop().create_task(
            self._keep_leases(), name="surge-nats-leases"
        )

    async def _ensure_stream(self, name: str, subjects: list[str], *, interest: bool) -> None:
        """Create or update a stream; the events stream (``interest``) also
        carries the partition count, which must not change under its data."""
        config = StreamConfig(
            name=name,
            subjects=subjects,
            storage=StorageType.FILE,
            retention=RetentionPolicy.INTEREST if interest else RetentionPolicy.LIMITS,
            duplicate_window=self.dedup_window,
            max_age=self.max_age if interest else None,
            metadata={_PARTITIONS: str(self.partitions)} if interest else None,
        )
        try:
            info = await self._js.stream_info(name)
        except nats.js.errors.NotFoundError:
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                raise TransportError(f"cannot create stream {name!r}: {exc.description}") from exc
            return
        metadata = info.config.metadata or {}
        stored = metadata.get(_PARTITIONS)
        if interest and stored is not None and int(stored) != self.partitions:
            if self._asked_partitions is not None:
                raise ConfigurationError(
                    f"stream {name!r} has {stored} partitions, not the "
                    f"{self._asked_partitions} asked for: use another stream to change it"
                )
            self.partitions = int(stored)
        if (
            set(info.config.subjects or ()) != set(subjects)
            or info.config.duplicate_window != self.dedup_window
            or (interest and (info.config.max_age or None) != self.max_age)
            or (interest and stored is None)
        ):
            config.retention = info.config.retention  # retention cannot change on update
            if interest:
                config.metadata = {**metadata, _PARTITIONS: str(self.partitions)}
            await self._js.update_stream(config)

    async def _on_error(self, exc: Exception) -> None:
        self.last_error = repr(exc)
        log.warning("NATS connection error (%s): %r", safe_url(self.url), exc)

    async def _on_disconnect(self) -> None:
        if not self._closed:
            self._connected = False
            log.warning("lost connection to NATS at %s; reconnecting", safe_url(self.url))

    async def _on_reconnect(self) -> None:
        self._connected = True
        self.last_error = None
        log.warning("reconnected to NATS at %s", safe_url(self.url))
        # Pull requests may have died with the old connection (or server):
        # forget their credit and ask again.
        for g in self._groups.values():
            for src in g.sources.values():
                src.outstanding = 0
            g.wake()
        # Publishes whose acks were lost are resent now rather than after
        # ack_timeout, under the same Nats-Msg-Id.
        self._pub.reconnected()
        # Acks sent just before the drop may never have arrived; acking
        # twice is harmless, a lost ack costs a redelivery a lease later.
        for reply in list(self._recent_acks):
            await self._send_ack(reply, b"+ACK")

    # --- groups ----------------------------------------------------------------
    def _subject(self, topic: str) -> str:
        return f"{self.stream}.{topic}"

    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        self._nats()
        for t in topics:
            if not t or any(c in t for c in " \t\r\n") or ".." in f".{t}.":
                raise ConfigurationError(f"topic {t!r} is not a valid NATS subject")
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = Group(group, ephemeral, self.partitions)
        new = [t for t in topics if t not in g.topics]
        if new or not g.subjects:
            g.topics.extend(new)
            g.subjects = [self._subject(t) for t in g.topics]
            if ephemeral:  # never partitioned: keyed envelopes too
                g.subjects += [f"{self.stream}_k.*.{t}" for t in g.topics]
            g.subjects.append(f"{self.stream}_replay.{g.durable}")
            for src in g.sources.values():
                await self._ensure_consumer(g, src)

    def _filter(self, g: Group, src: Source) -> list[str]:
        if src.part is None:
            return g.subjects
        return [f"{self.stream}_k.{src.part}.{t}" for t in g.topics]

    async def _ensure_consumer(self, g: Group, src: Source) -> None:
        subjects = self._filter(g, src)
        config = ConsumerConfig(
            durable_name=None if g.ephemeral else src.durable,
            name=src.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.lease,
            max_deliver=self.max_deliver,
            deliver_policy=DeliverPolicy.NEW,
            filter_subjects=subjects,
            max_ack_pending=self.max_ack_pending,
            inactive_threshold=self.ephemeral_ttl if g.ephemeral else None,
        )
        try:
            try:
                await self._js.add_consumer(self.stream, config)
            except nats.js.errors.BadRequestError:
                # It exists with settings we may not change (its deliver
                # policy, say): keep those, update what we can.
                info = await self._js.consumer_info(self.stream, src.durable)
                old = info.config
                old.filter_subject = None
                old.filter_subjects = sorted(set(old.filter_subjects or ()) | set(subjects))
                old.ack_wait = self.lease
                await self._js.add_consumer(self.stream, old)
        except nats.errors.Error as exc:
            raise translate(exc, f"declaring group {g.name!r}") from exc
        src.recreate = False

    def _group(self, name: str) -> Group:
        g = self._groups.get(name)
        if g is None:
            raise ConfigurationError(f"group {name!r} was not declared")
        return g

    # --- publishing --------------------------------------------------------------
    def _encode(self, envelopes: Sequence[Envelope]) -> list[Item]:
        encode = self.codec.encode_envelope
        stream = self.stream
        n = self.partitions
        return [
            (
                f"{stream}.{env.topic}"
                if env.key is None
                else f"{stream}_k.{partition_of(env.key, n)}.{env.topic}",
                encode(env),
                {"Nats-Msg-Id": env.id},
            )
            for env in envelopes
        ]

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self._nats()
        items = self._encode(envelopes)  # encoding errors before anything is sent
        self._busy = True
        await self._pub.publish(items)

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        self._nats()
        items = self._encode(envelopes)
        self._pub.publish_nowait(items)
        self._busy = True

    async def flush(self) -> None:
        """Wait until JetStream acknowledged everything published so far."""
        await self._pub.flush()

    # --- consuming ---------------------------------------------------------------
    # --- settling ----------------------------------------------------------------
    async def _send_ack(self, reply: str, payload: bytes) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        try:
            await nc.publish(reply, payload)
        except nats.errors.Error as exc:
            # The server redelivers after the lease: at-least-once holds.
            log.warning("could not send %r for %s: %r", payload[:4], reply, exc)

    def _release(self, d: Delivery) -> Group | None:
        g = self._groups.get(d.group)
        if g is not None:
            forget(g, d.token)
        return g

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        last: Group | None = None
        recent = self._recent_acks
        for d in deliveries:
            g = self._release(d)
            recent.append(d.token)
            await self._send_ack(d.token, b"+ACK")
            if g is not last and last is not None:
                last.wake()
            last = g
        if last is not None:
            last.wake()

    async def nack(self, delivery: Delivery, delay: float) -> None:
        g = self._release(delivery)
        if delay > 0:
            if g is not None:
                g.scheduled[ack_meta(delivery.token)[1]] = self.clock.time() + delay
            await self._send_ack(delivery.token, b'-NAK {"delay": %d}' % int(delay * 1e9))
        else:
            await self._send_ack(delivery.token, b"-NAK")
        if g is not None:
            g.wake()

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        _, seq, _ = ack_meta(delivery.token)
        durable = consumer_name(delivery.group)
        # Written before the original is settled; a crash in between makes a
        # second record with the same msg id, which the server drops.
        await self._store_dead(durable, record, f"dlq.{durable}.{record.id}.{seq}")
        g = self._release(delivery)
        await self._send_ack(delivery.token, b"+TERM")
        if g is not None:
            g.wake()

    async def _keep_leases(self) -> None:
        """Send in-progress acks for every delivery this process holds (not
        for a partition whose lease it lost: those go to the next owner)."""
        while not self._closed and self.extend_leases:
            await self.clock.sleep(self.lease / 3)
            for g in list(self._groups.values()):
                owned = g.own.owned if g.own is not None else ()
                held = [t for t, src in g.held.items() if src.part is None or src.part in owned]
                for reply in held:
                    await self._send_ack(reply, b"+WPI")

    # --- state -------------------------------------------------------------------
    def _durables(self, group: str) -> list[str]:
        g = self._groups.get(group)
        if g is not None:
            return [src.durable for src in g.sources.values()]
        durable = consumer_name(group)
        return [durable, *(partition_durable(durable, p) for p in range(self.partitions))]

    async def stats(self, group: str) -> TransportStats:
        subject = f"{self.stream}_dlq.{consumer_name(group)}"
        backlog = pending = 0
        async with self._session():
            await self._known(group)
            try:
                for durable in self._durables(group):
                    try:
                        info = await self._js.consumer_info(self.stream, durable)
                    except nats.js.errors.NotFoundError:
                        continue  # a partition of a group declared before partitions
                    backlog += info.num_pending or 0
                    pending += info.num_ack_pending or 0
                dlq = await self._js.stream_info(self.dlq_stream, subjects_filter=subject)
            except nats.errors.Error as exc:
                raise translate(exc, f"reading the state of {group!r}") from exc
        g = self._groups.get(group)
        scheduled = 0
        if g is not None:
            # Entries another process took over are never seen again here:
            # forget them a lease after they were due.
            stale = self.clock.time() - self.lease
            for seq in [s for s, due in g.scheduled.items() if due < stale]:
                del g.scheduled[seq]
            scheduled = len(g.scheduled)
        dead = (dlq.state.subjects or {}).get(subject, 0)
        return TransportStats(backlog, max(0, pending - scheduled), scheduled, dead)

    @property
    def idle(self) -> bool:
        """Nothing published or handed out since :meth:`wait_idle` saw every
        group empty."""
        return not self._busy

    async def _all_settled(self) -> bool:
        if self._pub.busy:
            return False
        for g in self._groups.values():
            if g.buffer or g.held:
                return False
        for g in list(self._groups.values()):
            for src in list(g.sources.values()):
                info = await self._js.consumer_info(self.stream, src.durable)
                if info.num_pending or info.num_ack_pending:
                    return False
        return True

    async def wait_idle(self) -> None:
        """Return once every group of this transport holds nothing: nothing
        undelivered, unacknowledged or scheduled (asks the server)."""
        while True:
            self._busy = False
            try:
                settled = await self._all_settled()
            except nats.errors.Error as exc:
                raise translate(exc, "reading consumer state") from exc
            if settled and not self._busy:
                return
            self._busy = True
            await self.clock.sleep(0.02)

    async def close(self) -> None:
        if self._closed:
            return
        nc = self._nc
        assert nc is not None
        if self._pub.busy:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ack_timeout):
                    await self._pub.flush()
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.ack_timeout)
        balancers = [g.balancer for g in self._groups.values() if g.balancer is not None]
        for task in balancers:
            task.cancel()
        await _ended(balancers, "balancing")
        # Hand the partitions over, all groups at once, within a bound: what
        # is not handed over in time goes to the next owner after the lease.
        groups = list(self._groups.values())
        try:
            async with asyncio.timeout(self.part_expires + 2.0):
                done = await asyncio.gather(
                    *(_parts.leave(self, g) for g in groups), return_exceptions=True
                )
        except TimeoutError:
            done = [TimeoutError()]
        for exc in done:
            if isinstance(exc, Exception):
                log.warning("could not hand every partition over at close: %r", exc)
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            await _ended([self._keeper], "lease keeping")
        for g in self._groups.values():
            g.wake()
            if g.ephemeral:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    async with asyncio.timeout(self.ack_timeout):
                        await self._js.delete_consumer(self.stream, g.durable)
        await self._pub.close()
        try:
            await nc.flush(timeout=2)
        except (nats.errors.Error, TimeoutError):
            log.warning("could not flush the last acks to NATS before closing")
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            async with asyncio.timeout(2.0):  # a close never holds up a worker's exit
                await nc.close()
        self._groups.clear()


async def _ended(tasks: list[asyncio.Task[None]], what: str) -> None:
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


def _ssl_context(
    url: str, ca: str | None, cert: str | None, key: str | None
) -> ssl.SSLContext | None:
    if not (ca or cert or url.startswith("tls://")):
        return None
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx
