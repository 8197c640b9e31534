"""surge over RabbitMQ next to raw aio-pika, in one run, on one node.

Usage: ``python -m benchmarks.amqp_bench [--events N] [--rate R] [--seconds S]``

Starts its own RabbitMQ node (Debian's ``rabbitmq-server``, as the tests do:
``tests/_servers.py``) on free loopback ports, and measures, 100-byte
payloads / no-op handlers, persistent messages on quorum queues throughout:

``raw_publish_confirms``  aio-pika, confirms on: N publishes in flight 500 at
                        a time, each awaited until the broker confirmed it
``raw_consume_prefetch100``  aio-pika, prefetch 100, ``message.ack()`` each,
                        until N are consumed (the ceiling of draining)
``raw_latency``         R messages/s for S seconds, publish (confirmed; started
                        at the rate, overlapping) to the consumer's callback,
                        one process (p50 / p99)
``surge_enqueue_concurrent``  ``await app.publish(ev)`` from 64 concurrent
                        publishers (each returns once confirmed)
``surge_enqueue_nowait``  ``app.publish_nowait`` (waiting when Overloaded),
                        then ``transport.flush()``
``surge_drain``         N events already stored, one worker process started:
                        first to last handler start (and launch to last)
``surge_keyed_drain``   the same with every event keyed (1,000 keys): 8
                        single-active-consumer partition queues
``surge_latency``       R events/s for S seconds (publishes started at the
                        rate, overlapping), publish call to handler start,
                        across processes (p50 / p99)

Prints one JSON line per measurement and a summary table; ``--save FILE``
also writes them, with the versions and the machine's load, as JSON.

``--drain-rounds K`` measures drains only, K rounds interleaved on one node:
surge, surge from ``--before SRC`` (another revision's ``src/``, imported by
the worker through PYTHONPATH) and the peers named by ``--peer-names``
(with ``--peers PYTHON``), in an order that alternates between rounds; each
surge row also gives the worker's CPU time per event during the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika
from tests._servers import RabbitServer

import surge
from surge.transports import open_transport

PAYLOAD = b"x" * 100
_ROOT = str(Path(__file__).resolve().parent.parent)
_QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


class Tick(surge.Event):
    __topic__ = "bench.tick"
    sent: float
    pad: bytes = b""


def emit(name: str, n: int, seconds: float, **extra: Any) -> dict[str, Any]:
    row = {"scenario": name, "n": n, "seconds": round(seconds, 4), "rate": round(n / seconds)}
    row.update(extra)
    print(json.dumps(row), flush=True)
    return row


# --- raw aio-pika ---------------------------------------------------------------------


async def raw(url: str, n: int, rate: int, seconds: float) -> list[dict[str, Any]]:
    conn = await aio_pika.connect(url)
    ch = await conn.channel(publisher_confirms=True)
    q = await ch.declare_queue("raw.x", durable=True, arguments=_QUORUM)
    ex = ch.default_exchange
    t0 = time.perf_counter()
    for i in range(0, n, 500):
        await asyncio.gather(
            *(
                ex.publish(aio_pika.Message(PAYLOAD, delivery_mode=2), routing_key="raw.x")
                for _ in range(min(500, n - i))
            )
        )
    rows = [emit("raw_publish_confirms", n, time.perf_counter() - t0)]
    cch = await conn.channel()
    await cch.set_qos(prefetch_count=100)
    cq = await cch.get_queue("raw.x")
    done = asyncio.Event()
    got = 0

    async def on(m: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal got
        await m.ack()
        got += 1
        if got == n:
            done.set()

    t0 = time.perf_counter()
    await cq.consume(on)
    await asyncio.wait_for(done.wait(), 300)
    rows.append(emit("raw_consume_prefetch100", n, time.perf_counter() - t0))
    await q.delete(if_unused=False, if_empty=False)
    rows.append(await raw_latency(ch, cch, rate, seconds))
    await conn.close()
    return rows


async def raw_latency(
    ch: aio_pika.abc.AbstractChannel, cch: aio_pika.abc.AbstractChannel, rate: int, seconds: float
) -> dict[str, Any]:
    """Publish (confirmed) -> a consumer with prefetch 100, one process."""
    await ch.declare_queue("raw.lat", durable=True, arguments=_QUORUM)
    cq = await cch.get_queue("raw.lat")
    total = int(rate * seconds)
    lat: list[float] = []
    done = asyncio.Event()

    async def on(m: aio_pika.abc.AbstractIncomingMessage) -> None:
        lat.append(time.time() - float(m.body))
        await m.ack()
        if len(lat) == total:
            done.set()

    await cq.consume(on)
    ex = ch.default_exchange
    sends: list[asyncio.Future[Any]] = []
    t0 = time.perf_counter()
    for i in range(total):
        d = t0 + i / rate - time.perf_counter()
        if d > 0:
            await asyncio.sleep(d)
        body = repr(time.time()).encode()
        # at the rate, whatever the confirm takes: publishes overlap
        msg = aio_pika.Message(body, delivery_mode=2)
        sends.append(asyncio.ensure_future(ex.publish(msg, routing_key="raw.lat")))
    await asyncio.gather(*sends)
    await asyncio.wait_for(done.wait(), 60)
    lat.sort()
    return emit(
        f"raw_latency_{rate}per_s",
        total,
        time.perf_counter() - t0,
        p50_ms=round(lat[len(lat) // 2] * 1e3, 3),
        p99_ms=round(lat[int(len(lat) * 0.99)] * 1e3, 3),
    )


# --- surge ----------------------------------------------------------------------------

_WORKER = r"""
import asyncio, json, sys, time
import surge
from surge.transports import open_transport
from benchmarks.amqp_bench import Tick

url, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
launched = float(sys.argv[4])
app = surge.App("bench", transport=open_transport(url))
lat = []
marks = []
cpu = []
done = asyncio.Event()
counter = [0]

@app.on(Tick, concurrency=100)
async def handle(ev: Tick) -> None:
    now = time.time()
    if mode == "latency":
        lat.append(now - ev.sent)
    if not marks:
        marks.append(now)
        cpu.append(time.process_time())
    counter[0] += 1
    if counter[0] >= n:
        marks.append(now)
        cpu.append(time.process_time())
        done.set()

async def main() -> None:
    async with app:
        print("ready", flush=True)
        await done.wait()
        out = {"first": marks[0], "last": marks[-1], "launched": launched,
               "cpu": cpu[-1] - cpu[0]}
        if mode == "latency":
            lat.sort()
            out["p50"] = lat[len(lat) // 2]
            out["p99"] = lat[int(len(lat) * 0.99)]
        print(json.dumps(out), flush=True)

asyncio.run(main())
"""


async def _start_worker(
    url: str, n: int, mode: str, src: str | None = None
) -> asyncio.subprocess.Process:
    """A worker process; with ``src``, surge is imported from that directory
    (another revision's ``src/``, for before / after in one run)."""
    env = None
    if src is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join((src, _ROOT))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER, url, str(n), mode, str(time.time()),
        stdout=asyncio.subprocess.PIPE, cwd=_ROOT, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"ready"
    return proc


async def _result(proc: asyncio.subprocess.Process) -> dict[str, float]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 300)
    await proc.wait()
    out: dict[str, float] = json.loads(line)
    return out


async def _declare(url: str, src: str | None = None) -> None:
    """Declare the worker's group (what its first start does), then leave."""
    proc = await _start_worker(url, 1, "drain", src)
    proc.terminate()
    await proc.wait()


async def drain_once(url: str, n: int, src: str | None = None) -> dict[str, float]:
    """Store ``n`` events (``publish_nowait``, then flush), then time one
    worker process draining them: first to last handler start, and the
    worker's CPU time in between."""
    await _declare(url, src)
    app = surge.App("bench", transport=open_transport(url))
    async with app:
        for _ in range(n):
            ev = Tick(sent=0.0, pad=PAYLOAD[:64])
            try:
                app.publish_nowait(ev)
            except surge.Overloaded:
                await app.publish(ev)
        await app.transport.flush()  # type: ignore[attr-defined]
    proc = await _start_worker(url, n, "drain", src)
    return await _result(proc)


async def drain_rounds(
    url: str, n: int, rounds: int, before: str | None, python: str | None, names: str
) -> list[dict[str, Any]]:
    """Drains only, interleaved: per round surge (this checkout), surge from
    ``before`` (another revision's src/) and each peer, in an order that
    alternates between rounds, so that load moves them alike."""
    runs: list[tuple[str, Any]] = [("surge", None)]
    if before:
        runs.append(("surge_before", before))
    if python:
        runs += [(name, python) for name in names.split(",")]
    rows: list[dict[str, Any]] = []
    for r in range(rounds):
        for who, arg in runs if r % 2 == 0 else runs[::-1]:
            if who.startswith("surge"):
                res = await drain_once(f"{url}?prefix=d{r}{who}", n, arg)
                dt = res["last"] - res["first"]
                cpu_us = round(res["cpu"] / n * 1e6)
                load1 = round(os.getloadavg()[0], 1)
                extra = {"round": r, "cpu_us_per_event": cpu_us, "load1": load1}
                rows.append(emit(f"{who}_drain", n, dt, **extra))
                continue
            for row in await peers(arg, url, n, 0, 0.0, names=who, drain_only=True):
                if row["scenario"] == "drain_one_worker":
                    row.update(round=r, load1=round(os.getloadavg()[0], 1))
                    rows.append(row)
    return rows


async def surge_runs(url: str, n: int, rate: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    events = [Tick(sent=0.0, pad=PAYLOAD[:64]) for _ in range(n)]

    async def enqueue(name: str, prefix: str, how: str) -> None:
        await _declare(f"{url}?prefix={prefix}")
        app = surge.App("bench", transport=open_transport(f"{url}?prefix={prefix}"))
        async with app:
            t0 = time.perf_counter()
            if how == "concurrent":
                it = iter(events)

                async def pub() -> None:
                    for ev in it:
                        await app.publish(ev)

                await asyncio.gather(*(pub() for _ in range(64)))
            else:
                for ev in events:
                    try:
                        app.publish_nowait(ev)
                    except surge.Overloaded:
                        await app.publish(ev)
                await app.transport.flush()  # type: ignore[attr-defined]
            rows.append(emit(name, n, time.perf_counter() - t0))

    await enqueue("surge_enqueue_concurrent", "s1", "concurrent")
    await enqueue("surge_enqueue_nowait", "s2", "nowait")

    # drain what s2 holds with one worker process
    t_launch = time.time()
    proc = await _start_worker(f"{url}?prefix=s2", n, "drain")
    res = await _result(proc)
    rows.append(
        emit("surge_drain", n, res["last"] - res["first"],
             launch_to_last_s=round(res["last"] - t_launch, 3))
    )  # fmt: skip

    # the same drain with keyed events (partitions: per-key order across workers)
    await _declare(f"{url}?prefix=s3")
    app = surge.App("bench", transport=open_transport(f"{url}?prefix=s3"))
    async with app:
        it = iter(enumerate(events))

        async def keyed() -> None:
            for i, ev in it:
                await app.publish(ev, key=str(i % 1000))

        await asyncio.gather(*(keyed() for _ in range(64)))
    t_launch = time.time()
    proc = await _start_worker(f"{url}?prefix=s3", n, "drain")
    res = await _result(proc)
    rows.append(
        emit("surge_keyed_drain", n, res["last"] - res["first"],
             launch_to_last_s=round(res["last"] - t_launch, 3))
    )  # fmt: skip

    # latency at a fixed rate, publisher and worker in two processes
    total = int(rate * seconds)
    proc = await _start_worker(f"{url}?prefix=lat", total, "latency")
    app = surge.App("benchpub", transport=open_transport(f"{url}?prefix=lat"))
    async with app:
        sends: list[asyncio.Future[str]] = []
        t0 = time.perf_counter()
        for i in range(total):
            d = t0 + i / rate - time.perf_counter()
            if d > 0:
                await asyncio.sleep(d)
            # at the rate, whatever the confirm takes: publishes overlap
            sends.append(asyncio.ensure_future(app.publish(Tick(sent=time.time()))))
        await asyncio.gather(*sends)
        res = await _result(proc)
    rows.append(
        emit(f"surge_latency_{rate}per_s", total, time.perf_counter() - t0,
             p50_ms=round(res["p50"] * 1e3, 3), p99_ms=round(res["p99"] * 1e3, 3))
    )  # fmt: skip
    return rows


async def peers(
    python: str,
    url: str,
    n: int,
    rate: int,
    seconds: float,
    *,
    names: str = "celery,dramatiq,faststream",
    drain_only: bool = False,
) -> list[dict[str, Any]]:
    """The peer frameworks' rows, measured by ``benchmarks.amqp_peers`` run
    with ``python`` (their venv) on this node."""
    extra = ["--drain-only"] if drain_only else []
    proc = await asyncio.create_subprocess_exec(
        python, "-m", "benchmarks.amqp_peers", "--url", url, "--events", str(n),
        "--rate", str(rate), "--seconds", str(seconds), "--peers", names, *extra,
        stdout=asyncio.subprocess.PIPE, cwd=_ROOT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    rows = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--save", metavar="FILE", help="also write the rows as JSON to FILE")
    ap.add_argument(
        "--peers",
        metavar="PYTHON",
        help="also run benchmarks.amqp_peers with this interpreter (a venv with "
        "celery, dramatiq[rabbitmq] and faststream[rabbit]) on the same node",
    )
    ap.add_argument(
        "--drain-rounds",
        type=int,
        metavar="K",
        help="only drains, K interleaved rounds: surge, --before, and the peers (--peer-names)",
    )
    ap.add_argument("--before", metavar="SRC", help="with --drain-rounds: also surge from SRC")
    ap.add_argument("--peer-names", default="celery,dramatiq,faststream")
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="surge-amqp-bench-"))
    node = RabbitServer(data)
    await asyncio.to_thread(node.start)
    if args.drain_rounds:
        try:
            rows = await drain_rounds(
                node.url, args.events, args.drain_rounds, args.before, args.peers, args.peer_names
            )
        finally:
            await asyncio.to_thread(node.stop)
            shutil.rmtree(data, ignore_errors=True)
        print("\nscenario                       median/s  rounds")
        for name in dict.fromkeys(r.get("system", r["scenario"]) for r in rows):
            rates = [r["rate"] for r in rows if r.get("system", r["scenario"]) == name]
            print(f"{name:<30} {statistics.median(rates):>8,.0f}  {rates}")
        if args.save:
            _save(args.save, rows, args.events)
        return
    try:
        rows = await raw(node.url, args.events, args.rate, args.seconds)
        rows += await surge_runs(node.url, args.events, args.rate, args.seconds)
        if args.peers:
            rows += await peers(args.peers, node.url, args.events, args.rate, args.seconds)
    finally:
        await asyncio.to_thread(node.stop)
        shutil.rmtree(data, ignore_errors=True)
    peer_rows = [r for r in rows if "system" in r]
    rows = [r for r in rows if "system" not in r]
    by = {r["scenario"]: r for r in rows}
    pub, pull = by["raw_publish_confirms"]["rate"], by["raw_consume_prefetch100"]["rate"]
    print("\nscenario                      rate/s   vs raw")
    for r in rows:
        ceiling = pub if "enqueue" in r["scenario"] else pull
        ratio = (
            "" if r["scenario"].startswith(("raw", "surge_lat")) else f"{r['rate'] / ceiling:.2f}x"
        )
        extra = {k: v for k, v in r.items() if k not in ("scenario", "n", "seconds", "rate")}
        print(f"{r['scenario']:<28} {r['rate']:>8,}   {ratio:<6} {extra or ''}")
    for r in peer_rows:
        extra = {k: v for k, v in r.items() if k in ("p50_ms", "p99_ms", "launch_to_last_s")}
        print(f"{r['system'] + ' ' + r['scenario']:<44} {r['rate']:>8,}   {extra or ''}")
    if args.save:
        _save(args.save, rows + peer_rows, args.events)


def _save(path: str, rows: list[dict[str, Any]], events: int) -> None:
    import platform
    from importlib.metadata import version

    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "aiormq": version("aiormq"),
        "aio-pika": version("aio-pika"),
        "rabbitmq": "3.10 (Debian 12 rabbitmq-server)",
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "events": events,
    }
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
