"""The shop's process stage alone: events/s and the loop process's CPU per event.

Usage: ``python -m benchmarks.process_stage [--events N] [--processes P]``

``N`` ``ReviewRequested`` orders to ``surge.examples.shop.score_fraud``
(``executor="process"``, ``concurrency=8``, as the shop subscribes it) on a
pool of ``P`` processes, from the first publish until ``drain()`` returns,
after a warm-up of 200 that starts the pool. The CPU figure is this
process's only (the pool's workers do the hashing), so it shows what a
round trip to the pool costs the event loop. To compare two copies of
surge, run it once per copy with ``PYTHONPATH=<copy>/src``, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import surge
from surge.examples import shop


async def measure(events: int, processes: int) -> tuple[float, float]:
    """(events per second, loop-process CPU seconds per event)."""
    app = surge.App("stage", processes=processes)
    app.on(shop.ReviewRequested, executor="process", concurrency=8)(shop.score_fraud)

    @app.on(shop.OrderScored, executor="inline")
    def scored(ev: shop.OrderScored) -> None:
        return None

    orders = [
        shop.ReviewRequested(
            order_id=f"o{i}", customer=f"c{i}", amount=900.0, warehouse=1, placed_at=0.0
        )
        for i in range(events + 200)
    ]
    async with app:
        for ev in orders[:200]:
            await app.publish(ev)
        await app.drain()
        t0, c0 = time.perf_counter(), time.process_time()
        for ev in orders[200:]:
            await app.publish(ev)
        await app.drain()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return events / wall, cpu / events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    rate, cpu = asyncio.run(measure(args.events, args.processes))
    print(f"{rate:,.0f} events/s, loop-process CPU {cpu * 1e6:.1f} us/event")


if __name__ == "__main__":
    main()
