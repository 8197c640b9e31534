"""Celery, Dramatiq and FastStream on RabbitMQ, measured as the peers'
``c4_frameworks.py`` measures them on Redis and NATS (``../shared/peers``).

Usage, with a venv that has the frameworks (they are not surge's
dependencies)::

    python3 -m venv /tmp/peersvenv
    /tmp/peersvenv/bin/pip install celery==5.7.0 'dramatiq[rabbitmq]==2.2.1' \\
        'faststream[rabbit,cli]==0.7.8'
    /tmp/peersvenv/bin/python -m benchmarks.amqp_peers --url amqp://guest:guest@127.0.0.1:PORT/

(``benchmarks.amqp_bench --peers /tmp/peersvenv/bin/python`` runs it on the
node it started, after surge's rows.) Per framework, 100-byte-ish no-op
tasks: enqueue N one by one with the worker stopped, then start one worker
process and time its drain from the first to the last handler start; then
p50 / p99 publish-to-handler-start at a fixed rate. Each framework with its
defaults, noted in the rows (Celery acks on receipt; Dramatiq publishes
without confirms by default; FastStream's queues are not durable by
default). One JSON line per measurement on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECORDER = """
import json, os, threading, time
EXPECT = int(os.environ.get("BENCH_EXPECT", "0"))
OUT = os.environ.get("BENCH_OUT", "")
_lock = threading.Lock()
_state = {"count": 0, "first": None, "cpu0": 0.0}
_lat = []

def hit(t_ns):
    now = time.time_ns()
    with _lock:
        _state["count"] += 1
        c = _state["count"]
        _lat.append(now - int(t_ns))
        if c == 1:
            _state["first"] = now
            _state["cpu0"] = time.process_time()
            open(OUT + ".first", "w").write(str(now))
        if c == EXPECT:
            cpu = time.process_time() - _state["cpu0"]
            with open(OUT + ".tmp", "w") as f:
                json.dump({"first_ns": _state["first"], "last_ns": now, "lat_ns": _lat,
                           "cpu": cpu}, f)
            os.replace(OUT + ".tmp", OUT)
"""

APPS = {
    "fw_celery_rabbit.py": """
import os
from celery import Celery
from recorder import hit
app = Celery("fw_celery_rabbit", broker=os.environ["BENCH_AMQP_URL"])
app.conf.update(task_ignore_result=True, task_default_queue="bench_celery",
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

@app.task(name="noop", ignore_result=True)
def noop(t_ns):
    hit(t_ns)
""",
    "fw_dramatiq_rabbit.py": """
import os
import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from recorder import hit
broker = RabbitmqBroker(url=os.environ["BENCH_AMQP_URL"])
dramatiq.set_broker(broker)

@dramatiq.actor(queue_name="bench_dramatiq", max_retries=0)
def noop(t_ns):
    hit(t_ns)
""",
    "fw_faststream_rabbit.py": """
import os
from faststream import FastStream
from faststream.rabbit import RabbitBroker
from recorder import hit
broker = RabbitBroker(os.environ["BENCH_AMQP_URL"])
app = FastStream(broker)

@broker.subscriber("bench_fs")
async def noop(t_ns: int) -> None:
    hit(t_ns)
""",
}


class Peer:
    """One framework: how to start its worker, and how to send a task."""

    name = ""
    note = ""
    pkgs: tuple[str, ...] = ()

    def __init__(self, url: str, bindir: str) -> None:
        self.url = url
        self.bindir = bindir

    def cmd(self) -> list[str]:
        raise NotImplementedError

    async def start(self) -> None: ...

    async def send(self, t_ns: int) -> None:
        raise NotImplementedError

    async def stop(self) -> None: ...


class Celery(Peer):
    name = "celery-rabbitmq"
    note = "solo pool (1 process), prefetch multiplier 4, acks on receipt (defaults)"
    pkgs = ("celery", "kombu", "amqp")

    def cmd(self) -> list[str]:
        return [f"{self.bindir}/celery", "-A", "fw_celery_rabbit", "worker", "-P", "solo",
                "-c", "1", "-l", "WARNING"]  # fmt: skip

    async def start(self) -> None:
        self.task = importlib.import_module("fw_celery_rabbit").noop

    async def send(self, t_ns: int) -> None:
        self.task.delay(t_ns)


class Dramatiq(Peer):
    name = "dramatiq-rabbitmq"
    note = "1 worker process, 8 threads, RabbitmqBroker defaults (no publisher confirms)"
    pkgs = ("dramatiq", "pika")

    def cmd(self) -> list[str]:
        return [f"{self.bindir}/dramatiq", "fw_dramatiq_rabbit", "--processes", "1",
                "--threads", "8"]  # fmt: skip

    async def start(self) -> None:
        self.task = importlib.import_module("fw_dramatiq_rabbit").noop

    async def send(self, t_ns: int) -> None:
        self.task.send(t_ns)


class FastStream(Peer):
    name = "faststream-rabbitmq"
    note = "RabbitBroker defaults (aio-pika; the queue is not durable), publish awaited"
    pkgs = ("faststream", "aio-pika")

    def cmd(self) -> list[str]:
        return [f"{self.bindir}/faststream", "run", "fw_faststream_rabbit:app", "--workers", "1",
                "--log-level", "warning"]  # fmt: skip

    async def start(self) -> None:
        self.broker = importlib.reload(importlib.import_module("fw_faststream_rabbit")).broker
        await self.broker.connect()
        # the queue exists before the worker starts, so the backlog waits in it
        rabbit = importlib.import_module("faststream.rabbit")
        await self.broker.declare_queue(rabbit.RabbitQueue("bench_fs"))

    async def send(self, t_ns: int) -> None:
        await self.broker.publish(t_ns, "bench_fs")

    async def stop(self) -> None:
        await self.broker.stop()


PEERS: dict[str, type[Peer]] = {"celery": Celery, "dramatiq": Dramatiq, "faststream": FastStream}


def _versions(pkgs: tuple[str, ...]) -> str:
    from importlib.metadata import version

    return ",".join(f"{p}=={version(p)}" for p in pkgs)


def emit(peer: Peer, scenario: str, n: int, seconds: float, **extra: Any) -> dict[str, Any]:
    row = {"system": peer.name, "scenario": scenario, "n": n, "seconds": round(seconds, 4),
           "rate": round(n / seconds), "note": peer.note, "versions": _versions(peer.pkgs),
           **extra}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.out = work / "out.json"
        (work / "recorder.py").write_text(RECORDER)
        for name, src in APPS.items():
            (work / name).write_text(src)
        sys.path.insert(0, str(work))

    def _clear(self) -> None:
        for p in (self.out, Path(f"{self.out}.first")):
            p.unlink(missing_ok=True)

    def worker(self, peer: Peer, expect: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, BENCH_EXPECT=str(expect), BENCH_OUT=str(self.out),
                   PYTHONPATH=str(self.work), BENCH_AMQP_URL=peer.url)  # fmt: skip
        log = (self.work / f"{peer.name}.log").open("ab")
        return subprocess.Popen(peer.cmd(), cwd=self.work, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(5)

    async def wait(self, path: Path, timeout: float, proc: subprocess.Popen[bytes]) -> None:
        end = time.monotonic() + timeout
        while not os.path.exists(path):  # noqa: ASYNC240  # a tiny stat, polled
            if time.monotonic() > end:
                raise TimeoutError(f"{path} not written in {timeout}s")
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited rc={proc.returncode}")
            await asyncio.sleep(0.01)  # a file written by another process: polled

    async def throughput(self, peer: Peer, n: int) -> list[dict[str, Any]]:
        self._clear()
        await peer.start()
        t0 = time.perf_counter()
        for _ in range(n):
            await peer.send(time.time_ns())
        rows = [emit(peer, "enqueue_one_by_one", n, time.perf_counter() - t0)]
        launched = time.time_ns()
        proc = self.worker(peer, n)
        try:
            await self.wait(self.out, 600, proc)
        finally:
            self.stop(proc)
            await peer.stop()
        res = json.loads(self.out.read_text())
        drain = (res["last_ns"] - res["first_ns"]) / 1e9
        rows.append(emit(peer, "drain_one_worker", n, drain,
                         launch_to_last_s=round((res["last_ns"] - launched) / 1e9, 3),
                         cpu_us_per_event=round(res["cpu"] / n * 1e6)))  # fmt: skip
        return rows

    async def latency(self, peer: Peer, rate: int, seconds: float) -> dict[str, Any]:
        self._clear()
        total = int(rate * seconds)
        await peer.start()
        proc = self.worker(peer, total + 1)
        try:
            await peer.send(time.time_ns())  # warm-up: waits until the worker is up
            await self.wait(Path(f"{self.out}.first"), 60, proc)
            t0 = time.perf_counter()
            for i in range(total):
                d = t0 + i / rate - time.perf_counter()
                if d > 0:
                    await asyncio.sleep(d)
                await peer.send(time.time_ns())
            sent = time.perf_counter() - t0
            await self.wait(self.out, 120, proc)
        finally:
            self.stop(proc)
            await peer.stop()
        lat = sorted(x / 1e6 for x in json.loads(self.out.read_text())["lat_ns"][1:])
        return emit(peer, f"latency_{rate}per_s", total, sent,
                    p50_ms=round(lat[len(lat) // 2], 3),
                    p99_ms=round(lat[int(len(lat) * 0.99)], 3))  # fmt: skip


async def run(
    url: str, names: list[str], n: int, rate: int, seconds: float, *, drain_only: bool = False
) -> list[dict[str, Any]]:
    bench = Bench(Path(tempfile.mkdtemp(prefix="surge-amqp-peers-")))
    bindir = str(Path(sys.executable).parent)
    rows: list[dict[str, Any]] = []
    for name in names:
        os.environ["BENCH_AMQP_URL"] = url  # the apps read it at import
        rows += await bench.throughput(PEERS[name](url, bindir), n)
        if not drain_only:
            rows.append(await bench.latency(PEERS[name](url, bindir), rate, seconds))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--peers", default="celery,dramatiq,faststream")
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--drain-only", action="store_true", help="enqueue and drain; no latency")
    args = ap.parse_args()
    asyncio.run(
        run(args.url, args.peers.split(","), args.events, args.rate, args.seconds,
            drain_only=args.drain_only)
    )  # fmt: skip


if __name__ == "__main__":
    main()
