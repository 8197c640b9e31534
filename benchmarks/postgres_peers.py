"""The PostgreSQL peers of surge's postgres transport, for postgres_bench.

Run by ``benchmarks/postgres_bench.py --peers PYTHON`` with a Python that
has ``pgqueuer`` and ``procrastinate`` (and asyncpg) installed, never
surge's own venv: ``PYTHON -m benchmarks.postgres_peers DSN EVENTS``. It
prints one JSON object of figures. Each peer gets a database of its own on
the same server, measured as surge is: ``EVENTS`` jobs enqueued first (in
batches of 1,000 through the peer's batch API), then one worker started on
the backlog, first to last handler start; then the worker running and idle
while one job at a time is enqueued at 500/s, enqueue-to-handler-start
latency. The worker runs in this process, a task beside the producer.

pgqueuer: ``QueueManager``, ``batch_size=100`` (its default is 10),
``mode=drain`` for the backlog. procrastinate: ``run_worker_async`` with
``concurrency=10``, ``wait=False`` for the backlog, LISTEN/NOTIFY on; it
drains at most 2,000 jobs (it commits each job on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import procrastinate
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.types import QueueExecutionMode

RATE, DURATION = 500, 5.0


async def _database(dsn: str) -> str:
    name = f"peer{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    return dsn.rsplit("/", 1)[0] + "/" + name


def _percentiles(lat: list[float]) -> tuple[float, float]:
    lat = sorted(lat)
    return lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


async def pgqueuer(dsn: str, n: int) -> dict[str, float]:
    url = await _database(dsn)
    conn = await asyncpg.connect(url)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        k = min(1000, n - i)
        await queries.enqueue(["noop"] * k, [b"x" * 100] * k, [0] * k)
    enqueue = time.perf_counter() - t0
    await conn.close()

    stamps: list[float] = []
    wconn = await asyncpg.connect(url)
    qm = QueueManager(Queries(AsyncpgDriver(wconn)))

    async def noop(job: Job) -> None:
        stamps.append(time.perf_counter())

    qm.entrypoint("noop")(noop)  # (called, not as a decorator: the module is untyped here)
    await qm.run(batch_size=100, mode=QueueExecutionMode.drain)
    drain = (len(stamps) - 1) / (stamps[-1] - stamps[0])

    # latency: the worker idle, one job at a time at RATE
    total = int(RATE * DURATION)
    lat: list[float] = []
    done = asyncio.Event()
    qm2 = QueueManager(Queries(AsyncpgDriver(wconn)))

    async def tick(job: Job) -> None:
        lat.append((time.perf_counter() - float(job.payload or b"0")) * 1e6)
        if len(lat) >= total:
            done.set()

    qm2.entrypoint("tick")(tick)

    worker = asyncio.ensure_future(qm2.run(batch_size=100, dequeue_timeout=timedelta(seconds=5)))
    pconn = await asyncpg.connect(url)
    producer = Queries(AsyncpgDriver(pconn))
    await asyncio.sleep(0.5)
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await producer.enqueue("tick", repr(time.perf_counter()).encode())
    await asyncio.wait_for(done.wait(), 60)
    qm2.shutdown.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(worker, 10)
    await pconn.close()
    await wconn.close()
    p50, p99 = _percentiles(lat)
    return {
        "pgqueuer_enqueue_batch1000_per_s": n / enqueue,
        "pgqueuer_drain_per_s": drain,
        "pgqueuer_latency_p50_us": p50,
        "pgqueuer_latency_p99_us": p99,
    }


async def procrastinate_peer(dsn: str, n: int) -> dict[str, float]:
    url = await _database(dsn)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    stamps: list[float] = []
    lat: list[float] = []
    total = int(RATE * DURATION)
    done = asyncio.Event()

    async def _noop() -> None:
        stamps.append(time.perf_counter())

    async def _tick(sent: float) -> None:
        lat.append((time.perf_counter() - sent) * 1e6)
        if len(lat) >= total:
            done.set()

    noop = app.task(queue="bench", name="noop")(_noop)
    tick = app.task(queue="lat", name="tick")(_tick)

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        t0 = time.perf_counter()
        for i in range(0, n, 1000):
            await noop.batch_defer_async(*[{} for _ in range(min(1000, n - i))])
        enqueue = time.perf_counter() - t0
        await app.run_worker_async(queues=["bench"], wait=False, concurrency=10)
        drain = (len(stamps) - 1) / (stamps[-1] - stamps[0])

        worker = asyncio.ensure_future(
            app.run_worker_async(queues=["lat"], concurrency=10, install_signal_handlers=False)
        )
        await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await tick.defer_async(sent=time.perf_counter())
        await asyncio.wait_for(done.wait(), 300)
        worker.cancel()
        with contextlib.suppress(BaseException):
            await worker
    p50, p99 = _percentiles(lat)
    return {
        "procrastinate_enqueue_batch1000_per_s": n / enqueue,
        "procrastinate_drain_per_s": drain,
        "procrastinate_latency_p50_us": p50,
        "procrastinate_latency_p99_us": p99,
    }


async def main(dsn: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out.update(await pgqueuer(dsn, n))
    # procrastinate commits each job on its own (fetch, then finish): a
    # few hundred a second at most here, so it drains a smaller backlog
    out.update(await procrastinate_peer(dsn, min(n, 2000)))
    return out


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2])))))
