"""How close in-process dispatch is to the floor its API allows.

Usage: ``python -m benchmarks.inproc_floor [--events N] [--rounds R] [--cpu C]
[--loops asyncio,uvloop]``

Three runs of N events each, interleaved in one process pinned to one CPU,
in CPU time, as ``benchmarks.inproc`` streams them (a producer awaiting
each publish, a consumer task):

``queue``   ``await q.put(ev)`` into ``asyncio.Queue(maxsize=1024)``, a task
            getting each and awaiting a no-op handler: the baseline;
``floor``   the objects surge's API needs and nothing else: a coroutine with
            ``App.publish``'s signature returning a fresh event id (surge's
            own id blocks), an ``Envelope`` with the wall-clock time, a
            ``Delivery`` in a bounded deque (memory://'s default
            capacity), a consumer taking batches of up to 256 (the default
            prefetch), awaiting the handler and keeping an ack list;
``surge``   ``await app.publish(ev)`` on memory:// and ``app.drain()``.

It prints queue/floor and queue/surge, median and range over the rounds:
the first is the most the API's objects allow (issue 17's bar is 0.8 for
queue/surge), and the difference between the two is what surge's
dispatch machinery costs beyond them (the consume iterator, the runner's
intake, workers and ack loop, the transport's accounting).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import surge
from surge._event import Envelope, refill_ids
from surge._event import ids as _ids
from surge._transport import Delivery
from surge.transports import MemoryTransport

from .inproc import Tick, _noop, _queue_once

# memory://'s default capacity, which surge runs with here
_CAPACITY: int = inspect.signature(MemoryTransport).parameters["capacity"].default


class _Floor:
    """A publish and a consumer with surge's objects and no other work."""

    def __init__(self, capacity: int = _CAPACITY, prefetch: int = 256) -> None:
        self.queue: deque[Delivery] = deque()
        self.capacity = capacity
        self.prefetch = prefetch
        self.readable: asyncio.Future[None] | None = None
        self.room: asyncio.Future[None] | None = None
        self.puts: dict[type, tuple[str, Callable[[Envelope], bool]]] = {Tick: ("Tick", self.put)}
        self.wall = time.time

    def put(self, env: Envelope) -> bool:
        queue = self.queue
        if len(queue) >= self.capacity:
            return False
        queue.append(Delivery(env, "g"))
        readable = self.readable
        if readable is not None:
            self.readable = None
            readable.set_result(None)
        return True

    async def publish(
        self,
        event: surge.Event,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        delay: float | None = None,
        at: float | None = None,
        connection: Any = None,
        id: str | None = None,
        mandatory: bool | None = None,
    ) -> str:
        put = self.puts.get(type(event))
        if put is None or delay is not None or at is not None or id is not None:
            raise NotImplementedError
        env_id = _ids.pop() if _ids else refill_ids()
        env = Envelope(env_id, put[0], key, self.wall(), headers, event)
        while not put[1](env):
            self.room = asyncio.get_running_loop().create_future()
            await self.room
        return env_id

    async def consume(self, n: int) -> int:
        queue = self.queue
        popleft = queue.popleft
        loop = asyncio.get_running_loop()
        done = 0
        while done < n:
            if not queue:
                self.readable = loop.create_future()
                await self.readable
                continue
            if len(queue) <= self.prefetch:
                batch = list(queue)
                queue.clear()
            else:
                batch = [popleft() for _ in range(self.prefetch)]
            room = self.room
            if room is not None:
                self.room = None
                room.set_result(None)
            acks = []
            for d in batch:
                await _noop(d.envelope.event)
                acks.append(d)
            done += len(acks)
        return done


async def _floor(events: list[Tick]) -> float:
    floor = _Floor()
    consumer = asyncio.get_running_loop().create_task(floor.consume(len(events)))
    publish = floor.publish
    t0 = time.process_time()
    for ev in events:
        await publish(ev)
    if await consumer != len(events):
        raise RuntimeError("the floor's consumer lost events")
    return time.process_time() - t0


async def _queue(events: list[Tick]) -> float:
    return (await _queue_once(events))[1]  # benchmarks.inproc's baseline, in CPU time


async def _surge(events: list[Tick]) -> float:
    app = surge.App("bench")
    handled = 0

    @app.on(Tick)
    async def handle(ev: Tick) -> None:
        nonlocal handled
        handled += 1

    async with app:
        for ev in events[:2000]:  # warm, as benchmarks.inproc does
            await app.publish(ev)
        await app.drain()
        gc.collect()
        publish = app.publish
        t0 = time.process_time()
        for ev in events:
            await publish(ev)
        await app.drain()
        seconds = time.process_time() - t0
    if handled != len(events) + 2000:
        raise RuntimeError(f"surge handled {handled} of {len(events) + 2000}")
    return seconds


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    parser.add_argument("--loops", default="asyncio,uvloop")
    args = parser.parse_args(argv)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    events = [Tick(n=i) for i in range(args.events)]
    load = os.getloadavg()[0]
    print(f"{args.events:,} events, {args.rounds} interleaved rounds, CPU time; load {load:.2f}")
    for name in args.loops.split(","):
        floor: list[float] = []
        ours: list[float] = []
        for _ in range(args.rounds):
            loop = _loop_factory(name)()
            try:
                gc.collect()
                s = loop.run_until_complete(_surge(events))
                gc.collect()
                f = loop.run_until_complete(_floor(events))
                gc.collect()
                q = loop.run_until_complete(_queue(events))
            finally:
                loop.close()
            floor.append(q / f)
            ours.append(q / s)
        for label, values in (("queue/floor", floor), ("queue/surge", ours)):
            print(
                f"{name:8} {label:12} median {statistics.median(values):.2f} "
                f"(rounds {min(values):.2f}-{max(values):.2f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
