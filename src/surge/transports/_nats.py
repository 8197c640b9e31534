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
  in total (credit counted down per message, and by the server's
  ``Nats-Pending-Messages`` when a request expires); idle heartbeats let a
  silent pull be detected and reissued, so a consumer resumes by itself
  after a reconnect or a server restart.
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
  See ``_nats_partitions``.
- Interest retention: a message stays until every group it matched acked
  it; one that no declared group matches is not kept (as on every surge
  transport), so workers declare their groups before producers publish.

Needs nats-server 2.10 or later (consumers with several filter subjects,
stream metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
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
from .._errors import Closed, ConfigurationError, DecodeError, TransportError
from .._event import Envelope
from .._transport import DeadLetter, Delivery, TransportStats
from . import _nats_partitions as _parts
from ._nats_dlq import _UNSAFE, DeadLetters, consumer_name
from ._nats_partitions import Leases, Source, partition_durable
from ._nats_publish import Item, Publisher, safe_url, translate
from ._partitions import DEFAULT_PARTITIONS, Ownership, partition_of

__all__ = ("NatsTransport", "consumer_name")

log = logging.getLogger("surge.nats")

_PARTITIONS = "surge_partitions"  # the stream's metadata key for the partition count


def _ack_meta(reply: str) -> tuple[int, int, float]:
    """(num_delivered, stream sequence, stored time) from an ack subject."""
    return _ack_info(reply)[1:]


def _ack_info(reply: str) -> tuple[str, int, int, float]:
    """(consumer, num_delivered, stream sequence, stored time) from an ack subject."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or
    # the v2 form with domain and account hash tokens after ACK.
    t = reply.split(".")
    if len(t) == 9:
        return t[3], int(t[4]), int(t[5]), int(t[7]) / 1e9
    return t[5], int(t[6]), int(t[7]), int(t[9]) / 1e9


def _forget(g: _Group, token: str) -> None:
    """A delivery of ``g`` is settled (or handed back)."""
    src = g.held.pop(token, None)
    if src is not None:
        src.held -= 1
        if src.part is not None and not src.held:
            g.rebalance.set()  # a partition being given up may be free now


class _Group:
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


class NatsTransport(DeadLetters):
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
        self._groups: dict[str, _Group] = {}
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
            g = self._groups[group] = _Group(group, ephemeral, self.partitions)
        new = [t for t in topics if t not in g.topics]
        if new or not g.subjects:
            g.topics.extend(new)
            g.subjects = [self._subject(t) for t in g.topics]
            if ephemeral:  # never partitioned: keyed envelopes too
                g.subjects += [f"{self.stream}_k.*.{t}" for t in g.topics]
            g.subjects.append(f"{self.stream}_replay.{g.durable}")
            for src in g.sources.values():
                await self._ensure_consumer(g, src)

    def _filter(self, g: _Group, src: Source) -> list[str]:
        if src.part is None:
            return g.subjects
        return [f"{self.stream}_k.{src.part}.{t}" for t in g.topics]

    async def _ensure_consumer(self, g: _Group, src: Source) -> None:
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

    def _group(self, name: str) -> _Group:
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
                _parts.balance_loop(self, g), name=f"surge-nats-balance-{group}"
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

    def _on_msg(self, g: _Group, by_reply: dict[str, Source]) -> Any:
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

    def _check_silence(self, g: _Group) -> None:
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

    async def _pull(self, g: _Group) -> None:
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
            await self._pull_from(nc, g, g.parts[p], share)

    async def _pull_from(self, nc: Client, g: _Group, src: Source, share: int = 0) -> None:
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

    async def _on_delivery(self, g: _Group, msg: Msg) -> None:
        reply = msg.reply
        try:
            consumer, delivered, seq, stored = _ack_info(reply)
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
            topic = msg.subject.partition(".")[2]
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

    def _check_pull(self, g: _Group, src: Source) -> None:
        if src.outstanding <= 0:
            g.wake()

    def _on_status(self, g: _Group, src: Source, headers: dict[str, str]) -> None:
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

    def _release(self, d: Delivery) -> _Group | None:
        g = self._groups.get(d.group)
        if g is not None:
            _forget(g, d.token)
        return g

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        last: _Group | None = None
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
                g.scheduled[_ack_meta(delivery.token)[1]] = self.clock.time() + delay
            await self._send_ack(delivery.token, b'-NAK {"delay": %d}' % int(delay * 1e9))
        else:
            await self._send_ack(delivery.token, b"-NAK")
        if g is not None:
            g.wake()

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand deliveries back untouched, at stop, with what the group's
        ended consumer fetched and did not hand out. A partition's are NAKed
        in stream order once the partition's pull has ended, and before its
        lease is released, so that its next owner reads them first."""
        for name in {d.group for d in deliveries} | set(self._groups):
            g = self._groups.get(name)
            if g is None or g.consuming:
                continue
            mine = [d for d in deliveries if d.group == name]
            back = [d.token for d in (*mine, *g.buffer) if d.token in g.held]
            g.buffer.clear()
            shared = [t for t in back if g.held[t].part is None]
            g.returning += [t for t in back if g.held[t].part is not None]
            await self._hand_back(g, shared)
            g.handed_back = True
            g.rebalance.set()

    async def _hand_back(self, g: _Group, tokens: list[str]) -> None:
        """NAK ``tokens`` (read from ``g``, not settled) in stream order."""
        for token in sorted(tokens, key=lambda t: _ack_meta(t)[1]):
            if token in g.held:
                _forget(g, token)
                await self._send_ack(token, b"-NAK")

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        _, seq, _ = _ack_meta(delivery.token)
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
        for g in self._groups.values():
            if g.balancer is not None:
                g.balancer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await g.balancer
        for g in list(self._groups.values()):
            try:
                async with asyncio.timeout(self.ack_timeout + self.part_expires):
                    await _parts.leave(self, g)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("could not hand over the partitions of %s: %r", g.name, exc)
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        for g in self._groups.values():
            g.wake()
            if g.ephemeral:
                with contextlib.suppress(nats.errors.Error):
                    await self._js.delete_consumer(self.stream, g.durable)
        await self._pub.close()
        try:
            await nc.flush(timeout=2)
        except (nats.errors.Error, TimeoutError):
            log.warning("could not flush the last acks to NATS before closing")
        with contextlib.suppress(nats.errors.Error):
            await nc.close()
        self._groups.clear()


def _ssl_context(
    url: str, ca: str | None, cert: str | None, key: str | None
) -> ssl.SSLContext | None:
    if not (ca or cert or url.startswith("tls://")):
        return None
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx
