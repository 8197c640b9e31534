"""Crash tests of sqlite:// with real processes: SIGKILL, SIGSTOP, kill loops.

The figures each test measures are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import select
import signal
import sqlite3
import time
from pathlib import Path

import pytest

import surge
from surge.cli._supervisor import Supervisor
from surge.transports import open_transport

from ._jepsen import (
    APP_REF,
    GROUP,
    Numbered,
    Record,
    check,
    drain,
    group_stats,
    publish_process,
    read_acked,
    read_records,
    stop_process,
    wait_for,
    worker_env,
)


@pytest.mark.slow
@pytest.mark.realtime
@pytest.mark.timeout(60)
async def test_a_stopped_worker_loses_its_lease(tmp_path: Path) -> None:
    """SIGSTOP past the lease: another worker gets the delivery within lease + 1 s,
    handles it once, and the stopped worker's late ack is refused as stale."""
    lease = 1.0
    url = f"sqlite:///{tmp_path / 'stop.db'}?lease={lease:g}"
    records = tmp_path / "records.txt"
    env = worker_env(records, hold_first=2.5, starts=True)
    sup = Supervisor(APP_REF, url, 2, shutdown_timeout=5, env=env)
    loop = asyncio.get_running_loop()
    running = loop.create_task(sup.run())
    try:
        await sup.wait_ready()
        acked: list[int] = []
        await _produce_one(url, acked)

        def starts() -> list[tuple[int, int]]:
            return [(r.pid, r.attempt) for r in read_records(records, "s")]

        await wait_for(lambda: len(starts()) == 1, timeout=10, what="first attempt")
        [(stopped, attempt)] = starts()
        assert attempt == 1
        await stop_process(stopped, tmp_path / "stop.db")
        t_stop = loop.time()
        try:
            await wait_for(lambda: len(starts()) == 2, timeout=lease + 5, what="redelivery")
            redelivered_after = loop.time() - t_stop
            other, attempt = starts()[1]
            assert other != stopped
            assert attempt == 2
            stats = await drain(url, records, acked, timeout=10)
            assert (stats.backlog, stats.pending, stats.scheduled) == (0, 0, 0)
        finally:
            os.kill(stopped, signal.SIGCONT)
        # the stopped worker wakes, finishes its (now stale) handling and acks
        await wait_for(
            lambda: any(r.pid == stopped for r in read_records(records)),
            timeout=10,
            what="late handling",
        )
    finally:
        sup.request_stop()
    assert await running == 0
    print(f"\nsqlite SIGSTOP test: redelivered {redelivered_after:.2f}s after the stop")
    assert redelivered_after <= lease + 1
    handled = [(r.pid, r.attempt) for r in read_records(records)]
    # handled once by the other worker; the stopped one's late run is its
    # first attempt finishing, and nothing was delivered a third time
    assert sorted(handled) == sorted([(other, 2), (stopped, 1)])
    stale = {r.pid: r.n for r in read_records(records, "x")}
    assert stale[stopped] >= 1, "the late ack was not refused as stale"
    assert stale[other] == 0
    stats = await group_stats(url)
    assert (stats.backlog, stats.pending, stats.scheduled) == (0, 0, 0)


async def _produce_one(url: str, acked: list[int]) -> None:
    producer = surge.App("jepsen-producer", transport=url)
    async with producer:
        await producer.publish(Numbered(n=0))
    acked.append(0)


async def _declare(url: str) -> None:
    transport = open_transport(url)
    await transport.start()
    await transport.declare(GROUP, (Numbered.__topic__,))
    await transport.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "kills", [100, pytest.param(200, marks=pytest.mark.soak)], ids=["ci", "full"]
)
def test_killing_the_publisher_again_and_again(tmp_path: Path, kills: int) -> None:
    """100 (full: 200) SIGKILLs of a process mid-publish: integrity_check is
    ok every time and every event whose publish returned is in the file."""
    db = tmp_path / "kill.db"
    url = f"sqlite:///{db}"
    asyncio.run(_declare(url))  # so every publish has a group to land in
    ctx = multiprocessing.get_context("forkserver")
    # forked from a server that has surge imported: a loop costs a fork, not
    # an interpreter start
    ctx.set_forkserver_preload([publish_process.__module__])
    rng = random.Random(200)
    codec = surge.MsgpackCodec()
    last_seq = 0
    acked_total = 0
    stored_total = 0
    start = time.monotonic()
    for i in range(kills):
        acked_path = tmp_path / f"acked-{i}.txt"
        fifo = tmp_path / f"notify-{i}"
        os.mkfifo(fifo)
        proc = ctx.Process(
            target=publish_process, args=(url, i * 1_000_000, str(acked_path), str(fifo))
        )
        proc.start()
        notify = os.open(fifo, os.O_RDONLY)  # returns once the child opened its end
        try:
            # kill after a random number of acknowledged publishes: the other
            # publishes of the process are somewhere in their commit by then
            for _ in range(rng.randint(1, 40)):
                ready, _, _ = select.select([notify], [], [], 30)
                assert ready, f"loop {i}: the publisher made no progress"
                assert os.read(notify, 1) == b"a", f"loop {i}: the publisher died"
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
        finally:
            os.close(notify)
        assert proc.exitcode == -signal.SIGKILL
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], f"loop {i}"
            rows = conn.execute(
                "SELECT seq, body FROM messages WHERE seq > ? ORDER BY seq", (last_seq,)
            ).fetchall()
        finally:
            conn.close()
        stored = {codec.decode_event(body, Numbered).n for _, body in rows}
        acked = read_acked(acked_path)
        missing = set(acked) - stored
        assert not missing, f"loop {i}: acknowledged but not in the file: {sorted(missing)[:5]}"
        if rows:
            last_seq = rows[-1][0]
        acked_total += len(acked)
        stored_total += len(stored)
    elapsed = time.monotonic() - start
    print(
        f"\nsqlite publisher kill loops: {kills} kills, {acked_total} acked, {stored_total} "
        f"stored (acked + committed before the ack reached the publisher), 0 missing, "
        f"integrity ok every time, {elapsed:.1f}s"
    )


def test_the_checker_sees_lost_unexpected_and_duplicate_events() -> None:
    """check() counts what a broken transport would do, and check() then fails."""
    records = [Record("h", n, 1, 1) for n in (0, 1, 1, 1, 7)]
    result = check(range(5), [0, 1, 2], records, kills=1, bound_per_kill=1, left=3)
    assert (result.lost, result.unexpected, result.duplicates) == (1, 1, 2)
    assert result.lost_sample == [2]
    with pytest.raises(AssertionError, match="lost"):
        result.check()
    fine = check(
        range(3),
        [0, 1, 2],
        [Record("h", n, 1, 1) for n in (0, 1, 2, 2)],
        kills=1,
        bound_per_kill=1,
        left=0,
    )
    fine.check()
    assert fine.duplicates == 1
