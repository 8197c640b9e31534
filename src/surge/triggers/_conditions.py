"""Condition triggers: ``count``, ``sequence`` and ``absence`` over event streams.

A condition is an internal subscription on its source topics that keeps
bounded per-key state in memory and publishes a :class:`ConditionMet` (with
an id derived from the event that completed it) when it holds; the decorated
function subscribes to that. See docs/triggers.md for the exact semantics.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from .._context import Context
from .._errors import ConfigurationError
from .._event import Envelope, Event, derive_id
from ._subscription import adapt, trigger_name

if TYPE_CHECKING:
    from .._app import App, HandlerOptions
    from .._runtime import Runtime

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


class _Hit(msgspec.Struct, frozen=True):
    key: str | None
    time: float
    ids: tuple[str, ...]


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
        self._seq = 0

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


class _Window:
    """A key's recent events, sorted by (time, arrival), and the newest time
    seen for the key (its watermark)."""

    __slots__ = ("events", "watermark")

    def __init__(self) -> None:
        self.events: list[tuple[float, int, str]] = []
        self.watermark = -math.inf

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
        self._seq += 1
        bisect.insort(w.events, (time, self._seq, event_id))
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
            self._seq += 1
            bisect.insort(w.events, (time, self._seq, event_id))
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


# Redeliveries of an event the condition already took in: remembered so a
# second delivery publishes the same derived events instead of counting again.
_SEEN = 10_000


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

    async def start(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def stop(self) -> None:
        # Handlers still running keep publishing through the runtime.
        pass

    async def observe(self, event: Event, ctx: Context) -> None:
        env = ctx.envelope
        seen = self._seen
        out = seen.get(env.id)
        if out is None:
            out = seen[env.id] = self._outputs(env, event)
            if len(seen) > _SEEN:
                seen.popitem(last=False)
        if out:
            # Published before the ack, with ids derived from this event's:
            # a redelivery republishes the same ids.
            assert self._runtime is not None, "the app runs its parts before its handlers"
            await self._runtime.publish(list(out))

    def _outputs(self, env: Envelope, event: Event) -> list[Envelope]:
        condition = self.condition
        if isinstance(event, _AbsenceCheck):
            hit = self.engine.check(event.key, event.a_id, event.deadline)
        else:
            role = self.roles.get(env.topic, self.roles.get(event.__topic__, 0))
            key = condition.key_of(event)
            hit = self.engine.feed(role, key, env.time, env.id)
            if isinstance(condition, _Absence) and role == 0:
                deadline = env.time + condition.within
                check = _AbsenceCheck(key=key, a_id=env.id, deadline=deadline)
                # No envelope key: the observer already takes events one at
                # a time, in arrival order.
                chk = Envelope(
                    derive_id(env.id, "absence"),
                    self.check_topic,
                    None,
                    env.time,
                    event=check,
                    not_before=deadline,
                )
                return [chk]
        if hit is None:
            return []
        met = ConditionMet(condition=self.name, key=hit.key, time=hit.time, ids=hit.ids)
        return [Envelope(derive_id(env.id, "when"), self.topic, None, hit.time, None, met)]


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
        # One consumer in order: the state is per process and order matters.
        app.on(*topics, name=f"_surge.when.{cname}", concurrency=1)(observer.observe)
        return fn

    return decorate
