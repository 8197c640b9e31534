"""Stops: phases, bounds, the report, and worker processes under SIGTERM.

The phase tests run on the virtual clock and assert exact durations. The
stress test runs 8 worker processes per durable transport under load and
stops them with SIGTERM: every one must exit 0 within ``shutdown_timeout``
(the supervisor gets no grace beyond it). ``test_workers_stop_within_the_timeout``
does one round per transport (CI); the ``soak`` variant (also ``slow``, left
out of the default run) does ``STOPS_ROUNDS`` rounds, 200 by default, and
prints the distribution of stop times::

    .venv/bin/pytest -s -m soak tests/test_stops.py

A transport added later joins both with one line in ``BROKERS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

import surge
from surge import VirtualClock
from surge.cli._supervisor import Supervisor
from surge.transports import MemoryTransport

from ._servers import (
    shared_amqp_url,
    shared_nats_url,
    shared_postgres_url,
    shared_redis_url,
)
from ._stop_app import APP_REF, Job, Loose, read_rows


class Ping(surge.Event):
    n: int


# --- phases on the virtual clock ------------------------------------------------
async def test_a_stop_runs_named_phases_and_reports_their_durations(
    clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop with a handler 0.3 s from done: the phases in order, the handlers
    phase 0.3 s, each logged at DEBUG, and one INFO line that sums it up."""
    app = surge.App("t", clock=clock, shutdown_timeout=4)
    started = asyncio.Event()

    @app.on(Ping)
    async def slow(ev: Ping) -> None:
        started.set()
        await clock.sleep(0.3)

    await app.start()
    await app.publish(Ping(n=1))
    await started.wait()
    with caplog.at_level(logging.DEBUG, logger="surge"):
        await app.stop()
    report = app.stop_report
    assert report is not None
    assert report.finished
    assert [(p.name, p.seconds) for p in report.phases] == [
        ("triggers", 0),
        ("intake", 0),
        ("handlers", 0.3),
        ("acks", 0),
        ("close", 0),
    ]
    assert report.seconds == 0.3
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "stop: handlers took 0.300s" in debug
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info == [
        "app t stopped in 0.300s of 4s: triggers 0.000s, intake 0.000s, "
        "handlers 0.300s, acks 0.000s, close 0.000s"
    ]


class _StubbornClose(MemoryTransport):
    """A close that swallows the first cancel (as Python 3.11's wait_for does
    when the awaited reply comes with it) and then never ends by itself."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.forever
        await asyncio.get_running_loop().create_future()  # only a second cancel ends it
        await super().close()


async def test_a_close_that_swallows_its_cancel_is_cut_at_the_deadline(
    clock: VirtualClock,
) -> None:
    """A transport whose close hangs and swallows the cancel: the stop still
    ends at shutdown_timeout, with the close phase marked cut."""
    app = surge.App("t", clock=clock, transport=_StubbornClose(clock), shutdown_timeout=2)

    @app.on(Ping)
    async def h(ev: Ping) -> None:
        pass

    await app.start()
    t0 = clock.monotonic()
    await app.stop()
    assert clock.monotonic() - t0 == 2
    report = app.stop_report
    assert report is not None
    close = report.phase("close")
    assert close is not None
    assert (close.seconds, close.finished) == (2, False)
    assert app.state == "stopped"


class _StubbornSave(MemoryTransport):
    """A trigger state save that hangs once, swallows the first cancel and
    then returns: the worst a client library does to a timer."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.saving = asyncio.Event()
        self.saved: list[float] = []

    async def save_state(self, key: str, value: bytes) -> None:
        if not self.saving.is_set():
            self.saving.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.get_running_loop().create_future()
        await super().save_state(key, value)
        self.saved.append(float(value))


async def test_a_timer_stuck_in_its_state_save_is_cut_and_ends(clock: VirtualClock) -> None:
    """A timer whose state save hangs and swallows its cancel: the triggers
    phase is cut at three quarters of shutdown_timeout, the stop ends in
    time, and the timer fires nothing more."""
    transport = _StubbornSave(clock)
    app = surge.App("t", clock=clock, transport=transport, shutdown_timeout=4)

    @app.every(seconds=1)
    async def second(t: surge.Tick) -> None:
        pass

    await app.start()
    await transport.saving.wait()
    t0 = clock.monotonic()
    await app.stop()
    assert clock.monotonic() - t0 == 3
    report = app.stop_report
    assert report is not None
    assert (report.phases[0].name, report.phases[0].finished) == ("triggers", False)
    await clock.sleep(10)
    assert len(transport.saved) == 1  # the cut save ends; no slot fired after
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("surge-trigger")]


class _Closing(MemoryTransport):
    closed = False

    async def close(self) -> None:
        await super().close()
        self.closed = True


async def test_a_hanging_on_stop_hook_leaves_time_to_close(clock: VirtualClock) -> None:
    """An on_stop hook that never returns is cut; the transport is still closed."""
    transport = _Closing(clock=clock)
    app = surge.App("t", clock=clock, transport=transport, shutdown_timeout=8)

    @app.on_stop
    async def hang() -> None:
        await asyncio.get_running_loop().create_future()

    await app.start()
    t0 = clock.monotonic()
    await app.stop()
    assert clock.monotonic() - t0 == 6
    assert transport.closed
    report = app.stop_report
    assert report is not None
    assert [(p.name, p.seconds, p.finished) for p in report.phases] == [
        ("triggers", 6, False),
        ("intake", 0, True),
        ("handlers", 0, True),
        ("acks", 0, True),
        ("close", 0, True),
    ]


class _Slow(surge.Event):
    __topic__ = "stops.slow"

    n: int


async def test_after_stop_hooks_run_once_handlers_and_acks_are_done(
    clock: VirtualClock,
) -> None:
    """``on_stop`` runs as the stop begins, while a handler still runs;
    ``after_stop`` once the handler ended, its event was acknowledged and
    the transport closed (where a resource the handlers use is released)."""
    transport = _Closing(clock=clock)
    app = surge.App("t", clock=clock, transport=transport, shutdown_timeout=8)
    started = asyncio.Event()
    ended: list[int] = []
    seen: dict[str, tuple[bool, bool, int]] = {}

    @app.on(_Slow)
    async def slow(event: _Slow) -> None:
        started.set()
        await clock.sleep(2)
        ended.append(event.n)

    async def look(when: str) -> None:
        stats = await transport.stats("t.slow") if not transport.closed else None
        pending = -1 if stats is None else stats.pending
        seen[when] = (bool(ended), transport.closed, pending)

    @app.on_stop
    async def first() -> None:
        await look("on_stop")

    @app.after_stop
    async def last() -> None:
        await look("after_stop")

    await app.start()
    await app.publish(_Slow(n=1))
    await started.wait()
    await app.stop()
    assert seen["on_stop"] == (False, False, 1)  # the handler still runs
    assert seen["after_stop"] == (True, True, -1)  # ended, settled, closed
    assert ended == [1]


# --- surge run ----------------------------------------------------------------
def test_surge_run_prints_one_line_with_the_phases_at_exit(tmp_path: Path) -> None:
    """`surge run` stopped by SIGTERM exits 0 and prints one line with the
    stop's phase durations."""
    (tmp_path / "quiet.py").write_text(
        "import surge\n"
        "app = surge.App('quiet')\n"
        "@app.on_start\n"
        "async def ready() -> None:\n"
        "    print('ready', flush=True)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-m", "surge", "run", "quiet:app"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if "stopped in" in line]
    assert len(lines) == 1, err
    for phase in ("triggers", "intake", "handlers", "acks", "close"):
        assert f" {phase} " in lines[0]


@pytest.mark.parametrize("http", [False, True], ids=["plain", "http"])
def test_a_second_sigterm_during_the_stop_does_not_kill_it(tmp_path: Path, http: bool) -> None:
    """`surge run` (and with --http) gets SIGTERM, and again while its stop
    runs (systemd's control-group kill signals a worker and its supervisor,
    which signals it again): it finishes the stop and exits 0. With --http
    the signal handlers used to be removed before the stop, and the second
    SIGTERM killed the draining process."""
    (tmp_path / "slowstop.py").write_text(
        "import asyncio, sys\n"
        "import surge\n"
        "app = surge.App('slowstop')\n"
        "@app.on_start\n"
        "async def ready() -> None:\n"
        "    print('ready', flush=True)\n"
        "@app.on_stop\n"
        "async def slow() -> None:\n"
        "    print('stopping', flush=True)\n"
        "    # the app's own slow cleanup: until the test says, after its SIGTERM\n"
        "    assert await asyncio.to_thread(sys.stdin.readline) == 'go\\n'\n"
        "    print('cleaned', flush=True)\n"
    )
    args = [sys.executable, "-m", "surge", "run", "slowstop:app"]
    if http:
        args += ["--http", "127.0.0.1:0"]
    with subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdin is not None
            assert proc.stdout.readline() == "ready\n"
            proc.send_signal(signal.SIGTERM)
            # (with --http a "serving HTTP on ..." line comes first)
            line = proc.stdout.readline()
            while line and line != "stopping\n":
                line = proc.stdout.readline()
            assert line == "stopping\n"
            proc.send_signal(signal.SIGTERM)
            # The signal is delivered at once: a process that still takes
            # SIGTERM's default action is dead before it reads this line.
            out, err = proc.communicate("go\n", timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert "cleaned" in out


# --- worker processes under SIGTERM ----------------------------------------------
def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / f'stops-{uuid.uuid4().hex[:8]}.db'}"


BROKERS: dict[str, Callable[[Path], str]] = {
    "sqlite": _sqlite_url,
    "redis": shared_redis_url,
    "nats": shared_nats_url,
    "postgres": shared_postgres_url,
    "amqp": shared_amqp_url,
}
"""Every durable transport: a fresh URL (its own file, prefix, stream or
schema) on a server the tests started, one per round."""

WORKERS = 8
SHUTDOWN = 10.0
# Published per round: the SIGTERM comes once half of it is out, so it finds
# handlers in flight, acks unsettled and a backlog to hand over.
EVENTS = 2000
PRODUCERS = 16


async def _publish(url: str, halfway: asyncio.Event) -> int:
    """Publish EVENTS (keyed and unkeyed, alternately) from PRODUCERS
    coroutines, as fast as the transport confirms them; set ``halfway`` half
    way. Returns the count."""
    pub = surge.App("stops-pub", transport=url)
    sent = 0

    async def produce(first: int) -> None:
        nonlocal sent
        for n in range(first, EVENTS, PRODUCERS):
            if n % 2:
                await pub.publish(Job(key=f"k{n % 64}", n=n))
            else:
                await pub.publish(Loose(n=n))
            sent += 1
            if sent == EVENTS // 2:
                halfway.set()

    async with pub:
        await asyncio.gather(*(produce(k) for k in range(PRODUCERS)))
    return sent


class _Stop(NamedTuple):
    """One worker's stop: seconds from the SIGTERM to its process's end and
    to its atexit hook (after the app's stop; the rest is the interpreter's
    own teardown), and its app's stop report."""

    exit: float
    atexit: float
    report: surge.StopReport


class _Round(NamedTuple):
    """One round's per-worker stops, and where its wall time went: workers'
    start-up (spawn to every app started), load (publishing until the
    SIGTERM) and the stop (SIGTERM to the supervisor's return)."""

    stops: list[_Stop]
    start: float
    load: float
    stop: float


async def _round(url: str, tmp_path: Path, i: int) -> _Round:
    """One round: 8 workers, load, SIGTERM. Every worker's process ends,
    with exit code 0, within shutdown_timeout, every phase finished."""
    reports = tmp_path / f"reports{i}.jsonl"
    env = dict(os.environ, STOPS_REPORTS=str(reports))
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    sup = Supervisor(APP_REF, url, WORKERS, shutdown_timeout=SHUTDOWN, grace=0.0, env=env)
    spawned = time.monotonic()
    running = asyncio.create_task(sup.run())
    halfway = asyncio.Event()
    publisher: asyncio.Task[int] | None = None
    ready = spawned
    try:
        await sup.wait_ready()
        ready = time.monotonic()
        publisher = asyncio.create_task(_publish(url, halfway))
        half = asyncio.create_task(halfway.wait())
        # a publisher that fails (a broker refusing it under load) ends the round
        await asyncio.wait((publisher, half), return_when=asyncio.FIRST_COMPLETED)
        half.cancel()
        if publisher.done():
            publisher.result()
    finally:
        exits = _watch_exits(sup.pids)
        sigterm = time.monotonic()
        sup.request_stop()
        code = await running
        stopped = time.monotonic()
        if publisher is not None:
            await publisher
    # A worker that died before the SIGTERM (under a heavy load a broker can
    # time out a worker's start) was restarted by the supervisor: not a stop.
    rows = [row for row in read_rows(str(reports)) if row.exited >= sigterm]
    assert code == 0, f"round {i}: workers not stopped cleanly (killed or failed)"
    assert len(rows) == WORKERS
    out = []
    for row in rows:
        assert row.report is not None
        assert row.report.finished, f"round {i}, worker {row.pid}: {row.report}"
        exited = exits.get(row.pid, row.exited)
        assert exited - sigterm <= SHUTDOWN, f"round {i}, worker {row.pid}"
        out.append(_Stop(exited - sigterm, row.exited - sigterm, row.report))
    return _Round(out, ready - spawned, sigterm - ready, stopped - sigterm)


def _watch_exits(pids: list[int]) -> dict[int, float]:
    """The monotonic time each of ``pids`` ends at, filled in by the running
    loop as they end (a pidfd turns readable then; without pidfds, as on
    macOS, nothing: the caller falls back to the workers' atexit times)."""
    exits: dict[int, float] = {}
    if not hasattr(os, "pidfd_open"):
        return exits
    loop = asyncio.get_running_loop()

    def ended(pid: int, fd: int) -> None:
        exits[pid] = time.monotonic()
        loop.remove_reader(fd)
        os.close(fd)

    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        loop.add_reader(fd, ended, pid, fd)
    return exits


async def _rounds(kind: str, tmp_path: Path, rounds: int) -> list[_Round]:
    return [await _round(BROKERS[kind](tmp_path), tmp_path, i) for i in range(rounds)]


def _spread(xs: list[float]) -> str:
    xs = sorted(xs)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    return f"min {xs[0]:.3f} p50 {q(0.5):.3f} p95 {q(0.95):.3f} max {xs[-1]:.3f}"


@pytest.mark.realtime
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(BROKERS))
async def test_workers_stop_within_the_timeout(tmp_path: Path, kind: str) -> None:
    """8 workers under load, SIGTERM: every one exits 0 within
    shutdown_timeout, every stop phase finished (one round)."""
    (done,) = await _rounds(kind, tmp_path, 1)
    assert len(done.stops) == WORKERS


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.realtime
@pytest.mark.timeout(4 * 3600)
@pytest.mark.parametrize("kind", sorted(BROKERS))
async def test_workers_stop_within_the_timeout_every_time(tmp_path: Path, kind: str) -> None:
    """The same, STOPS_ROUNDS times (200 by default); prints the distribution
    of SIGTERM-to-exit times, of app.stop and of each phase, and where a
    round's wall time went."""
    rounds = int(os.environ.get("STOPS_ROUNDS", "200"))
    t0 = time.monotonic()
    done = await _rounds(kind, tmp_path, rounds)
    took = time.monotonic() - t0
    stops = [stop for r in done for stop in r.stops]
    assert len(stops) == WORKERS * rounds
    reports = [stop.report for stop in stops]
    lines = [
        f"{kind}: {rounds} rounds x {WORKERS} workers in {took:.0f}s, seconds",
        f"  round: start-up  {_spread([r.start for r in done])}",
        f"  round: load      {_spread([r.load for r in done])}",
        f"  round: stop      {_spread([r.stop for r in done])}",
        f"  SIGTERM to exit  {_spread([stop.exit for stop in stops])}",
        f"  SIGTERM to atexit {_spread([stop.atexit for stop in stops])}",
        f"  app.stop         {_spread([r.seconds for r in reports])}",
    ]
    for name in ("triggers", "intake", "handlers", "acks", "close"):
        phase = [p.seconds for r in reports if (p := r.phase(name)) is not None]
        lines.append(f"  {name:<16} {_spread(phase)}")
    slowest = max(reports, key=lambda r: r.seconds)
    lines.append(
        f"  slowest app.stop {slowest.seconds:.3f}: "
        + ", ".join(f"{p.name} {p.seconds:.3f}" for p in slowest.phases)
    )
    print("\n" + "\n".join(lines))
