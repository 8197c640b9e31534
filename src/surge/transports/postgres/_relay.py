"""The outbox relay: what is committed to a ``postgresql://`` schema,
published on another transport (``surge relay``).

For an app whose bus is Redis, NATS (or any transport) while its data lives
in PostgreSQL: the app writes each event inside the transaction of its
business rows, through a publish-only App on the schema
(``await outbox.publish(event, connection=conn)``), and the relay reads
what was committed as the consumer group ``surge.relay`` of that schema,
publishes each batch on the target and acknowledges it in PostgreSQL once
the target has taken it (its publish returned: stored, or confirmed, as the
target promises). Rolled back, an event never reaches the target.

What it promises: every committed event reaches the target at least once,
with its id, topic, key, time, headers (a signature stays valid) and body
bytes unchanged; one key's events in the order they were committed (the
relay reads a key's partition in row order and publishes a batch before it
claims the next). A relay that dies between a target's publish and the
acknowledgement publishes that batch again after the lease: a duplicate
with the same id (NATS drops it within its duplicate window; consumers
see an id twice on Redis, which at-least-once allows). Relays may run in
several processes: they share the group, keyed partitions split among them.

Only what is written after the group exists is kept (a ``postgresql://``
topic that no group matches is dropped), so start the relay once, or run
``surge relay --declare-only``, before the first write. Both sides must use
the same codec (the body is passed on as bytes). A batch the target keeps
refusing for a transient reason (``TransportError``: the broker is away) is
tried again in place, its leases kept; an envelope it refuses for good (too
large for it) is moved to the relay group's dead letters
(``surge dlq`` over the schema shows and replays them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast

from ..._clock import Clock, RealClock
from ..._errors import ConfigurationError, SurgeError, TransportError
from ..._transport import DeadLetter, Delivery, Transport
from ._transport import PostgresTransport

__all__ = ("RELAY_GROUP", "Relay")

log = logging.getLogger("surge.relay")

RELAY_GROUP = "surge.relay"

# Waits between attempts at a batch the target refused for a transient
# reason: doubling from the first to the last.
_FIRST_WAIT, _LAST_WAIT = 0.05, 2.0


class Relay:
    """Moves the events committed to ``source`` (a ``postgresql://`` URL or
    :class:`PostgresTransport`) to ``target`` (a URL or a transport), for the
    topics matching ``topics``; the relay starts and closes both.

    ::

        async with Relay("postgresql://db/app", "redis://bus:6379") as relay:
            await relay.run()  # until relay.stop()
    """

    def __init__(
        self,
        source: str | PostgresTransport,
        target: str | Transport,
        *,
        topics: Sequence[str] = (">",),
        group: str = RELAY_GROUP,
        prefetch: int = 1000,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(source, str):
            source = PostgresTransport(source)
        if not isinstance(source, PostgresTransport):
            raise ConfigurationError(
                f"the relay reads a postgresql:// outbox, not {type(source).__name__}"
            )
        if isinstance(target, str):
            from .. import open_transport

            target = open_transport(target)
        if not topics:
            raise ConfigurationError("the relay needs at least one topic pattern ('>': all)")
        if prefetch < 1:
            raise ConfigurationError("prefetch must be at least 1")
        self.source = source
        self.target = target
        self.topics = tuple(topics)
        self.group = group
        self.prefetch = prefetch
        self.clock: Clock = clock or RealClock()
        self.relayed = 0
        """Envelopes the target has taken (a batch published again counts again)."""
        self.dead = 0
        """Envelopes the target refused for good, moved to the dead letters."""
        self._started = False
        self._stopping = False
        self._forwarding = False
        self._run: asyncio.Task[Any] | None = None
        self._batch_done: asyncio.Event | None = None

    async def start(self) -> None:
        """Start both transports and declare the relay's group on the source
        (from then on the schema keeps what is written for it)."""
        await self.source.start()
        try:
            await self.target.start()
            await self.source.declare(self.group, self.topics)
        except BaseException:
            await self.source.close()
            with contextlib.suppress(Exception):
                await self.target.close()
            raise
        self._started = True

    async def run(self) -> None:
        """Relay until :meth:`stop` (a batch being published finishes first)."""
        if not self._started:
            raise ConfigurationError("start the relay before running it")
        self._run = asyncio.current_task()
        # an async generator: closed here, so its consumer leaves at once
        batches = cast(
            "AsyncGenerator[list[Delivery], None]",
            self.source.consume(self.group, prefetch=self.prefetch),
        )
        try:
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    self._forwarding = True
                    try:
                        await self._forward(batch)
                    finally:
                        self._forwarding = False
                    if self._stopping:
                        return
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            self._run = None

    def stop(self) -> None:
        """End :meth:`run`: at once when it waits for events, after the batch
        it is publishing otherwise (what it holds unpublished goes back at
        :meth:`close`)."""
        self._stopping = True
        task = self._run
        if task is not None and not self._forwarding:
            task.cancel()

    async def close(self) -> None:
        """Close both transports (the source hands its leases back)."""
        self.stop()
        self._started = False
        try:
            await self.target.close()
        finally:
            await self.source.close()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- one batch -----------------------------------------------------------------
    async def _forward(self, batch: list[Delivery]) -> None:
        envelopes = [d.envelope for d in batch]
        wait = _FIRST_WAIT
        while True:
            try:
                await self.target.publish(envelopes)
                break
            except TransportError as exc:
                # the target is away: the leases are extended meanwhile, and
                # a stop leaves the batch to be relayed again
                if self._stopping:
                    raise asyncio.CancelledError from exc
                log.warning(
                    "relay: the target refused %d events (%s); again in %.2fs",
                    len(envelopes),
                    exc,
                    wait,
                )
                await self.clock.sleep(wait)
                wait = min(_LAST_WAIT, wait * 2)
            except SurgeError:
                # refused for good (too large for it...): one by one, so the
                # others pass and only those are set aside
                await self._one_by_one(batch)
                return
        await self.source.ack(batch)
        self.relayed += len(batch)

    async def _one_by_one(self, batch: list[Delivery]) -> None:
        for d in batch:
            try:
                await self.target.publish([d.envelope])
            except TransportError:
                raise
            except SurgeError as exc:
                await self._bury(d, exc)
                continue
            await self.source.ack([d])
            self.relayed += 1

    async def _bury(self, d: Delivery, exc: SurgeError) -> None:
        env = d.envelope
        log.error("relay: the target refused event %s on %r for good: %s", env.id, env.topic, exc)
        now = self.clock.time()
        record = DeadLetter(
            id=env.id,
            group=self.group,
            topic=env.topic,
            key=env.key,
            headers=env.headers,
            body=env.body or b"",
            error_type=type(exc).__name__,
            error=str(exc),
            traceback="".join(traceback.format_exception(exc)),
            attempts=d.attempt,
            first_attempt_at=d.first_time or now,
            failed_at=now,
        )
        await self.source.dead_letter(d, record)
        self.dead += 1

    def __repr__(self) -> str:
        return f"<Relay {self.source!r} -> {type(self.target).__name__} ({self.group})>"
