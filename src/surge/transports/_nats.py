"""NATS JetStream: a stream per app, a durable pull consumer per group.

Layout on the server, for ``stream="surge"`` (the default):

==========================  ================================================
stream ``surge``            subjects ``surge.<topic>`` (topic dots are subject
                            tokens, so ``orders.*`` / ``orders.>`` are NATS
                            wildcards) and ``surge_replay.<group>``; file
                            storage, interest retention (a message goes once
                            every group that wanted it has acked it)
consumer per group          durable, pull, explicit acks; AckWait is the
                            lease; filter subjects = the group's topics plus
                            its own replay subject
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

- Several workers on one group share its work: JetStream hands each
  message to whichever worker pulls next. Per-key order (``key=``) holds
  within one worker (the runner's lanes), not across workers; a keyed
  subscription that needs strict order runs one worker (partitioning
  subjects by key hash, a group per partition, is the way to scale it).
- Interest retention: a message stays until every group it matched acked
  it; one that no declared group matches is not kept (as on every surge
  transport), so workers declare their groups before producers publish.

Needs nats-server 2.10 or later (consumers with several filter subjects).
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
from ._nats_dlq import _UNSAFE, DeadLetters, consumer_name
from ._nats_publish import Item, Publisher, safe_url, translate

__all__ = ("NatsTransport", "consumer_name")

log = logging.getLogger("surge.nats")


def _ack_meta(reply: str) -> tuple[int, int, float]:
    """(num_delivered, stream sequence, stored time) from an ack subject."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or
    # the v2 form with domain and account hash tokens after ACK.
    t = reply.split(".")
    if len(t) == 9:
        return int(t[4]), int(t[5]), int(t[7]) / 1e9
    return int(t[6]), int(t[7]), int(t[9]) / 1e9


class _Group:
    """One consumer group as this process sees it."""

    __slots__ = (
        "buffer",
        "deferred",
        "durable",
        "ephemeral",
        "errors",
        "last_seen",
        "name",
        "outstanding",
        "prefetch",
        "recreate",
        "scheduled",
        "stalled",
        "sub",
        "subjects",
        "topics",
        "unsettled",
        "waiter",
    )

    def __init__(self, name: str, ephemeral: bool) -> None:
        self.name = name
        self.durable = consumer_name(name)
        self.ephemeral = ephemeral
        self.topics: list[str] = []
        self.subjects: list[str] = []
        self.sub: Subscription | None = None
        self.buffer: deque[Delivery] = deque()
        self.unsettled: set[str] = set()
        self.deferred: dict[int, int] = {}  # stream seq -> not_before deferrals
        self.scheduled: dict[int, float] = {}  # stream seq -> due (wall clock)
        self.outstanding = 0
        self.prefetch = 0
        self.last_seen = 0.0
        self.stalled = False
        self.recreate = False
        self.errors = 0
        self.waiter: asyncio.Future[None] | None = None

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
    stream's retention limit; default none), credentials ``user`` /
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
        except ValueError as exc:
            raise ConfigurationError(f"bad option in the NATS URL query {query!r}: {exc}") from None
        if q:
            raise ConfigurationError(f"unknown options in the NATS URL: {sorted(q)}")
        if _UNSAFE.search(stream):
            raise ConfigurationError(f"stream name {stream!r}: use letters, digits, _ and -")
        if lease <= 0 or heartbeat <= 0 or max_pending < 1:
            raise ConfigurationError("lease, heartbeat and max_pending must be positive")
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
            and not any(g.stalled for g in self._groups.values() if g.sub is not None)
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
                self.stream, [f"{self.stream}.>", f"{self.stream}_replay.>"], interest=True
            )
            await self._ensure_stream(self.dlq_stream, [f"{self.stream}_dlq.>"], interest=False)
            await self._pub.open(nc)
            await nc.subscribe(
                f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.*",
                cb=self._on_max_deliveries,
            )
        except nats.errors.Error as exc:
            raise translate(exc, "setting up JetStream") from exc
        self._keeper = asyncio.get_running_loop().create_task(
            self._keep_leases(), name="surge-nats-leases"
        )

    async def _ensure_stream(self, name: str, subjects: list[str], *, interest: bool) -> None:
        config = StreamConfig(
            name=name,
            subjects=subjects,
            storage=StorageType.FILE,
            retention=RetentionPolicy.INTEREST if interest else RetentionPolicy.LIMITS,
            duplicate_window=self.dedup_window,
            max_age=self.max_age if interest else None,
        )
        try:
            info = await self._js.stream_info(name)
        except nats.js.errors.NotFoundError:
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                raise TransportError(f"cannot create stream {name!r}: {exc.description}") from exc
            return
        if (
            set(info.config.subjects or ()) != set(subjects)
            or info.config.duplicate_window != self.dedup_window
            or (interest and (info.config.max_age or None) != self.max_age)
        ):
            config.retention = info.config.retention  # retention cannot change on update
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
            g.outstanding = 0
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
            g = self._groups[group] = _Group(group, ephemeral)
        new = [t for t in topics if t not in g.topics]
        if new or not g.subjects:
            g.topics.extend(new)
            g.subjects = [self._subject(t) for t in g.topics]
            g.subjects.append(f"{self.stream}_replay.{g.durable}")
            await self._ensure_consumer(g)

    async def _ensure_consumer(self, g: _Group) -> None:
        config = ConsumerConfig(
            durable_name=None if g.ephemeral else g.durable,
            name=g.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.lease,
            max_deliver=self.max_deliver,
            deliver_policy=DeliverPolicy.NEW,
            filter_subjects=g.subjects,
            max_ack_pending=self.max_ack_pending,
            inactive_threshold=self.ephemeral_ttl if g.ephemeral else None,
        )
        try:
            try:
                await self._js.add_consumer(self.stream, config)
            except nats.js.errors.BadRequestError:
                # It exists with settings we may not change (its deliver
                # policy, say): keep those, update what we can.
                info = await self._js.consumer_info(self.stream, g.durable)
                old = info.config
                old.filter_subject = None
                old.filter_subjects = sorted(set(old.filter_subjects or ()) | set(g.subjects))
                old.ack_wait = self.lease
                await self._js.add_consumer(self.stream, old)
        except nats.errors.Error as exc:
            raise translate(exc, f"declaring group {g.name!r}") from exc
        g.recreate = False

    def _group(self, name: str) -> _Group:
        g = self._groups.get(name)
        if g is None:
            raise ConfigurationError(f"group {name!r} was not declared")
        return g

    # --- publishing --------------------------------------------------------------
    def _encode(self, envelopes: Sequence[Envelope]) -> list[Item]:
        encode = self.codec.encode_envelope
        stream = self.stream
        return [
            (f"{stream}.{env.topic}", encode(env), {"Nats-Msg-Id": env.id}) for env in envelopes
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
    async def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        g = self._group(group)
        if g.sub is not None:
            raise ConfigurationError(f"group {group!r} is already consumed by this transport")
        if prefetch < 1:
            raise ConfigurationError("prefetch must be at least 1")
        nc = self._nats()
        g.prefetch = prefetch
        inbox = nc.new_inbox()

        async def on_msg(msg: Msg) -> None:
            await self._on_delivery(g, msg)

        try:
            g.sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1)
        except nats.errors.Error as exc:
            raise translate(exc, f"consuming {group!r}") from exc
        g.last_seen = self.clock.monotonic()
        g.outstanding = 0
        loop = asyncio.get_running_loop()
        silence = 3 * self.heartbeat + 0.5
        try:
            while not self._closed:
                if g.buffer:
                    batch = list(g.buffer)
                    g.buffer.clear()
                    g.unsettled.update(d.token for d in batch)
                    yield batch
                    continue
                try:
                    await self._pull(g, inbox)
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
                if g.outstanding and self.clock.monotonic() - g.last_seen > silence:
                    # No message and no heartbeat: the pull died with a
                    # connection or a server; ask again.
                    if not g.stalled:
                        log.warning(
                            "consumer %s got no heartbeat for %.1fs; pulling again",
                            g.name,
                            silence,
                        )
                    g.stalled = True
                    g.outstanding = 0
        finally:
            sub, g.sub = g.sub, None
            g.outstanding = 0
            g.wake()
            if sub is not None and not self._closed:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    async def _pull(self, g: _Group, inbox: str) -> None:
        if g.recreate:
            await self._ensure_consumer(g)
            log.warning("consumer of %s was gone from the server; declared it again", g.name)
        free = g.prefetch - len(g.unsettled) - len(g.buffer) - g.outstanding
        if free <= 0 or (g.outstanding and free < max(1, g.prefetch // 4)):
            return
        nc = self._nats()
        if not nc.is_connected:
            return
        request = {
            "batch": free,
            "expires": int(self.pull_expires * 1e9),
            "idle_heartbeat": int(self.heartbeat * 1e9),
        }
        g.outstanding += free
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{g.durable}",
            json.dumps(request).encode(),
            reply=inbox,
        )

    async def _on_delivery(self, g: _Group, msg: Msg) -> None:
        g.last_seen = self.clock.monotonic()
        g.stalled = False
        reply = msg.reply
        if not reply:
            self._on_status(g, msg.headers or {})
            return
        g.errors = 0
        self._busy = True
        if g.outstanding:
            g.outstanding -= 1
        try:
            delivered, seq, stored = _ack_meta(reply)
        except (ValueError, IndexError):
            log.error("unparseable JetStream ack subject %r on %s", reply, g.name)
            return
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
                self._check_pull(g)
                return
            if not deferrals and stored < nb:
                deferrals = 1  # deferred by another process, most likely
        g.buffer.append(Delivery(env, g.name, max(1, delivered - deferrals), reply))
        g.wake()

    def _check_pull(self, g: _Group) -> None:
        if g.outstanding <= 0:
            g.wake()

    def _on_status(self, g: _Group, headers: dict[str, str]) -> None:
        status = headers.get("Status", "")
        if status == "100":
            g.errors = 0  # idle heartbeat: the pull is alive
            return
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None:
            g.outstanding = max(0, g.outstanding - int(pending))
        else:
            g.outstanding = 0
        if status not in ("404", "408"):
            desc = headers.get("Description", "")
            g.errors += 1
            if "deleted" in desc.lower() or "not found" in desc.lower() or status == "503":
                g.recreate = True
            log.warning("pull for %s answered %s %s", g.name, status, desc)
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
            g.unsettled.discard(d.token)
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
        """Send in-progress acks for every delivery this process holds."""
        while not self._closed and self.extend_leases:
            await self.clock.sleep(self.lease / 3)
            for g in self._groups.values():
                held = [*g.unsettled, *(d.token for d in g.buffer)]
                for reply in held:
                    await self._send_ack(reply, b"+WPI")

    # --- state -------------------------------------------------------------------
    async def stats(self, group: str) -> TransportStats:
        subject = f"{self.stream}_dlq.{consumer_name(group)}"
        async with self._session():
            durable = await self._known(group)
            try:
                info = await self._js.consumer_info(self.stream, durable)
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
        return TransportStats(
            info.num_pending or 0, max(0, (info.num_ack_pending or 0) - scheduled), scheduled, dead
        )

    @property
    def idle(self) -> bool:
        """Nothing published or handed out since :meth:`wait_idle` saw every
        group empty."""
        return not self._busy

    async def _all_settled(self) -> bool:
        if self._pub.busy:
            return False
        for g in self._groups.values():
            if g.buffer or g.unsettled:
                return False
        for g in list(self._groups.values()):
            info = await self._js.consumer_info(self.stream, g.durable)
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
