"""The ingress under abuse: a flood past its in-flight bound, and slowloris."""

from __future__ import annotations

import asyncio
import os
import resource
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

import surge
from surge.http import ASGIApp, Limits, Server
from surge.tools import run_load

pytestmark = pytest.mark.realtime


class Order(surge.Event):
    order_id: str


class Done(surge.Event):
    order_id: str


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class CountRefusals:
    """Wraps the ingress; sets ``reached`` once ``target`` requests got 503."""

    def __init__(self, inner: ASGIApp, target: int) -> None:
        self.inner = inner
        self.target = target
        self.refused = 0
        self.reached = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counting(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                self.refused += 1
                if self.refused >= self.target:
                    self.reached.set()
            await send(message)

        await self.inner(scope, receive, counting)


@pytest.mark.timeout(90)
async def test_flood_past_max_in_flight_is_refused_and_descriptors_come_back(
    tmp_path: Path,
) -> None:
    """10,000 concurrent connections against 1,000 in flight: 9,000 get 503 at once, the
    1,000 admitted finish, none hangs, and descriptors return to their baseline."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 16_000):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16_000), hard))
    total, admitted = 10_000, 1_000
    app = surge.App("flood")
    gate = asyncio.Event()

    @app.on(Order, concurrency=admitted)
    async def hold(event: Order) -> Done:
        await gate.wait()
        return Done(order_id=event.order_id)

    app.http.post("/orders", publish=Order, reply=Done, timeout=60)
    counter = CountRefusals(app.http, total - admitted)
    async with app:
        # max_in_flight alone: the pipeline-driven admission would shed earlier
        limits = Limits(max_in_flight=admitted, target_latency=None)
        server = Server(app, port=0, limits=limits, asgi=counter)
        await server.start()
        baseline = open_fds()
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from surge.cli._load import load; load()",
            f"{server.url}/orders",
            f"--requests={total}",
            f"--concurrency={total}",
            "--timeout=40",
            "--retries=0",  # every refusal must show as a 503, not be waited out
            '--body={"order_id": "{i}"}',
            f"--chart={tmp_path / 'chart.html'}",
            "--json",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            # Every excess request is refused while the admitted ones are held.
            await asyncio.wait_for(counter.reached.wait(), 60)
            # The last refusals were just sent: their clients have yet to
            # read them and close, which gives their descriptors back (or
            # LINGER, 1 s, later). Measure once they have, while the admitted
            # requests are still held (the first loop turn after the 9,000th
            # 503 was too early under Python 3.12's wait_for).
            await asyncio.wait_for(server.wait_connections(admitted), 10)
            at_peak = open_fds()
            held = app.http.statistics().in_flight
        finally:
            gate.set()
            try:
                out, _ = await asyncio.wait_for(client.communicate(), 60)
            finally:
                if client.returncode is None:
                    client.kill()
                    await client.wait()
        await asyncio.wait_for(server.wait_idle(), 20)
        after = open_fds()
        await server.stop()
    report = msgspec.json.decode(out)
    assert report["errors"] == {}
    assert report["statuses"] == {"200": admitted, "503": total - admitted}
    assert held == admitted
    # Refused connections are closed at once, so at the peak the process holds
    # about one descriptor per admitted request, not one per client; and it
    # gives every one of them back.
    assert at_peak <= baseline + 2 * admitted
    assert after <= baseline + 2
    # The refusals all came while the admitted requests were still held, so
    # none of them queued behind those; and no request waited unboundedly.
    assert report["max"] < 30


@pytest.mark.timeout(60)
async def test_slowloris_connections_are_closed_while_normal_requests_are_served() -> None:
    """500 clients trickling headers get 408 and are closed by the header deadline; normal
    requests keep being answered meanwhile."""
    deadline = 1.0
    app = surge.App("loris")
    handled = 0

    @app.on(Order)
    async def take(event: Order) -> None:
        nonlocal handled
        handled += 1

    app.http.post("/orders", publish=Order)
    loop = asyncio.get_running_loop()
    all_open = asyncio.Event()
    opened = 0
    lorises = 500

    async def loris() -> tuple[float, bytes]:
        nonlocal opened
        # Timed from before the connect: the server's deadline runs from its
        # accept, which the client may see late when 500 connect at once.
        start = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /orders HTTP/1.1\r\nhost: x\r\n")
        opened += 1
        if opened == lorises:
            all_open.set()
        answer = b""
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(4096), 0.2)
                except ConnectionResetError:
                    # the server must end the connection, not reset it
                    return loop.time() - start, answer + b" (reset)"
                except TimeoutError:
                    if not answer:
                        # Another header line: progress that must not reset the deadline.
                        writer.write(b"x-slow: 1\r\n")
                    continue
                if not chunk:
                    return loop.time() - start, answer
                answer += chunk
        finally:
            writer.close()

    limits = Limits(header_timeout=deadline)
    async with app, Server(app, port=0, limits=limits) as server:
        tasks = [asyncio.create_task(loris()) for _ in range(lorises)]
        await asyncio.wait_for(all_open.wait(), 20)
        served = await run_load(
            f"{server.url}/orders", 300, 10, body=b'{"order_id": "n"}', timeout=5
        )
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await app.drain()
    assert served.statuses == {202: 300}
    assert handled == 300
    closed_after = sorted(t for t, _ in results)
    assert closed_after[0] >= deadline * 0.9
    assert closed_after[-1] < deadline + 3.0
    assert [a for _, a in results if not a.startswith(b"HTTP/1.1 408 ")] == []


async def test_a_connection_that_sends_nothing_is_closed_by_the_deadline() -> None:
    """An idle new connection (no request byte at all) is closed after header_timeout."""
    app = surge.App("idle")
    async with app, Server(app, port=0, limits=Limits(header_timeout=0.3)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_connections_past_max_connections_are_answered_503_and_closed() -> None:
    """Past max_connections a new connection gets 503 + Retry-After and is closed, while
    the connections already open keep being served."""
    app = surge.App("capped")
    async with app, Server(app, port=0, limits=Limits(max_connections=3)) as server:
        kept = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        refused = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        kept_reader, kept_writer = kept[0]
        kept_writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        served = await asyncio.wait_for(kept_reader.readuntil(b'{"status":"ok"}'), 5)
        for _, w in kept:
            w.close()
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 1\r\n" in refused
    assert served.startswith(b"HTTP/1.1 200 ")
