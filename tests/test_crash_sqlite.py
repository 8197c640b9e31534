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
    KEYED_APP_REF,
    KEYED_GROUP,
    Keyed,
    Numbered,
    Record,
    check,
    drain,
    group_stats,
    overlaps,
    produce_keyed,
    publish_process,
    read_acked,
    read_keyed_records,
    read_records,
    tally,
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
        os.kill(stopped, signal.SIGSTOP)
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


@pytest.mark.slow
@pytest.mark.soak  # 7-10 s: past what CI's 20 minutes have left; run with -m soak
@pytest.mark.realtime
@pytest.mark.timeout(90)
async def test_a_stopped_keyed_worker_starts_none_of_what_moved_on(tmp_path: Path) -> None:
    """Two workers of a keyed subscription (8 keys x 10 events, handlings of
    0.3 s, prefetch 32, lease 1 s); one is SIGSTOPped while it holds
    prefetched events of its keys, and SIGCONTed once the other started
    one of them. No key is handled by two processes at once (the handling
    it was stopped in the middle of aside: nothing can stop that), lost 0:
    the stopped worker's round after the stall finds its partitions' leases
    lapsed, and it starts none of what it held (``surge.Fences``)."""
    lease = 1.0
    url = f"sqlite:///{tmp_path / 'fence.db'}?lease={lease:g}"
    records = tmp_path / "keyed.txt"
    keys = [f"k{i}" for i in range(8)]
    per_key = 10
    env = worker_env(records, concurrency=8, prefetch=32, delay=0.3, shutdown_timeout=5.0)
    sup = Supervisor(KEYED_APP_REF, url, 2, shutdown_timeout=5.0, env=env)
    loop = asyncio.get_running_loop()
    running = loop.create_task(sup.run())
    acked: list[tuple[str, int]] = []
    try:
        await sup.wait_ready()
        producing = loop.create_task(produce_keyed(url, keys, per_key, acked))

        def starters() -> set[int]:
            return {r.pid for r in read_keyed_records(records) if r.kind == "s"}

        await wait_for(lambda: len(starters()) == 2, timeout=30, what="both workers handling")
        before = read_keyed_records(records)
        stopped = before[-1].pid
        its_keys = {r.key for r in before if r.pid == stopped}
        os.kill(stopped, signal.SIGSTOP)
        t_stop = loop.time()
        try:
            await wait_for(
                lambda: any(
                    r.kind == "s" and r.pid != stopped and r.key in its_keys
                    for r in read_keyed_records(records)[len(before) :]
                ),
                timeout=lease * 10,
                what="the other worker taking the stopped one's keys",
            )
            taken_after = loop.time() - t_stop
        finally:
            os.kill(stopped, signal.SIGCONT)
        await producing
        stats = await drain(
            url,
            records,
            acked,
            group=KEYED_GROUP,
            topics=(Keyed.__topic__,),
            handled=lambda p: {(r.key, r.seq) for r in read_keyed_records(p) if r.kind == "h"},
            timeout=60,
        )
    finally:
        sup.request_stop()
    assert await running == 0
    lines = read_keyed_records(records)
    # handlings the worker was stopped in the middle of
    open_at_stop: dict[tuple[int, str, int], int] = {}
    for r in before:
        at = (r.pid, r.key, r.seq)
        open_at_stop[at] = open_at_stop.get(at, 0) + (1 if r.kind == "s" else -1)
    stalled = [at for at, n in open_at_stop.items() if n > 0 and at[0] == stopped]
    found = overlaps(lines, exempt=stalled)
    crash = tally(
        [(k, seq) for k in keys for seq in range(per_key)],
        acked,
        [(r.key, r.seq) for r in lines if r.kind == "h"],
        kills=0,
        bound_per_kill=0,
        left=stats.backlog + stats.pending + stats.scheduled,
    )
    resumed = [r for r in lines[len(before) :] if r.pid == stopped and r.kind == "s"]
    print(
        f"\nsqlite SIGSTOP keyed test: handlings={crash.deliveries} lost={crash.lost} "
        f"duplicates={crash.duplicates} overlaps={len(found)} {found[:3]} "
        f"stalled_mid_handling={len(stalled)} taken_after={taken_after:.2f}s "
        f"stopped_worker_starts_after={len(resumed)}"
    )
    assert found == [], f"{len(found)} overlapping handlings: {found[:10]}"
    assert crash.lost == 0, f"lost acknowledged events: {crash.lost_sample}"
    assert crash.left == 0, str(crash)


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
