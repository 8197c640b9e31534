"""Publishing with confirms: a publish returns once RabbitMQ stored it.

Every message of a batch is sent at once on the publisher's confirm channel
and the batch waits for all the broker's acks; at most ``max_pending``
messages are unconfirmed, beyond which ``publish`` waits and
``publish_nowait`` raises ``Overloaded``. A message whose confirm was lost
with the connection is sent again once the link is back (at-least-once: it
may be stored twice).

Derived ids (UUIDv8: handler outputs, trigger firings) are dropped when
this publisher sent the same id within ``dedup_window``: RabbitMQ keeps no
window of its own, so the window is this process's (docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple

import aiormq
from pamqp.commands import Basic

from ..._clock import Clock
from ..._codec import Codec
from ..._errors import Closed, Overloaded, TransportError
from ..._event import Envelope, is_derived
from .._partitions import partition_of
from ._link import LOST, Link, translate
from ._topology import Topology
from ._wire import props

__all__ = ("Delayed", "Outgoing", "Publisher")

log = logging.getLogger("surge.amqp")


class Outgoing(NamedTuple):
    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties


class Delayed(NamedTuple):
    delay: float
    target: str
    """``x.<routing key>`` (every group, again) or ``q.<queue>`` (one queue)"""
    body: bytes
    properties: Basic.Properties


class Publisher:
    """The confirm channel, the window of unconfirmed messages, the dedup
    window, and how an envelope is routed."""

    def __init__(
        self,
        link: Link,
        topology: Topology,
        codec: Codec,
        clock: Clock,
        *,
        max_pending: int,
        dedup_window: float,
        publish_timeout: float,
    ) -> None:
        self.link = link
        self.topology = topology
        self.codec = codec
        self.clock = clock
        self.max_pending = max_pending
        self.dedup_window = dedup_window
        self.publish_timeout = publish_timeout
        self.outstanding = 0
        self._room = asyncio.Condition()
        self._ch: aiormq.abc.AbstractChannel | None = None
        self._opening: asyncio.Lock = asyncio.Lock()
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.scheduled: dict[str, dict[str, float]] = {}
        """group -> event id -> when it comes due: delayed events this
        process published or retried (for ``stats``; RabbitMQ cannot say)."""

    # --- channel ---------------------------------------------------------------
    async def channel(self) -> aiormq.abc.AbstractChannel:
        ch = self._ch
        if ch is not None and not ch.is_closed:
            return ch
        async with self._opening:
            ch = self._ch
            if ch is None or ch.is_closed:
                ch = self._ch = await self.link.channel(confirms=True)
            return ch

    # --- envelopes -> messages ---------------------------------------------------
    def _fresh(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        """``envelopes`` less derived ids sent within the dedup window."""
        if not any(is_derived(e.id) for e in envelopes):
            return list(envelopes)
        now = self.clock.monotonic()
        recent = self._recent
        while recent:
            oldest, at = next(iter(recent.items()))
            if now - at <= self.dedup_window:
                break
            del recent[oldest]
        out: list[Envelope] = []
        for e in envelopes:
            if is_derived(e.id):
                if e.id in recent:
                    continue
                recent[e.id] = now
            out.append(e)
        return out

    def encode(self, envelopes: Sequence[Envelope]) -> tuple[list[Outgoing], list[Delayed]]:
        """Messages for ``envelopes``, and those to send through a delay
        queue (a future ``not_before``); encoding errors raise here, before
        anything is sent."""
        top = self.topology
        parts = top.partitions
        now = self.clock.time()
        ready: list[Outgoing] = []
        delayed: list[Delayed] = []
        for env in self._fresh(envelopes):
            body = self.codec.encode_envelope(env)
            part = None if env.key is None or not parts else partition_of(env.key, parts)
            rk = top.routing_key(env.topic, part)
            nb = env.not_before
            if nb is not None and nb > now:
                for g in top.local_groups(env.topic):
                    self.note_scheduled(g.name, env.id, nb)
                delayed.append(Delayed(nb - now, f"x.{rk}", body, props(env.id)))
            else:
                ready.append(Outgoing(top.events, rk, body, props(env.id)))
        return ready, delayed

    async def delayed(self, items: Sequence[Delayed]) -> list[Outgoing]:
        """``items`` as messages to their delay queues (declared as needed)."""
        out: list[Outgoing] = []
        for it in items:
            ms = await self.topology.delay_route(await self.channel(), it.delay)
            out.append(Outgoing(self.topology.delay, f"{ms}.{it.target}", it.body, it.properties))
        return out

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        ready, later = self.encode(envelopes)
        if later:
            await self.link.wait_up()
            try:
                ready += await self.delayed(later)
            except LOST as exc:
                raise translate(exc, "declaring a delay queue") from exc
        await self.send(ready)

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        ready, later = self.encode(envelopes)
        if self.outstanding + len(ready) + len(later) > self.max_pending:
            raise Overloaded(
                f"{self.outstanding} messages await RabbitMQ's confirm (max_pending="
                f"{self.max_pending})"
            )
        n = len(ready) + len(later)
        self.outstanding += n  # taken now: the next call sees the window fill
        self._spawn(self._send_later(ready, later, n))

    async def _send_later(self, ready: list[Outgoing], later: list[Delayed], n: int) -> None:
        try:
            if later:
                await self.link.wait_up()
                ready += await self.delayed(later)
            await self._confirmed(ready)
        finally:
            await self._free(n)

    # --- sending -------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.outstanding > 0

    async def send(self, messages: Sequence[Outgoing]) -> None:
        """Send ``messages`` and wait for the broker's confirms (resending
        after a lost connection, within ``publish_timeout``)."""
        if not messages:
            return
        n = len(messages)
        async with self._room:
            await self._room.wait_for(lambda: self.outstanding < self.max_pending)
            self.outstanding += n
        try:
            await self._confirmed(messages)
        finally:
            await self._free(n)

    async def _confirmed(self, messages: Sequence[Outgoing]) -> None:
        refusals: list[str] = []
        try:
            async with asyncio.timeout(self.publish_timeout):
                await self._send(messages, refusals)
        except TimeoutError:
            why = f" (refused {len(refusals)} times, last: {refusals[-1]})" if refusals else ""
            raise TransportError(
                f"RabbitMQ did not confirm {len(messages)} messages within "
                f"{self.publish_timeout}s{why}"
            ) from None

    async def _free(self, n: int) -> None:
        self.outstanding -= n
        async with self._room:
            self._room.notify_all()

    async def _send(self, messages: Sequence[Outgoing], refusals: list[str]) -> None:
        """Send until every message is confirmed. A message the broker
        nacks (not stored: a quorum queue with no leader yet, as one that
        another channel's declare has just created; seen for 10-40 ms when
        eight processes declare and publish to a new queue at once) is sent
        again after a pause (10 ms, doubling to 0.5 s), within the caller's
        ``publish_timeout``; a message is at least once in each queue."""
        todo = list(messages)
        pause = 0.01
        while todo:
            await self.link.wait_up()
            try:
                ch = await self.channel()
                results = await asyncio.gather(
                    *(
                        ch.basic_publish(
                            m.body, exchange=m.exchange, routing_key=m.routing_key,
                            properties=m.properties,
                        )
                        for m in todo
                    ),
                    return_exceptions=True,
                )  # fmt: skip
            except LOST as exc:
                if self.link.closed:
                    raise Closed("transport is closed") from exc
                await self._lost()
                continue
            again: list[Outgoing] = []
            lost = False
            for m, r in zip(todo, results, strict=True):
                if isinstance(r, Basic.Ack):
                    continue
                if isinstance(r, LOST):
                    lost = True
                elif isinstance(r, aiormq.exceptions.DeliveryError) or not isinstance(
                    r, BaseException
                ):  # a nack: the broker did not store it
                    refusals.append(f"{m.exchange or m.routing_key!r}: {r!r}")
                else:
                    if self.link.closed:
                        raise Closed("transport is closed") from r
                    raise translate(r, f"publishing to {m.exchange!r}") from r
                again.append(m)  # in their order
            if again and self.link.closed:
                raise Closed("transport is closed")
            if lost:
                await self._lost()
            elif again:
                await self.clock.sleep(pause)
                pause = min(pause * 2, 0.5)
            todo = again

    async def _lost(self) -> None:
        """The channel or the connection went: wait a moment for the link."""
        self._ch = None
        with contextlib.suppress(TimeoutError):
            await self.link.wait_up(timeout=1.0)
        if not self.link.connected:
            await self.clock.sleep(0.05)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(self._background(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except Closed:
            log.error("amqp: the transport closed before a publish was confirmed")
        except Exception:
            log.exception("amqp: a publish_nowait failed")

    async def flush(self) -> None:
        """Wait until everything sent so far is confirmed."""
        async with self._room:
            await self._room.wait_for(lambda: self.outstanding == 0)

    def note_scheduled(self, group: str, event_id: str, due: float) -> None:
        self.scheduled.setdefault(group, {})[event_id] = due

    def came_due(self, group: str, event_id: str) -> None:
        s = self.scheduled.get(group)
        if s:
            s.pop(event_id, None)

    def scheduled_count(self, group: str) -> int:
        s = self.scheduled.get(group)
        if not s:
            return 0
        # Entries another process received are never seen again here:
        # forget them a while after they were due.
        stale = self.clock.time() - 30.0
        for k in [k for k, due in s.items() if due < stale]:
            del s[k]
        return len(s)

    async def close(self, timeout: float) -> None:
        if self.busy:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.flush()
        for t in list(self._tasks):
            t.cancel()
        ch, self._ch = self._ch, None
        await self.link.close_channel(ch)
