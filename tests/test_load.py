"""The load generator (``surge load``): what it counts, times and writes."""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest

import surge
from surge.http import Server, bind_socket
from surge.tools import LoadReport, run_load
from surge.tools._chart import render_chart

pytestmark = pytest.mark.realtime


class Hit(surge.Event):
    n: int


@asynccontextmanager
async def hit_server() -> AsyncIterator[tuple[Server, list[int]]]:
    app = surge.App("target")
    seen: list[int] = []

    @app.on(Hit)
    async def record(event: Hit) -> None:
        seen.append(event.n)

    app.http.post("/hit", publish=Hit)
    async with app, Server(app, port=0) as server:
        yield server, seen
        await app.drain()


async def test_report_counts_statuses_and_orders_percentiles() -> None:
    """Every request is answered and counted by status; p50 <= p95 <= p99 <= max."""
    async with hit_server() as (server, seen):
        ok = await run_load(f"{server.url}/hit", 400, 8, body_factory=lambda i: b'{"n":%d}' % i)
        bad = await run_load(f"{server.url}/hit", 20, 4, body=b"{}")
    assert (ok.requests, ok.completed, ok.errors) == (400, 400, {})
    assert ok.statuses == {202: 400}
    assert 0 < ok.p50 <= ok.p95 <= ok.p99 <= ok.max
    assert ok.rps > 0
    assert sum(row[1] for row in ok.timeline) == 400
    assert bad.statuses == {422: 20}
    assert sorted(seen) == list(range(400))


async def test_rate_paces_requests_open_loop() -> None:
    """With rate=R, n requests take at least (n - 1) / R seconds."""
    async with hit_server() as (server, _):
        report = await run_load(f"{server.url}/hit", 60, 4, rate=200.0, body=b'{"n": 1}')
    assert report.statuses == {202: 60}
    assert report.duration >= 59 / 200


async def test_refused_connections_are_counted_as_errors() -> None:
    """A port nobody listens on yields one error per request, by cause, and no hang."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    report = await run_load(f"http://127.0.0.1:{port}/", 10, 2, timeout=5)
    assert report.completed == 0
    assert report.errors == {"ConnectionRefusedError": 10}
    assert report.p99 == 0.0


async def test_a_server_that_never_answers_times_out_each_request() -> None:
    """Requests to a server that accepts but never answers end as timeouts."""
    held: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        report = await run_load(f"http://127.0.0.1:{port}/", 4, 2, timeout=0.2)
        for w in held:
            w.close()
    assert report.errors == {"timeout": 4}


def test_chart_is_self_contained_html_with_svg() -> None:
    """The chart is one HTML file: inline SVG polylines, no script, no external URL."""
    report = LoadReport(
        url="http://x/",
        requests=3,
        completed=3,
        errors={},
        statuses={200: 3},
        duration=1.0,
        rps=3.0,
        mean=0.01,
        p50=0.01,
        p95=0.02,
        p99=0.02,
        max=0.03,
        timeline=[(0.0, 1, 0.01, 0.01, 0.01), (0.5, 2, 0.01, 0.02, 0.03)],
    )
    page = render_chart(report)
    assert page.startswith("<!doctype html>")
    assert page.count("<polyline") == 4
    assert "<script" not in page
    assert "https://" not in page
    assert "src=" not in page


async def test_cli_prints_a_json_report_and_writes_the_chart(tmp_path: Path) -> None:
    """`surge load URL --json` prints the report and writes the chart beside --report."""
    async with hit_server() as (server, seen):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from surge.cli._load import load; load()",
            f"{server.url}/hit",
            "-n",
            "50",
            "-c",
            "5",
            "--body",
            '{"n": {i}}',
            "--report",
            str(tmp_path / "run.json"),
            "--json",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    report = msgspec.json.decode(out, type=LoadReport)
    assert report.statuses == {202: 50}
    assert sorted(seen) == list(range(50))
    assert msgspec.json.decode((tmp_path / "run.json").read_bytes(), type=LoadReport) == report
    assert "<svg" in (tmp_path / "run.html").read_text()


async def test_cli_prints_a_readable_table(tmp_path: Path) -> None:
    """Without --json the CLI prints throughput, percentiles and status codes."""
    async with hit_server() as (server, _):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from surge.cli._load import load; load()",
            f"{server.url}/hit",
            "-n",
            "20",
            "-c",
            "2",
            "-b",
            '{"n": 1}',
            "--chart",
            str(tmp_path / "c.html"),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 0
    assert "req/s" in text
    assert "latency p99" in text
    assert "status 202" in text
    assert (tmp_path / "c.html").exists()


async def test_a_503_is_sent_again_after_its_retry_after() -> None:
    """A server answering 503 twice then 202: the load generator backs off by
    Retry-After (0.1 s here) and sends again; the final answer counts, and so
    do the retries; with retries=0 the 503 is the answer."""
    answers = [503, 503, 202] * 4
    sent_at: list[float] = []
    loop = asyncio.get_running_loop()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            sent_at.append(loop.time())
            status = answers.pop(0)
            reason = b"Service Unavailable" if status == 503 else b"Accepted"
            writer.write(
                b"HTTP/1.1 %d %s\r\nretry-after: 0.1\r\ncontent-length: 0\r\n\r\n"
                % (status, reason)
            )
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        report = await run_load(f"http://127.0.0.1:{port}/", 2, 1, method="GET")
        assert (report.statuses, report.retried) == ({202: 2}, 4)
        gaps = [b - a for a, b in itertools.pairwise(sent_at)]
        assert all(gaps[i] >= 0.05 for i in (0, 1, 3, 4)), gaps
        assert report.max >= 0.1
        once = await run_load(f"http://127.0.0.1:{port}/", 1, 1, method="GET", retries=0)
        assert (once.statuses, once.retried) == ({503: 1}, 0)
