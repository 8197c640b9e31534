"""surge over Redis Streams against raw redis-py, in one run, on one server.

Usage: ``python -m benchmarks.redis_bench [--events N] [--rounds R]``

The script starts its own redis-server (no persistence) on a free loopback
port and stops it at the end. It measures, the way ../shared/peers/
c4_frameworks.py measures the peer frameworks:

``surge enqueue``        ``await app.publish(ev)`` one by one, no worker running
``surge enqueue x100``   the same with 100 publishing tasks (group commit at work)
``surge drain``          one worker process (an App, async no-op handler, default
                         options) started on the full stream: first to last
                         handler start (startup excluded, reported apart)
``surge signed ...``     enqueue x100 and drain again with ``App(signing_keys=...)``
                         on both sides: signed at publish, verified at consume
``surge keyed drain``    the same with every event published with ``key=`` (1,000
                         keys): each goes to its partition stream (per-key order
                         across processes), the worker reads all 8
``surge latency``        worker running; 2,500 events at a fixed 500/s; latency is
                         ``time.time_ns()`` before ``publish`` to handler start
``raw XADD pipelined``   redis-py pipelines of 100 XADDs (100-byte payload)
``raw drain``            XREADGROUP COUNT 100 + one XACK per batch
``raw latency``          XADD at 500/s, a consumer task in XREADGROUP BLOCK

Each round runs every scenario once; the medians are printed and written to
benchmarks/results/redis.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aredis

import surge
from surge.transports.redis import RedisTransport

RESULTS = Path(__file__).parent / "results"
RATE, DURATION = 500, 5.0
GROUP = "bench.noop"
KEYS: dict[str, str | bytes] = {"k1": "bench-signing-key-0123456789abcdef"}


class Tick(surge.Event):
    __topic__ = "bench.tick"
    sent_ns: int = 0


# --- the server ----------------------------------------------------------------
def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("no redis-server binary: apt-get install redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp), "--logfile", ""],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if b"Ready to accept connections" in line:
            break
    else:
        sys.exit("redis-server did not start")
    return proc, f"redis://127.0.0.1:{port}/0"


# --- the worker process ----------------------------------------------------------
def worker(url: str, prefix: str, n: int, mode: str, out: str) -> None:
    """Handle ``n`` Tick events with a no-op handler; write timings to ``out``."""
    app = surge.App(
        "bench",
        transport=RedisTransport(url, prefix=prefix),
        signing_keys=KEYS if mode.endswith("-signed") else None,
    )
    first = last = 0.0
    count = 0
    latencies: list[int] = []
    done: asyncio.Event | None = None

    @app.on(Tick, name="noop")
    async def noop(ev: Tick) -> None:
        nonlocal first, last, count
        now = time.perf_counter()
        if mode == "latency":
            latencies.append(time.time_ns() - ev.sent_ns)
        if not count:
            first = now
        last = now
        count += 1
        if count >= n and done is not None:
            done.set()

    launched = 0.0

    async def main() -> None:
        nonlocal done, launched
        done = asyncio.Event()
        launched = time.perf_counter()
        async with app:
            print("ready", flush=True)
            await done.wait()
            await app.drain()

    surge._app.run_loop(main())
    result = {"first": first - launched, "span": last - first, "count": count}
    Path(out).write_text(json.dumps({**result, "latencies_ns": latencies}))


def spawn_worker(url: str, prefix: str, n: int, mode: str, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.redis_bench", "--worker", url, prefix, str(n), mode,
         str(out)],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
    )  # fmt: skip


def _wait_ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"ready"):
        raise RuntimeError("worker did not start")


# --- surge scenarios ----------------------------------------------------------------
async def _producer(url: str, prefix: str, *, signed: bool = False) -> surge.App:
    """A producer app, once the worker's group exists (so nothing is dropped)."""
    declare = RedisTransport(url, prefix=prefix)
    await declare.start()
    await declare.declare(GROUP, [Tick.__topic__])
    await declare.close()
    return surge.App(
        "bench-producer",
        transport=RedisTransport(url, prefix=prefix),
        signing_keys=KEYS if signed else None,
    )


async def surge_signed(url: str, n: int, tmp: Path, rnd: int) -> dict[str, float]:
    prefix = f"s{rnd}"
    producer = await _producer(url, prefix, signed=True)
    events = [Tick() for _ in range(n)]
    async with producer:
        t0 = time.perf_counter()

        async def publisher(part: list[Tick]) -> None:
            for ev in part:
                await producer.publish(ev)

        await asyncio.gather(*(publisher(events[i::100]) for i in range(100)))
        enqueue_conc = time.perf_counter() - t0
    out = tmp / f"signed{rnd}.json"
    proc = spawn_worker(url, prefix, n, "throughput-signed", out)
    await asyncio.to_thread(proc.wait)
    res = json.loads(out.read_text())
    return {
        "surge_signed_enqueue_100_tasks_per_s": n / enqueue_conc,
        "surge_signed_drain_per_s": (n - 1) / res["span"],
    }


async def surge_throughput(url: str, n: int, tmp: Path, rnd: int) -> dict[str, float]:
    prefix = f"b{rnd}"
    producer = await _producer(url, prefix)
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
    proc = spawn_worker(url, prefix, 2 * n, "throughput", out)
    await asyncio.to_thread(proc.wait)
    res = json.loads(out.read_text())
    return {
        "surge_enqueue_one_by_one_per_s": n / enqueue,
        "surge_enqueue_100_tasks_per_s": n / enqueue_conc,
        "surge_drain_per_s": (2 * n - 1) / res["span"],
        "surge_app_start_to_first_handler_s": res["first"],
    }


async def surge_keyed(url: str, n: int, tmp: Path, rnd: int) -> dict[str, float]:
    prefix = f"k{rnd}"
    producer = await _producer(url, prefix)

    async def publisher(i: int) -> None:
        for j in range(i, n, 100):
            await producer.publish(Tick(), key=str(j % 1000))

    async with producer:
        await asyncio.gather(*(publisher(i) for i in range(100)))
    out = tmp / f"keyed{rnd}.json"
    proc = spawn_worker(url, prefix, n, "throughput", out)
    await asyncio.to_thread(proc.wait)
    res = json.loads(out.read_text())
    return {"surge_keyed_drain_per_s": (n - 1) / res["span"]}


async def surge_latency(url: str, tmp: Path, rnd: int) -> dict[str, float]:
    prefix = f"l{rnd}"
    total = int(RATE * DURATION)
    out = tmp / f"lat{rnd}.json"
    declare = RedisTransport(url, prefix=prefix)
    await declare.start()
    await declare.declare(GROUP, [Tick.__topic__])
    await declare.close()
    proc = spawn_worker(url, prefix, total + 1, "latency", out)
    await asyncio.to_thread(_wait_ready, proc)
    producer = surge.App("bench-producer", transport=RedisTransport(url, prefix=prefix))
    async with producer:
        await producer.publish(Tick(sent_ns=time.time_ns()))  # warm-up
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.publish(Tick(sent_ns=time.time_ns()))
    await asyncio.to_thread(proc.wait)
    lat = sorted(json.loads(out.read_text())["latencies_ns"][1:])
    return {
        "surge_latency_p50_us": lat[len(lat) // 2] / 1000,
        "surge_latency_p99_us": lat[int(len(lat) * 0.99)] / 1000,
    }


# --- raw redis-py ---------------------------------------------------------------------
async def raw(url: str, n: int) -> dict[str, float]:
    r = aredis.Redis.from_url(url)
    stream = "raw:bench"
    payload = b"x" * 100
    await r.delete(stream)
    t0 = time.perf_counter()
    for _ in range(0, n, 100):
        pipe = r.pipeline(transaction=False)
        for _ in range(100):
            pipe.xadd(stream, {"d": payload})
        await pipe.execute()
    produce = time.perf_counter() - t0
    await r.xgroup_create(stream, "g", id="0")
    got = 0
    t0 = time.perf_counter()
    while got < n:
        resp: Any = await r.xreadgroup("g", "c1", {stream: ">"}, count=100)
        for _s, entries in resp:
            ids = [eid for eid, _f in entries]
            await r.xack(stream, "g", *ids)
            got += len(ids)
    drain = time.perf_counter() - t0
    await r.delete(stream)

    # latency at a fixed rate, consumer on its own connection
    await r.xgroup_create(stream, "g", id="$", mkstream=True)
    rc = aredis.Redis.from_url(url)
    total = int(RATE * DURATION)
    sent: dict[int, float] = {}
    lat: list[float] = []

    async def consumer() -> None:
        seen = 0
        while seen < total:
            resp: Any = await rc.xreadgroup("g", "c1", {stream: ">"}, count=100, block=1000)
            now = time.perf_counter()
            for _s, entries in resp or ():
                ids = []
                for eid, fields in entries:
                    lat.append((now - sent[int(fields[b"i"])]) * 1e6)
                    ids.append(eid)
                await rc.xack(stream, "g", *ids)
                seen += len(ids)

    task = asyncio.ensure_future(consumer())
    await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[i] = time.perf_counter()
        await r.xadd(stream, {"i": i, "d": payload})
    await asyncio.wait_for(task, 30)
    await r.delete(stream)
    await rc.aclose()
    await r.aclose()
    lat.sort()
    return {
        "raw_xadd_pipelined100_per_s": n / produce,
        "raw_xreadgroup100_xack_drain_per_s": n / drain,
        "raw_latency_p50_us": lat[len(lat) // 2],
        "raw_latency_p99_us": lat[int(len(lat) * 0.99)],
    }


async def run(n: int, rounds: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="surge-redis-bench-"))
    proc, url = start_server(tmp)
    rows: list[dict[str, float]] = []
    try:
        for rnd in range(rounds):
            row: dict[str, float] = {}
            row.update(await raw(url, n))
            row.update(await surge_throughput(url, n, tmp, rnd))
            row.update(await surge_signed(url, n, tmp, rnd))
            row.update(await surge_keyed(url, n, tmp, rnd))
            row.update(await surge_latency(url, tmp, rnd))
            rows.append(row)
            print(f"round {rnd + 1}: " + json.dumps({k: round(v, 3) for k, v in row.items()}))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    medians["surge_drain_vs_raw_drain"] = (
        medians["surge_drain_per_s"] / medians["raw_xreadgroup100_xack_drain_per_s"]
    )
    medians["surge_signed_drain_vs_surge_drain"] = (
        medians["surge_signed_drain_per_s"] / medians["surge_drain_per_s"]
    )
    medians["surge_signed_enqueue_vs_surge_enqueue"] = (
        medians["surge_signed_enqueue_100_tasks_per_s"] / medians["surge_enqueue_100_tasks_per_s"]
    )
    medians["surge_drain_vs_raw_xadd"] = (
        medians["surge_drain_per_s"] / medians["raw_xadd_pipelined100_per_s"]
    )
    return {"events": n, "rounds": rounds, "medians": medians, "rows": rows}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        url, prefix, n, mode, out = sys.argv[2:7]
        worker(url, prefix, int(n), mode, out)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args.events, args.rounds))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "redis.json").write_text(json.dumps(result, indent=2))
    for k, v in result["medians"].items():
        print(f"{k:45s} {v:12,.2f}")
    print(f"(median of {args.rounds} rounds, {args.events} events; python {sys.version.split()[0]},"
          f" pid {os.getpid()})")  # fmt: skip


if __name__ == "__main__":
    main()
