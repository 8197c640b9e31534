"""The in-process transport: the embedded default, and the fastest.

Envelopes pass as objects, never encoded. Each group has a bounded queue;
publishers wait while a queue is full. Delivery is at-least-once within the
process; nothing survives the process.

Size: an event whose encoding (by the app's codec) is over the codec's
``max_message_size`` raises ``MessageTooLarge`` at publish, as on every
transport that carries bytes, so an app tested here meets the same limit
where it is deployed. An event type whose every instance fits
(``Codec.size_bound``: only fixed-size fields, such as numbers, flags,
times and enums) is never measured; any other event costs one encode
(measured in BENCHMARKS.md, "Envelope size on memory://").

Capabilities: ``DirectPut`` (``put_one``, the in-process hot path) and
``TopicPut`` (``putter``: the same, made once per topic and type),
``TakesNow`` (``taker``: a worker takes its next batch without awaiting),
``HandsBack`` (``release``), ``IdleAware`` (``idle``, ``wait_idle``) and
``StateStore`` (a dict that lives as long as the transport).
"""

from __future__ import annotations

import asyncio
import operator
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from itertools import repeat, starmap

from .._clock import Clock, RealClock
from .._codec import Codec, MsgpackCodec
from .._errors import Closed, ConfigurationError, Overloaded
from .._event import Envelope
from .._transport import (
    DeadLetter,
    Delivery,
    Taker,
    TransportStats,
    publishing_group,
    topic_matches,
)

__all__ = ("MemoryTransport",)

_GROUP_OF = operator.attrgetter("group")


def _own_output(group: str) -> bool:
    """Whether this task is publishing the outputs of a handler of
    ``group`` (``publishing_group``): they go in past the group's bound."""
    publishing = publishing_group.get()
    return (
        publishing is not None
        and publishing[0] == group
        and publishing[1] is asyncio.current_task()
    )


class _Group:
    __slots__ = (
        "capacity",
        "consumers",
        "dead",
        "name",
        "patterns",
        "queue",
        "roomless",
        "scheduled",
        "space_waiters",
        "unacked",
    )

    def __init__(self, name: str, patterns: list[str], capacity: int) -> None:
        self.name = name
        self.patterns = patterns
        self.capacity = capacity
        self.queue: deque[Delivery] = deque()
        self.unacked = 0
        self.scheduled = 0
        # Consumers waiting for envelopes, and those waiting for room (all
        # their prefetch unsettled): a put wakes only the first, so a
        # consumer that cannot take anything is not woken by each burst.
        self.consumers: list[asyncio.Future[None]] = []
        self.roomless: list[asyncio.Future[None]] = []
        self.space_waiters: deque[asyncio.Future[None]] = deque()
        self.dead: dict[str, DeadLetter] = {}

    def wake_readers(self) -> None:
        """Wake the consumers waiting for envelopes (one was put)."""
        for fut in self.consumers:
            if not fut.done():
                fut.set_result(None)
        self.consumers.clear()

    def wake_consumers(self) -> None:
        """Wake every waiting consumer (envelopes came, or room was made)."""
        if self.consumers:
            self.wake_readers()
        if self.roomless:
            for fut in self.roomless:
                if not fut.done():
                    fut.set_result(None)
            self.roomless.clear()

    def wake_publishers(self) -> None:
        waiters = self.space_waiters
        room = self.capacity - len(self.queue)
        while waiters and room > 0:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                room -= 1

    @property
    def idle(self) -> bool:
        return not self.queue and not self.unacked and not self.scheduled


class MemoryTransport:
    """Groups as bounded in-process queues.

    ``capacity`` bounds each group's queue of undelivered envelopes
    (4,096 by default: a producer runs at most that far ahead of its
    consumers, so what is queued mostly stays in the CPU's caches, where
    10,000 events a group did not; 1,024 kept them closer still and cost the
    shop demo a sixth of its rate: BENCHMARKS.md, issue 17); ``dedup_window`` is
    how many recent event ids are remembered to drop duplicates (between
    half of it and all of it, at any moment);
    ``codec`` (the app's) measures events against its ``max_message_size``.
    """

    durable = False

    def __init__(
        self,
        url: str = "memory://",
        *,
        capacity: int = 4_096,
        dedup_window: int = 100_000,
        clock: Clock | None = None,
        codec: Codec | None = None,
    ) -> None:
        if capacity < 1:
            raise ConfigurationError("capacity must be at least 1")
        self.url = url
        self.capacity = capacity
        self.clock: Clock = clock or RealClock()
        self.codec: Codec = codec or MsgpackCodec()
        self._check_size = self.codec.check_size
        self._limit = self.codec.max_message_size
        # Event types whose size bound is within the limit (never measured),
        # and those measured each time.
        self._fit: set[type] = set()
        self._measured: set[type] = set()
        self._groups: dict[str, _Group] = {}
        self._routes: dict[str, tuple[_Group, ...]] = {}
        # topic -> its one group, for topics routed to exactly one (put_one)
        self._single: dict[str, _Group] = {}
        # Non-empty while the putters made since the last change of routes
        # hold: declare and close empty it (and start a new one).
        self._live: list[bool] = [True]
        self._window = max(2, dedup_window // 2)
        self._seen: set[str] = set()
        self._seen_old: set[str] = set()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._state: dict[str, bytes] = {}
        self._closed = False

    async def start(self) -> None:
        self._closed = False

    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(group, list(topics), self.capacity)
        else:
            g.patterns.extend(t for t in topics if t not in g.patterns)
        self._routes.clear()
        self._single.clear()
        self._renew_putters()

    def _renew_putters(self) -> None:
        self._live.clear()
        self._live = [True]

    def _route(self, topic: str) -> tuple[_Group, ...]:
        groups = self._routes.get(topic)
        if groups is None:
            groups = self._routes[topic] = tuple(
                g for g in self._groups.values() if any(topic_matches(p, topic) for p in g.patterns)
            )
        return groups

    async def groups_for(self, topic: str) -> list[str]:
        """The groups whose topics match ``topic`` (``KnowsGroups``)."""
        return [g.name for g in self._route(topic)]

    def _always_fits(self, tp: type) -> bool:
        """Whether every event of type ``tp`` is within the codec's limit
        (its size bound is), learnt once per type."""
        if tp in self._fit:
            return True
        if tp in self._measured:
            return False
        bound = self.codec.size_bound(tp)
        if bound is not None and bound <= self._limit:
            self._fit.add(tp)
            return True
        self._measured.add(tp)
        return False

    def _measure(self, env: Envelope) -> None:
        """Raise ``MessageTooLarge`` if ``env`` is over the codec's limit;
        an event of a type that always fits is not measured."""
        if env.event is None or not self._always_fits(type(env.event)):
            self._check_size(env)

    def _fresh(self, env_id: str) -> bool:
        # Only derived ids (UUIDv8, see surge._event) can repeat; callers
        # check that first, so fresh ids skip this on the hot path.
        seen = self._seen
        if env_id in seen or env_id in self._seen_old:
            return False
        seen.add(env_id)
        if len(seen) >= self._window:
            self._seen_old = seen
            self._seen = set()
        return True

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if self._closed:
            raise Closed("transport is closed")
        fit = self._fit
        for env in envelopes:
            if type(env.event) not in fit:
                self._measure(env)
        routes = self._routes
        for env in envelopes:
            if env.id[12] == "8" and not self._fresh(env.id):
                continue
            groups = routes.get(env.topic)
            if groups is None:
                groups = self._route(env.topic)
            if env.not_before is not None and self._later(env, groups):
                continue
            for g in groups:
                while len(g.queue) >= g.capacity and not _own_output(g.name):
                    fut = asyncio.get_running_loop().create_future()
                    g.space_waiters.append(fut)
                    await fut
                    if self._closed:
                        raise Closed("transport is closed")
                g.queue.append(Delivery(env, g.name))
                if g.consumers:
                    g.wake_readers()

    def put_one(self, env: Envelope) -> bool:
        """Put one envelope whose id is fresh (a UUIDv7, never repeated, so no
        dedup check) if every group has room; False, taking nothing, if one
        is full. The hot path of App.publish and App.publish_nowait."""
        # _single is empty while closed: close clears it, and only this
        # method fills it, past the check that raises Closed.
        g = self._single.get(env.topic)
        if g is not None and env.not_before is None:
            if type(env.event) not in self._fit:
                self._measure(env)
            q = g.queue
            if len(q) >= g.capacity or g.space_waiters:
                return False
            q.append(Delivery(env, g.name))
            if g.consumers:
                g.wake_readers()
            return True
        if self._closed:
            raise Closed("transport is closed")
        groups = self._routes.get(env.topic)
        if groups is None:
            groups = self._route(env.topic)
        if type(env.event) not in self._fit:
            self._measure(env)
        if len(groups) == 1:
            self._single[env.topic] = groups[0]
        for g in groups:
            if len(g.queue) >= g.capacity or g.space_waiters:
                return False
        if env.not_before is not None and self._later(env, groups):
            return True
        for g in groups:
            g.queue.append(Delivery(env, g.name))
            if g.consumers:
                g.wake_readers()
        return True

    def putter(self, topic: str, event_type: type) -> Callable[[Envelope], bool] | None:
        """``put_one`` for fresh envelopes of ``topic`` carrying
        ``event_type`` events, published now (``TopicPut``); None unless the
        topic is routed to one group. It skips the route lookup, the
        not-before check and, for a type that always fits, the size check
        (about 140 ns of a 1.2 us publish, BENCHMARKS.md). A change of
        routes or a close sends every later put to ``put_one``; so does a
        full queue, which decides. A subclass that overrides ``put_one``
        gets none: its ``put_one`` sees every put."""
        if self._closed or type(self).put_one is not MemoryTransport.put_one:
            return None
        groups = self._route(topic)
        if len(groups) != 1:
            return None
        g = groups[0]
        live = self._live
        queue, capacity, waiting = g.queue, g.capacity, g.space_waiters
        consumers, wake, name = g.consumers, g.wake_readers, g.name
        put_one = self.put_one
        check = None if self._always_fits(event_type) else self._check_size

        def put(env: Envelope) -> bool:
            if live and len(queue) < capacity and not waiting:
                if check is not None:
                    check(env)
                queue.append(Delivery(env, name))
                if consumers:
                    wake()
                return True
            return put_one(env)

        return put

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        if self._closed:
            raise Closed("transport is closed")
        routes = self._routes
        # All or nothing: check sizes and room for the whole batch before taking any.
        need: dict[_Group, int] = {}
        fit = self._fit
        for env in envelopes:
            if type(env.event) not in fit:
                self._measure(env)
            for g in self._route(env.topic):
                need[g] = need.get(g, 0) + 1
        for g, n in need.items():
            if len(g.queue) + n > g.capacity or g.space_waiters:
                raise Overloaded(
                    f"group {g.name!r} holds {len(g.queue)} of {g.capacity} undelivered events"
                )
        for env in envelopes:
            if env.id[12] == "8" and not self._fresh(env.id):
                continue
            groups = routes.get(env.topic)
            if groups is None:
                groups = self._route(env.topic)
            if env.not_before is not None and self._later(env, groups):
                continue
            for g in groups:
                g.queue.append(Delivery(env, g.name))
                if g.consumers:
                    g.wake_readers()

    async def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        g = self._groups.get(group)
        if g is None:
            raise ConfigurationError(f"group {group!r} was not declared")
        loop = asyncio.get_running_loop()
        take = self._taker(g)
        while not self._closed:
            batch = take(prefetch)
            if batch:
                yield batch
                continue
            fut = loop.create_future()
            (g.consumers if g.unacked < prefetch else g.roomless).append(fut)
            await fut

    def taker(self, group: str) -> Taker | None:
        """``(settle_take, settle)`` for ``group`` (``TakesNow``): ``ack``
        and what ``consume`` yields next, without awaiting. None for a subclass that
        overrides ``consume`` or ``ack`` (surge.testing.FaultyTransport):
        its own see every delivery."""
        cls = type(self)
        if cls.consume is not MemoryTransport.consume or cls.ack is not MemoryTransport.ack:
            return None
        g = self._group(group)
        take = self._taker(g)
        settled = self._settled

        def settle_take(prefetch: int, deliveries: Sequence[Delivery]) -> list[Delivery]:
            g.unacked -= len(deliveries)
            batch = take(prefetch)
            # A consumer waiting for room is woken only when the take left
            # nothing queued: a worker that took a batch keeps the stream.
            if not g.queue:
                settled(g)
            return batch

        def settle(deliveries: Sequence[Delivery]) -> None:
            g.unacked -= len(deliveries)
            settled(g)

        return settle_take, settle

    def _taker(self, g: _Group) -> Callable[[int], list[Delivery]]:
        queue = g.queue
        popleft = queue.popleft

        def take(prefetch: int) -> list[Delivery]:
            """Up to ``prefetch`` less what is unsettled, now; [] once closed."""
            room = prefetch - g.unacked
            if room <= 0 or not queue or self._closed:
                return []
            if len(queue) <= room:
                batch = list(queue)
                queue.clear()
            else:
                batch = list(starmap(popleft, repeat((), room)))  # twice a comprehension's speed
            g.unacked += len(batch)
            if g.space_waiters:
                g.wake_publishers()
            return batch

        return take

    def _later(self, env: Envelope, groups: tuple[_Group, ...]) -> bool:
        """Schedule ``env`` for its ``not_before`` time, if that is ahead."""
        assert env.not_before is not None
        delay = env.not_before - self.clock.time()
        if delay <= 0:
            return False
        for g in groups:
            self._schedule(g, Delivery(env, g.name, 0), delay)
        return True

    def _schedule(self, g: _Group, delivery: Delivery, delay: float) -> None:
        g.scheduled += 1

        def due() -> None:
            self._timers.discard(handle)
            g.scheduled -= 1
            delivery.attempt += 1
            g.queue.append(delivery)
            g.wake_consumers()

        handle = self.clock.call_later(max(0.0, delay), due)
        self._timers.add(handle)

    def _settled(self, g: _Group) -> None:
        if g.consumers or g.roomless:
            g.wake_consumers()
        if self._idle_waiters and g.idle:
            self._check_idle()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        groups = self._groups
        if deliveries:
            # A runner acks its own group's deliveries: one count, checked in C.
            names = set(map(_GROUP_OF, deliveries))
            if len(names) == 1:
                g = groups[names.pop()]
                g.unacked -= len(deliveries)
                self._settled(g)
                return
        last: _Group | None = None
        for d in deliveries:
            g = groups[d.group]
            g.unacked -= 1
            if g is not last:
                if last is not None:
                    self._settled(last)
                last = g
        if last is not None:
            self._settled(last)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        g = self._groups[delivery.group]
        g.unacked -= 1
        if g.roomless:
            g.wake_consumers()
        self._schedule(g, delivery, delay)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries no handler has seen (the app is stopping):
        first in their group's queue, in the order given, the attempt not
        counted."""
        groups = self._groups
        touched: dict[_Group, None] = {}
        for d in reversed(deliveries):
            g = groups[d.group]
            g.unacked -= 1
            g.queue.appendleft(d)
            touched[g] = None
        for g in touched:
            g.wake_consumers()

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        g = self._groups[delivery.group]
        g.unacked -= 1
        g.dead[record.id] = record
        self._settled(g)

    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        groups = self._groups.values() if group is None else [self._group(group)]
        return sorted((d for g in groups for d in g.dead.values()), key=lambda d: d.failed_at)

    def _group(self, name: str) -> _Group:
        g = self._groups.get(name)
        if g is None:
            raise ConfigurationError(f"no group {name!r}; groups: {sorted(self._groups)}")
        return g

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        g = self._group(group)
        chosen = list(g.dead) if ids is None else [i for i in ids if i in g.dead]
        for dead_id in chosen:
            rec = g.dead.pop(dead_id)
            env = Envelope(rec.id, rec.topic, rec.key, 0.0, rec.headers, None, rec.body)
            g.queue.append(Delivery(env, g.name))
        g.wake_consumers()
        return len(chosen)

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        g = self._group(group)
        chosen = list(g.dead) if ids is None else [i for i in ids if i in g.dead]
        for dead_id in chosen:
            del g.dead[dead_id]
        return len(chosen)

    async def stats(self, group: str) -> TransportStats:
        g = self._group(group)
        return TransportStats(len(g.queue), g.unacked, g.scheduled, len(g.dead))

    # --- fault injection (surge.testing.FaultyTransport) ----------------------
    def redeliver(self, delivery: Delivery) -> None:
        """Queue a second, independent delivery of ``delivery``'s envelope
        at the same attempt (a duplicate, as a broker may deliver)."""
        g = self._groups[delivery.group]
        g.queue.append(Delivery(delivery.envelope, g.name, delivery.attempt))
        if g.consumers:
            g.wake_consumers()

    def hold_back(self, delivery: Delivery, delay: float) -> None:
        """Take back a fetched delivery, to come again after ``delay`` seconds
        with its attempt not counted (a late delivery)."""
        g = self._groups[delivery.group]
        g.unacked -= 1
        if g.roomless:
            g.wake_consumers()
        delivery.attempt -= 1
        self._schedule(g, delivery, delay)

    # --- trigger state -------------------------------------------------------
    async def load_state(self, key: str) -> bytes | None:
        """The value saved under ``key`` on this transport, if any."""
        return self._state.get(key)

    async def save_state(self, key: str, value: bytes) -> None:
        """Keep ``value`` under ``key`` for as long as this transport lives."""
        self._state[key] = value

    # --- for tests and drain() ---------------------------------------------
    @property
    def idle(self) -> bool:
        """No group holds an undelivered, unsettled or scheduled envelope."""
        return all(g.idle for g in self._groups.values())

    def _check_idle(self) -> None:
        if self.idle:
            for fut in self._idle_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._idle_waiters.clear()

    async def wait_idle(self) -> None:
        """Return once every group is idle."""
        while not self.idle:
            fut = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(fut)
            await fut

    async def close(self) -> None:
        self._closed = True
        self._single.clear()
        self._renew_putters()
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        for g in self._groups.values():
            g.wake_consumers()
            for fut in g.space_waiters:
                if not fut.done():
                    fut.set_result(None)
            g.space_waiters.clear()
