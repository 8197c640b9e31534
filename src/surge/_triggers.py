"""Triggers: time (``every``, ``cron``) and conditions over event streams.

A timer firing is an event: a :class:`Tick` published on the topic
``_surge.trigger.<app>.<name>`` with an id derived from the trigger's name and
its scheduled time (``surge._event.id_at``). Every process that runs the app
computes the same slots and publishes the same id for each, and the
transport's dedup keeps one: that is the whole "exactly one firing per slot
on any number of workers" mechanism. The decorated function is an ordinary
subscription to that topic, so it gets retries, timeouts, a context and
publishes what it returns.

A condition is an internal subscription on its source topics that keeps
bounded per-key state in memory and publishes a :class:`ConditionMet` (with
an id derived from the event that completed it) when it holds; the decorated
function subscribes to that. See docs/triggers.md for the exact semantics.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import logging
import math
import operator
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from functools import wraps
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import msgspec

from . import _event
from ._context import Context
from ._errors import ConfigurationError
from ._event import Envelope, Event, derive_id, id_at

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from ._app import App

__all__ = (
    "Condition",
    "ConditionMet",
    "Tick",
    "absence",
    "count",
    "cron",
    "every",
    "sequence",
    "when",
)

log = logging.getLogger("surge.triggers")

F = TypeVar("F", bound=Callable[..., Any])

Misfire = Literal["skip", "catch_up"]

# A firing that could not be published is retried this often, until the
# next slot is due.
_PUBLISH_RETRY = 1.0
# Waking up this close to a slot counts as on time: the loop's clock and the
# wall clock are two floats and may disagree in their last bits.
_EARLY = 1e-3


class Tick(Event):
    """One firing of a timer trigger.

    ``trigger`` is the trigger's name; ``scheduled`` the slot's time (epoch
    seconds), which is the same in every process, so every worker publishes
    the same event for a slot.
    """

    __topic__ = "_surge.Tick"

    trigger: str
    scheduled: float

    @property
    def at(self) -> datetime:
        """The scheduled time as an aware UTC datetime."""
        return datetime.fromtimestamp(self.scheduled, UTC)


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


def _name_of(fn: Callable[..., Any], name: str | None) -> str:
    raw = name or fn.__qualname__
    # Topic tokens must survive every broker's subject rules (NATS treats
    # '>' and '*' as wildcards), so keep only plain characters.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw).strip(".") or "trigger"


def _register_topic(topic: str, tp: type[Event]) -> None:
    # Decoding on wire transports looks the type up by topic.
    _event._TYPES[topic] = tp


def _adapt(fn: F) -> Callable[..., Any]:
    """A handler for ``app.on``: functions of no argument get a shim."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params) or any(
        p.kind in positional and p.default is inspect.Parameter.empty for p in params
    ):
        return fn
    if inspect.iscoroutinefunction(fn):

        @wraps(fn)
        async def shim_async(_tick: Event) -> Any:
            return await fn()

        return shim_async

    @wraps(fn)
    def shim(_tick: Event) -> Any:
        return fn()

    return shim


# --- schedules ---------------------------------------------------------------
class _Schedule(Protocol):
    def next_after(self, t: float) -> float:
        """The first slot strictly after ``t``."""
        ...

    def latest(self, after: float, upto: float, n: int) -> list[float]:
        """At most the ``n`` latest slots in ``(after, upto]``, oldest first."""
        ...


class _Interval:
    """Slots at whole multiples of the period since the Unix epoch, so every
    process agrees on them whenever it started."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)

    def _slot(self, k: int) -> float:
        return k * self.seconds

    def next_after(self, t: float) -> float:
        k = math.floor(t / self.seconds) + 1
        while self._slot(k - 1) > t:
            k -= 1
        while self._slot(k) <= t:
            k += 1
        return self._slot(k)

    def latest(self, after: float, upto: float, n: int) -> list[float]:
        k = math.floor(upto / self.seconds)
        while self._slot(k) > upto:
            k -= 1
        out: list[float] = []
        while len(out) < n and self._slot(k) > after:
            out.append(self._slot(k))
            k -= 1
        out.reverse()
        return out


class _Cron:
    """Slots of a cron expression in a time zone (croniter does the parsing).

    DST: a wall time skipped when clocks go forward fires at the first
    instant after the gap (croniter's, and Vixie cron's, rule). When clocks go
    back, a wall time that occurs twice fires only on its first occurrence,
    unless the hour field is ``*`` (a job that runs every hour runs in both
    repeated hours, since they are two real hours), as Debian cron does.
    """

    def __init__(self, expression: str, tz: str) -> None:
        try:
            from croniter import croniter
        except ImportError:
            raise ImportError("cron triggers need croniter: pip install 'surge[cron]'") from None
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            self.tz: ZoneInfo = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(f"unknown time zone {tz!r} (use an IANA name)") from None
        if not croniter.is_valid(expression):
            raise ConfigurationError(f"invalid cron expression {expression!r}")
        self._croniter = croniter
        self.expression = expression
        fields = expression.split()
        self._every_hour = len(fields) >= 2 and fields[1] == "*"
        try:
            self.next_after(0.0)
        except ValueError:  # croniter's CroniterBadDateError
            raise ConfigurationError(f"cron expression {expression!r} never fires") from None

    def _iter(self, t: float) -> Any:
        return self._croniter(self.expression, datetime.fromtimestamp(t, self.tz))

    def _keep(self, ts: float) -> bool:
        if self._every_hour:
            return True
        local = datetime.fromtimestamp(ts, self.tz)
        # The second pass through a repeated wall time has fold=1 and an
        # offset other than the first pass's.
        return not (local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset())

    def next_after(self, t: float) -> float:
        it = self._iter(t)
        while True:
            ts = float(it.get_next(float))
            if ts > t and self._keep(ts):
                return ts

    def latest(self, after: float, upto: float, n: int) -> list[float]:
        # get_prev is strictly before its start: start just past ``upto``.
        it = self._iter(upto + 0.0005)
        out: list[float] = []
        while len(out) < n:
            ts = float(it.get_prev(float))
            if ts <= after:
                break
            if ts <= upto and self._keep(ts):
                out.append(ts)
        out.reverse()
        return out


# --- trigger state -----------------------------------------------------------
# The last fired slot of each trigger, per transport object, for transports
# that keep no state of their own (memory): it lives as long as the transport.
_LOCAL_STATE: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()


async def _load_last(transport: Any, key: str) -> float | None:
    load = getattr(transport, "load_state", None)
    if load is not None:
        raw = await load(f"trigger:{key}")
        return None if raw is None else float(raw.decode())
    return _LOCAL_STATE.get(transport, {}).get(key)


async def _save_last(transport: Any, key: str, slot: float) -> None:
    save = getattr(transport, "save_state", None)
    if save is not None:
        await save(f"trigger:{key}", repr(slot).encode())
        return
    try:
        state = _LOCAL_STATE.setdefault(transport, {})
    except TypeError:  # not weak-referenceable: no state to keep
        return
    if slot > state.get(key, -math.inf):
        state[key] = slot


class _Timer(msgspec.Struct, kw_only=True):
    name: str
    topic: str
    schedule: Any
    misfire: Misfire
    max_catch_up: int


class _Scheduler:
    """The background tasks that fire one app's timers."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.timers: list[_Timer] = []
        self.tasks: list[asyncio.Task[None]] = []
        app.on_start(self.start)
        app.on_stop(self.stop)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(self._run(t), name=f"surge-trigger-{t.name}") for t in self.timers
        ]

    async def stop(self) -> None:
        tasks, self.tasks = self.tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, timer: _Timer) -> None:
        try:
            await self._fire_forever(timer)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("trigger %s.%s stopped firing", self.app.name, timer.name)

    async def _fire_forever(self, timer: _Timer) -> None:
        clock = self.app.clock
        key = f"{self.app.name}.{timer.name}"
        now = clock.time()
        if timer.misfire == "catch_up":
            last = await _load_last(self.app.transport, key)
            if last is not None:
                missed = timer.schedule.latest(last, now, timer.max_catch_up + 1)
                if len(missed) > timer.max_catch_up:
                    log.warning(
                        "trigger %s missed more than %d slots; firing the latest %d",
                        key,
                        timer.max_catch_up,
                        timer.max_catch_up,
                    )
                    missed = missed[1:]
                for slot in missed:
                    await self._fire(timer, key, slot)
        slot = timer.schedule.next_after(now)
        while True:
            while (wait := slot - clock.time()) > _EARLY:
                await clock.sleep(wait)
            await self._fire(timer, key, slot)
            now = clock.time()
            if timer.misfire == "skip":
                slot = timer.schedule.next_after(max(slot, now))
                continue
            slot = timer.schedule.next_after(slot)
            if slot < now:
                # Far behind (a blocked loop, a suspended host): catch up on
                # at most max_catch_up slots, the latest, as after a restart.
                behind = timer.schedule.latest(slot, now, timer.max_catch_up)
                if len(behind) == timer.max_catch_up:
                    slot = behind[0]

    async def _fire(self, timer: _Timer, key: str, slot: float) -> None:
        app = self.app
        env = Envelope(
            id_at(key, slot),
            timer.topic,
            None,
            slot,
            None,
            Tick(trigger=timer.name, scheduled=slot),
        )
        while True:
            try:
                await app._publish_envelopes([env])
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                if app.clock.time() + _PUBLISH_RETRY >= timer.schedule.next_after(slot):
                    log.exception("trigger %s could not fire its slot %.3f; giving up", key, slot)
                    return
                log.warning("trigger %s could not fire yet; retrying", key, exc_info=True)
                await app.clock.sleep(_PUBLISH_RETRY)
        await _save_last(app.transport, key, slot)


_SCHEDULERS: weakref.WeakKeyDictionary[App, _Scheduler] = weakref.WeakKeyDictionary()


def _timer(
    app: App,
    schedule: _Schedule,
    name: str | None,
    misfire: Misfire,
    max_catch_up: int,
    options: dict[str, Any],
) -> Callable[[F], F]:
    if misfire not in ("skip", "catch_up"):
        raise ConfigurationError(f"misfire={misfire!r}: use 'skip' or 'catch_up'")
    if max_catch_up < 1:
        raise ConfigurationError("max_catch_up must be at least 1")

    def decorate(fn: F) -> F:
        tname = _name_of(fn, name)
        topic = f"_surge.trigger.{app.name}.{tname}"
        _register_topic(topic, Tick)
        app.on(topic, name=name or tname, **options)(_adapt(fn))
        sched = _SCHEDULERS.get(app)
        if sched is None:
            sched = _SCHEDULERS[app] = _Scheduler(app)
        sched.timers.append(
            _Timer(
                name=tname,
                topic=topic,
                schedule=schedule,
                misfire=misfire,
                max_catch_up=max_catch_up,
            )
        )
        return fn

    return decorate


def every(
    app: App,
    *,
    seconds: float,
    name: str | None = None,
    misfire: Misfire = "skip",
    max_catch_up: int = 100,
    **options: Any,
) -> Callable[[F], F]:
    """Fire the decorated handler every ``seconds``, at whole multiples of
    the period since the Unix epoch (so all workers agree on the slots).

    The handler takes ``()``, ``(tick)`` or ``(tick, ctx)``; ``options`` are
    those of ``App.on``. ``misfire="skip"`` fires only future slots after a
    pause; ``"catch_up"`` first fires the slots missed since the last firing
    (at most ``max_catch_up``, the latest ones).
    """
    # Firing ids carry the slot to the millisecond: shorter periods would
    # give two slots one id, and the transport would drop the second.
    if not seconds >= 0.001 or not math.isfinite(seconds):
        raise ConfigurationError(f"every(seconds={seconds!r}): the period must be at least 1 ms")
    return _timer(app, _Interval(seconds), name, misfire, max_catch_up, options)


def cron(
    app: App,
    expression: str,
    *,
    tz: str = "UTC",
    name: str | None = None,
    misfire: Misfire = "skip",
    max_catch_up: int = 100,
    **options: Any,
) -> Callable[[F], F]:
    """Fire the decorated handler on a cron schedule read in the time zone
    ``tz`` (an IANA name); otherwise as :func:`every`."""
    return _timer(app, _Cron(expression, tz), name, misfire, max_catch_up, options)


# --- conditions --------------------------------------------------------------
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


def when(
    app: App, condition: Condition, *, name: str | None = None, **options: Any
) -> Callable[[F], F]:
    """Run the decorated handler with a :class:`ConditionMet` each time
    ``condition`` holds. The handler takes ``()``, ``(met)`` or ``(met,
    ctx)``; ``options`` are those of ``App.on``."""
    if not isinstance(condition, Condition):
        raise ConfigurationError(
            f"app.when({condition!r}): give surge.count(), surge.sequence() or surge.absence()"
        )

    def decorate(fn: F) -> F:
        cname = _name_of(fn, name)
        topic = f"_surge.when.{app.name}.{cname}"
        check_topic = f"{topic}.check"
        _register_topic(topic, ConditionMet)
        app.on(topic, name=name or cname, **options)(_adapt(fn))
        roles = {s.__topic__: i for i, s in enumerate(condition.sources)}
        topics: list[type[Event] | str] = list(condition.sources)
        if isinstance(condition, _Absence):
            _register_topic(check_topic, _AbsenceCheck)
            topics.append(check_topic)
        engine = condition.engine()
        seen: OrderedDict[str, list[Envelope]] = OrderedDict()

        async def observe(event: Event, ctx: Context) -> None:
            env = ctx.envelope
            out = seen.get(env.id)
            if out is None:
                out = seen[env.id] = _outputs(env, event)
                if len(seen) > _SEEN:
                    seen.popitem(last=False)
            if out:
                # Published before the ack, with ids derived from this
                # event's: a redelivery republishes the same ids.
                await app._publish_envelopes(list(out))

        def _outputs(env: Envelope, event: Event) -> list[Envelope]:
            if isinstance(event, _AbsenceCheck):
                hit = engine.check(event.key, event.a_id, event.deadline)
            else:
                role = roles.get(env.topic, roles.get(event.__topic__, 0))
                key = condition.key_of(event)
                hit = engine.feed(role, key, env.time, env.id)
                if isinstance(condition, _Absence) and role == 0:
                    deadline = env.time + condition.within
                    check = _AbsenceCheck(key=key, a_id=env.id, deadline=deadline)
                    # No envelope key: the observer already takes events one
                    # at a time, in arrival order.
                    chk = Envelope(
                        derive_id(env.id, "absence"),
                        check_topic,
                        None,
                        env.time,
                        event=check,
                        not_before=deadline,
                    )
                    return [chk]
            if hit is None:
                return []
            met = ConditionMet(condition=cname, key=hit.key, time=hit.time, ids=hit.ids)
            return [Envelope(derive_id(env.id, "when"), topic, None, hit.time, None, met)]

        # One consumer in order: the state is per process and order matters.
        app.on(*topics, name=f"_surge.when.{cname}", concurrency=1)(observe)
        return fn

    return decorate
