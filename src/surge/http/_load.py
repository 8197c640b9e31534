"""``surge load``: an asynchronous HTTP load generator for any endpoint.

``concurrency`` workers each keep one HTTP/1.1 connection alive and send
requests until ``requests`` have been sent. With ``rate``, request ``i`` is
due at ``i / rate`` seconds and its latency counts from then, not from when
a worker got to it, so a slow server cannot hide its queue (no coordinated
omission). It measures real time: it is a tool that times a server, not
library code, so it reads ``time.perf_counter`` directly.
"""

from __future__ import annotations

import asyncio
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec

from ._chart import write_chart
from ._client import Connection, Response, build_request, split_url

__all__ = ("LoadReport", "load", "run_load")


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a load run measured; latencies in seconds."""

    url: str
    requests: int
    completed: int
    """Requests answered (any status)."""
    errors: dict[str, int]
    """Requests with no answer, by cause (``timeout``, ``ConnectionResetError``...)."""
    statuses: dict[int, int]
    duration: float
    rps: float
    """Answered requests per second over the whole run."""
    mean: float
    p50: float
    p95: float
    p99: float
    max: float
    timeline: list[tuple[float, int, float, float, float]] = msgspec.field(default_factory=list)
    """Per time slice: (start s, answers, p50, p99, max)."""

    def summary(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())) or "none"
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        ms = 1000.0
        return (
            f"{self.completed}/{self.requests} answered in {self.duration:.2f}s: "
            f"{self.rps:,.0f} req/s\n"
            f"latency ms: p50 {self.p50 * ms:.2f}  p95 {self.p95 * ms:.2f}  "
            f"p99 {self.p99 * ms:.2f}  max {self.max * ms:.2f}  mean {self.mean * ms:.2f}\n"
            f"status codes: {codes}\nerrors: {errs}"
        )


async def run_load(
    url: str,
    requests: int = 1000,
    concurrency: int = 50,
    rate: float | None = None,
    body_factory: Callable[[int], bytes] | None = None,
    *,
    method: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    on_response: Callable[[int, Response], object] | None = None,
    on_progress: Callable[[int, int], object] | None = None,
) -> LoadReport:
    """Send ``requests`` requests to ``url`` from ``concurrency`` connections.

    ``body`` is sent with every request, or ``body_factory(i)`` with the
    i-th; ``method`` defaults to POST with a body, GET without.
    ``on_response(i, response)`` sees every answer; ``on_progress(done,
    requests)`` is called as answers arrive. Every request is bounded by
    ``timeout`` seconds (connecting included).
    """
    if requests < 0 or concurrency < 1:
        raise ValueError("requests must be >= 0 and concurrency >= 1")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    host, port, path = split_url(url)
    has_body = body is not None or body_factory is not None
    verb = (method or ("POST" if has_body else "GET")).upper()
    fixed = None if body_factory else build_request(verb, host, port, path, body, headers)
    starts = array("d")
    latencies = array("d")
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    next_index = 0
    done = 0
    clock = time.perf_counter
    t0 = clock()

    async def worker() -> None:
        nonlocal next_index, done
        conn: Connection | None = None
        try:
            while next_index < requests:
                i = next_index
                next_index += 1
                if rate is not None:
                    due = t0 + i / rate
                    wait = due - clock()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    start = due
                else:
                    start = clock()
                if fixed is not None:
                    request = fixed
                else:
                    assert body_factory is not None
                    request = build_request(verb, host, port, path, body_factory(i), headers)
                try:
                    async with asyncio.timeout(timeout):
                        if conn is None or conn.closed:
                            conn = await Connection.open(host, port)
                        response = await conn.send(request)
                except TimeoutError:
                    errors["timeout"] = errors.get("timeout", 0) + 1
                    if conn is not None:
                        conn.close()
                    conn = None
                except OSError as exc:
                    name = type(exc).__name__
                    errors[name] = errors.get(name, 0) + 1
                    if conn is not None:
                        conn.close()
                    conn = None
                else:
                    latencies.append(clock() - start)
                    starts.append(start - t0)
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    if on_response is not None:
                        on_response(i, response)
                    if not conn.keep_alive:
                        conn.close()
                        conn = None
                done += 1
                if on_progress is not None:
                    on_progress(done, requests)
        finally:
            if conn is not None:
                conn.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, max(requests, 1)))))
    duration = clock() - t0
    return _report(url, requests, statuses, errors, duration, starts, latencies)


def _report(
    url: str,
    requests: int,
    statuses: dict[int, int],
    errors: dict[str, int],
    duration: float,
    starts: array[float],
    latencies: array[float],
) -> LoadReport:
    ordered = sorted(latencies)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] if n else 0.0

    return LoadReport(
        url=url,
        requests=requests,
        completed=n,
        errors=dict(errors),
        statuses=dict(sorted(statuses.items())),
        duration=duration,
        rps=n / duration if duration > 0 else 0.0,
        mean=sum(ordered) / n if n else 0.0,
        p50=pct(0.50),
        p95=pct(0.95),
        p99=pct(0.99),
        max=ordered[-1] if n else 0.0,
        timeline=_timeline(starts, latencies, duration),
    )


def _timeline(
    starts: array[float], latencies: array[float], duration: float, slices: int = 100
) -> list[tuple[float, int, float, float, float]]:
    if not latencies:
        return []
    width = max(duration / slices, 0.001)
    buckets: dict[int, list[float]] = {}
    for s, lat in zip(starts, latencies, strict=True):
        buckets.setdefault(int(s / width), []).append(lat)
    out = []
    for b in sorted(buckets):
        lats = sorted(buckets[b])
        k = len(lats)
        out.append((b * width, k, lats[k // 2], lats[min(k - 1, int(0.99 * k))], lats[-1]))
    return out


def _raise_fd_limit(wanted: int) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


@click.command("load")
@click.argument("url")
@click.option("-n", "--requests", default=1000, show_default=True, help="Requests to send.")
@click.option("-c", "--concurrency", default=50, show_default=True, help="Open connections.")
@click.option("-r", "--rate", type=float, default=None, help="Requests per second (open loop).")
@click.option("-m", "--method", default=None, help="HTTP method [POST with a body, else GET].")
@click.option("-b", "--body", default=None, help="JSON body; '{i}' becomes the request index.")
@click.option("-H", "--header", "header", multiple=True, help="'Name: value', repeatable.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds per request.")
@click.option(
    "--chart",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Latency-over-time chart (HTML) [surge-load.html, or beside --report].",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report as JSON here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON only.")
def load(
    url: str,
    requests: int,
    concurrency: int,
    rate: float | None,
    method: str | None,
    body: str | None,
    header: tuple[str, ...],
    timeout: float,
    chart: Path | None,
    report: Path | None,
    as_json: bool,
) -> None:
    """Send REQUESTS requests to URL over CONCURRENCY keep-alive connections
    and report throughput, latency percentiles and status codes."""
    from .._app import run_loop

    headers = {}
    for h in header:
        name, sep, value = h.partition(":")
        if not sep:
            raise click.BadParameter(f"{h!r}: use 'Name: value'", param_hint="--header")
        headers[name.strip()] = value.strip()
    body_factory = None
    fixed = None
    if body is not None:
        text = body
        if "{i}" in text:
            body_factory = _templated(text)
        else:
            fixed = text.encode()
    _raise_fd_limit(concurrency + 256)
    kwargs: dict[str, Any] = {
        "method": method,
        "body": fixed,
        "headers": headers,
        "timeout": timeout,
    }
    if as_json:
        result = run_loop(run_load(url, requests, concurrency, rate, body_factory, **kwargs))
    else:
        result = run_loop(_with_progress(url, requests, concurrency, rate, body_factory, kwargs))
    chart_path = chart or (report.with_suffix(".html") if report else Path("surge-load.html"))
    write_chart(result, chart_path)
    if report is not None:
        report.write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    if as_json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
        return
    _print_report(result, chart_path)


def _templated(text: str) -> Callable[[int], bytes]:
    def make(i: int) -> bytes:
        return text.replace("{i}", str(i)).encode()

    return make


async def _with_progress(
    url: str,
    requests: int,
    concurrency: int,
    rate: float | None,
    body_factory: Callable[[int], bytes] | None,
    kwargs: dict[str, Any],
) -> LoadReport:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("[bold]load[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rps]:>8,.0f} req/s"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False, refresh_per_second=10) as progress:
        task = progress.add_task("load", total=requests, rps=0.0)
        start = time.perf_counter()

        def on_progress(done: int, total: int) -> None:
            # Rich redraws on its own thread; a counter update is enough here.
            if done % 64 == 0 or done == total:
                elapsed = time.perf_counter() - start
                progress.update(task, completed=done, rps=done / elapsed if elapsed else 0.0)

        return await run_load(
            url, requests, concurrency, rate, body_factory, on_progress=on_progress, **kwargs
        )


def _print_report(result: LoadReport, chart_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    ms = 1000.0
    table = Table(title=f"surge load {result.url}", show_header=False)
    table.add_row("answered", f"{result.completed:,} / {result.requests:,}")
    table.add_row("duration", f"{result.duration:.2f} s")
    table.add_row("throughput", f"{result.rps:,.0f} req/s")
    for name in ("p50", "p95", "p99", "max", "mean"):
        table.add_row(f"latency {name}", f"{getattr(result, name) * ms:.2f} ms")
    for code, n in result.statuses.items():
        table.add_row(f"status {code}", f"{n:,}")
    for kind, n in sorted(result.errors.items()):
        table.add_row(f"error {kind}", f"{n:,}", style="red")
    table.add_row("chart", str(chart_path))
    Console().print(table)


if __name__ == "__main__":  # pragma: no cover - `python -m surge.http._load`
    load()
