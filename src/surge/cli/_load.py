"""``surge load``: drive HTTP load at any endpoint from the command line.

The load generator itself is :func:`surge.tools.run_load`; this module reads
the options, shows progress and prints (or writes) the report.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec

from ..tools import LoadReport, run_load, write_chart

__all__ = ("load",)


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
    "--retries",
    default=3,
    show_default=True,
    help="Times a 503 is sent again, after its Retry-After (0: never).",
)
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
    retries: int,
    chart: Path | None,
    report: Path | None,
    as_json: bool,
) -> None:
    """Send REQUESTS requests to URL over CONCURRENCY keep-alive connections
    and report throughput, latency percentiles and status codes."""
    from .._app import run_loop

    if not url.startswith("http://"):
        raise click.BadParameter(f"{url!r}: give an http://host[:port]/path URL", param_hint="URL")
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
    kwargs: dict[str, Any] = {
        "method": method,
        "body": fixed,
        "headers": headers,
        "timeout": timeout,
        "retries": retries,
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
    else:
        _print_report(result, chart_path)
    if result.completed == 0:
        errors = ", ".join(f"{n} x {kind}" for kind, n in sorted(result.errors.items()))
        raise click.ClickException(
            f"no request to {url} was answered ({errors or 'no answer'}): is the server up?"
        )


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
    if result.retried:
        table.add_row("sent again after 503", f"{result.retried:,}", style="yellow")
    for kind, n in sorted(result.errors.items()):
        table.add_row(f"error {kind}", f"{n:,}", style="red")
    table.add_row("chart", str(chart_path))
    Console().print(table)


if __name__ == "__main__":  # pragma: no cover - `python -m surge.cli._load`
    load()
