"""The PostgreSQL transport under crashes, on a cluster each test starts
itself (tests/_servers.py): every backend killed with
``pg_terminate_backend`` again and again under load, and the server itself
restarted under load (a clean stop and a crash). Nothing acknowledged is
lost in any of them. Workers SIGKILLed (the shared Jepsen checker, plain
and keyed) are in tests/test_crash_brokers.py, the ``postgres`` cases."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from surge.cli._supervisor import Supervisor

from ._jepsen import (
    APP_REF,
    CrashResult,
    drain,
    produce,
    read_records,
    tally,
    worker_env,
)
from ._servers import PostgresServer, postgres_server

pytestmark = [pytest.mark.realtime, pytest.mark.slow]

PREFETCH = 16
WORKERS = 2


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[PostgresServer]:
    # fsync off: these tests kill processes (the server's too), not the machine
    with postgres_server(tmp_path, fsync=False) as server:
        yield server


def _url(pg: PostgresServer) -> str:
    return f"{pg.dsn()}?lease=2"


async def _under_load(
    url: str,
    tmp: Path,
    fault: Callable[[asyncio.Future[None]], Awaitable[int]],
    *,
    events: int,
    rate: float,
) -> CrashResult:
    """Two supervised workers handle ``events`` published at ``rate`` while
    ``fault(producing)`` strikes (its count of strikes); drained, tallied.
    Every strike may cost at most what the workers had in flight."""
    records = tmp / "records.txt"
    sup = Supervisor(
        APP_REF,
        url,
        WORKERS,
        shutdown_timeout=5.0,
        backoff=0.05,
        backoff_cap=0.5,
        stable_after=0.5,
        env=worker_env(records, concurrency=8, prefetch=PREFETCH),
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    running = loop.create_task(sup.run())
    acked: list[int] = []
    try:
        await sup.wait_ready()
        producing: asyncio.Future[None] = loop.create_task(
            produce(url, range(events), acked, concurrency=8, rate=rate)
        )
        strikes = await fault(producing)
        await producing
        stats = await drain(url, records, acked, timeout=90)
    finally:
        sup.request_stop()
        await running
    return tally(
        range(events),
        acked,
        [r.n for r in read_records(records)],
        kills=strikes,
        bound_per_kill=WORKERS * PREFETCH,
        left=stats.backlog + stats.pending + stats.scheduled,
        seconds=loop.time() - start,
    )


@pytest.mark.timeout(200)
async def test_backends_terminated_under_load(pg: PostgresServer, tmp_path: Path) -> None:
    """Every backend of the database (publisher's, workers' pools and
    LISTEN connections) killed by pg_terminate_backend 20 times while 10,000
    events flow: everyone reconnects, nothing acknowledged is lost."""
    rng = random.Random(11)

    async def terminate(producing: asyncio.Future[None]) -> int:
        done = 0
        while done < 20 and not producing.done():
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            killed = await asyncio.to_thread(
                pg.psql,
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM "
                "(SELECT pid FROM pg_stat_activity WHERE datname = 'postgres' "
                "AND pid <> pg_backend_pid() OFFSET 0) AS others",
            )
            if int(killed):
                done += 1
        return done

    result = await _under_load(_url(pg), tmp_path, terminate, events=10_000, rate=1500)
    print(f"\npostgres terminate-backend test: {result}")
    assert result.acked == 10_000
    assert result.kills >= 15
    result.check()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_server_restarted_under_load(pg: PostgresServer, tmp_path: Path, mode: str) -> None:
    """The server stopped (``fast``: cleanly; ``immediate``: as a crash, WAL
    recovery) and started again three times while 6,000 events flow:
    publishers and workers wait for it, nothing acknowledged is lost."""

    async def restart(producing: asyncio.Future[None]) -> int:
        done = 0
        while done < 3 and not producing.done():
            await asyncio.sleep(1.0)
            await asyncio.to_thread(pg.stop, mode)
            await asyncio.to_thread(pg.start)
            done += 1
        return done

    result = await _under_load(_url(pg), tmp_path, restart, events=6_000, rate=1000)
    print(f"\npostgres restart test ({mode}): {result}")
    assert result.acked == 6_000
    assert result.kills == 3
    result.check()
