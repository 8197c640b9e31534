"""The cost of metrics on the hot path: one run, metrics on against off.

Usage: ``python -m benchmarks.metrics_bench [--events N] [--repeat R] [--cpu C]``

Scenarios (memory transport, a no-op async handler, ``await app.publish`` per
event, timed until ``app.drain()`` returns):

``off``        no middleware (the runner's own counters only, always on)
``noop_mw``    one middleware whose hooks do nothing: the price of building
               a Context per delivery and calling hooks at all
``metrics``    ``surge.observe.instrument(app)``: counters, and duration and
               latency histograms of one attempt in 8 (the default sample)
``metrics_all`` ``instrument(app, sample=1)``: every attempt timed

Each measurement gets a fresh app and event loop with an untimed warm-up;
rounds are interleaved, rotating the order, and the medians are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from typing import Any

import surge
from surge.observe import instrument

from .inproc import RESULTS, machine_info, pin_cpu

__all__ = ("main",)


class Tick(surge.Event):
    n: int


def _app(kind: str) -> surge.App:
    middleware: list[surge.Middleware] = [surge.Middleware()] if kind == "noop_mw" else []
    app = surge.App("bench", middleware=middleware)
    if kind == "metrics":
        instrument(app)
    elif kind == "metrics_all":
        instrument(app, sample=1)

    @app.on(Tick, concurrency=64)
    async def handle(event: Tick) -> None:
        return None

    return app


async def _measure(kind: str, events: list[Tick], warm: list[Tick]) -> float:
    app = _app(kind)
    async with app:
        for ev in warm:
            await app.publish(ev)
        await app.drain()
        gc.collect()
        t0 = time.perf_counter()
        for ev in events:
            await app.publish(ev)
        await app.drain()
        elapsed = time.perf_counter() - t0
    assert app.statistics().subscriptions["bench.handle"].succeeded == len(warm) + len(events)
    return len(events) / elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--cpu", type=int, default=-1, help="pin to this CPU (-1: do not)")
    parser.add_argument("--save", action="store_true", help="write results/metrics-*.json")
    args = parser.parse_args(argv)
    cpus = pin_cpu(args.cpu)
    kinds = ["off", "noop_mw", "metrics", "metrics_all"]
    events = [Tick(n=i) for i in range(args.events)]
    warm = [Tick(n=i) for i in range(2_000)]
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.repeat):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
        for kind in order:
            rates[kind].append(asyncio.run(_measure(kind, events, warm)))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}
    # Each round measures every scenario back to back, so a round's ratio
    # shares the machine's load of the moment; the median of these ratios
    # is steadier than a ratio of medians on a shared machine.
    paired = {
        k: statistics.median(off / r for off, r in zip(rates["off"], v, strict=True))
        for k, v in rates.items()
    }
    report = {
        "machine": machine_info(),
        "cpus": cpus,
        "events": args.events,
        "repeat": args.repeat,
        "rates": rates,
        "median_events_per_s": medians,
        "best_events_per_s": best,
        "overhead_pct_paired_median": {k: round(100 * (p - 1), 1) for k, p in paired.items()},
        "overhead_pct_of_best": {k: round(100 * (best["off"] / b - 1), 1) for k, b in best.items()},
    }
    print(
        f"{'scenario':12} {'median ev/s':>12} {'best ev/s':>10} "
        f"{'time vs off (paired median)':>28} {'(best)':>8}"
    )
    for k in kinds:
        print(
            f"{k:12} {medians[k]:12,.0f} {best[k]:10,.0f} "
            f"{report['overhead_pct_paired_median'][k]:+27.1f}% "
            f"{report['overhead_pct_of_best'][k]:+7.1f}%"
        )
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        (RESULTS / f"metrics-{stamp}.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
