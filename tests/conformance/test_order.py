"""Per-key order across consumers: the promise that lets a keyed
subscription scale out to several worker processes.

Several Apps (each its own transport, as separate processes would have)
consume one keyed subscription. Every handler checks that no other consumer
is handling its key at the same moment and that the events of its key
arrive in publish order, while consumers join and leave under load.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

import surge

from ._helpers import balanced
from .conftest import Case, Factory

GROUP = "conf.step"


class Step(surge.Event):
    __topic__ = "conf.step"
    key: str
    seq: int


async def test_key_order_across_consumers(
    transport_factory: Factory, case: Case, clock: surge.Clock
) -> None:
    if not case.partitioned:
        pytest.skip(f"{case.id} has one consumer process: order across consumers is n/a")
    keys = [f"k{i}" for i in range(16)]
    per_round = 20  # events per key in each of three rounds
    total = 3 * per_round * len(keys)
    running: set[str] = set()
    last: dict[str, int] = {}
    problems: list[str] = []
    by_app: Counter[str] = Counter()
    handled = 0
    reached: dict[int, asyncio.Event] = {
        per_round * len(keys): asyncio.Event(),
        total: asyncio.Event(),
    }

    def make(name: str) -> surge.App:
        app = surge.App(
            "conf",
            transport=transport_factory.open(**case.order_options),
            clock=clock,
            concurrency=8,
        )

        @app.on(Step, key="key")
        async def step(ev: Step) -> None:
            nonlocal handled
            if ev.key in running:
                problems.append(f"{name}: {ev.key} {ev.seq} while another ran")
            running.add(ev.key)
            if ev.seq != last.get(ev.key, -1) + 1:
                problems.append(f"{name}: {ev.key} {ev.seq} after {last.get(ev.key)}")
            last[ev.key] = ev.seq
            for _ in range(ev.seq % 3 + 1):
                await asyncio.sleep(0)  # a yield: lets another consumer interleave
            running.discard(ev.key)
            by_app[name] += 1
            handled += 1
            if handled in reached:
                reached[handled].set()

        return app

    async def publish_round(app: surge.App, r: int) -> None:
        for seq in range(r * per_round, (r + 1) * per_round):
            for k in keys:
                await app.publish(Step(key=k, seq=seq))  # key from the subscription

    a, b, c, d = make("a"), make("b"), make("c"), make("d")
    async with a, b:
        await c.start()
        try:
            await balanced([a.transport, b.transport, c.transport], GROUP)
            await publish_round(a, 0)
            async with asyncio.timeout(60):
                await reached[per_round * len(keys)].wait()
            spread = dict(by_app)
            # Consumers leave and join while events of every key are in flight.
            await publish_round(a, 1)
            await c.stop()
            await d.start()
            await publish_round(a, 2)
            async with asyncio.timeout(60):
                await reached[total].wait()
            await balanced([a.transport, b.transport, d.transport], GROUP)
        finally:
            await c.stop()
            await d.stop()
    assert problems == []
    assert handled == total
    assert last == {k: 3 * per_round - 1 for k in keys}
    assert set(spread) == {"a", "b", "c"}, spread  # every consumer had a share
