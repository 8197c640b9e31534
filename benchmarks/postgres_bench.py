"""surge over PostgreSQL against raw asyncpg queues, in one run, on one server.

Usage: ``python -m benchmarks.postgres_bench [--events N] [--rounds R] [--fsync on|off]
[--peers PYTHON]``

The script starts its own PostgreSQL cluster (initdb + pg_ctl, as the tests
do: tests/_servers.py) on a free loopback port, with the server's defaults
(``fsync=on``, ``synchronous_commit=on``) unless ``--fsync off``, and
removes it at the end. Scenarios:

``surge enqueue``        ``await app.publish(ev)`` one by one, no worker running
``surge enqueue x100``   the same with 100 publishing tasks (group commit at work)
``surge drain``          one worker process (an App, async no-op handler, default
                         options) started on the full backlog: first to last
                         handler start (startup excluded)
``surge keyed drain``    the same with every event published with ``key=``
                         (1,000 keys): partitions with owners, the worker owns all 8
``surge latency``        worker running and idle; 2,500 events at a fixed 500/s;
                         ``time.time_ns()`` before ``publish`` to handler start;
                         also how long each publish waited for its commit, the
                         worker's part alone (publish returned to handler start)
                         and the worker process's CPU time per event
``raw insert``           ``INSERT ... SELECT unnest(...)`` batches of 100 rows
                         (100-byte payload), each a durable commit
``raw drain``            the baseline the issue names: one consumer claiming 100
                         rows at a time with ``FOR UPDATE SKIP LOCKED`` (an UPDATE
                         that leases them) and deleting them by id after
                         handling (ack): two statements per batch, as an
                         at-least-once consumer needs; its commits with
                         ``synchronous_commit=off``, as surge's consumer's
``raw drain 1-stmt``     ``DELETE ... WHERE id IN (SELECT ... FOR UPDATE SKIP
                         LOCKED LIMIT 100) RETURNING``: at-most-once, the floor
``raw NOTIFY``           ``pg_notify`` at 500/s on one connection to a LISTENing
                         one: send to callback (the round trip a wake-up costs)

With ``--peers PYTHON`` (a Python with pgqueuer and procrastinate, not
surge's venv), each round also runs ``benchmarks/postgres_peers.py`` on the
same server: the peers' drain and latency, measured the same way.

Each round runs every scenario once; the medians are printed and written to
benchmarks/results/postgres.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from tests._servers import PostgresServer

import surge
from surge._app import run_loop
from surge.transports.postgres import PostgresTransport

RESULTS = Path(__file__).parent / "results"
RATE, DURATION = 500, 5.0
GROUP = "bench.noop"
ROOT = Path(__file__).resolve().parent.parent


class Tick(surge.Event):
    __topic__ = "bench.tick"
    sent_ns: int = 0


# --- the worker process ----------------------------------------------------------
def worker(url: str, n: int, mode: str, out: str) -> None:
    """Handle ``n`` Tick events with a no-op handler; write timings to ``out``."""
    app = surge.App("bench", transport=PostgresTransport(url))
    first = last = 0.0
    count = 0
    latencies: list[int] = []
    sent: list[int] = []
    done: asyncio.Event | None = None

    @app.on(Tick, name="noop")
    async def noop(ev: Tick) -> None:
        nonlocal first, last, count
        now = time.perf_counter()
        if mode == "latency":
            latencies.append(time.time_ns() - ev.sent_ns)
            sent.append(ev.sent_ns)
        if not count:
            first = now
        last = now
        count += 1
        if count >= n and done is not None:
            done.set()

    launched = 0.0
    cpu = 0.0  # the process's CPU seconds from ready to the last event

    async def main() -> None:
        nonlocal done, launched, cpu
        done = asyncio.Event()
        launched = time.perf_counter()
        async with app:
            cpu = -time.process_time()
            print("ready", flush=True)
            await done.wait()
            cpu += time.process_time()
            await app.drain()

    run_loop(main())
    result = {"first": first - launched, "span": last - first, "count": count, "cpu": cpu}
    Path(out).write_text(json.dumps({**result, "latencies_ns": latencies, "sent_ns": sent}))


def spawn_worker(url: str, n: int, mode: str, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.postgres_bench", "--worker", url, str(n), mode,
         str(out)],
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip


def _wait_ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"ready"):
        raise RuntimeError("worker did not start")


# --- surge scenarios ----------------------------------------------------------------
async def _declared(url: str) -> None:
    """The worker's group exists before anything is published (nothing dropped)."""
    t = PostgresTransport(url)
    await t.start()
    await t.declare(GROUP, [Tick.__topic__])
    await t.close()


async def surge_throughput(base: str, n: int, tmp: Path, rnd: int) -> dict[str, float]:
    url = f"{base}?schema=d{rnd}"
    await _declared(url)
    producer = surge.App("bench-producer", transport=url)
    events = [Tick() for _ in range(n)]
    async with producer:
        t0 = time.perf_counter()
        for ev in events:
            await producer.publish(ev)
        enqueue = time.perf_counter() - t0
        t0 = time.perf_counter()

        async def publisher(part: list[Tick]) -> None:
            for ev in part:
                await producer.publish(ev)

        await asyncio.gather(*(publisher(events[i::100]) for i in range(100)))
        enqueue_conc = time.perf_counter() - t0
    out = tmp / f"drain{rnd}.json"
    proc = spawn_worker(url, 2 * n, "throughput", out)
    await asyncio.to_thread(proc.wait)
    res = json.loads(out.read_text())
    return {
        "surge_enqueue_one_by_one_per_s": n / enqueue,
        "surge_enqueue_100_tasks_per_s": n / enqueue_conc,
        "surge_drain_per_s": (2 * n - 1) / res["span"],
        "surge_app_start_to_first_handler_s": res["first"],
    }


async def surge_keyed(base: str, n: int, tmp: Path, rnd: int) -> dict[str, float]:
    url = f"{base}?schema=k{rnd}"
    await _declared(url)
    producer = surge.App("bench-producer", transport=url)

    async def publisher(i: int) -> None:
        for j in range(i, n, 100):
            await producer.publish(Tick(), key=str(j % 1000))

    async with producer:
        await asyncio.gather(*(publisher(i) for i in range(100)))
    out = tmp / f"keyed{rnd}.json"
    proc = spawn_worker(url, n, "throughput", out)
    await asyncio.to_thread(proc.wait)
    res = json.loads(out.read_text())
    return {"surge_keyed_drain_per_s": (n - 1) / res["span"]}


async def surge_latency(base: str, tmp: Path, rnd: int) -> dict[str, float]:
    url = f"{base}?schema=l{rnd}"
    total = int(RATE * DURATION)
    out = tmp / f"lat{rnd}.json"
    await _declared(url)
    proc = spawn_worker(url, total + 1, "latency", out)
    await asyncio.to_thread(_wait_ready, proc)
    producer = surge.App("bench-producer", transport=url)
    commits: list[int] = []  # how long each publish waited for its commit
    committed: dict[int, int] = {}  # sent_ns -> when its publish returned
    async with producer:
        await producer.publish(Tick(sent_ns=time.time_ns()))  # warm-up
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.time_ns()
            await producer.publish(Tick(sent_ns=sent))
            done = time.time_ns()
            commits.append(done - sent)
            committed[sent] = done
    await asyncio.to_thread(proc.wait)
    res = json.loads(out.read_text())
    lat = sorted(res["latencies_ns"][1:])
    after = sorted(
        s + d - committed[s]
        for s, d in zip(res["sent_ns"], res["latencies_ns"], strict=True)
        if s in committed
    )
    commits.sort()
    return {
        "surge_latency_p50_us": lat[len(lat) // 2] / 1000,
        "surge_latency_p99_us": lat[int(len(lat) * 0.99)] / 1000,
        "surge_publish_commit_p50_us": commits[len(commits) // 2] / 1000,
        "surge_publish_commit_p99_us": commits[int(len(commits) * 0.99)] / 1000,
        # the worker's side alone: from the publish's return (its commit) to
        # the handler's start (NOTIFY, wake-up, claim, dispatch)
        "surge_commit_to_handle_p50_us": after[len(after) // 2] / 1000,
        "surge_commit_to_handle_p99_us": after[int(len(after) * 0.99)] / 1000,
        "surge_worker_cpu_us_per_event": res["cpu"] / total * 1e6,
    }


# --- raw asyncpg ------------------------------------------------------------------------
_JOBS = """
DROP TABLE IF EXISTS raw_jobs;
CREATE TABLE raw_jobs (
    id bigserial PRIMARY KEY, payload bytea NOT NULL,
    visible_at float8 NOT NULL DEFAULT 0, token bigint
);
"""
_INSERT = "INSERT INTO raw_jobs (payload) SELECT unnest($1::bytea[])"
_CLAIM = (
    "UPDATE raw_jobs j SET visible_at = $1, token = $2 FROM (SELECT id FROM raw_jobs "
    "WHERE visible_at <= $3 ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED) c "
    "WHERE j.id = c.id RETURNING j.id, j.payload"
)
_ACK = "DELETE FROM raw_jobs WHERE id = ANY($1::bigint[]) AND token = $2"
_TAKE = (
    "DELETE FROM raw_jobs WHERE id IN (SELECT id FROM raw_jobs ORDER BY id LIMIT 100 "
    "FOR UPDATE SKIP LOCKED) RETURNING id, payload"
)


async def _fill(conn: asyncpg.Connection, n: int) -> float:
    await conn.execute(_JOBS)
    payload = [b"x" * 100] * 100
    t0 = time.perf_counter()
    for _ in range(0, n, 100):
        async with conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = on")  # as a publish
            await conn.execute(_INSERT, payload)
    return time.perf_counter() - t0


async def raw(dsn: str, n: int) -> dict[str, float]:
    # the consumer's commits need not wait for the disk (as surge's claims
    # and acks do not): a lost ack only means a duplicate
    conn = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "off"})
    try:
        produce = await _fill(conn, n)
        got = 0
        token = 0
        t0 = time.perf_counter()
        while got < n:
            token += 1
            now = time.time()
            rows = await conn.fetch(_CLAIM, now + 30, token, now)
            await conn.execute(_ACK, [r[0] for r in rows], token)
            got += len(rows)
        drain = time.perf_counter() - t0
        await _fill(conn, n)
        got = 0
        t0 = time.perf_counter()
        while got < n:
            got += len(await conn.fetch(_TAKE))
        drain_one = time.perf_counter() - t0
        await conn.execute("DROP TABLE raw_jobs")
    finally:
        await conn.close()
    return {
        "raw_insert_batch100_per_s": n / produce,
        "raw_skip_locked_drain_per_s": n / drain,
        "raw_skip_locked_delete_returning_per_s": n / drain_one,
    }


async def raw_notify(dsn: str) -> dict[str, float]:
    """pg_notify at 500/s, send to the LISTENing connection's callback."""
    sender = await asyncpg.connect(dsn)
    listener = await asyncpg.connect(dsn)
    total = int(RATE * DURATION)
    lat: list[float] = []
    done = asyncio.Event()

    def got(_c: Any, _pid: int, _ch: str, payload: str) -> None:
        lat.append((time.perf_counter() - float(payload)) * 1e6)
        if len(lat) >= total:
            done.set()

    await listener.add_listener("bench", got)
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await sender.execute("SELECT pg_notify('bench', $1)", repr(time.perf_counter()))
    await asyncio.wait_for(done.wait(), 30)
    await sender.close()
    await listener.close()
    lat.sort()
    return {
        "raw_notify_p50_us": lat[len(lat) // 2],
        "raw_notify_p99_us": lat[int(len(lat) * 0.99)],
    }


async def raw_queue_latency(dsn: str) -> dict[str, float]:
    """The least a durable queue's publish-to-handle can cost: at 500/s, an
    INSERT and a pg_notify in one statement (one durable commit); the
    LISTENing connection's callback wakes a consumer that claims the row
    with ``FOR UPDATE SKIP LOCKED`` on a connection of its own (as a worker
    sharing the queue must), records the latency, then deletes it (ack)."""
    setup = await asyncpg.connect(dsn)
    await setup.execute(_JOBS)
    await setup.close()
    sender = await asyncpg.connect(dsn)
    listener = await asyncpg.connect(dsn)
    fast = {"synchronous_commit": "off"}
    worker = await asyncpg.connect(dsn, server_settings=fast)
    acker = await asyncpg.connect(dsn, server_settings=fast)
    acks: list[tuple[list[int], int]] = []
    acked = asyncio.Event()
    total = int(RATE * DURATION)
    lat: list[float] = []
    done = asyncio.Event()
    wake = asyncio.Event()
    await listener.add_listener("rawq", lambda *_: wake.set())

    async def consume() -> None:
        token = 0
        while len(lat) < total:
            await wake.wait()
            wake.clear()
            token += 1
            now = time.time()
            rows = await worker.fetch(_CLAIM, now + 30, token, now)
            t = time.perf_counter()
            lat.extend((t - float(r[1])) * 1e6 for r in rows)
            if rows:
                acks.append(([r[0] for r in rows], token))
                acked.set()
            if len(rows) == 100:
                wake.set()  # a full batch may leave more
        done.set()

    async def ack() -> None:  # beside the consumer, on a connection of its own
        while True:
            await acked.wait()
            acked.clear()
            while acks:
                ids, tok = acks.pop()
                await acker.execute(_ACK, ids, tok)

    consumer = asyncio.create_task(consume())
    acking = asyncio.create_task(ack())
    send = "WITH i AS (INSERT INTO raw_jobs (payload) VALUES ($1)) SELECT pg_notify('rawq', '')"
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await sender.execute(send, repr(time.perf_counter()).encode())
    await asyncio.wait_for(done.wait(), 30)
    await consumer
    acking.cancel()
    await asyncio.gather(acking, return_exceptions=True)
    for conn in (sender, listener, worker, acker):
        await conn.close()
    lat.sort()
    return {
        "raw_queue_latency_p50_us": lat[len(lat) // 2],
        "raw_queue_latency_p99_us": lat[int(len(lat) * 0.99)],
    }


async def peers(python: str, dsn: str, n: int) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        python, "-m", "benchmarks.postgres_peers", dsn, str(n),
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"postgres_peers failed ({proc.returncode})")
    figures: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return figures


SCENARIOS = ("raw", "drain", "keyed", "latency", "peers")


async def run(
    n: int, rounds: int, fsync: bool, python: str | None, only: tuple[str, ...] = SCENARIOS
) -> dict[str, Any]:
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="surge-pg-bench-")), fsync=fsync)
    server.init()
    server.start()
    base = server.dsn()
    rows: list[dict[str, float]] = []
    tmp = server.root
    try:
        for rnd in range(rounds):
            row: dict[str, float] = {"load_1min": os.getloadavg()[0]}
            if "raw" in only:
                row.update(await raw(base, n))
            if "latency" in only:
                row.update(await raw_notify(base))
                row.update(await raw_queue_latency(base))
                row.update(await surge_latency(base, tmp, rnd))
            if "drain" in only:
                row.update(await surge_throughput(base, n, tmp, rnd))
            if "keyed" in only:
                row.update(await surge_keyed(base, n, tmp, rnd))
            if python is not None and "peers" in only:
                row.update(await peers(python, base, n))
            row["load_1min_after"] = os.getloadavg()[0]
            rows.append(row)
            print(f"round {rnd + 1}: " + json.dumps({k: round(v, 3) for k, v in row.items()}))
    finally:
        server.stop("immediate")
        import shutil

        shutil.rmtree(server.root, ignore_errors=True)
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    if "surge_drain_per_s" in medians and "raw_skip_locked_drain_per_s" in medians:
        medians["surge_drain_vs_raw_skip_locked"] = (
            medians["surge_drain_per_s"] / medians["raw_skip_locked_drain_per_s"]
        )
    if "surge_latency_p99_us" in medians:
        medians["surge_p99_vs_raw_notify_p99"] = (
            medians["surge_latency_p99_us"] / medians["raw_notify_p99_us"]
        )
    if "pgqueuer_drain_per_s" in medians and "surge_drain_per_s" in medians:
        best = max(medians["pgqueuer_drain_per_s"], medians["procrastinate_drain_per_s"])
        medians["surge_drain_vs_best_peer"] = medians["surge_drain_per_s"] / best
    return {"events": n, "rounds": rounds, "fsync": fsync, "medians": medians, "rows": rows}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        url, n, mode, out = sys.argv[2:6]
        worker(url, int(n), mode, out)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fsync", choices=("on", "off"), default="on")
    parser.add_argument("--peers", metavar="PYTHON", help="a Python with pgqueuer, procrastinate")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run (default all: {','.join(SCENARIOS)})",
    )
    args = parser.parse_args()
    only = tuple(args.only.split(","))
    if unknown := set(only) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    result = asyncio.run(run(args.events, args.rounds, args.fsync == "on", args.peers, only))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "postgres.json").write_text(json.dumps(result, indent=2))
    for k, v in result["medians"].items():
        print(f"{k:45s} {v:12,.2f}")
    print(f"(median of {args.rounds} rounds, {args.events} events, fsync={args.fsync}; python "
          f"{sys.version.split()[0]}, pid {os.getpid()})")  # fmt: skip


if __name__ == "__main__":
    main()
