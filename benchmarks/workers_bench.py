"""Worker processes on sqlite://: CPU-bound scaling, throughput, latency, in one run.

Usage: ``python -m benchmarks.workers_bench [--repeat R] [--only cpu,rate,latency]``
(``--help`` for the sizes).

Three measurements, all through the real supervisor
(:class:`surge.cli._supervisor.Supervisor`) and worker processes:

``cpu``      a backlog of events whose handler runs a fixed pure-Python loop
             (``--spin-ms`` of CPU each) drained by 1 worker and by 2 workers
             (synchronous=NORMAL); events/s counted over the window in which
             every worker was handling, and the speedup of 2 over 1.
``rate``     no-op events published as fast as 64 concurrent ``await
             app.publish`` calls go, from this process, while the workers
             handle them: events/s from the first publish to the last
             handling, for synchronous FULL and NORMAL with 1 and 2 workers,
             NORMAL with every event keyed (1,000 keys: partitions, per-key
             order across workers), and memory:// (publisher and handler in
             this one process).
``latency``  no-op events published at a fixed ``--rate`` per second:
             publish-to-handle latency p50 / p99 (the handler compares the
             wall time carried in the event with its own), same cases.

The ``-poll`` cases run 1 worker with ``wakeups=false``: it learns of the
publisher's commits only by polling, as every worker did before the
wake-ups between processes (``surge/transports/sqlite/_wakeups.py``).

Each handler appends ``pid,published_at,handled_at`` to a records file, which
is what the figures are computed from. Rounds are interleaved (each round
runs every case once) so drift on a shared machine hits every case alike;
the median over rounds is reported. JSON goes to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import surge
from surge.cli._supervisor import Supervisor
from surge.transports import open_transport

__all__ = ("Job", "app", "main")

RESULTS = Path(__file__).parent / "results"
APP_REF = "benchmarks.workers_bench:app"  # by name: run as __main__, workers import it
GROUP = "bench.work"


class Job(surge.Event):
    """An event carrying its publish time and the CPU work its handler does."""

    __topic__ = "bench.job"

    t: float
    spin: int = 0


_RECORDS = os.environ.get("BENCH_RECORDS")
_fd: int | None = None


def spin(iterations: int) -> int:
    """Pure-Python CPU work of a fixed cost (holds the GIL throughout)."""
    x = 0
    for i in range(iterations):
        x = (x + i * i) % 1_000_003
    return x


def _record(ev: Job) -> None:
    global _fd
    if _RECORDS is None:
        return
    if _fd is None:
        _fd = os.open(_RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    line = f"{os.getpid()},{ev.t!r},{time.time()!r},{time.process_time()!r}\n"
    os.write(_fd, line.encode())


app = surge.App("bench", shutdown_timeout=5)


@app.on(Job, name="work", concurrency=int(os.environ.get("BENCH_CONCURRENCY", 64)), prefetch=64)
async def work(ev: Job) -> None:
    if ev.spin:
        spin(ev.spin)
    _record(ev)


def _count(path: Path) -> int:
    return len(_read(path)) if path.exists() else 0


def _read(path: Path) -> list[tuple[int, float, float, float]]:
    """(pid, published at, handled at, the handling process's CPU seconds)."""
    out = []
    for line in path.read_text().splitlines():
        pid, t, h, cpu = line.split(",")
        out.append((int(pid), float(t), float(h), float(cpu)))
    return out


async def _drain(url: str, path: Path, n: int, timeout: float = 120.0) -> None:
    """Wait until ``n`` events are recorded and the group holds nothing."""
    transport = open_transport(url)
    await transport.start()
    try:
        await transport.declare(GROUP, (Job.__topic__,))
        async with asyncio.timeout(timeout):
            while True:
                await transport.wait_idle()  # type: ignore[attr-defined]
                if _count(path) >= n:
                    return
                # idle but records short: a worker is between handling and ack
                await asyncio.sleep(0.01)
    finally:
        await transport.close()


async def _publish(
    url: str, events: Sequence[Job], *, concurrency: int = 64, keyed: bool = False
) -> None:
    producer = surge.App("bench-producer", transport=url)
    it = iter(enumerate(events))

    async def one() -> None:
        for i, ev in it:
            # keyed: 1,000 keys, each in its partition (per-key order across workers)
            await producer.publish(ev, key=str(i % 1000) if keyed else None)

    async with producer:
        await asyncio.gather(*(one() for _ in range(concurrency)))


async def _publish_at(url: str, n: int, rate: float) -> None:
    producer = surge.App("bench-producer", transport=url)
    async with producer:
        await _paced(producer, n, rate)


async def _paced(producer: surge.App, n: int, rate: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(n):
        ahead = start + i / rate - loop.time()
        if ahead > 0:
            await asyncio.sleep(ahead)
        # each publish stamps its own time; they overlap like independent clients
        tasks.append(asyncio.ensure_future(producer.publish(Job(t=time.time()))))
    await asyncio.gather(*tasks)


class _Workers:
    """A supervisor with ``n`` workers of :data:`app` on ``url``, records in ``path``."""

    def __init__(self, url: str, n: int, path: Path, concurrency: int = 64) -> None:
        env = dict(os.environ, BENCH_RECORDS=str(path), BENCH_CONCURRENCY=str(concurrency))
        self.sup = Supervisor(APP_REF, url, n, shutdown_timeout=5, env=env)
        self.task: asyncio.Task[int] | None = None

    async def __aenter__(self) -> _Workers:
        self.task = asyncio.get_running_loop().create_task(self.sup.run())
        await self.sup.wait_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sup.request_stop()
        assert self.task is not None
        await self.task


async def _declare(url: str) -> None:
    transport = open_transport(url)
    await transport.start()
    await transport.declare(GROUP, (Job.__topic__,))
    await transport.close()


# --- the measurements -----------------------------------------------------------
async def cpu_case(tmp: Path, workers: int, events: int, spin_iters: int) -> dict[str, Any]:
    """A backlog of CPU-bound events drained by ``workers`` processes."""
    url = f"sqlite:///{tmp / 'cpu.db'}?synchronous=normal"
    path = tmp / "cpu.txt"
    await _declare(url)
    await _publish(url, [Job(t=0.0, spin=spin_iters) for _ in range(events)])
    # concurrency 1: a CPU-bound handler blocks its loop anyway
    async with _Workers(url, workers, path, concurrency=1):
        await _drain(url, path, events)
    recs = _read(path)
    pids = {p for p, _, _, _ in recs}
    # the window in which every worker was handling (start-up skew excluded)
    lo = max(min(h for p, _, h, _ in recs if p == pid) for pid in pids)
    hi = min(max(h for p, _, h, _ in recs if p == pid) for pid in pids)
    inside = sum(1 for _, _, h, _ in recs if lo < h <= hi)
    # the share of a core each worker got in the window: below 1, other
    # processes on the machine took the rest
    shares = []
    for pid in pids:
        mine = [(h, c) for p, _, h, c in recs if p == pid and lo <= h <= hi]
        shares.append((mine[-1][1] - mine[0][1]) / (mine[-1][0] - mine[0][0]))
    return {
        "workers": workers,
        "events": events,
        "per_s": inside / (hi - lo),
        "pids": len(pids),
        "core_share": sorted(shares),
        "per_cpu_s": inside / (hi - lo) / sum(shares),
    }


async def rate_case(tmp: Path, name: str, url: str, workers: int, events: int) -> dict[str, Any]:
    """No-op events published at full speed while the workers handle them."""
    path = tmp / f"rate-{name}.txt"
    if url.startswith("memory"):
        local = _local_app(url, path)
        async with local:
            t0 = time.time()
            await _feed(local, events)
            await local.drain()
    else:
        async with _Workers(url, workers, path):
            t0 = time.time()
            jobs = [Job(t=time.time()) for _ in range(events)]
            await _publish(url, jobs, keyed="keyed" in name)
            await _drain(url, path, events)
    recs = _read(path)
    end = max(h for _, _, h, _ in recs)
    return {"case": name, "events": len(recs), "per_s": len(recs) / (end - t0)}


async def _feed(local: surge.App, events: int) -> None:
    it = iter(range(events))

    async def one() -> None:
        for _ in it:
            await local.publish(Job(t=time.time()))

    await asyncio.gather(*(one() for _ in range(64)))


def _local_app(url: str, path: Path) -> surge.App:
    """The same handler in this process, for memory://."""
    local = surge.App("bench", transport=url)

    @local.on(Job, name="work", concurrency=64)
    async def handle(ev: Job) -> None:
        line = f"{os.getpid()},{ev.t!r},{time.time()!r},{time.process_time()!r}\n"
        os.write(fd, line.encode())

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return local


async def latency_case(
    tmp: Path, name: str, url: str, workers: int, events: int, rate: float
) -> dict[str, Any]:
    """Publish-to-handle latency at a fixed publish rate."""
    path = tmp / f"lat-{name}.txt"
    if url.startswith("memory"):
        local = _local_app(url, path)
        async with local:
            await _paced(local, events, rate)
            await local.drain()
    else:
        async with _Workers(url, workers, path):
            await _publish_at(url, events, rate)
            await _drain(url, path, events)
    lat = sorted(h - t for _, t, h, _ in _read(path))
    return {
        "case": name,
        "events": len(lat),
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


def _calibrate(ms: float) -> int:
    """Iterations of :func:`spin` that take ``ms`` on an undisturbed core: the
    fastest of several trials, since other processes only ever add time."""
    n = 200_000
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        spin(n)
        best = min(best, time.perf_counter() - t)
    return max(1, int(ms / 1000 / (best / n)))


CASES = [
    ("memory", "memory://", 1),
    ("sqlite-full-1w", "sqlite:///{tmp}/{case}.db?synchronous=full", 1),
    ("sqlite-full-2w", "sqlite:///{tmp}/{case}.db?synchronous=full", 2),
    ("sqlite-normal-1w", "sqlite:///{tmp}/{case}.db?synchronous=normal", 1),
    ("sqlite-normal-2w", "sqlite:///{tmp}/{case}.db?synchronous=normal", 2),
    ("sqlite-normal-keyed-1w", "sqlite:///{tmp}/{case}.db?synchronous=normal", 1),
    ("sqlite-normal-keyed-2w", "sqlite:///{tmp}/{case}.db?synchronous=normal", 2),
    # the workers learn of the publisher's commits only by polling (before
    # the wake-ups between processes; sqlite/_wakeups.py)
    ("sqlite-full-1w-poll", "sqlite:///{tmp}/{case}.db?synchronous=full&wakeups=false", 1),
    ("sqlite-normal-1w-poll", "sqlite:///{tmp}/{case}.db?synchronous=normal&wakeups=false", 1),
]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    spin_iters = args.spin_iterations or _calibrate(args.spin_ms)
    out: dict[str, Any] = {"cpu": [], "rate": [], "latency": [], "spin_iterations": spin_iters}
    only = set(args.only.split(","))
    for r in range(args.repeat):
        for workers in ((1, 2) if r % 2 == 0 else (2, 1)) if "cpu" in only else ():
            with tempfile.TemporaryDirectory() as d:
                res = await cpu_case(Path(d), workers, args.cpu_events, spin_iters)
            shares = ", ".join(f"{x:.2f}" for x in res["core_share"])
            print(
                f"round {r} cpu {workers}w: {res['per_s']:.0f} events/s "
                f"(share of a core per worker: {shares})",
                flush=True,
            )
            out["cpu"].append(res)
        order = CASES if r % 2 == 0 else CASES[::-1]
        for name, url, workers in order if "rate" in only else ():
            with tempfile.TemporaryDirectory() as d:
                u = url.format(tmp=d, case=name)
                res = await rate_case(Path(d), name, u, workers, args.events)
            print(f"round {r} rate {name}: {res['per_s']:.0f} events/s", flush=True)
            out["rate"].append(res)
        for name, url, workers in order if "latency" in only else ():
            if "keyed" in name:
                continue
            with tempfile.TemporaryDirectory() as d:
                u = url.format(tmp=d, case=name)
                res = await latency_case(Path(d), name, u, workers, args.lat_events, args.rate)
            print(
                f"round {r} latency {name}: p50 {res['p50_ms']:.1f} ms p99 {res['p99_ms']:.1f} ms",
                flush=True,
            )
            out["latency"].append(res)
    return out


def _median(rows: list[dict[str, Any]], key: str, **match: Any) -> float:
    vals: list[float] = [r[key] for r in rows if all(r[k] == v for k, v in match.items())]
    return statistics.median(vals)


def _pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(1 worker, 2 workers) results of each round."""
    it = iter(rows)
    out = []
    for a, b in zip(it, it, strict=True):
        out.append((a, b) if a["workers"] == 1 else (b, a))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-events", type=int, default=3000)
    p.add_argument("--spin-ms", type=float, default=2.0, help="CPU per event in the cpu case")
    p.add_argument(
        "--spin-iterations", type=int, default=0, help="fixed loop size (default: calibrate)"
    )
    p.add_argument("--events", type=int, default=20_000, help="events per rate case")
    p.add_argument("--lat-events", type=int, default=1500, help="events per latency case")
    p.add_argument("--rate", type=float, default=500.0, help="publishes/s in latency cases")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", default="cpu,rate,latency", help="comma-separated measurements")
    args = p.parse_args(argv)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    out = asyncio.run(run(args))
    if out["cpu"]:
        one = _median(out["cpu"], "per_s", workers=1)
        two = _median(out["cpu"], "per_s", workers=2)
        # rounds run 1w and 2w back to back: their ratio is less hit by drift
        ratios = [b["per_s"] / a["per_s"] for a, b in _pairs(out["cpu"])]
        print(f"\ncpu-bound ({args.spin_ms} ms/event, sqlite normal), median of {args.repeat}:")
        print(f"  1 worker  {one:8.0f} events/s")
        print(f"  2 workers {two:8.0f} events/s   speedup {two / one:.2f}x")
        best = max(r["per_s"] for r in out["cpu"] if r["workers"] == 2) / max(
            r["per_s"] for r in out["cpu"] if r["workers"] == 1
        )
        print(
            f"  per-round speedups {', '.join(f'{x:.2f}' for x in ratios)} "
            f"(median {statistics.median(ratios):.2f}x), best against best {best:.2f}x"
        )
        # what 2 workers would do with 2 whole cores, at the efficiency
        # (events per CPU-second) they showed: a projection, not a measurement
        eff1 = _median(out["cpu"], "per_cpu_s", workers=1)
        eff2 = _median(out["cpu"], "per_cpu_s", workers=2)
        print(
            f"  events per CPU-second: 1 worker {eff1:.0f}, 2 workers {eff2:.0f} each; "
            f"with 2 idle cores 2 workers would do {2 * eff2 / eff1:.2f}x"
        )
        out["summary"] = {
            "projected_speedup": 2 * eff2 / eff1,
            "cpu_1w": one,
            "cpu_2w": two,
            "speedup": two / one,
            "rounds": ratios,
            "best_vs_best": best,
        }
    if out["rate"] and out["latency"]:
        print(f"\nno-op events, median of {args.repeat}:")
        head = f"  {'case':21} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
        print(f"{head}   (latency at {args.rate:g}/s)")
        for name, _, _ in CASES:
            rate = _median(out["rate"], "per_s", case=name)
            if not any(row["case"] == name for row in out["latency"]):
                print(f"  {name:21} {rate:9.0f} {'-':>8} {'-':>8}")  # keyed: rate only
                continue
            p50 = _median(out["latency"], "p50_ms", case=name)
            p99 = _median(out["latency"], "p99_ms", case=name)
            print(f"  {name:21} {rate:9.0f} {p50:8.1f} {p99:8.1f}")
    out["args"] = vars(args)
    out["machine"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    RESULTS.mkdir(exist_ok=True)
    dest = RESULTS / f"workers-{started:%Y%m%dT%H%M%SZ}.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"\nwritten to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
