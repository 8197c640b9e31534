"""The Jepsen checker shared by every transport (tests/_jepsen.py): on the
brokers, and its keyed mode (per-key order across processes) on every
transport several processes share. Each broker is one the test starts
(RabbitMQ: the session's node, with a prefix of the test's own)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from surge.cli._supervisor import Supervisor

from ._jepsen import (
    KEYED_APP_REF,
    KEYED_GROUP,
    Keyed,
    KeyedRecord,
    drain,
    key_order,
    overlaps,
    produce_keyed,
    read_keyed_records,
    run_crash,
    run_keyed_crash,
    stop_process,
    tally,
    wait_for,
    worker_env,
)
from ._servers import nats_server, postgres_server, redis_server, shared_amqp_url

pytestmark = pytest.mark.realtime


@contextlib.contextmanager
def _broker(kind: str, tmp_path: Path, *, lease: float = 2.0) -> Iterator[str]:
    if kind == "nats":
        with nats_server(tmp_path) as srv:
            yield f"{srv.url}?stream=jepsen&lease={lease:g}"
    elif kind == "amqp":
        # the session's RabbitMQ node, a prefix of this test's own
        yield f"{shared_amqp_url()}&lease={lease:g}"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'jepsen.db'}?lease={lease:g}"
    elif kind == "postgres":
        # a cluster of the test's own; fsync off: these tests kill
        # processes, not the machine
        with postgres_server(tmp_path, fsync=False) as server:
            yield f"{server.dsn()}?lease={lease:g}"
    else:
        with redis_server(tmp_path) as (url, _server):
            yield f"{url}?lease={lease:g}"


SIZES = [
    pytest.param(1, id="ci"),
    pytest.param(2, id="full", marks=pytest.mark.soak),
]
"""How big a run: CI's (half the events and kills, within its 20 minutes)
and the full one (``-m soak``)."""


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["redis", "nats", "sqlite", "amqp", "postgres"])
async def test_two_workers_sigkilled_with_the_shared_checker(
    tmp_path: Path, kind: str, size: int
) -> None:
    """10,000 (full: 20,000) acked events, two supervised workers SIGKILLed
    10+ (20+) times: nothing lost or invented, duplicates within in-flight,
    nothing pending."""
    events = 10_000 * size
    with _broker(kind, tmp_path) as url:
        result = await run_crash(
            url,
            tmp_path,
            events=events,
            kills=11 * size,  # the last share can run out before the last kill or two
            workers=2,
            seed=5,
            rate=2000,
        )
    print(f"\n{kind} crash test (shared checker): {result}")
    assert result.acked == events
    assert result.kills >= 10 * size
    result.check()


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["redis", "nats", "sqlite", "amqp", "postgres"])
async def test_keyed_order_holds_across_sigkilled_workers(
    tmp_path: Path, kind: str, size: int
) -> None:
    """24 keys x 150 (full: 300) events, each key's published in order, two
    supervised workers of a keyed subscription SIGKILLed 10+ (20+) times:
    nothing lost or invented, duplicates within in-flight, no two processes
    on one key at once, every key's first handlings in publish order (see
    key_order)."""
    per_key = 150 * size
    with _broker(kind, tmp_path) as url:
        result = await run_keyed_crash(
            url, tmp_path, keys=24, per_key=per_key, kills=11 * size, workers=2, seed=7
        )
    print(f"\n{kind} keyed crash test: {result}")
    assert result.crash.acked == 24 * per_key
    assert result.crash.kills >= 10 * size
    # the keys did move between processes, and kills did cut handlings
    assert result.order.handovers >= result.crash.kills
    assert result.order.cut > 0
    result.check()


@pytest.mark.slow
@pytest.mark.soak  # 7-10 s each: past what CI's 20 minutes have left; run with -m soak
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["sqlite", "postgres", "redis", "nats"])
async def test_a_stopped_keyed_worker_starts_none_of_what_moved_on(
    tmp_path: Path, kind: str
) -> None:
    """Two workers of a keyed subscription (8 keys x 10 events, handlings of
    0.3 s, prefetch 32, lease 1 s); one is SIGSTOPped while it holds
    prefetched events of its keys, and SIGCONTed once the other started
    one of them. No key is handled by two processes at once (the handlings
    it was stopped in the middle of aside: nothing can stop those), lost 0:
    it starts none of what it held once its partitions' leases may have
    lapsed (``surge.Fences``; amqp does not fence). On sqlite, whose
    processes share one host, this stall is the partition fault."""
    lease = 1.0
    records = tmp_path / "keyed.txt"
    keys = [f"k{i}" for i in range(8)]
    per_key = 10
    env = worker_env(records, concurrency=8, prefetch=32, delay=0.3, shutdown_timeout=5.0)
    with _broker(kind, tmp_path, lease=lease) as url:
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
            await stop_process(stopped, tmp_path / "jepsen.db" if kind == "sqlite" else None)
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
            code = await running
    assert code == 0
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
        f"\n{kind} SIGSTOP keyed test: handlings={crash.deliveries} lost={crash.lost} "
        f"duplicates={crash.duplicates} overlaps={len(found)} {found[:3]} "
        f"stalled_mid_handling={len(stalled)} taken_after={taken_after:.2f}s "
        f"stopped_worker_starts_after={len(resumed)}"
    )
    assert found == [], f"{len(found)} overlapping handlings: {found[:10]}"
    assert crash.lost == 0, f"lost acknowledged events: {crash.lost_sample}"
    assert crash.left == 0, str(crash)


def _lines(text: str) -> list[KeyedRecord]:
    out = []
    for line in text.split():
        kind, key, seq, pid, attempt = line.split(",")
        out.append(KeyedRecord(kind, key, int(seq), int(pid), int(attempt)))
    return out


def test_key_order_allows_a_killed_handling_rerun_by_the_next_owner() -> None:
    """Pid 1 handles a0, starts a1 and is killed; pid 2 reruns a0 (its ack
    was lost) and a1, then goes on: the only break key_order allows."""
    order = key_order(
        _lines("""
        s,a,0,1,1 h,a,0,1,1 s,a,1,1,1 s,b,0,2,1 h,b,0,2,1 k,,-1,1,0
        s,a,0,2,2 h,a,0,2,2 s,a,1,2,2 h,a,1,2,2 s,a,2,2,1 h,a,2,2,1
        """)
    )
    assert order.violations == []
    assert (order.keys, order.handovers, order.reruns, order.cut) == (2, 1, 2, 1)


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        # two live processes on one key at once
        ("s,a,0,1,1 s,a,1,2,1 h,a,0,1,1 h,a,1,2,1", "while pid 1 handled 0"),
        # a killed process's handling ends after the next owner started the key
        ("s,a,0,1,1 k,,-1,1,0 s,a,0,2,2 h,a,0,1,1", "after another process started"),
        # a later event first handled before an earlier one
        ("s,a,1,1,1 h,a,1,1,1 s,a,0,1,1 h,a,0,1,1", "before 0 was ever started"),
        # an event handled twice with no kill
        ("s,a,0,1,1 h,a,0,1,1 s,a,0,2,1 h,a,0,2,1", "not killed"),
        # a rerun of a killed process's event after the next owner went past it
        (
            "s,a,0,1,1 h,a,0,1,1 k,,-1,1,0 s,a,1,2,1 h,a,1,2,1 s,a,0,2,2 h,a,0,2,2",
            "went back from 1 to 0",
        ),
        # a handling that never ends in a process nobody killed
        ("s,a,0,1,1", "never ended"),
    ],
    ids=["overlap", "end-after-take-over", "gap", "rerun-no-kill", "late-redelivery", "no-end"],
)
def test_key_order_finds_what_breaks_the_promise(lines: str, problem: str) -> None:
    violations = key_order(_lines(lines)).violations
    assert any(problem in v for v in violations), violations
