"""A transport written only from docs/transports.md: the core protocol, no capability.

In process, over a few dicts and deques: envelopes pass as objects, and
nothing is durable. It has no ``release``, ``partitions``, ``idle`` /
``wait_idle``, ``load_state`` / ``save_state`` or ``put_one``, so the app
runs it the way the page says it runs any transport without them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence

import surge


class _Group:
    def __init__(self, name: str, topics: Sequence[str], ephemeral: bool) -> None:
        self.name = name
        self.topics = list(topics)
        self.ephemeral = ephemeral
        self.ready: deque[surge.Delivery] = deque()
        self.unsettled = 0
        self.scheduled = 0
        self.dead: dict[str, surge.DeadLetter] = {}
        self.wakeup = asyncio.Event()

    def put(self, d: surge.Delivery) -> None:
        self.ready.append(d)
        self.wakeup.set()


class MinimalTransport:
    """``minimal://``: the core protocol over in-process queues."""

    durable = False

    def __init__(
        self,
        url: str = "minimal://",
        *,
        clock: surge.Clock | None = None,
        codec: surge.Codec | None = None,
    ) -> None:
        self.url = url
        self.clock: surge.Clock = clock or surge.RealClock()
        self.codec = codec or surge.MsgpackCodec()
        self._groups: dict[str, _Group] = {}
        self._seen: set[str] = set()  # derived ids, for dedup
        self._seen_order: deque[str] = deque()
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed = False

    async def start(self) -> None:
        self._closed = False

    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        g = self._groups.get(group)
        if g is None:
            self._groups[group] = _Group(group, topics, ephemeral)
        else:
            g.topics.extend(t for t in topics if t not in g.topics)

    def _group(self, name: str) -> _Group:
        g = self._groups.get(name)
        if g is None:
            raise surge.ConfigurationError(f"no group {name!r}")
        return g

    def _accept(self, envelopes: Sequence[surge.Envelope]) -> None:
        if self._closed:
            raise surge.Closed("the transport is closed")
        for env in envelopes:  # all or nothing: sizes first
            self.codec.check_size(env)
        for env in envelopes:
            if surge.is_derived(env.id):
                if env.id in self._seen:
                    continue
                self._seen.add(env.id)
                self._seen_order.append(env.id)
                if len(self._seen_order) > 10_000:
                    self._seen.discard(self._seen_order.popleft())
            for g in self._groups.values():
                if any(surge.topic_matches(t, env.topic) for t in g.topics):
                    self._deliver_later(g, surge.Delivery(env, g.name), env.not_before)

    def _deliver_later(self, g: _Group, d: surge.Delivery, at: float | None) -> None:
        delay = 0.0 if at is None else at - self.clock.time()
        if delay <= 0:
            g.put(d)
            return
        g.scheduled += 1

        def due() -> None:
            self._timers.discard(handle)
            g.scheduled -= 1
            g.put(d)

        handle = self.clock.call_later(delay, due)
        self._timers.add(handle)

    async def publish(self, envelopes: Sequence[surge.Envelope]) -> None:
        self._accept(envelopes)

    def publish_nowait(self, envelopes: Sequence[surge.Envelope]) -> None:
        self._accept(envelopes)

    async def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[surge.Delivery]]:
        g = self._group(group)
        while not self._closed:
            room = prefetch - g.unsettled
            if room <= 0 or not g.ready:
                g.wakeup.clear()
                await g.wakeup.wait()
                continue
            batch = [g.ready.popleft() for _ in range(min(room, len(g.ready)))]
            now = self.clock.time()
            for d in batch:
                if d.attempt == 1 and not d.first_time:
                    d.first_time = now
            g.unsettled += len(batch)
            yield batch

    def _settle(self, d: surge.Delivery) -> _Group:
        g = self._group(d.group)
        g.unsettled -= 1
        g.wakeup.set()
        return g

    async def ack(self, deliveries: Sequence[surge.Delivery]) -> None:
        for d in deliveries:
            self._settle(d)

    async def nack(self, delivery: surge.Delivery, delay: float) -> None:
        g = self._settle(delivery)
        again = surge.Delivery(
            delivery.envelope, g.name, delivery.attempt + 1, None, delivery.first_time
        )
        self._deliver_later(g, again, self.clock.time() + delay if delay > 0 else None)

    async def dead_letter(self, delivery: surge.Delivery, record: surge.DeadLetter) -> None:
        self._settle(delivery).dead[record.id] = record

    async def dead_letters(self, group: str | None = None) -> list[surge.DeadLetter]:
        groups = self._groups.values() if group is None else [self._group(group)]
        return sorted((d for g in groups for d in g.dead.values()), key=lambda d: d.failed_at)

    def _chosen(self, g: _Group, ids: Sequence[str] | None) -> list[str]:
        return list(g.dead) if ids is None else [i for i in ids if i in g.dead]

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        g = self._group(group)
        chosen = self._chosen(g, ids)
        for dead_id in chosen:
            rec = g.dead.pop(dead_id)
            env = surge.Envelope(rec.id, rec.topic, rec.key, 0.0, rec.headers, None, rec.body)
            g.put(surge.Delivery(env, g.name))
        return len(chosen)

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        g = self._group(group)
        chosen = self._chosen(g, ids)
        for dead_id in chosen:
            del g.dead[dead_id]
        return len(chosen)

    async def stats(self, group: str) -> surge.TransportStats:
        g = self._group(group)
        return surge.TransportStats(len(g.ready), g.unsettled, g.scheduled, len(g.dead))

    async def close(self) -> None:
        self._closed = True
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        for name in [n for n, g in self._groups.items() if g.ephemeral]:
            del self._groups[name]
        for g in self._groups.values():
            g.scheduled = 0  # their timers are cancelled: not durable
            g.wakeup.set()
