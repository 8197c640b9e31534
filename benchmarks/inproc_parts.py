"""Where an in-process event's time goes: surge's publish path step by step,
its dispatch, and the bare ``asyncio.Queue`` the inproc benchmark holds it to.

Usage: ``python -m benchmarks.inproc_parts [--events N] [--rounds R] [--cpu C]``

One process pinned to one CPU; each round times every part once, over the
same N pre-built events, in CPU time; the medians over R rounds are printed
as nanoseconds per event:

``queue.put``      ``await q.put(ev)`` on an unbounded ``asyncio.Queue``, nothing
                   consuming (``maxsize`` does not matter then)
``queue.get``      the N events taken back, ``await q.get()``
``handler``        ``await noop(ev)``: the no-op async handler both sides call

and, inside a running app on memory:// whose queue holds all N (nothing is
consumed while a publish step is timed; the backlog is drained after it,
untimed), ``App.publish``'s plain path rebuilt one step at a time:

``coroutine``      an empty coroutine with ``App.publish``'s signature
``+ lookup``       the per-type dict and the option checks
``+ id``           a new event id (a list pop, a block of 32 made every 32nd)
``+ envelope``     the ``Envelope`` with the wall-clock time
``+ put``          the transport's put (a ``Delivery``, a deque append)
``app.publish``    the real thing
``dispatch``       handling and acknowledging a backlog of N (``app.drain()``)

The steps read the app's private per-type dict and the id block (they copy
``App.publish``'s code as of issue 17); they break loudly if those change.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import surge
from surge._event import Envelope, refill_ids
from surge._event import ids as _ids
from surge.transports import MemoryTransport

from .inproc import Tick, pin_cpu

__all__ = ("main", "measure")

Step = Callable[[Tick], Awaitable[object]]


async def _noop(ev: Tick) -> None:
    return None


def _steps(app: surge.App) -> dict[str, Step]:
    """App.publish's plain path, one step more in each."""
    entries: dict[type[surge.Event], Any] = app._put_types  # a copy of its code
    wall = app.clock.time

    async def coroutine(
        event: Tick,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        delay: float | None = None,
        at: float | None = None,
        connection: Any = None,
        id: str | None = None,
        mandatory: bool | None = None,
    ) -> str | None:
        return None

    async def lookup(
        event: Tick,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        delay: float | None = None,
        at: float | None = None,
        connection: Any = None,
        id: str | None = None,
        mandatory: bool | None = None,
    ) -> str | None:
        put = entries.get(type(event))
        if put is not None and delay is None and at is None and id is None and connection is None:
            return ""
        return None

    async def with_id(
        event: Tick,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        delay: float | None = None,
        at: float | None = None,
        connection: Any = None,
        id: str | None = None,
        mandatory: bool | None = None,
    ) -> str | None:
        put = entries.get(type(event))
        if put is not None and delay is None and at is None and id is None and connection is None:
            return _ids.pop() if _ids else refill_ids()
        return None

    async def with_envelope(
        event: Tick,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        delay: float | None = None,
        at: float | None = None,
        connection: Any = None,
        id: str | None = None,
        mandatory: bool | None = None,
    ) -> str | None:
        put = entries.get(type(event))
        if put is not None and delay is None and at is None and id is None and connection is None:
            env_id = _ids.pop() if _ids else refill_ids()
            Envelope(env_id, put[0], key, wall(), headers, event)
            return env_id
        return None

    async def with_put(
        event: Tick,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        delay: float | None = None,
        at: float | None = None,
        connection: Any = None,
        id: str | None = None,
        mandatory: bool | None = None,
    ) -> str | None:
        put = entries.get(type(event))
        if put is not None and delay is None and at is None and id is None and connection is None:
            env_id = _ids.pop() if _ids else refill_ids()
            env = Envelope(env_id, put[0], key, wall(), headers, event)
            if not put[1](env):
                raise RuntimeError("the queue was full")
            return env_id
        return None

    return {
        "coroutine": coroutine,
        "+ lookup": lookup,
        "+ id": with_id,
        "+ envelope": with_envelope,
        "+ put": with_put,
        "app.publish": app.publish,
    }


async def _timed(step: Step, events: Sequence[Tick]) -> float:
    t0 = time.process_time()
    for ev in events:
        await step(ev)
    return time.process_time() - t0


async def _queue_parts(events: Sequence[Tick], out: dict[str, list[float]]) -> None:
    q: asyncio.Queue[Tick] = asyncio.Queue()
    put, get = q.put, q.get
    out["queue.put"].append(await _timed(put, events))
    t0 = time.process_time()
    for _ in events:
        await get()
    out["queue.get"].append(time.process_time() - t0)
    out["handler"].append(await _timed(_noop, events))


async def _surge_parts(events: Sequence[Tick], rounds: int, out: dict[str, list[float]]) -> None:
    app = surge.App("parts", transport=MemoryTransport(capacity=len(events) + 1))

    @app.on(Tick)
    async def handle(ev: Tick) -> None:
        return None

    async with app:
        await app.publish(events[0])  # learns the type's plain path
        await app.drain()
        steps = _steps(app)
        for r in range(rounds):
            names = list(steps)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                gc.collect()
                out[name].append(await _timed(steps[name], events))
                t0 = time.process_time()
                await app.drain()
                if name == "app.publish":
                    out["dispatch"].append(time.process_time() - t0)
            await _queue_parts(events, out)


def measure(n: int, rounds: int) -> dict[str, float]:
    """Nanoseconds per event of each part, medians of ``rounds``."""
    events = [Tick(n=i) for i in range(n)]
    gc.collect()
    gc.freeze()
    names = ("coroutine", "+ lookup", "+ id", "+ envelope", "+ put", "app.publish", "dispatch")
    out: dict[str, list[float]] = {k: [] for k in (*names, "queue.put", "queue.get", "handler")}
    asyncio.run(_surge_parts(events, rounds, out))
    return {k: statistics.median(v) / n * 1e9 for k, v in out.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inproc_parts", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=20_000, help="events per part and round")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds")
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin to; -1 leaves affinity")
    args = parser.parse_args(argv)
    pin_cpu(args.cpu)
    load = os.getloadavg()
    parts = measure(args.events, args.rounds)
    prev = 0.0
    for name in ("coroutine", "+ lookup", "+ id", "+ envelope", "+ put"):
        print(f"{parts[name]:8,.0f} ns  (+{parts[name] - prev:6,.0f})  publish: {name}")
        prev = parts[name]
    for name in ("app.publish", "dispatch", "queue.put", "queue.get", "handler"):
        print(f"{parts[name]:8,.0f} ns             {name}")
    surge_total = parts["app.publish"] + parts["dispatch"]
    queue_total = parts["queue.put"] + parts["queue.get"] + parts["handler"]
    print(
        f"surge {surge_total:,.0f} ns, queue {queue_total:,.0f} ns an event: "
        f"{queue_total / surge_total:.2f}x the queue's rate "
        f"(load {load[0]:.1f} -> {os.getloadavg()[0]:.1f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
