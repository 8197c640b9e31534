"""NatsTransport: the facade that composes the parts of the NATS transport
and says in what order they start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Sequence

import nats.errors

from ..._clock import Clock, RealClock
from ..._codec import Codec, MsgpackCodec
from ..._event import Envelope
from ..._transport import DeadLetter, Delivery, TransportStats
from .._partitions import DEFAULT_PARTITIONS, Ownership, partition_of
from ._balancer import Balancer
from ._connection import (
    ELECTION_ERRORS,
    CancelGuard,
    Connection,
    Election,
    ssl_context,
    translate,
)
from ._consumer import Consumer
from ._dead_letters import DeadLetters
from ._groups import ack_meta
from ._layout import Layout, PeersOffline, consumer_name
from ._leases import Leases
from ._options import NatsOptions
from ._publisher import Item, Publisher
from ._released import Released
from ._state import StateBucket

__all__ = ("NatsTransport",)

log = logging.getLogger("surge.nats")

# waited out while setting up: an election, or a restarted node rejoining
_ELECTING_AT_START: tuple[type[Exception], ...] = (*ELECTION_ERRORS, PeersOffline)


class NatsTransport:
    """Groups as durable JetStream pull consumers on one stream.

    Options: ``stream`` (name, and subject prefix), ``lease`` (AckWait, s),
    ``dedup_window`` (s), ``max_pending`` (publish acks outstanding),
    ``ack_timeout`` (s: a publish not acknowledged within it is sent again),
    ``publish_timeout`` (s: then it fails with ``TransportError``),
    ``max_deliver``, ``max_ack_pending`` (per consumer, all workers),
    ``heartbeat`` (s, idle heartbeat of pulls), ``max_age`` (s, the
    stream's retention limit; default none), ``partitions`` (of keyed
    envelopes, per stream: the first process fixes it), ``replicas`` (copies
    of the streams and key-value buckets on a JetStream cluster: 3 on three
    nodes survives the loss of one; give every server in the URL,
    ``nats://a:4222,b:4222,c:4222``), credentials ``user`` /
    ``password`` / ``token`` (or in the URL), ``nkeys_seed``, ``creds`` (a
    ``.creds`` file), TLS via a ``tls://`` URL or ``tls`` (an SSLContext) or
    ``tls_ca`` / ``tls_cert`` / ``tls_key`` files; ``extend_leases``
    (in-progress acks for held deliveries), ``codec``, ``clock``.

    Simple options may also come in the URL's query, and win there:
    ``nats://host:4222?stream=shop&lease=10``.

    Besides ``Transport`` it implements ``HandsBack``, ``KeyRouting``,
    ``Fences``, ``IdleAware`` and ``StateStore`` (``surge._transport``).
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
        replicas: int = 1,
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
        url, options = NatsOptions.parse(
            url,
            stream=stream,
            lease=lease,
            dedup_window=dedup_window,
            max_pending=max_pending,
            max_deliver=max_deliver,
            max_ack_pending=max_ack_pending,
            heartbeat=heartbeat,
            ack_timeout=ack_timeout,
            publish_timeout=publish_timeout,
            ephemeral_ttl=ephemeral_ttl,
            max_age=max_age,
            partitions=partitions,
            extend_leases=extend_leases,
            replicas=replicas,
        )
        self.url = url
        self.options = options
        self.stream = options.stream
        self.partitions = options.partitions or DEFAULT_PARTITIONS
        """Partitions of keyed envelopes (the stream's, once started)."""
        self.codec: Codec = codec or MsgpackCodec()
        self.clock: Clock = clock or RealClock()
        layout = self._layout = Layout(options.stream, options.replicas)
        conn = self._conn = Connection(
            url,
            {
                "servers": [s.strip() for s in url.split(",")],
                "user": user,
                "password": password,
                "token": token,
                "nkeys_seed": nkeys_seed,
                "user_credentials": creds,
                "tls": tls or ssl_context(url, tls_ca, tls_cert, tls_key),
                "connect_timeout": connect_timeout,
                "name": name,
            },
            ack_timeout=options.ack_timeout,
            on_reconnect=self._reconnected,
        )
        self._pub = Publisher(conn, options, self.clock)
        self._leases = Leases(conn, layout, lease=options.lease)
        released = Released(conn, layout)
        self._balancer = Balancer(conn, self._leases, options, self.clock, released)
        self._consumer = Consumer(
            conn,
            layout,
            options,
            self.clock,
            self.codec,
            self._balancer,
            released,
            touched=self._touched,
        )
        self._dead = DeadLetters(
            conn, layout, options, self.clock, self.codec, self._pub, self._consumer
        )
        self._state = StateBucket(conn, layout)
        self._busy = True  # cleared only by wait_idle's observation

    # --- connection ------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """Connected, and no consumer's pulls have gone silent."""
        return self._conn.open and self._conn.connected and not self._consumer.stalled

    @property
    def last_error(self) -> str | None:
        """The last connection error, until the connection is back."""
        return self._conn.last_error

    async def start(self) -> None:
        if self._conn.open:
            return
        await self._conn.connect()
        o = self.options
        electing = Election(self.clock, "setting up JetStream")
        try:
            while True:
                try:
                    self.partitions = await self._layout.ensure_streams(
                        self._conn.js,
                        dedup_window=o.dedup_window,
                        max_age=o.max_age,
                        partitions=self.partitions,
                        asked=o.partitions is not None,
                    )
                    await self._pub.open()
                    await self._dead.open()
                    break
                except _ELECTING_AT_START as exc:
                    # The same wait as wait_idle's: a process started while a
                    # cluster elects a leader (CI: the drain's transport, opened
                    # right after the stream leader was killed, timed out here),
                    # or while a restarted node rejoins (a new replicated stream
                    # has no peers to be placed on until then).
                    await electing.wait_out(exc)
        except nats.errors.Error as exc:
            await self._conn.close()
            raise translate(exc, "setting up JetStream") from exc
        except BaseException:
            await self._conn.close()
            raise
        self._consumer.start()

    def _reconnected(self) -> None:
        self._consumer.reconnected()
        # Publishes whose acks were lost are resent now rather than after
        # ack_timeout, under the same Nats-Msg-Id.
        self._pub.reconnected()

    def _touched(self) -> None:
        self._busy = True

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[None]:
        """Connected for the block: reopened for it if this transport is
        closed (reading dead letters or stats after the app stopped)."""
        if self._conn.open:
            yield
            return
        await self.start()
        try:
            yield
        finally:
            await self.close()

    # --- groups ------------------------------------------------------------------------
    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        with CancelGuard():
            await self._consumer.declare(
                group, topics, ephemeral=ephemeral, partitions=self.partitions
            )

    async def groups_for(self, topic: str) -> list[str]:
        """The groups of the stream, declared by any process, that receive
        ``topic`` (``KnowsGroups``)."""
        with CancelGuard():
            return await self._consumer.groups_for(topic)

    def ownership(self, group: str) -> Ownership | None:
        """Which partitions of ``group`` this consumer reads (None: an
        ephemeral group, or not declared here)."""
        return self._consumer.ownership(group)

    # --- publishing --------------------------------------------------------------------
    def _encode(self, envelopes: Sequence[Envelope]) -> list[Item]:
        encode = self.codec.encode_envelope
        layout = self._layout
        n = self.partitions
        return [
            (
                layout.subject(env.topic)
                if env.key is None
                else layout.keyed(partition_of(env.key, n), env.topic),
                encode(env),
                {"Nats-Msg-Id": env.id},
            )
            for env in envelopes
        ]

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self._conn.client()
        items = self._encode(envelopes)  # encoding errors before anything is sent
        self._busy = True
        await self._pub.publish(items)

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        self._conn.client()
        items = self._encode(envelopes)
        self._pub.publish_nowait(items)
        self._busy = True

    async def flush(self) -> None:
        """Wait until JetStream acknowledged everything published so far."""
        await self._pub.flush()

    # --- consuming and settling ----------------------------------------------------------
    def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        return self._consumer.consume(group, prefetch=prefetch)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._consumer.ack(deliveries)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        await self._consumer.nack(delivery, delay)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand deliveries back untouched, at stop (``HandsBack``)."""
        await self._consumer.release(deliveries)

    def fenced(self, delivery: Delivery) -> bool:
        """A keyed delivery whose partition lease may have lapsed is not to
        start (``Fences``; see ``Consumer.fenced``)."""
        return self._consumer.fenced(delivery)

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        _, seq, _ = ack_meta(delivery.token)
        durable = consumer_name(delivery.group)
        # Written before the original is settled; a crash in between makes a
        # second record with the same msg id, which the server drops.
        with CancelGuard():
            await self._dead.store(durable, record, f"dlq.{durable}.{record.id}.{seq}")
            await self._consumer.terminate(delivery)

    # --- dead letters ------------------------------------------------------------------
    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        with CancelGuard():
            async with self._session():
                return await self._dead.read(group)

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        with CancelGuard():
            async with self._session():
                return await self._dead.replay(group, ids)

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        with CancelGuard():
            async with self._session():
                return await self._dead.purge(group, ids)

    # --- state ---------------------------------------------------------------------------
    async def load_state(self, key: str) -> bytes | None:
        """A small value kept under ``key`` in the JetStream key-value bucket
        ``<stream>_state`` (the last fired slot of each trigger)."""
        async with self._session():
            return await self._state.load(key)

    async def save_state(self, key: str, value: bytes) -> None:
        async with self._session():
            await self._state.save(key, value)

    async def stats(self, group: str) -> TransportStats:
        with CancelGuard():
            async with self._session():
                await self._dead.known(group)
                try:
                    backlog, pending = await self._consumer.counts(group, self.partitions)
                except nats.errors.Error as exc:
                    raise translate(exc, f"reading the state of {group!r}") from exc
                dead = await self._dead.count(group)
        scheduled = self._consumer.scheduled(group)
        return TransportStats(backlog, max(0, pending - scheduled), scheduled, dead)

    @property
    def idle(self) -> bool:
        """Nothing published or handed out since :meth:`wait_idle` saw every
        group empty."""
        return not self._busy

    async def wait_idle(self) -> None:
        """Return once every group of this transport holds nothing: nothing
        undelivered, unacknowledged or scheduled (asks the server)."""
        electing = Election(self.clock, "reading consumer state")
        while True:
            self._busy = False
            try:
                with CancelGuard():
                    settled = (
                        not self._pub.busy
                        and not self._consumer.unsettled
                        and await self._consumer.settled_on_server()
                    )
            except ELECTION_ERRORS as exc:
                # Not idle yet (CI: a drain right after the stream leader was
                # killed got a TransportError here).
                self._busy = True
                await electing.wait_out(exc)
                continue
            except nats.errors.Error as exc:
                raise translate(exc, "reading consumer state") from exc
            if settled and not self._busy:
                return
            self._busy = True
            await self.clock.sleep(0.02)

    # --- closing -------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop, each step bounded: publishes confirmed (ack_timeout), dead
        letters being recorded (ack_timeout), balancing stopped (2 s), every
        partition handed over (part_expires + 2 s), lease keeping stopped
        (2 s), ephemeral consumers deleted (ack_timeout each), the last acks
        flushed and the connection closed (2 s + 2 s)."""
        conn = self._conn
        if not conn.open:
            return
        try:
            await self._close_in_order()
        except asyncio.CancelledError:
            # Cut short (an App's stop past its shutdown_timeout cancels a
            # close left behind): what was not handed over waits out its
            # lease, but the connection goes now. Left open, its socket
            # outlived the event loop (CI: an unclosed-socket warning in a
            # later test, after a stop with shutdown_timeout=0 on a cluster).
            await self.abandon()
            raise

    async def _close_in_order(self) -> None:
        conn = self._conn
        o = self.options
        phases = _Phases(self.clock)
        if self._pub.busy:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(o.ack_timeout):
                    await self._pub.flush()
        phases.done("publishes confirmed")
        await self._dead.wait_recorded(o.ack_timeout)
        phases.done("dead letters recorded")
        await self._balancer.stop()
        phases.done("balancing stopped")
        # Hand the partitions over, all groups at once, within a bound: what
        # is not handed over in time goes to the next owner after the lease.
        await self._balancer.leave(self._consumer.groups())
        phases.done("partitions handed over")
        conn.closing()
        await self._consumer.close()
        phases.done("consumers closed")
        await self._pub.close()
        await conn.close()
        phases.done("connection closed")
        self._consumer.forget_groups()
        log.debug("nats close: %s", phases)

    async def abandon(self) -> None:
        """Stop as a killed process would (for crash tests): background tasks
        end, the connection drops; nothing is handed back, released or
        deleted, so leases, memberships and deliveries wait out the lease."""
        await self._balancer.stop()
        await self._consumer.stop()
        await self._conn.drop()


class _Phases:
    """How long each step of a close took (logged at debug level)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._last = clock.monotonic()
        self._took: list[tuple[str, float]] = []

    def done(self, phase: str) -> None:
        now = self._clock.monotonic()
        self._took.append((phase, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{phase} {took:.3f}s" for phase, took in self._took)
