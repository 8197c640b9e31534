"""Timer triggers: ``every`` and ``cron``.

A timer firing is an event: a :class:`Tick` published on the topic
``_surge.trigger.<app>.<name>`` with an id derived from the trigger's name and
its scheduled time (``surge._event.id_at``). Every process that runs the app
computes the same slots and publishes the same id for each, and the
transport's dedup keeps one: that is the whole "exactly one firing per slot
on any number of workers" mechanism. The decorated function is an ordinary
subscription to that topic, so it gets retries, timeouts, a context and
publishes what it returns. See docs/triggers.md for the exact semantics.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import msgspec

from .._errors import ConfigurationError
from .._event import Envelope, Event, id_at
from ._subscription import adapt, trigger_name

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from .._app import App, HandlerOptions
    from .._runtime import Runtime

__all__ = ("Misfire", "Tick", "cron", "every")

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


class _Timer(msgspec.Struct, kw_only=True):
    name: str
    topic: str
    schedule: Any
    misfire: Misfire
    max_catch_up: int


_STATE_PREFIX = "trigger:"


class Scheduler:
    """The background tasks that fire one app's timers (a part of the app,
    kept in ``app.extensions["surge.triggers"]``).

    Stopping is level-triggered: :meth:`stop` sets ``stopping`` and wakes
    the timers waiting for their next slot; a timer firing a slot finishes it
    (publish, then save the trigger state) and sees the flag before it waits
    again. A cancel alone does not stop a loop: on Python 3.11,
    ``asyncio.wait_for`` (inside every nats-py request and redis-py write)
    swallows a cancel that arrives together with its reply (CPython
    gh-86296), and a timer stopped only by a cancel fired on until its worker
    was killed (test_each_slot_fires_once_on_worker_processes[redis-4],
    [nats-4]: the supervisor's SIGTERM lands just after a slot fires, while
    every worker's timer awaits its state save).
    """

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self.timers: list[_Timer] = []
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._runtime: Runtime | None = None
        self._naps: set[asyncio.Future[bool]] = set()

    @classmethod
    def of(cls, app: App) -> Scheduler:
        """The scheduler of ``app``, attached on first use."""
        found = app.extensions.get("surge.triggers")
        if isinstance(found, Scheduler):
            return found
        sched = app.extensions["surge.triggers"] = cls(app.name)
        app.attach(sched)
        return sched

    async def start(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.stopping = False
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(runtime, t), name=f"surge-trigger-{t.name}")
            for t in self.timers
        ]

    async def stop(self) -> None:
        """Stop firing: a slot being fired is published and its state saved.

        The caller bounds the wait (``App.stop``'s deadline); cancelled, this
        cancels the timers, which end at their next wait at the latest."""
        self.stopping = True
        for nap in self._naps:
            if not nap.done():
                nap.set_result(False)
        tasks, self._tasks = self._tasks, []
        try:
            if tasks:
                await asyncio.wait(tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _nap(self, runtime: Runtime, seconds: float) -> bool:
        """Wait ``seconds`` on the app's clock: False if the app stops first."""
        if self.stopping:
            return False
        nap: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        timer = runtime.clock.call_later(seconds, partial(_wake, nap))
        self._naps.add(nap)
        try:
            return await nap
        finally:
            timer.cancel()
            self._naps.discard(nap)

    async def _run(self, runtime: Runtime, timer: _Timer) -> None:
        try:
            await self._fire_forever(runtime, timer)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("trigger %s.%s stopped firing", self.app_name, timer.name)

    async def _fire_forever(self, runtime: Runtime, timer: _Timer) -> None:
        clock = runtime.clock
        key = f"{self.app_name}.{timer.name}"
        now = clock.time()
        if timer.misfire == "catch_up":
            try:
                raw = await runtime.state.load_state(_STATE_PREFIX + key)
            except Exception:
                log.warning("trigger %s could not load its state; no catch-up", key, exc_info=True)
                raw = None
            if raw is not None:
                last = float(raw.decode())
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
                    if self.stopping:
                        return
                    await self._fire(runtime, timer, key, slot)
        slot = timer.schedule.next_after(now)
        while not self.stopping:
            while (wait := slot - clock.time()) > _EARLY:
                if not await self._nap(runtime, wait):
                    return
            await self._fire(runtime, timer, key, slot)
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

    async def _fire(self, runtime: Runtime, timer: _Timer, key: str, slot: float) -> None:
        clock = runtime.clock
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
                await runtime.publish([env])
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                if clock.time() + _PUBLISH_RETRY >= timer.schedule.next_after(slot):
                    log.exception("trigger %s could not fire its slot %.3f; giving up", key, slot)
                    return
                if self.stopping:
                    log.warning(
                        "trigger %s could not fire its slot %.3f before stopping", key, slot
                    )
                    return
                log.warning("trigger %s could not fire yet; retrying", key, exc_info=True)
                if not await self._nap(runtime, _PUBLISH_RETRY):
                    return
        try:
            await runtime.state.save_state(_STATE_PREFIX + key, repr(slot).encode())
        except Exception:
            # The slot is out; its state only serves catch_up after a restart
            # (an unsaved slot is fired again there, with the same id). A
            # broker's hiccup must not end the timer.
            log.warning("trigger %s could not save its slot %.3f", key, slot, exc_info=True)


def _wake(nap: asyncio.Future[bool]) -> None:
    if not nap.done():
        nap.set_result(True)


def _timer(
    app: App,
    schedule: _Schedule,
    name: str | None,
    misfire: Misfire,
    max_catch_up: int,
    options: HandlerOptions,
) -> Callable[[F], F]:
    if misfire not in ("skip", "catch_up"):
        raise ConfigurationError(f"misfire={misfire!r}: use 'skip' or 'catch_up'")
    if max_catch_up < 1:
        raise ConfigurationError("max_catch_up must be at least 1")

    def decorate(fn: F) -> F:
        tname = trigger_name(fn, name)
        topic = f"_surge.trigger.{app.name}.{tname}"
        app.register_topic(topic, Tick)
        options.subscribe(app, topic, name=name or tname)(adapt(fn))
        Scheduler.of(app).timers.append(
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
    name: str | None,
    misfire: Misfire,
    max_catch_up: int,
    options: HandlerOptions,
) -> Callable[[F], F]:
    """Fire the decorated handler every ``seconds``, at whole multiples of
    the period since the Unix epoch (so all workers agree on the slots).

    ``misfire="skip"`` fires only future slots after a pause; ``"catch_up"``
    first fires the slots missed since the last firing (at most
    ``max_catch_up``, the latest ones). ``options`` go to ``App.on``.
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
    tz: str,
    name: str | None,
    misfire: Misfire,
    max_catch_up: int,
    options: HandlerOptions,
) -> Callable[[F], F]:
    """Fire the decorated handler on a cron schedule read in the time zone
    ``tz`` (an IANA name); otherwise as :func:`every`."""
    return _timer(app, _Cron(expression, tz), name, misfire, max_catch_up, options)
