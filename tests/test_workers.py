"""The supervisor: worker processes started, restarted, drained, refused."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

import surge
from surge.cli._supervisor import EX_CONFIG, Supervisor, check_workers, load_app, run_workers

from ._jepsen import APP_REF, GROUP, drain, group_stats, produce, read_records, wait_for, worker_env
from ._servers import free_port

pytestmark = pytest.mark.realtime


def _url(tmp_path: Path, query: str = "") -> str:
    return f"sqlite:///{tmp_path / 'w.db'}{query}"


async def test_supervisor_restarts_a_killed_worker(tmp_path: Path) -> None:
    """A SIGKILLed worker is replaced by a new process, and stop exits 0."""
    sup = Supervisor(APP_REF, _url(tmp_path), 1, env=worker_env(tmp_path / "r.txt"))
    running = asyncio.create_task(sup.run())
    try:
        await sup.wait_ready()
        [first] = sup.pids
        os.kill(first, signal.SIGKILL)
        await sup.wait_restarted(first)
        [second] = sup.ready_pids
        assert second != first
        assert sup.restarts == 1
        assert sup.exit_codes == [-signal.SIGKILL]
    finally:
        sup.request_stop()
    assert await running == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_sigterm_drains_in_flight_handlers(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM or SIGINT to `run_workers`: in-flight handlers finish and ack, exit 0."""
    url = _url(tmp_path)
    records = tmp_path / "r.txt"
    env = worker_env(records, delay=1.0, starts=True, shutdown_timeout=5.0)
    code = (
        "import sys; from surge.cli._supervisor import run_workers; "
        f"sys.exit(run_workers({APP_REF!r}, {url!r}, 2))"
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env)
    try:
        # workers must have declared their group before anything is published
        await wait_for(lambda: _declared(tmp_path / "w.db"), timeout=30, what="workers up")
        await produce(url, range(6), [], concurrency=6)
        await wait_for(
            lambda: len(read_records(records, "s")) == 6, timeout=30, what="6 handlers running"
        )
        assert read_records(records, "h") == []
        loop = asyncio.get_running_loop()
        start = loop.time()
        proc.send_signal(sig)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert loop.time() - start < 5.0 + 2.0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert sorted(r.n for r in read_records(records, "h")) == list(range(6))
    stats = await group_stats(url)
    assert (stats.backlog, stats.pending, stats.scheduled) == (0, 0, 0)


def _declared(db: Path) -> bool:
    import sqlite3

    if not db.exists():
        return False
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT name FROM groups WHERE name = ?", (GROUP,)).fetchall()
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return bool(rows)


def test_several_workers_on_memory_are_refused() -> None:
    """--workers 2 with memory:// raises ConfigurationError naming the fix."""
    with pytest.raises(surge.ConfigurationError, match=r"memory://.*sqlite:///"):
        run_workers(APP_REF, "memory://", 2)
    with pytest.raises(surge.ConfigurationError, match="memory://"):
        Supervisor(APP_REF, "memory://", 3)
    with pytest.raises(surge.ConfigurationError, match="at least 1"):
        check_workers("sqlite:///x.db", 0)
    check_workers("memory://", 1)


def test_bad_app_references_are_configuration_errors() -> None:
    """A reference without ':', a missing module or attribute, or a non-App is refused."""
    for ref, why in [
        (APP_REF.split(":")[0], "module:attribute"),
        ("no_such_module_xyz:app", "no module named"),
        (APP_REF + "x", "no attribute"),
        (APP_REF.replace(":app", ":Numbered"), "not a surge.App"),
    ]:
        with pytest.raises(surge.ConfigurationError, match=why):
            load_app(ref)


async def test_a_worker_that_cannot_load_its_app_stops_the_supervisor(tmp_path: Path) -> None:
    """A worker exiting with EX_CONFIG is not restarted; run() returns that code."""
    sup = Supervisor("no_such_module_xyz:app", _url(tmp_path), 2, backoff=0.01)
    assert await asyncio.wait_for(sup.run(), 30) == EX_CONFIG
    assert sup.restarts == 0


async def test_two_workers_compete_for_deliveries(tmp_path: Path) -> None:
    """Two workers on one sqlite file share a group: each event handled once, by both pids."""
    url = _url(tmp_path)
    records = tmp_path / "r.txt"
    # a little work per event so that one worker cannot take everything at once
    sup = Supervisor(APP_REF, url, 2, env=worker_env(records, delay=0.01, prefetch=4))
    running = asyncio.create_task(sup.run())
    try:
        await sup.wait_ready()
        pids = set(sup.ready_pids)
        acked: list[int] = []
        await produce(url, range(400), acked)
        stats = await drain(url, records, acked, timeout=60)
    finally:
        sup.request_stop()
    assert await running == 0
    handled = read_records(records)
    assert sorted(r.n for r in handled) == list(range(400))
    assert {r.pid for r in handled} == pids
    assert (stats.backlog, stats.pending) == (0, 0)


async def test_quick_deaths_back_off(tmp_path: Path) -> None:
    """A worker that keeps dying right after its start is restarted with a growing delay."""
    sup = Supervisor(
        APP_REF,
        _url(tmp_path),
        1,
        backoff=0.2,
        backoff_cap=0.4,
        stable_after=60,
        env=worker_env(tmp_path / "r.txt"),
    )
    running = asyncio.create_task(sup.run())
    loop = asyncio.get_running_loop()
    try:
        gaps = []
        for _ in range(3):
            await sup.wait_ready()
            [pid] = sup.pids
            killed = loop.time()
            os.kill(pid, signal.SIGKILL)
            await sup.wait_restarted(pid)
            gaps.append(loop.time() - killed)
        # delays 0.2, 0.4, 0.4 (capped) come on top of a worker's start-up time
        assert gaps[0] >= 0.2
        assert gaps[1] >= 0.4
        assert gaps[2] >= 0.4
        assert sup.restarts == 3
    finally:
        sup.request_stop()
    assert await running == 0


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return status


async def test_workers_serve_http_on_one_port(tmp_path: Path) -> None:
    """With http=(host, port) every worker listens on the same port (SO_REUSEPORT), and
    with admin=(host, port) on an admin port that alone serves /metrics and /_surge/*."""
    port, admin = free_port(), free_port()
    sup = Supervisor(
        APP_REF,
        _url(tmp_path),
        2,
        http=("127.0.0.1", port),
        admin=("127.0.0.1", admin),
        env=worker_env(tmp_path / "r.txt"),
    )
    running = asyncio.create_task(sup.run())
    try:
        await sup.wait_ready()  # ready means listening, for an HTTP worker
        statuses = [await _get(port, "/healthz") for _ in range(8)]
        assert statuses == [b"HTTP/1.1 200 OK\r\n"] * 8
        for path in ("/metrics", "/_surge/dlq", "/_surge/stats"):
            assert await _get(port, path) == b"HTTP/1.1 404 Not Found\r\n", path
            assert await _get(admin, path) == b"HTTP/1.1 200 OK\r\n", path
        assert len(sup.ready_pids) == 2
    finally:
        sup.request_stop()
    assert await running == 0


async def test_workers_drain_when_the_supervisor_dies(tmp_path: Path) -> None:
    """A SIGKILLed supervisor leaves no orphans: its workers see stdin close and exit."""
    url = _url(tmp_path)
    records = tmp_path / "r.txt"
    env = worker_env(records)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    code = (
        "import sys; from surge.cli._supervisor import run_workers; "
        f"sys.exit(run_workers({APP_REF!r}, {url!r}, 2))"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env)
    try:
        await wait_for(lambda: _declared(tmp_path / "w.db"), timeout=30, what="workers up")
        # learn the workers' pids from what they handle
        acked: list[int] = []
        await produce(url, range(200), acked)
        await drain(url, records, acked, timeout=30)
        pids = {r.pid for r in read_records(records)}
        assert pids
    finally:
        proc.kill()
        await proc.wait()
    await wait_for(lambda: not any(_alive(p) for p in pids), timeout=15, what="workers exit")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; reaping it is init's business


async def test_a_second_stop_request_kills_at_once(tmp_path: Path) -> None:
    """A second signal does not wait for slow handlers: workers are killed, exit 1."""
    url = _url(tmp_path)
    records = tmp_path / "r.txt"
    env = worker_env(records, delay=60.0, starts=True, shutdown_timeout=30.0)
    sup = Supervisor(APP_REF, url, 1, shutdown_timeout=30.0, env=env)
    running = asyncio.create_task(sup.run())
    try:
        await sup.wait_ready()
        await produce(url, range(2), [])
        await wait_for(lambda: len(read_records(records, "s")) == 2, timeout=30, what="running")
    finally:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sup.request_stop()
        sup.request_stop()
    assert await asyncio.wait_for(running, 10) == 1
    assert loop.time() - start < 5.0
    assert read_records(records, "h") == []
    assert sup.exit_codes == [-signal.SIGKILL]
