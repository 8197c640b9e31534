"""``surge demo`` over HTTP: the shop's ingress on a local port, driven by the
built-in load generator over real sockets.

Every request carries a unique order id; the tracker subscribed to the last
event counts the ids it sees, so ``lost`` is every request answered 202 whose
order never shipped nor was dead-lettered: counted, not assumed. Requests
refused (503) are counted apart: refusing is the ingress's promise under
overload, and a refused order was never accepted.

The load generator runs in a child process by default (``client="process"``),
as a real client would: on one loop with the server it takes a third of the
loop's time away from the handlers, so the pipeline falls behind the
ingress. ``client="loop"`` keeps both in one process. The report header says
which ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from .._event import new_id
from ..examples import shop
from ..http import AdmissionStats
from ._demo import (
    DemoReport,
    Tracker,
    dead_order_numbers,
    order_amount,
    pipeline_report,
    print_report,
)

__all__ = ("HttpDemoReport", "http_demo", "print_http_report", "run_http_demo")

RETRIES = 1_000
"""A refused order is sent again after its ``Retry-After`` until it is
accepted (a bound, so a server that never admits still ends the run)."""

MODES = {
    "process": "load generator in a child process, server and pipeline in this one",
    "loop": "load generator, server and pipeline on one loop, one process",
}


class _ClientResult(msgspec.Struct, frozen=True):
    report: Any
    accepted: bytes
    """One byte per request: 1 if it was answered 202."""


def _order_body(run: str, i: int) -> bytes:
    return msgspec.json.encode(
        {
            "order_id": f"{run}-{i}",
            "customer": f"c{i % 5_000}",
            "amount": order_amount(i),
            "placed_at": time.time(),
        }
    )


class HttpDemoReport(msgspec.Struct, frozen=True, kw_only=True):
    """What an HTTP demo run measured: the load generator's view and the
    pipeline's."""

    url: str
    mode: str
    concurrency: int
    requests: int
    answered: int
    accepted: int
    """Requests answered 202."""
    refused: int
    """Requests whose final answer was 503 (admission control), not lost."""
    shed: int = 0
    """503 answers the load generator waited out and sent again (every one
    counted; a request accepted on its second try counts one here)."""
    retried_requests: int = 0
    """Requests sent more than once (shed at least once)."""
    admission: AdmissionStats | None = None
    """The route's admission at the end (limit, estimated delay, target)."""
    pipeline_timeline: list[tuple[float, int, float, float, float]] = msgspec.field(
        default_factory=list
    )
    """Placed-to-shipped latency per time slice, by when the order was
    placed: (start s, orders, p50, p99, max)."""
    statuses: dict[int, int]
    errors: dict[str, int]
    """Requests with no answer, by cause."""
    duration: float
    """Seconds the load generator ran."""
    rps: float
    p50: float
    p95: float
    p99: float
    max: float
    """HTTP latency, seconds."""
    pipeline: DemoReport
    unconfirmed: int
    """Orders shipped whose request got no 202 (a timed-out answer)."""
    chart: str | None

    @property
    def lost(self) -> int:
        return self.pipeline.lost

    @property
    def ok(self) -> bool:
        return self.pipeline.ok and not self.errors


async def http_demo(
    *,
    requests: int = 100_000,
    concurrency: int = 500,
    transport: str = "memory://",
    console: Console | None = None,
    progress: bool = True,
    chart: Path | None = None,
    stall_timeout: float = 30.0,
    timeout: float = 30.0,
    client: str = "process",
    max_in_flight: int | None = None,
    target_latency: float | None = None,
) -> HttpDemoReport:
    """Serve the shop app's ingress on 127.0.0.1 (a free port) and send it
    ``requests`` orders from ``concurrency`` keep-alive connections; what was
    measured. ``chart``: where to write the latency-over-time chart (HTML);
    ``client``: ``"process"`` or ``"loop"`` (where the load generator runs);
    ``max_in_flight``: the ingress's admission bound (by default at least
    ``concurrency``, so nothing is refused); ``target_latency``: the
    queueing delay admission aims at (seconds; by default ``Limits``'s,
    0.25 s): lower sheds more and ships sooner (BENCHMARKS.md)."""
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be at least 1")
    if target_latency is not None and not target_latency > 0:
        raise ValueError("target_latency must be positive")
    if client not in MODES:
        raise ValueError(f"client must be one of {sorted(MODES)}, not {client!r}")
    console = console or Console(stderr=True)
    surge_log = logging.getLogger("surge")
    level = surge_log.level
    surge_log.setLevel(max(level, logging.ERROR))  # retries are counted, not logged
    try:
        return await _http_demo(
            requests,
            concurrency,
            transport,
            console,
            progress,
            chart,
            stall_timeout,
            timeout,
            client,
            max_in_flight or max(1000, concurrency),
            target_latency,
        )
    finally:
        surge_log.setLevel(level)


async def _http_demo(
    requests: int,
    concurrency: int,
    transport: str,
    console: Console,
    progress: bool,
    chart: Path | None,
    stall_timeout: float,
    timeout: float,
    client: str,
    max_in_flight: int,
    target_latency: float | None,
) -> HttpDemoReport:
    from ..http import Limits, Server
    from ._chart import write_chart
    from ._client import Response
    from ._load import LoadReport, _timeline, run_load

    app = shop.make_app(transport=transport, http=True)
    clock = app.clock
    run = new_id()[-10:]
    tracker = Tracker(run, requests, clock.time)
    app.on(shop.OrderShipped, name="delivered", concurrency=64)(tracker.delivered)
    subs = list(app.subscriptions.values())
    reviewed = sum(1 for i in range(requests) if order_amount(i) >= shop.REVIEW_THRESHOLD)

    counts = {"accepted": 0, "answered": 0}

    async def in_loop(url: str) -> tuple[LoadReport, bytes]:
        accepted = bytearray(requests)

        def on_response(i: int, response: Response) -> None:
            if response.status == 202:
                accepted[i] = 1
                counts["accepted"] += 1

        def on_progress(done: int, total: int) -> None:
            counts["answered"] = done

        result = await run_load(
            url,
            requests,
            concurrency,
            None,
            lambda i: _order_body(run, i),
            timeout=timeout,
            on_response=on_response,
            on_progress=on_progress,
            retries=RETRIES,
        )
        return result, bytes(accepted)

    async def in_child(url: str) -> tuple[LoadReport, bytes]:
        args = (url, str(requests), str(concurrency), run, str(timeout))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "surge.tools._demo_http",
            *args,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,  # the result line holds a byte per request
        )
        assert proc.stdout is not None
        final = b""
        try:
            async for line in proc.stdout:
                if line.startswith(b"P "):
                    answered, acc = line.split()[1:3]
                    counts["answered"], counts["accepted"] = int(answered), int(acc)
                elif line.startswith(b"R "):
                    final = line[2:]
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if code != 0 or not final:
            raise RuntimeError(f"the load generator process failed (exit {code})")
        out = msgspec.json.decode(final, type=_ClientResult)
        result = msgspec.convert(out.report, LoadReport, strict=False)
        counts["accepted"] = sum(out.accepted)
        counts["answered"] = result.completed
        return result, out.accepted

    bar = Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=False,
    )
    t_sent = bar.add_task("answered", total=requests)
    t_acc = bar.add_task("accepted (202)", total=requests)
    stage_tasks: dict[str, TaskID] = {}
    for s in subs:
        total = requests
        if s.handler is shop.score_fraud:
            total = reviewed
        elif s.handler is shop.approve:
            total = requests - reviewed
        stage_tasks[s.name] = bar.add_task(s.name.split(".", 1)[1], total=total or None)

    def dead_now() -> int:
        return sum(st.dead_lettered for st in app.statistics().subscriptions.values())

    def refresh() -> None:
        bar.update(t_sent, completed=counts["answered"])
        bar.update(t_acc, completed=counts["accepted"])
        for name, st in app.statistics().subscriptions.items():
            bar.update(stage_tasks[name], completed=st.succeeded)

    # Admit every connection the generator opens; a 503 (past max_in_flight)
    # is counted as refused, never as lost.
    limits = Limits(max_in_flight=max_in_flight, max_connections=concurrency + 256)
    if target_latency is not None:
        limits = msgspec.structs.replace(limits, target_latency=target_latency)
    async with app, Server(app, "127.0.0.1", 0, limits=limits) as server:
        drainable = app.capabilities.idle is not None  # App.drain needs IdleAware
        url = f"{server.url}/orders"
        start = clock.monotonic()
        wall_start = clock.time()
        load = asyncio.ensure_future((in_child if client == "process" else in_loop)(url))
        settled: asyncio.Future[None] | None = None
        last_seen = (-1, start)
        with bar:
            while True:
                waits: set[asyncio.Future[Any]] = set()
                if not load.done():
                    waits.add(load)
                elif drainable:
                    if settled is None:
                        settled = asyncio.ensure_future(app.drain())
                    waits.add(settled)
                await asyncio.wait(waits or {load}, timeout=0.1)
                refresh()
                accounted = tracker.unique + dead_now()
                if load.done() and (
                    accounted >= counts["accepted"]
                    or load.exception() is not None
                    or (settled is not None and settled.done())
                ):
                    break
                now = clock.monotonic()
                seen = counts["answered"] + accounted
                if seen != last_seen[0]:
                    last_seen = (seen, now)
                elif now - last_seen[1] > stall_timeout:
                    console.print(f"[red]no progress for {stall_timeout:.0f}s; giving up[/red]")
                    break
            elapsed = clock.monotonic() - start
            if settled is not None and not settled.done():
                settled.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await settled
            if not load.done():
                load.cancel()
            result, accepted = await load  # re-raises the generator's error
            refresh()
        if drainable:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(app.drain(), stall_timeout)
        dead_ids = await dead_order_numbers(app, tracker)
        admission = app.http.statistics().admission.get("POST /orders")

    shipped = tracker.counts
    lost = sum(1 for i in range(requests) if accepted[i] and not shipped[i] and i not in dead_ids)
    unconfirmed = sum(1 for i in range(requests) if shipped[i] and not accepted[i])
    pipeline = pipeline_report(
        app, subs, tracker, dead_ids, events=counts["accepted"], producers=concurrency,
        transport=transport, elapsed=elapsed, lost=lost,
    )  # fmt: skip
    placed = array("d", (t - wall_start for t in tracker.placed))
    span = max(result.duration, max(placed, default=0.0))
    timeline = _timeline(placed, tracker.latencies, span)
    report = HttpDemoReport(
        url=url,
        mode=MODES[client],
        concurrency=concurrency,
        requests=requests,
        answered=result.completed,
        accepted=counts["accepted"],
        refused=result.statuses.get(503, 0),
        shed=result.retried,
        retried_requests=result.retried_requests,
        admission=admission,
        pipeline_timeline=timeline,
        statuses=result.statuses,
        errors=result.errors,
        duration=result.duration,
        rps=result.rps,
        p50=result.p50,
        p95=result.p95,
        p99=result.p99,
        max=result.max,
        pipeline=pipeline,
        unconfirmed=unconfirmed,
        chart=str(chart) if chart is not None else None,
    )
    if chart is not None:
        write_chart(result, chart, pipeline=_chart_pipeline(report), rows=_chart_rows(report))
    return report


def _chart_pipeline(
    report: HttpDemoReport,
) -> tuple[str, list[tuple[float, int, float, float, float]]]:
    return ("Orders: placed to shipped, by when the order was placed", report.pipeline_timeline)


def _chart_rows(report: HttpDemoReport) -> list[tuple[str, str]]:
    p = report.pipeline
    rows = [
        (
            "placed -> shipped",
            f"p50 {_ms(p.latency_p50)} · p95 {_ms(p.latency_p95)} · p99 {_ms(p.latency_p99)}",
        ),
        ("orders", f"{report.accepted:,} accepted · {p.delivered:,} shipped · lost {p.lost:,}"),
        ("pipeline", f"{p.throughput:,.0f} orders/s over {p.elapsed:.2f} s on {p.transport}"),
    ]
    if report.admission is not None:
        rows.append(("admission", _admission_line(report.admission)))
    return rows


def _admission_line(a: AdmissionStats) -> str:
    limit = "none" if a.limit is None else f"{a.limit:,} events"
    return (
        f"target {_ms(a.target)} · shed {a.shed:,} · limit at the end {limit} "
        f"· estimated queueing then {_ms(a.delay)}"
    )


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def print_http_report(report: HttpDemoReport, console: Console) -> None:
    """The HTTP side (throughput, latency, status codes), then the
    pipeline's report and the loss check."""
    console.print(
        f"\n[bold]surge demo over HTTP[/bold]: {report.requests:,} POST {report.url} "
        f"from {report.concurrency:,} connections ({report.mode})"
    )
    console.print(
        f"http:        {report.answered:,} answered in {report.duration:.2f} s: "
        f"{report.rps:,.0f} req/s"
    )
    console.print(
        f"http latency: p50 {_ms(report.p50)}  p95 {_ms(report.p95)}  p99 {_ms(report.p99)}"
        f"  max {_ms(report.max)}"
    )
    codes = "  ".join(f"{k}: {v:,}" for k, v in report.statuses.items()) or "none"
    console.print(f"status codes: {codes}", highlight=False)
    console.print(
        f"accepted:    {report.accepted:,}   refused (503, not lost): {report.refused:,}"
        f"   shed and sent again: {report.shed:,} ({report.retried_requests:,} requests)",
        highlight=False,
    )
    if report.admission is not None:
        console.print(f"admission:   {_admission_line(report.admission)}", highlight=False)
    if report.errors:
        errs = "  ".join(f"{k}: {v:,}" for k, v in sorted(report.errors.items()))
        console.print(f"[red]no answer:   {errs}[/red]", highlight=False)
    if report.unconfirmed:
        console.print(f"shipped without a 202 (answer timed out): {report.unconfirmed:,}")
    pipeline = report.pipeline
    header = (
        f"\n[bold]pipeline[/bold]: {pipeline.events:,} accepted orders on {pipeline.transport}"
        " (time: first request to last order shipped; placed: when the accepted"
        " request was sent)"
    )
    print_report(pipeline, console, header=header)
    if report.chart is not None:
        console.print(f"latency chart: {report.chart}", highlight=False)


def run_http_demo(
    *,
    requests: int = 100_000,
    concurrency: int = 500,
    transport: str = "memory://",
    chart: Path | None = None,
    console: Console | None = None,
    progress: bool = True,
    client: str = "process",
    target_latency: float | None = None,
) -> HttpDemoReport:
    """Run :func:`http_demo` on a new loop and print its report."""
    from .._app import run_loop
    from ._load import raise_fd_limit

    console = console or Console()
    raise_fd_limit(concurrency + 512)
    report = run_loop(
        http_demo(
            requests=requests,
            concurrency=concurrency,
            transport=transport,
            console=console,
            progress=progress,
            chart=chart,
            client=client,
            target_latency=target_latency,
        )
    )
    print_http_report(report, console)
    return report


async def _client_main(url: str, requests: int, concurrency: int, run: str, timeout: float) -> None:
    """The child process's side: run the load, report progress lines
    (``P answered accepted``) and then the result (``R json``) on stdout."""
    from ._client import Response
    from ._load import run_load

    accepted = bytearray(requests)
    counts = [0, 0]
    out = sys.stdout.buffer

    def on_response(i: int, response: Response) -> None:
        if response.status == 202:
            accepted[i] = 1
            counts[1] += 1

    def on_progress(done: int, total: int) -> None:
        counts[0] = done

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.1)
            out.write(b"P %d %d\n" % (counts[0], counts[1]))
            out.flush()

    ticker = asyncio.ensure_future(tick())
    try:
        report = await run_load(
            url,
            requests,
            concurrency,
            None,
            lambda i: _order_body(run, i),
            timeout=timeout,
            on_response=on_response,
            on_progress=on_progress,
            retries=RETRIES,
        )
    finally:
        ticker.cancel()
    out.write(b"R " + msgspec.json.encode(_ClientResult(report, bytes(accepted))) + b"\n")
    out.flush()


if __name__ == "__main__":  # the load generator's process (client="process")
    from .._app import run_loop

    _url, _n, _c, _run, _timeout = sys.argv[1:6]
    run_loop(_client_main(_url, int(_n), int(_c), _run, float(_timeout)))
