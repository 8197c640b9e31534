"""Many handlers in flight at once: resident memory per in-flight handler.

Usage: ``python -m benchmarks.scale [--handlers N] [--repeat R]``

``surge``  an ``App(concurrency=N)`` with one async handler; N events are
           published with ``await app.publish``; each handler awaits one
           shared future that is released only after all N have started.
``tasks``  the baseline: ``loop.create_task(handler(ev))`` per event, the same
           handler, the same gate.

Each (system, loop) runs in a fresh subprocess, so one measurement's heap
does not carry over to the next; rounds are interleaved. The events are
built before the first reading. RSS comes from ``VmRSS`` in
``/proc/self/status``: once before the first handler starts (after an
untimed warm-up through the same code path) and once when all N are in
flight; KiB per in-flight handler is the difference over N.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import surge

from .inproc import RESULTS, Tick, loop_factories, machine_info, pin_cpu

__all__ = ("main",)

WARMUP = 1_000
SYSTEMS = ("surge", "tasks")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class _Gate:
    """Counts handler starts and holds every handler until released."""

    def __init__(self, expect: int) -> None:
        self.reset(expect)

    def reset(self, expect: int) -> None:
        loop = asyncio.get_running_loop()
        self.expect = expect
        self.started = 0
        self.finished = 0
        self.all_started: asyncio.Future[None] = loop.create_future()
        self.release: asyncio.Future[None] = loop.create_future()

    async def handler(self, ev: Tick) -> None:
        self.started += 1
        if self.started == self.expect:
            self.all_started.set_result(None)
        await self.release
        self.finished += 1


async def _surge(events: Sequence[Tick], warm: Sequence[Tick]) -> dict[str, Any]:
    n = len(events)
    app = surge.App("scale", concurrency=n)
    gate = _Gate(len(warm))
    # The bound method itself is the handler: the same one coroutine per
    # event as the baseline's, no wrapper frame.
    app.on(Tick)(gate.handler)

    async with app:
        gate.release.set_result(None)
        for ev in warm:
            await app.publish(ev)
        await app.drain()
        gate.reset(n)
        gc.collect()
        rss0 = _status_kib("VmRSS")
        t0 = time.perf_counter()
        for ev in events:
            await app.publish(ev)
        await gate.all_started
        t_started = time.perf_counter() - t0
        rss1 = _status_kib("VmRSS")
        in_flight = sum(s.in_flight for s in app.statistics().subscriptions.values())
        gate.release.set_result(None)
        await app.drain()
        wall = time.perf_counter() - t0
    if gate.finished != n:
        raise RuntimeError(f"{gate.finished} of {n} handlers finished")
    return {
        "rss_before_kib": rss0,
        "rss_all_in_flight_kib": rss1,
        "seconds_to_all_started": t_started,
        "seconds_total": wall,
        "app_in_flight": in_flight,  # surge's own count, a cross-check
    }


async def _tasks(events: Sequence[Tick], warm: Sequence[Tick]) -> dict[str, Any]:
    n = len(events)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def spawn_all(gate: _Gate, evs: Sequence[Tick]) -> None:
        handler = gate.handler
        create = loop.create_task
        for ev in evs:
            t = create(handler(ev))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    warm_gate = _Gate(len(warm))
    warm_gate.release.set_result(None)
    await spawn_all(warm_gate, warm)
    await asyncio.gather(*tasks)
    gate = _Gate(n)
    gc.collect()
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    await spawn_all(gate, events)
    await gate.all_started
    t_started = time.perf_counter() - t0
    rss1 = _status_kib("VmRSS")
    gate.release.set_result(None)
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    if gate.finished != n:
        raise RuntimeError(f"{gate.finished} of {n} handlers finished")
    return {
        "rss_before_kib": rss0,
        "rss_all_in_flight_kib": rss1,
        "seconds_to_all_started": t_started,
        "seconds_total": wall,
    }


def one(system: str, loop_name: str, n: int, cpu: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    pin_cpu(cpu)
    events = [Tick(n=i) for i in range(n)]
    warm = [Tick(n=i) for i in range(WARMUP)]
    gc.collect()
    gc.freeze()
    fn = _surge if system == "surge" else _tasks
    with asyncio.Runner(loop_factory=loop_factories()[loop_name]) as runner:
        rec = runner.run(fn(events, warm))
    rec.update(
        system=system,
        loop=loop_name,
        handlers=n,
        peak_rss_kib=_status_kib("VmHWM"),
        kib_per_in_flight=(rec["rss_all_in_flight_kib"] - rec["rss_before_kib"]) / n,
    )
    return rec


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--handlers", type=int, default=100_000, help="handlers in flight")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin to; -1 leaves affinity")
    parser.add_argument("--loops", default="asyncio,uvloop", help="comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--one", nargs=2, metavar=("SYSTEM", "LOOP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.handlers < 1 or args.repeat < 1:
        parser.error("--handlers and --repeat must be at least 1")
    available = loop_factories()
    loops = args.loops.split(",")
    for name in loops:
        if name not in available:
            parser.error(f"loop {name!r} is not available (have: {', '.join(available)})")

    if args.one:
        system, loop_name = args.one
        print(json.dumps(one(system, loop_name, args.handlers, args.cpu)), flush=True)
        return 0

    cells = [(s, lp) for lp in loops for s in SYSTEMS]
    runs: dict[str, list[dict[str, Any]]] = {f"{s}/{lp}": [] for s, lp in cells}
    info = machine_info()
    for r in range(args.repeat):
        shift = r % len(cells)
        for s, lp in cells[shift:] + cells[:shift]:
            cmd = [sys.executable, "-m", "benchmarks.scale", "--one", s, lp]
            cmd += ["--handlers", str(args.handlers), "--cpu", str(args.cpu)]
            proc = subprocess.run(
                cmd, check=True, capture_output=True, text=True, timeout=300, cwd=Path.cwd()
            )
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[f"{s}/{lp}"].append(rec)
            print(
                f"round {r + 1}/{args.repeat}  {s:6} {lp:8} "
                f"{rec['kib_per_in_flight']:.2f} KiB/handler, "
                f"all started in {rec['seconds_to_all_started']:.2f}s",
                file=sys.stderr,
                flush=True,
            )
    summary = {
        cell: {
            "kib_per_in_flight": _summary([x["kib_per_in_flight"] for x in recs]),
            "peak_rss_mib": _summary([x["peak_rss_kib"] / 1024 for x in recs]),
            "seconds_to_all_started": _summary([x["seconds_to_all_started"] for x in recs]),
            "seconds_total": _summary([x["seconds_total"] for x in recs]),
        }
        for cell, recs in runs.items()
    }
    info["loadavg_end"] = machine_info()["loadavg"]
    record = {
        "benchmark": "scale",
        "command": " ".join(["python -m benchmarks.scale", *(argv or sys.argv[1:])]),
        "handlers": args.handlers,
        "repeat": args.repeat,
        "goal_kib_per_in_flight": 2.5,
        "machine": info,
        "summary": summary,
        "runs": runs,
    }
    out = args.out
    if out is None:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"scale-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.handlers:,} async handlers in flight, median of {args.repeat}")
    for col in ("system/loop", "KiB per in-flight", "min-max", "peak RSS MiB", "all started s"):
        t.add_column(col, justify="left" if col == "system/loop" else "right")
    for cell, sm in summary.items():
        k = sm["kib_per_in_flight"]
        t.add_row(
            cell,
            f"{k['median']:.2f}",
            f"{k['min']:.2f}-{k['max']:.2f}",
            f"{sm['peak_rss_mib']['median']:.0f}",
            f"{sm['seconds_to_all_started']['median']:.2f}",
        )
    Console(width=max(Console().width, 100)).print(t)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
