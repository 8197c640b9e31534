"""Condition triggers: ``count``, ``sequence`` and ``absence`` over event streams.

A condition is an internal subscription on its source topics, keyed by the
condition's ``by=`` (one constant key without it), that keeps per-key state
and publishes a :class:`ConditionMet` (with an id derived from the event that
completed it) when it holds; the decorated function subscribes to that.

On a transport with partitions (``KeyRouting``) publishers route each key's
source events to one partition, read by one process at a time in publish
order, and the state of each key lives in the transport's state store,
loaded and saved around each event before its ack: any process that owns
the partition next carries on where the last one stopped. Elsewhere the
state is kept in memory, bounded by an LRU over keys. See docs/triggers.md
for the exact semantics.
"""

from __future__ import annotations

import bisect
import logging
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from .._context import Context
from .._errors import ConfigurationError, RetryLater
from .._event import Envelope, Event, derive_id
from ._subscription import adapt, trigger_name

if TYPE_CHECKING:
    from .._app import App, HandlerOptions
    from .._runtime import Runtime
    from .._transport import Delivery

__all__ = ("Condition", "ConditionMet", "absence", "count", "sequence", "when")

F = TypeVar("F", bound=Callable[..., Any])


class ConditionMet(Event):
    """A condition held: which one, for which key, when (event time), and
    the ids of the events that made it hold, in event-time order."""

    __topic__ = "_surge.ConditionMet"

    condition: str
    key: str | None
    time: float
    ids: tuple[str, ...]


class _AbsenceCheck(Event):
    """Delivered at ``deadline``: did a B follow the A ``a_id`` in time?"""

    __topic__ = "_surge.AbsenceCheck"

    key: str | None
    a_id: str
    deadline: float


KeyFn = Callable[[Any], Hashable]

log = logging.getLogger("surge.triggers")

# The routing key of a condition without ``by=``: every source event in one
# partition, hence one process at a time and in publish order.
_ALL = "_surge.when"


class Condition:
    """A pattern over event streams; made by :func:`count`, :func:`sequence`
    and :func:`absence`, used with ``app.when``."""

    kind: str = ""

    def __init__(
        self,
        sources: tuple[type[Event], ...],
        *,
        by: str | KeyFn | None,
        within: float,
        max_keys: int,
        max_events: int,
    ) -> None:
        for s in sources:
            if not (isinstance(s, type) and issubclass(s, Event)):
                raise ConfigurationError(f"{self.kind}(): {s!r} is not an Event subclass")
        if len({s.__topic__ for s in sources}) != len(sources):
            raise ConfigurationError(f"{self.kind}(): give two different event types")
        if not within > 0 or not math.isfinite(within):
            raise ConfigurationError(f"{self.kind}(within={within!r}): must be positive")
        if max_keys < 1 or max_events < 1:
            raise ConfigurationError("max_keys and max_events must be at least 1")
        self.sources = sources
        self.by = by
        self.within = within
        self.max_keys = max_keys
        self.max_events = max_events
        self._key: KeyFn | None
        if isinstance(by, str):
            for s in sources:
                if s.__key__ is not None and s.__key__ != by:
                    # Across processes the publisher routes by __key__: one
                    # key of the condition would be split between processes.
                    raise ConfigurationError(
                        f"{self.kind}(by={by!r}): {s.__name__} is keyed by "
                        f"{s.__key__!r} (its __key__); give by={s.__key__!r} or key "
                        "the event type by the condition's field"
                    )
        if by is None:
            self._key = None
        elif isinstance(by, str):
            for s in sources:
                if by not in getattr(s, "__struct_fields__", ()):
                    raise ConfigurationError(f"{self.kind}(by={by!r}): {s.__name__} has no {by}")
            self._key = operator.attrgetter(by)
        else:
            self._key = by

    def key_of(self, event: Event) -> str | None:
        return None if self._key is None else str(self._key(event))

    def route_of(self, event: Event) -> str:
        """The key publishers route ``event`` by on a partitioned transport
        (the internal subscription's ``key=``)."""
        key = event.key if isinstance(event, _AbsenceCheck) else self.key_of(event)
        return _ALL if key is None else key

    def engine(self) -> _Engine:
        raise NotImplementedError


class _Count(Condition):
    kind = "count"

    def __init__(self, source: type[Event], *, at_least: int, **kw: Any) -> None:
        super().__init__((source,), **kw)
        if at_least < 1:
            raise ConfigurationError(f"count(at_least={at_least!r}): must be at least 1")
        self.at_least = at_least

    def engine(self) -> _Engine:
        return _CountEngine(self)


class _Sequence(Condition):
    kind = "sequence"

    def engine(self) -> _Engine:
        return _SequenceEngine(self)


class _Absence(Condition):
    kind = "absence"

    def engine(self) -> _Engine:
        return _AbsenceEngine(self)


def count(
    event_type: type[Event],
    *,
    at_least: int,
    within: float,
    by: str | KeyFn | None = None,
    max_keys: int = 10_000,
) -> Condition:
    """Holds when ``at_least`` events of ``event_type`` with the same key
    have event times less than ``within`` seconds apart (a sliding window);
    then that key's window starts empty again."""
    return _Count(
        event_type,
        at_least=at_least,
        by=by,
        within=within,
        max_keys=max_keys,
        max_events=max(1, at_least),
    )


def sequence(
    first: type[Event],
    then: type[Event],
    *,
    within: float,
    by: str | KeyFn | None = None,
    max_keys: int = 10_000,
    max_events: int = 1_000,
) -> Condition:
    """Holds when a ``then`` event follows a ``first`` event of the same key,
    at most ``within`` seconds later (``0 <= then.time - first.time <
    within``); then that key's pending ``first`` events are used up."""
    return _Sequence((first, then), by=by, within=within, max_keys=max_keys, max_events=max_events)


def absence(
    first: type[Event],
    then: type[Event],
    *,
    within: float,
    by: str | KeyFn | None = None,
    max_keys: int = 10_000,
    max_events: int = 1_000,
) -> Condition:
    """Holds at ``first.time + within`` when no ``then`` event of the same key
    with ``first.time <= then.time < first.time + within`` came after it."""
    return _Absence((first, then), by=by, within=within, max_keys=max_keys, max_events=max_events)


class _Hit(msgspec.Struct, frozen=True, array_like=True):
    key: str | None
    time: float
    ids: tuple[str, ...]


class _Saved(msgspec.Struct, array_like=True, omit_defaults=True):
    """One key's state in the transport's state store: a window (count,
    sequence) or the pending A's (absence), and the events it took in most
    recently with the firing each made, to recognise a redelivery."""

    events: list[tuple[float, int, str]] = []
    watermark: float = -math.inf
    seq: int = 0
    pending: dict[str, float] = {}
    seen: list[tuple[str, _Hit | None]] = []


_encode_saved = msgspec.msgpack.Encoder().encode
_decode_saved = msgspec.msgpack.Decoder(_Saved).decode


class _Engine:
    """The state of one condition: per key, bounded by an LRU over keys.

    Events are fed in arrival order with their event time. ``role`` is 0 for
    the first (or only) source type, 1 for the second.
    """

    def __init__(self, cond: Condition) -> None:
        self.cond = cond
        self.keys: OrderedDict[str | None, Any] = OrderedDict()
        self.evicted_keys = 0
        self.dropped_events = 0

    def _state(self, key: str | None) -> Any:
        st = self.keys.get(key)
        if st is None:
            st = self.keys[key] = self._new()
            if len(self.keys) > self.cond.max_keys:
                self.keys.popitem(last=False)
                self.evicted_keys += 1
        else:
            self.keys.move_to_end(key)
        return st

    def _new(self) -> Any:
        raise NotImplementedError

    def feed(self, role: int, key: str | None, time: float, event_id: str) -> _Hit | None:
        raise NotImplementedError

    def check(self, key: str | None, a_id: str, deadline: float) -> _Hit | None:
        return None

    def attach(self, key: str | None, saved: _Saved) -> None:
        """Take ``key``'s state from the store (no LRU: one key at a time)."""
        w = _Window()
        w.events = saved.events
        w.watermark = saved.watermark
        w.seq = saved.seq
        self.keys[key] = w

    def detach(self, key: str | None) -> _Saved:
        """``key``'s state, to store; the engine keeps nothing of it."""
        w: _Window | None = self.keys.pop(key, None)
        if w is None:
            return _Saved()
        return _Saved(events=w.events, watermark=w.watermark, seq=w.seq)


class _Window:
    """A key's recent events, sorted by (time, arrival), and the newest time
    seen for the key (its watermark)."""

    __slots__ = ("events", "seq", "watermark")

    def __init__(self) -> None:
        self.events: list[tuple[float, int, str]] = []
        self.watermark = -math.inf
        self.seq = 0  # arrival order, for equal times

    def advance(self, time: float, within: float) -> bool:
        """Take ``time`` into the watermark and forget what fell out of the
        window; False when ``time`` itself is already out of it."""
        if time <= self.watermark - within:
            return False
        if time > self.watermark:
            self.watermark = time
            cut = bisect.bisect_right(self.events, (time - within, math.inf, ""))
            if cut:
                del self.events[:cut]
        return True


class _CountEngine(_Engine):
    cond: _Count

    def _new(self) -> _Window:
        return _Window()

    def feed(self, role: int, key: str | None, time: float, event_id: str) -> _Hit | None:
        w: _Window = self._state(key)
        if not w.advance(time, self.cond.within):
            self.dropped_events += 1
            return None
        w.seq += 1
        bisect.insort(w.events, (time, w.seq, event_id))
        if len(w.events) < self.cond.at_least:
            return None
        hit = _Hit(key, time, tuple(e[2] for e in w.events))
        w.events.clear()
        return hit


class _SequenceEngine(_Engine):
    def _new(self) -> _Window:
        return _Window()

    def feed(self, role: int, key: str | None, time: float, event_id: str) -> _Hit | None:
        w: _Window = self._state(key)
        if not w.advance(time, self.cond.within):
            self.dropped_events += 1
            return None
        if role == 0:
            w.seq += 1
            bisect.insort(w.events, (time, w.seq, event_id))
            if len(w.events) > self.cond.max_events:
                del w.events[0]
                self.dropped_events += 1
            return None
        # Every pending A left is less than ``within`` older than the
        # watermark, hence than this B; it matches if it is not newer.
        first = w.events[0] if w.events and w.events[0][0] <= time else None
        if first is None:
            return None
        w.events.clear()
        return _Hit(key, time, (first[2], event_id))


class _AbsenceEngine(_Engine):
    def _new(self) -> dict[str, float]:
        return {}

    def feed(self, role: int, key: str | None, time: float, event_id: str) -> _Hit | None:
        within = self.cond.within
        if role == 1:
            waiting: dict[str, float] | None = self.keys.get(key)
            if waiting:
                for a_id in [a for a, t in waiting.items() if t <= time < t + within]:
                    del waiting[a_id]
            return None
        pending: dict[str, float] = self._state(key)
        pending[event_id] = time
        if len(pending) > self.cond.max_events:
            oldest = min(pending, key=pending.__getitem__)
            del pending[oldest]
            self.dropped_events += 1
        return None

    def check(self, key: str | None, a_id: str, deadline: float) -> _Hit | None:
        pending: dict[str, float] | None = self.keys.get(key)
        if pending is None or a_id not in pending:
            return None
        del pending[a_id]
        if not pending:
            del self.keys[key]
        return _Hit(key, deadline, (a_id,))

    def attach(self, key: str | None, saved: _Saved) -> None:
        self.keys[key] = saved.pending

    def detach(self, key: str | None) -> _Saved:
        pending: dict[str, float] | None = self.keys.pop(key, None)
        return _Saved(pending=pending or {})


# Redeliveries of an event the condition already took in: remembered so a
# second delivery publishes the same derived events instead of counting again.
_SEEN = 10_000
# The same, per key, in the state store: a redelivery follows a crash or a
# lost lease, and at most a prefetch of the condition's events was unsettled.
_SEEN_PER_KEY = 64


class _Observer:
    """One condition's internal subscription: feeds its engine and publishes
    what the engine makes (a part of the app, for the runtime's publish)."""

    def __init__(self, condition: Condition, name: str, topic: str, check_topic: str) -> None:
        self.condition = condition
        self.name = name
        self.topic = topic
        self.check_topic = check_topic
        self.engine = condition.engine()
        self.roles = {s.__topic__: i for i, s in enumerate(condition.sources)}
        self._seen: OrderedDict[str, list[Envelope]] = OrderedDict()
        self._runtime: Runtime | None = None
        self._stored = False
        self._state_prefix = ""
        self.fenced = 0
        """State saves refused because the source event's lease had run
        out (``FencedState``): the event went to the partition's next owner."""
        self.misrouted = 0
        """Source events that arrived routed by another key than the
        condition's (on a partitioned transport): their key's firings may
        differ from one process's."""

    async def start(self, runtime: Runtime) -> None:
        self._runtime = runtime
        # Partitions keep one key's events with one process at a time; its
        # state then has to follow the partition from process to process.
        self._stored = runtime.partitions > 0
        self._state_prefix = f"when:{runtime.app.name}.{self.name}:"

    async def stop(self) -> None:
        # Handlers still running keep publishing through the runtime.
        pass

    async def observe(self, event: Event, ctx: Context) -> None:
        env = ctx.envelope
        runtime = self._runtime
        assert runtime is not None, "the app runs its parts before its handlers"
        if self._stored:
            out = await self._observe_stored(runtime, ctx.delivery, event)
        else:
            seen = self._seen
            cached = seen.get(env.id)
            if cached is None:
                key = self._key_of(event)
                hit = self._feed(env, event, key)
                cached = seen[env.id] = self._envelopes(env, event, key, hit)
                if len(seen) > _SEEN:
                    seen.popitem(last=False)
            out = cached
        if out:
            # Published before the ack, with ids derived from this event's:
            # a redelivery republishes the same ids.
            await runtime.publish(list(out))

    async def _observe_stored(
        self, runtime: Runtime, delivery: Delivery, event: Event
    ) -> list[Envelope]:
        """Take ``event`` in with its key's state from the store, saved
        again before the ack (only while ``delivery`` is still ours, where
        the transport can tell)."""
        env = delivery.envelope
        key = self._key_of(event)
        route = self.condition.route_of(event)
        if env.key != route:
            self._misrouted(env, route)
        name = self._state_prefix + route
        raw = await runtime.state.load_state(name)
        saved = _decode_saved(raw) if raw else _Saved()
        for seen_id, hit in saved.seen:
            if seen_id == env.id:
                return self._envelopes(env, event, key, hit)
        self.engine.attach(key, saved)
        try:
            hit = self._feed(env, event, key)
        finally:
            after = self.engine.detach(key)
        after.seen = saved.seen[-(_SEEN_PER_KEY - 1) :]
        after.seen.append((env.id, hit))
        value = _encode_saved(after)
        held = runtime.fenced_state
        if held is None:
            await runtime.state.save_state(name, value)
        elif not await held.save_state_held(name, value, delivery):
            # Stalled past the delivery's lease: the partition's next owner
            # may have gone on from the state loaded here. Publish nothing;
            # the event is the next owner's to take in.
            self.fenced += 1
            raise RetryLater(0.0, f"condition {self.name!r}: the event's lease ran out")
        return self._envelopes(env, event, key, hit)

    def _misrouted(self, env: Envelope, route: str) -> None:
        self.misrouted += 1
        if self.misrouted == 1:
            log.warning(
                "condition %r: an event of %r came routed by key %r, not by the condition's "
                "key %r (published with key=, by an app without this condition, or keyed by "
                "another subscription of the topic): across processes the condition may miss "
                "or split its firings",
                self.name,
                env.topic,
                env.key,
                route,
            )

    def _key_of(self, event: Event) -> str | None:
        if isinstance(event, _AbsenceCheck):
            return event.key
        return self.condition.key_of(event)

    def _role(self, env: Envelope, event: Event) -> int:
        return self.roles.get(env.topic, self.roles.get(event.__topic__, 0))

    def _feed(self, env: Envelope, event: Event, key: str | None) -> _Hit | None:
        if isinstance(event, _AbsenceCheck):
            return self.engine.check(key, event.a_id, event.deadline)
        return self.engine.feed(self._role(env, event), key, env.time, env.id)

    def _envelopes(
        self, env: Envelope, event: Event, key: str | None, hit: _Hit | None
    ) -> list[Envelope]:
        """What taking ``event`` in publishes: the same on every delivery."""
        out: list[Envelope] = []
        condition = self.condition
        if (
            isinstance(condition, _Absence)
            and not isinstance(event, _AbsenceCheck)
            and self._role(env, event) == 0
        ):
            deadline = env.time + condition.within
            check = _AbsenceCheck(key=key, a_id=env.id, deadline=deadline)
            # Routed with the key's source events when partitions carry the
            # state (the check then meets the key's latest state); else no
            # key: one observer takes events one at a time, in arrival order.
            route = (_ALL if key is None else key) if self._stored else None
            out.append(
                Envelope(
                    derive_id(env.id, "absence"),
                    self.check_topic,
                    route,
                    env.time,
                    event=check,
                    not_before=deadline,
                )
            )
        if hit is not None:
            met = ConditionMet(condition=self.name, key=hit.key, time=hit.time, ids=hit.ids)
            out.append(Envelope(derive_id(env.id, "when"), self.topic, None, hit.time, None, met))
        return out


class _RouteKey:
    """A condition's routing key function; equal for conditions keyed alike,
    so two of them over one topic agree on how its events are routed."""

    __slots__ = ("_by", "_condition")

    def __init__(self, condition: Condition) -> None:
        self._condition = condition
        self._by = condition.by

    def __call__(self, event: Event) -> str:
        return self._condition.route_of(event)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RouteKey) and other._by == self._by

    def __hash__(self) -> int:
        return hash(self._by)


def when(
    app: App, condition: Condition, *, name: str | None, options: HandlerOptions
) -> Callable[[F], F]:
    """Run the decorated handler with a :class:`ConditionMet` each time
    ``condition`` holds; ``options`` go to ``App.on``."""
    if not isinstance(condition, Condition):
        raise ConfigurationError(
            f"app.when({condition!r}): give surge.count(), surge.sequence() or surge.absence()"
        )

    def decorate(fn: F) -> F:
        cname = trigger_name(fn, name)
        topic = f"_surge.when.{app.name}.{cname}"
        check_topic = f"{topic}.check"
        app.register_topic(topic, ConditionMet)
        options.subscribe(app, topic, name=name or cname)(adapt(fn))
        topics: list[type[Event] | str] = list(condition.sources)
        if isinstance(condition, _Absence):
            app.register_topic(check_topic, _AbsenceCheck)
            topics.append(check_topic)
        observer = _Observer(condition, cname, topic, check_topic)
        app.attach(observer)
        # One consumer in order, keyed by the condition's key: on a
        # partitioned transport publishers route each key's events to one
        # process at a time, in publish order.
        app.on(
            *topics,
            name=f"_surge.when.{cname}",
            concurrency=1,
            key=_RouteKey(condition),
            prefetch=_SEEN_PER_KEY,
        )(observer.observe)
        return fn

    return decorate
