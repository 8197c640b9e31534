"""Timer triggers: exact slots on the virtual clock, DST, misfire, one firing
per slot however many workers fire it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import surge
from surge import VirtualClock
from surge._event import Envelope
from surge.cli._supervisor import Supervisor
from surge.transports import MemoryTransport
from surge.triggers import Misfire

from ._jepsen import wait_for
from ._servers import nats_server, redis_server

PARIS = ZoneInfo("Europe/Paris")
NEW_YEAR = 1_767_225_600.0  # 2026-01-01T00:00Z


def paris(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> float:
    return datetime(y, m, d, hh, mm, tzinfo=PARIS).timestamp()


def utc(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> float:
    return datetime(y, m, d, hh, mm, tzinfo=UTC).timestamp()


@pytest.fixture
def clock(request: pytest.FixtureRequest) -> VirtualClock:
    """A virtual clock starting at the test's chosen epoch (New Year 2026)."""
    return VirtualClock(start=getattr(request, "param", NEW_YEAR))


class Beat(surge.Event):
    at: float


async def test_every_fires_on_the_epoch_grid_at_exact_times(clock: VirtualClock) -> None:
    """every(seconds=5) fires at each multiple of 5 s, at exactly that virtual time."""
    app = surge.App("t", clock=clock)
    fired: list[tuple[float, float]] = []

    @app.every(seconds=5)
    async def tick(t: surge.Tick) -> None:
        fired.append((t.scheduled, clock.time()))

    async with app:
        await clock.sleep(23)
    assert [s - NEW_YEAR for s, _ in fired] == [5, 10, 15, 20]
    assert all(now == pytest.approx(s, abs=1e-6) for s, now in fired)


@pytest.mark.parametrize("clock", [NEW_YEAR + 2.5], indirect=True)
async def test_every_slots_do_not_depend_on_the_start_time(clock: VirtualClock) -> None:
    """A worker started mid-period fires on the same grid as any other."""
    app = surge.App("t", clock=clock)
    fired: list[float] = []

    @app.every(minutes=1, name="minutely")
    def tick(t: surge.Tick) -> None:
        fired.append(t.scheduled)

    async with app:
        await clock.sleep(150)
    assert [s - NEW_YEAR for s in fired] == [60, 120]


@pytest.mark.parametrize("clock", [paris(2026, 3, 28, 23, 50)], indirect=True)
async def test_cron_across_spring_forward(clock: VirtualClock) -> None:
    """Clocks go forward in Paris on 2026-03-29: half-hourly jobs keep real
    30-minute steps, and a daily 02:30 job (a time that does not exist that
    day) fires at 03:00 CEST, then at 02:30 the next day."""
    app = surge.App("t", clock=clock)
    halves: list[float] = []
    daily: list[float] = []
    hourly: list[float] = []

    @app.cron("*/30 * * * *", tz="Europe/Paris")
    async def half(t: surge.Tick) -> None:
        halves.append(t.scheduled)

    @app.cron("30 2 * * *", tz="Europe/Paris")
    async def nightly(t: surge.Tick) -> None:
        assert clock.time() == pytest.approx(t.scheduled, abs=1e-6)
        daily.append(t.scheduled)

    @app.every(hours=1)
    async def hour(t: surge.Tick) -> None:
        hourly.append(t.scheduled)

    async with app:
        await clock.sleep(4 * 3600 - 5)  # until 04:45 CEST
        assert halves == [
            paris(2026, 3, 29, 0, 0),
            paris(2026, 3, 29, 0, 30),
            paris(2026, 3, 29, 1, 0),
            paris(2026, 3, 29, 1, 30),
            paris(2026, 3, 29, 3, 0),  # 02:00 and 02:30 do not exist
            paris(2026, 3, 29, 3, 30),
            paris(2026, 3, 29, 4, 0),
            paris(2026, 3, 29, 4, 30),
        ]
        assert [b - a for a, b in itertools.pairwise(halves)] == [1800.0] * 7
        assert hourly == [utc(2026, 3, 28, 23)] + [utc(2026, 3, 29, h) for h in range(3)]
        await clock.sleep(86_400)
    assert daily == [utc(2026, 3, 29, 1, 0), paris(2026, 3, 30, 2, 30)]
    assert daily == [paris(2026, 3, 29, 3, 0), utc(2026, 3, 30, 0, 30)]


@pytest.mark.parametrize("clock", [paris(2026, 10, 25, 1, 50)], indirect=True)
async def test_cron_across_fall_back(clock: VirtualClock) -> None:
    """Clocks go back in Paris on 2026-10-25 (03:00 CEST -> 02:00 CET): an
    hourly job fires in both 02:00 hours, a daily 02:30 job fires once."""
    app = surge.App("t", clock=clock)
    hourly: list[float] = []
    daily: list[float] = []

    @app.cron("0 * * * *", tz="Europe/Paris")
    async def top(t: surge.Tick) -> None:
        hourly.append(t.scheduled)

    @app.cron("30 2 * * *", tz="Europe/Paris")
    async def nightly(t: surge.Tick) -> None:
        daily.append(t.scheduled)

    async with app:
        await clock.sleep(3 * 3600)
        assert hourly == [
            utc(2026, 10, 25, 0, 0),  # 02:00 CEST
            utc(2026, 10, 25, 1, 0),  # 02:00 CET
            utc(2026, 10, 25, 2, 0),  # 03:00 CET
        ]
        await clock.sleep(86_400)
    assert daily == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def _worker(
    transport: MemoryTransport, clock: VirtualClock, fired: list[float], **options: object
) -> surge.App:
    app = surge.App("w", clock=clock, transport=transport)

    @app.every(seconds=10, name="ten", **options)  # type: ignore[arg-type]
    async def ten(t: surge.Tick) -> None:
        fired.append(t.scheduled - NEW_YEAR)

    return app


async def _run(app: surge.App, clock: VirtualClock, seconds: float) -> None:
    async with app:
        await clock.sleep(seconds)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, [10, 20, 90, 100]),
        ({"misfire": "skip"}, [10, 20, 90, 100]),
        ({"misfire": "catch_up"}, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]),
        ({"misfire": "catch_up", "max_catch_up": 3}, [10, 20, 60, 70, 80, 90, 100]),
    ],
)
async def test_misfire_after_downtime(
    clock: VirtualClock, options: dict[str, object], expected: list[float]
) -> None:
    """After 60 s with the app stopped, skip fires only future slots; catch_up
    first fires the missed ones since the last firing, the latest
    max_catch_up of them."""
    fired: list[float] = []
    app = _worker(MemoryTransport(clock=clock), clock, fired, **options)
    await _run(app, clock, 25)
    assert fired == [10, 20]
    await clock.sleep(60)  # nothing runs from t=25 to t=85
    await _run(app, clock, 20)
    assert fired == expected


async def test_catch_up_with_no_history_fires_nothing_missed(clock: VirtualClock) -> None:
    """A trigger that never fired has nothing to catch up on its first start."""
    fired: list[float] = []
    await clock.sleep(100)
    await _run(_worker(MemoryTransport(clock=clock), clock, fired, misfire="catch_up"), clock, 15)
    assert fired == [110]


class _CountingTransport(MemoryTransport):
    """Counts the trigger firings offered to the transport, duplicates included."""

    offered = 0

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.offered += sum(e.topic.startswith("_surge.trigger.") for e in envelopes)
        await super().publish(envelopes)


@pytest.mark.parametrize("workers", [2, 4])
async def test_each_slot_fires_once_on_many_workers(clock: VirtualClock, workers: int) -> None:
    """N apps on one transport all fire every slot of a 1 s trigger; over 60
    virtual seconds each slot is handled exactly once."""
    transport = _CountingTransport(clock=clock)
    handled: list[tuple[float, int]] = []
    apps = []
    for n in range(workers):
        app = surge.App("w", clock=clock, transport=transport)

        def register(app: surge.App, n: int) -> None:
            @app.every(seconds=1, name="second")
            async def second(t: surge.Tick) -> None:
                handled.append((t.scheduled - NEW_YEAR, n))

        register(app, n)
        apps.append(app)
    for app in apps:
        await app.start()
    await clock.sleep(60.5)
    for app in apps:
        await app.stop()
    assert sorted(s for s, _ in handled) == [float(s) for s in range(1, 61)]
    assert transport.offered == workers * 60


class Reported(surge.Event):
    slot: float


async def test_trigger_handlers_take_no_argument_a_tick_or_a_context(
    clock: VirtualClock,
) -> None:
    """Handlers of (), (tick) and (tick, ctx) all run; what they return or
    publish is published like any handler's."""
    app = surge.App("t", clock=clock)
    seen: list[str] = []
    reports: list[float] = []

    @app.every(seconds=10)
    def bare() -> None:
        seen.append("bare")

    @app.every(seconds=10)
    async def with_tick(t: surge.Tick) -> Reported:
        seen.append(f"tick {t.trigger}")
        return Reported(slot=t.scheduled)

    @app.every(seconds=10)
    async def with_ctx(t: surge.Tick, ctx: surge.Context) -> None:
        seen.append(f"ctx {ctx.envelope.time == t.scheduled}")
        assert t.at.timestamp() == t.scheduled

    @app.on(Reported)
    async def report(ev: Reported) -> None:
        reports.append(ev.slot - NEW_YEAR)

    async with app:
        await clock.sleep(15)
    assert sorted(seen) == [
        "bare",
        "ctx True",
        "tick test_trigger_handlers_take_no_argument_a_tick_or_a_context._locals_.with_tick",
    ]
    assert reports == [10]


async def test_a_failing_trigger_handler_is_retried(clock: VirtualClock) -> None:
    """A firing is an event: a failed handler is retried like any other."""
    app = surge.App("t", clock=clock, retry=surge.Retry(attempts=3, backoff=0.5))
    attempts: list[int] = []

    @app.every(seconds=10, name="flaky")
    async def flaky(t: surge.Tick, ctx: surge.Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first time fails")

    async with app:
        await clock.sleep(12)
    assert attempts == [1, 2]


def test_bad_trigger_options_raise_configuration_error() -> None:
    """Bad periods, cron expressions, time zones and misfire policies are
    refused when the trigger is declared."""
    app = surge.App("t")
    with pytest.raises(surge.ConfigurationError, match="at least 1 ms"):
        app.every(seconds=0)
    with pytest.raises(surge.ConfigurationError, match="at least 1 ms"):
        app.every(seconds=0.0005)
    with pytest.raises(surge.ConfigurationError, match="cron expression"):
        app.cron("61 * * * *")
    with pytest.raises(surge.ConfigurationError, match="never fires"):
        app.cron("0 0 30 2 *")
    with pytest.raises(surge.ConfigurationError, match="time zone"):
        app.cron("* * * * *", tz="Mars/Olympus")
    with pytest.raises(surge.ConfigurationError, match="misfire"):
        app.every(seconds=1, misfire="later")  # type: ignore[arg-type]
    with pytest.raises(surge.ConfigurationError, match="max_catch_up"):
        app.every(seconds=1, misfire="catch_up", max_catch_up=0)


def test_cron_without_croniter_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without croniter installed, cron() says which pip install fixes it."""
    monkeypatch.setitem(sys.modules, "croniter", None)
    with pytest.raises(ImportError, match=r"pip install 'surge\[cron\]'"):
        surge.App("t").cron("* * * * *")


def test_trigger_topics_are_plain_tokens() -> None:
    """A trigger declared in a function gets a topic without '<' or '>'."""
    app = surge.App("t")

    @app.every(seconds=1)
    def inner() -> None:
        pass

    (sub,) = app.subscriptions.values()
    assert sub.topics == ("_surge.trigger.t.test_trigger_topics_are_plain_tokens._locals_.inner",)


# --- worker processes on a durable transport (real time) ---------------------
_RECORDS = os.environ.get("SURGE_TRIGGER_RECORDS")

worker_app = surge.App("tw")
"""Started by a Supervisor in worker processes: records each slot it handles."""


@worker_app.every(seconds=1, name="second")
async def _record_second(t: surge.Tick) -> None:
    if _RECORDS is not None:
        fd = os.open(_RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{t.scheduled!r},{os.getpid()}\n".encode())
        finally:
            os.close(fd)


def _slots(path: Path) -> list[tuple[float, int]]:
    if not path.exists():
        return []
    rows = [line.split(",") for line in path.read_text().splitlines()]
    return [(float(s), int(pid)) for s, pid in rows]


@contextlib.contextmanager
def _broker(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 't.db'}"
    elif kind == "redis":
        with redis_server(tmp_path) as (url, _):
            yield url
    else:
        with nats_server(tmp_path) as server:
            yield server.url


@pytest.mark.realtime
@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("kind", ["sqlite", "redis", "nats"])
async def test_each_slot_fires_once_on_worker_processes(
    tmp_path: Path, kind: str, workers: int
) -> None:
    """N worker processes on one durable transport all fire a 1 s trigger:
    over about 6 real seconds no slot is handled twice and none is skipped."""
    records = tmp_path / "slots.txt"
    env = dict(os.environ, SURGE_TRIGGER_RECORDS=str(records))
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with _broker(kind, tmp_path) as url:
        sup = Supervisor(f"{__name__}:worker_app", url, workers, env=env)
        running = asyncio.create_task(sup.run())
        try:
            await sup.wait_ready()
            await wait_for(
                lambda: len({s for s, _ in _slots(records)}) >= 6, timeout=30, what="6 slots"
            )
        finally:
            sup.request_stop()
        assert await running == 0
    handled = sorted(s for s, _ in _slots(records))
    assert len(handled) == len(set(handled)), "a slot was handled twice"
    assert handled == [handled[0] + i for i in range(len(handled))], "a slot was skipped"


class _SlowSave(MemoryTransport):
    """Trigger state saved through a client request that waits for its reply
    in ``asyncio.wait_for``, as nats-py and redis-py do: the first save
    waits for ``reply``, the others answer at once."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.saving = asyncio.Event()
        self.reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.saved: list[float] = []

    async def save_state(self, key: str, value: bytes) -> None:
        if not self.saving.is_set():
            self.saving.set()
            await asyncio.wait_for(self.reply, 5)
        await super().save_state(key, value)
        self.saved.append(float(value))


async def test_stop_as_a_state_save_gets_its_reply_ends_the_timer(clock: VirtualClock) -> None:
    """A stop that comes with the reply to a timer's state save ends the
    timer: the slot's state is saved and nothing fires after. (Python 3.11's
    wait_for swallows a cancel that arrives with its reply; a timer stopped
    only by a cancel fired on, and its worker was killed at the deadline.)"""
    transport = _SlowSave(clock)
    app = surge.App("t", clock=clock, transport=transport, shutdown_timeout=5)

    @app.every(seconds=1)
    async def second(t: surge.Tick) -> None:
        pass

    await app.start()
    await transport.saving.wait()
    transport.reply.set_result(None)
    async with asyncio.timeout(30):
        await app.stop()
    stopped_at = clock.time()
    await clock.sleep(10)
    assert [s - NEW_YEAR for s in transport.saved] == [1.0]
    assert stopped_at - NEW_YEAR < 2
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("surge-trigger")]


class _FlakyState(MemoryTransport):
    """Trigger state a broker fails to load once and to save once."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.failures = {"load": 1, "save": 1}

    async def load_state(self, key: str) -> bytes | None:
        if self.failures["load"]:
            self.failures["load"] -= 1
            raise surge.TransportError("the broker timed out")
        return await super().load_state(key)

    async def save_state(self, key: str, value: bytes) -> None:
        if self.failures["save"]:
            self.failures["save"] -= 1
            raise surge.TransportError("the broker timed out")
        await super().save_state(key, value)


async def test_a_timer_outlives_failed_state_loads_and_saves(clock: VirtualClock) -> None:
    """A state load or save the broker fails is logged and the timer fires on
    (it used to end the timer for good: no slot fired after)."""
    transport = _FlakyState(clock)
    app = surge.App("t", clock=clock, transport=transport)
    fired: list[float] = []

    @app.every(seconds=1, misfire="catch_up")
    async def second(t: surge.Tick) -> None:
        fired.append(t.scheduled - NEW_YEAR)

    async with app:
        await clock.sleep(3.5)
    assert fired == [1.0, 2.0, 3.0]
    assert transport.failures == {"load": 0, "save": 0}


class _Shared(MemoryTransport):
    """One memory transport that outlives the apps on it: an app's stop
    (its 'death') must not close it under the others. Its state store is
    what the apps share, as processes share a durable transport's."""

    def __init__(self, *, clock: surge.Clock) -> None:
        super().__init__(clock=clock)
        self.state: dict[str, bytes] = {}

    async def load_state(self, key: str) -> bytes | None:
        return self.state.get(key)

    async def save_state(self, key: str, value: bytes) -> None:
        self.state[key] = value

    async def close(self) -> None:
        pass


async def test_no_slot_lost_or_doubled_while_workers_come_and_go(clock: VirtualClock) -> None:
    """Four apps stopped and restarted at random around fire times (at times
    all of them at once): each of 10,000 one-second slots is handled once."""
    import random

    rng = random.Random(7)
    transport = _Shared(clock=clock)
    handled: list[float] = []

    def worker() -> surge.App:
        app = surge.App("w", clock=clock, transport=transport, shutdown_timeout=1)

        @app.every(seconds=1, name="second", misfire="catch_up", max_catch_up=1000)
        async def second(t: surge.Tick) -> None:
            handled.append(t.scheduled - NEW_YEAR)

        return app

    apps: list[surge.App | None] = [None] * 4
    slots = 10_000
    restarts = blackouts = 0
    while clock.time() - NEW_YEAR < slots:
        i = rng.randrange(4)
        app = apps[i]
        if app is None:
            apps[i] = app = worker()
            await app.start()
            restarts += 1
        else:
            await app.stop()
            apps[i] = None
            blackouts += all(a is None for a in apps)
        # around a fire time: just before, on, or just after a slot
        step = rng.choice((0.999, 1.0, 1.001)) * rng.randint(1, 60)
        await clock.sleep(min(step, slots + 0.5 - (clock.time() - NEW_YEAR)))
    if all(a is None for a in apps):
        apps[0] = last = worker()
        await last.start()  # the last missed slots are caught up
    for a in apps:
        if a is not None:
            await a.drain()
            await a.stop()
    await MemoryTransport.close(transport)
    assert restarts > 100
    assert blackouts > 10  # catch_up had slots to recover
    assert sorted(handled) == [float(s) for s in range(1, slots + 1)]


class _JumpingWallClock(VirtualClock):
    """A virtual clock whose wall time can leap ahead (a suspended host)."""

    leap = 0.0

    def time(self) -> float:
        return super().time() + self.leap


@pytest.mark.parametrize(
    ("misfire", "expected"),
    [("skip", [1, 2, 3, 4, 105]), ("catch_up", [1, 2, 3, 4, 100, 101, 102, 103, 104, 105])],
)
def test_a_leap_of_the_wall_clock_is_a_misfire(misfire: Misfire, expected: list[float]) -> None:
    """When the wall clock leaps 100 s ahead while the scheduler waits, skip
    resumes at the next slot and catch_up fires the latest max_catch_up
    missed slots first."""
    clock = _JumpingWallClock()

    async def main() -> list[float]:
        app = surge.App("t", clock=clock)
        fired: list[float] = []

        @app.every(seconds=1, misfire=misfire, max_catch_up=5)
        async def second(t: surge.Tick) -> None:
            fired.append(t.scheduled - NEW_YEAR)

        async with app:
            await clock.sleep(3.5)
            clock.leap = 100.0
            await clock.sleep(1.9)
        return fired

    assert clock.run(main()) == expected


def test_the_docs_example_declares_its_triggers() -> None:
    """docs/triggers.md's first example runs as written: three triggers."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "triggers.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {"__name__": "docs_triggers"}
    exec(compile(block, "docs/triggers.md", "exec"), namespace)
    app = namespace["app"]
    assert isinstance(app, surge.App)
    assert sorted(app.subscriptions) == [
        "billing._surge.when.lock",
        "billing.heartbeat",
        "billing.lock",
        "billing.nightly",
    ]
