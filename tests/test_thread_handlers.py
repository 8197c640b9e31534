"""Thread handlers: ``concurrency`` counts the events in flight, outputs
being published included; the pool bounds only what runs in its threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

import surge
from surge.transports import MemoryTransport


class Job(surge.Event):
    n: int


class Done(surge.Event):
    n: int


class GatedOutputs(MemoryTransport):
    """Holds every publish of ``Done`` until ``gate`` opens; counts them."""

    def __init__(self, expect: int) -> None:
        super().__init__()
        self.expect = expect
        self.held = 0
        self.all_held = asyncio.Event()
        self.gate = asyncio.Event()

    async def publish(self, envelopes: Sequence[surge.Envelope]) -> None:
        if envelopes and envelopes[0].topic == Done.__topic__:
            self.held += 1
            if self.held == self.expect:
                self.all_held.set()
            await self.gate.wait()
        await super().publish(envelopes)


async def _in_flight_past_the_pool(key: str | None) -> None:
    transport = GatedOutputs(expect=8)
    app = surge.App("threads", transport=transport, threads=2)
    in_threads = 0
    most_in_threads = 0
    lock = threading.Lock()
    done: list[int] = []

    def work(ev: Job) -> Done:
        nonlocal in_threads, most_in_threads
        with lock:
            in_threads += 1
            most_in_threads = max(most_in_threads, in_threads)
        try:
            return Done(n=ev.n)
        finally:
            with lock:
                in_threads -= 1

    @app.on(Done)
    async def finish(ev: Done) -> None:
        done.append(ev.n)

    app.on(Job, concurrency=8, key=key)(work)
    async with app:
        for n in range(8):
            await app.publish(Job(n=n))
        # eight handlers returned and wait for their outputs' publish at
        # once, with two threads (before: concurrency was cut to the pool's
        # size, and two waited while six queued)
        await asyncio.wait_for(transport.all_held.wait(), 10)
        transport.gate.set()
        await app.drain()
    assert sorted(done) == list(range(8))
    assert most_in_threads <= 2


async def test_outputs_publishing_do_not_hold_the_pool() -> None:
    await _in_flight_past_the_pool(None)


async def test_keyed_lanes_are_the_concurrency_not_the_pool() -> None:
    # keys 0..7 (ints hash to themselves): eight lanes of eight
    await _in_flight_past_the_pool("n")


@pytest.mark.realtime  # a thread's own time: the virtual clock stands still for it
async def test_a_timeout_starts_when_the_thread_slot_is_taken() -> None:
    """One thread, two events, a 1 s timeout: the first call holds the
    thread 2.5 s (and times out), the second queues behind it that long and
    then takes no time: it succeeds, its timeout not spent queueing."""
    app = surge.App("threads-timeout", threads=1)
    lock = threading.Lock()
    calls: list[int] = []
    never = threading.Event()

    def slow_first(ev: Job) -> None:
        with lock:
            calls.append(ev.n)
            first = len(calls) == 1
        if first:
            never.wait(2.5)  # the handler's own work, 2.5 s of it

    app.on(Job, concurrency=2, timeout=1.0, retry=surge.Retry(attempts=1))(slow_first)
    async with app:
        for n in range(2):
            await app.publish(Job(n=n))
        await app.drain()
        stats = app.statistics().subscriptions["threads-timeout.slow_first"]
    assert sorted(calls) == [0, 1]
    assert (stats.failed, stats.succeeded) == (1, 1)
