"""Clustered brokers beside single nodes, in one run: keyed drain and p99.

Usage: ``python -m benchmarks.clusters [--events N] [--rounds R] [--workers W]
[--rate R] [--seconds S] [--only redis|nats]``

Starts four brokers with tests/_servers.py, each on free loopback ports, no
persistence on Redis, file storage on NATS (as the tests run them):

``redis``           one redis-server
``redis-cluster``   a Redis Cluster of 3 masters with a replica each
                    (``redis-cli --cluster create``); the URL names one node
``nats``            one nats-server with JetStream
``nats-cluster``    3 nats-servers with routes and JetStream; the stream and
                    its buckets with ``replicas=3``

and measures on each, 100-byte-ish events and no-op handlers throughout:

``keyed enqueue``   N events, each with ``key=`` (1,000 keys), from 100
                    concurrent ``await app.publish``, no worker running
``keyed drain``     W worker processes (``App``, default options) started on
                    that backlog: first handler start to last, any worker
``p50 / p99``       W workers running, R events/s for S seconds (unkeyed),
                    ``time.time()`` before ``publish`` to handler start, in
                    another process (the first 100 events, a warm-up, dropped)

Each of ``--rounds`` rounds runs every broker once, in an order rotating
from round to round, so drift on a shared machine hits each alike. Printed:
the medians, the per-round figures, and the ratios cluster / single node of
the medians and of each round. Written to
``benchmarks/results/clusters-<UTC time>.json`` with the load average
before and after and the surge revision.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import surge
from surge.transports import open_transport

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
GROUP = "bench.noop"
KEYS = 1000
WARMUP = 100
BROKERS = ("redis", "redis-cluster", "nats", "nats-cluster")


class Tick(surge.Event):
    __topic__ = "bench.tick"
    sent: float = 0.0
    n: int = 0
    pad: bytes = b"x" * 64


# --- the brokers ---------------------------------------------------------------------
class Broker:
    """A running broker: ``url(name)`` is the URL of a fresh, empty prefix
    or stream; ``cpu()`` the CPU seconds its server processes used so far."""

    def __init__(self, base: str, nodes: Sequence[Any]) -> None:
        self.base = base
        self.nodes = nodes

    def url(self, name: str) -> str:
        return self.base + name

    def cpu(self) -> float:
        total = 0
        for node in self.nodes:
            fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in ticks
        return total / os.sysconf("SC_CLK_TCK")


@contextmanager
def brokers(root: Path, only: str | None) -> Iterator[dict[str, Broker]]:
    """Every broker running, by name."""
    sys.path.insert(0, str(ROOT))
    from tests import _servers

    urls: dict[str, Broker] = {}
    with ExitStack() as stack:
        if only in (None, "redis"):
            single = _servers.RedisServer(root / "redis")
            single.start()
            stack.callback(single.stop)
            cluster = _servers.RedisCluster(root / "redis-cluster")
            stack.callback(cluster.stop)
            cluster.start()
            urls["redis"] = Broker(f"{single.url}?prefix=", [single])
            urls["redis-cluster"] = Broker(f"{cluster.url}?prefix=", cluster.nodes)
        if only in (None, "nats"):
            nats = _servers.NatsServer(root / "nats")
            nats.start()
            stack.callback(nats.stop)
            ncluster = _servers.NatsCluster(root / "nats-cluster")
            stack.callback(ncluster.stop)
            ncluster.start()
            urls["nats"] = Broker(f"{nats.url}?stream=", [nats])
            urls["nats-cluster"] = Broker(f"{ncluster.url}?replicas=3&stream=", ncluster.nodes)
        yield urls


# --- the worker processes -------------------------------------------------------------
def worker(
    url: str,
    index: int,
    counts: Any,
    ready: Any,
    stop: Any,
    out: Any,
) -> None:
    """Handle Tick events with a no-op handler until ``stop`` is set; count
    them in ``counts[index]`` (its only writer); at the end put (index, first,
    last, count, latencies, CPU seconds from first to last) on ``out``."""
    app = surge.App("bench", transport=url)
    first = last = 0.0
    cpu_first = cpu_last = 0.0
    count = 0
    latencies: list[float] = []

    @app.on(Tick, name="noop")
    async def noop(ev: Tick) -> None:
        nonlocal first, last, count, cpu_first, cpu_last
        now = time.time()
        cpu_last = time.process_time()
        if ev.sent and ev.n >= WARMUP:
            latencies.append(now - ev.sent)
        if not count:
            first, cpu_first = now, cpu_last
        last = now
        count += 1
        counts[index] = count

    async def main() -> None:
        async with app:
            ready.set()
            await asyncio.to_thread(stop.wait)
            await app.drain()

    asyncio.run(main())
    out.put((index, first, last, count, latencies, cpu_last - cpu_first))


class Workers:
    """``n`` worker processes on ``url``; ``wait_for(total)`` returns once
    they handled that many between them."""

    def __init__(self, url: str, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.counts = ctx.Array("q", n, lock=False)
        self.stop = ctx.Event()
        self.out: Any = ctx.Queue()
        self.ready = [ctx.Event() for _ in range(n)]
        self.procs = [
            ctx.Process(
                target=worker,
                args=(url, i, self.counts, self.ready[i], self.stop, self.out),
                daemon=True,
            )
            for i in range(n)
        ]

    async def start(self) -> None:
        for p in self.procs:
            p.start()
        for ev in self.ready:
            if not await asyncio.to_thread(ev.wait, 120):
                raise RuntimeError("a worker did not start in 120 s")

    async def wait_for(self, total: int, timeout: float = 300) -> list[tuple[Any, ...]]:
        """Block until the workers handled ``total`` events; stop them; their
        reports. Polls the shared counters every 5 ms: the figures are the
        workers' own timestamps, so the poll only decides when to stop."""
        deadline = time.monotonic() + timeout
        while sum(self.counts) < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"handled {sum(self.counts)} of {total} in {timeout} s")
            await asyncio.sleep(0.005)
        self.stop.set()
        reports = [await asyncio.to_thread(self.out.get, True, 60) for _ in self.procs]
        for p in self.procs:
            await asyncio.to_thread(p.join, 60)
        return reports


# --- the scenarios -------------------------------------------------------------------
async def declare(url: str) -> None:
    """The workers' group, made before anything is published to it."""
    t = open_transport(url)
    await t.start()
    try:
        await t.declare(GROUP, [Tick.__topic__])
    finally:
        await t.close()


async def keyed(broker: Broker, url: str, n: int, workers: int) -> dict[str, float]:
    await declare(url)
    producer = surge.App("bench-producer", transport=url)
    events = [Tick() for _ in range(n)]

    async def publisher(i: int) -> None:
        for j in range(i, n, 100):
            await producer.publish(events[j], key=str(j % KEYS))

    async with producer:
        t0 = time.perf_counter()
        await asyncio.gather(*(publisher(i) for i in range(100)))
        enqueue = time.perf_counter() - t0
    pool = Workers(url, workers)
    await pool.start()
    server_cpu = broker.cpu()
    reports = await pool.wait_for(n)
    server_cpu = broker.cpu() - server_cpu
    first = min(r[1] for r in reports if r[3])
    last = max(r[2] for r in reports)
    span = last - first
    return {
        "keyed_enqueue_per_s": n / enqueue,
        "keyed_drain_per_s": (n - 1) / span,
        # where the drain's time goes: the share of one core each side used
        "drain_worker_cpu": sum(r[5] for r in reports) / span,
        "drain_server_cpu": server_cpu / span,
    }


async def latency(url: str, workers: int, rate: int, seconds: float) -> dict[str, float]:
    await declare(url)
    pool = Workers(url, workers)
    await pool.start()
    total = WARMUP + int(rate * seconds)
    producer = surge.App("bench-producer", transport=url)
    async with producer:
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.publish(Tick(sent=time.time(), n=i))
    reports = await pool.wait_for(total)
    kept = sorted(lat for r in reports for lat in r[4])
    return {
        "p50_ms": kept[len(kept) // 2] * 1e3,
        "p99_ms": kept[int(len(kept) * 0.99)] * 1e3,
    }


async def one(broker: Broker, rnd: int, args: argparse.Namespace) -> dict[str, float]:
    row: dict[str, float] = {}
    row.update(await keyed(broker, broker.url(f"k{rnd}"), args.events, args.workers))
    row.update(await latency(broker.url(f"l{rnd}"), args.workers, args.rate, args.seconds))
    return row


# --- the run -------------------------------------------------------------------------
def revision() -> str:
    def git(*a: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=False
        ).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD")
    return rev + ("+dirty" if git("status", "--porcelain", "src") else "")


async def run(args: argparse.Namespace, urls: dict[str, Broker]) -> dict[str, Any]:
    names = [b for b in BROKERS if b in urls]
    rows: list[dict[str, dict[str, float]]] = []
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        row: dict[str, dict[str, float]] = {}
        for broker in order:
            row[broker] = await one(urls[broker], rnd, args)
            print(
                f"round {rnd + 1} {broker:13s} "
                + json.dumps({k: round(v, 2) for k, v in row[broker].items()}),
                flush=True,
            )
        rows.append(row)
    medians = {b: {k: statistics.median(r[b][k] for r in rows) for k in rows[0][b]} for b in names}
    ratios: dict[str, dict[str, Any]] = {}
    for single in ("redis", "nats"):
        cluster = f"{single}-cluster"
        if single not in medians:
            continue
        ratios[cluster] = {
            k: {
                "of_medians": medians[cluster][k] / medians[single][k],
                "per_round": [r[cluster][k] / r[single][k] for r in rows],
            }
            for k in medians[single]
        }
    return {"medians": medians, "ratios": ratios, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", choices=("redis", "nats"))
    args = parser.parse_args()
    meta: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "surge": revision(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "args": vars(args),
    }
    root = Path(tempfile.mkdtemp(prefix="surge-clusters-bench-"))
    try:
        with brokers(root, args.only) as urls:
            result = asyncio.run(run(args, urls))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    meta["load_after"] = os.getloadavg()
    result = {"meta": meta, **result}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"clusters-{time.strftime('%Y%m%dT%H%MZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nmedians of {args.rounds} rounds, {args.events} keyed events, {args.workers} worker(s)"
    )
    for broker, figures in result["medians"].items():
        print(f"{broker:14s} " + "  ".join(f"{k} {v:,.2f}" for k, v in figures.items()))
    for cluster, figures in result["ratios"].items():
        print(f"{cluster} / single:")
        for k, v in figures.items():
            rounds = ", ".join(f"{x:.2f}" for x in v["per_round"])
            print(f"  {k:22s} {v['of_medians']:.2f}x  (rounds {rounds})")
    print(f"load average {meta['load_before']} -> {meta['load_after']}; {path}")


if __name__ == "__main__":
    main()
