"""The demo: a flood through the shop example, counted end to end."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

import surge
from surge.cli import main
from surge.examples import shop
from surge.tools._demo import demo, order_amount, print_report
from surge.tools._demo_http import http_demo, print_http_report


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.mark.realtime
async def test_demo_delivers_every_order_once_and_reports() -> None:
    """2,000 orders cross every stage; lost and duplicates are counted as 0."""
    report = await demo(events=2_000, producers=100, console=_quiet(), progress=False)
    reviewed = sum(1 for i in range(2_000) if order_amount(i) >= shop.REVIEW_THRESHOLD)
    stages = {s.name: s for s in report.stages}
    assert report.lost == 0
    assert report.duplicates == 0
    assert report.delivered == 2_000
    assert report.dead_lettered == 0
    assert stages["reserve_stock"].handled == 2_000
    assert stages["score_fraud"].handled == reviewed > 0
    assert stages["score_fraud"].executor == "process"
    assert stages["approve"].handled == 2_000 - reviewed
    assert stages["charge_and_ship"].handled == 2_000
    assert stages["charge_and_ship"].executor == "thread"
    assert stages["charge_and_ship"].retried > 0  # the flaky gateway was retried
    assert stages["delivered"].handled == 2_000
    assert 0 < report.latency_p50 <= report.latency_p95 <= report.latency_p99
    assert report.ok

    out = _quiet()
    print_report(report, out)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert "lost: 0" in text
    assert "events/s" in text
    for label in ("p50", "p95", "p99"):
        assert label in text
    for name in stages:
        assert name in text


@pytest.mark.realtime
async def test_demo_counts_orders_that_never_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage that silently drops orders makes the demo report them lost."""
    real = shop.charge_and_ship

    def drop_some(ev: shop.OrderScored, ctx: surge.Context) -> shop.OrderShipped | None:
        if ev.order_id.endswith("7"):
            return None
        return real(ev, ctx)

    monkeypatch.setattr(shop, "charge_and_ship", drop_some)
    report = await demo(events=500, producers=50, console=_quiet(), progress=False)
    assert report.lost == 50
    assert report.delivered == 450
    assert not report.ok
    out = _quiet()
    print_report(report, out)
    assert "lost: 50" in out.file.getvalue()  # type: ignore[attr-defined]


def test_demo_command_prints_report_and_exits_zero() -> None:
    """`surge demo` with a small flood prints the report and exits 0."""
    result = CliRunner().invoke(
        main, ["demo", "--in-process", "--events", "1000", "--producers", "50", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "1,000 orders from 50 producers on memory://" in result.output
    assert "lost: 0" in result.output


def test_demo_command_rejects_zero_events() -> None:
    """`surge demo --events 0` is a usage error, not an empty run."""
    result = CliRunner().invoke(main, ["demo", "--events", "0"])
    assert result.exit_code == 2
    assert "--events" in result.output


def test_demo_command_exits_nonzero_when_orders_are_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """`surge demo` exits 1 and prints the lost count when orders go missing."""
    real = shop.charge_and_ship

    def drop_some(ev: shop.OrderScored, ctx: surge.Context) -> shop.OrderShipped | None:
        return None if ev.order_id.endswith("3") else real(ev, ctx)

    monkeypatch.setattr(shop, "charge_and_ship", drop_some)
    result = CliRunner().invoke(
        main, ["demo", "--in-process", "-n", "200", "-p", "20", "--no-progress"]
    )
    assert result.exit_code == 1, result.output
    assert "lost: 20" in result.output


@pytest.mark.realtime
@pytest.mark.parametrize("client", ["process", "loop"])
async def test_http_demo_matches_every_accepted_request(tmp_path: Path, client: str) -> None:
    """2,000 orders POSTed over sockets: every 202 ships once, counts add up, chart written."""
    chart = tmp_path / "report.html"
    report = await http_demo(
        requests=2_000,
        concurrency=50,
        console=_quiet(),
        progress=False,
        chart=chart,
        client=client,
    )
    assert report.url.startswith("http://127.0.0.1:")
    assert report.answered == 2_000
    assert sum(report.statuses.values()) == report.answered
    assert report.statuses.get(202, 0) == report.accepted == 2_000
    assert report.refused == 0
    assert not report.errors
    assert report.lost == 0
    assert report.unconfirmed == 0
    assert report.pipeline.delivered == 2_000
    assert report.pipeline.duplicates == 0
    stages = {s.name: s for s in report.pipeline.stages}
    assert stages["reserve_stock"].handled == 2_000
    assert stages["delivered"].handled == 2_000
    assert 0 < report.p50 <= report.p95 <= report.p99 <= report.max
    assert report.ok

    out = _quiet()
    print_http_report(report, out)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    for line in ("req/s", "p50", "p95", "p99", "max", "status codes: 202: 2,000", "lost: 0"):
        assert line in text
    flat = " ".join(text.split())
    assert {"process": "in a child process", "loop": "on one loop"}[client] in flat
    html = chart.read_text()
    assert html.startswith("<!doctype html>")
    assert "<svg" in html
    # self-contained: nothing fetched (the served URL appears only as text)
    assert not re.search(r"<script|<link|<img|(src|href)\s*=|url\(", html)
    assert report.url in html


@pytest.mark.realtime
async def test_http_demo_counts_refused_requests_apart_from_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past max_in_flight the ingress answers 503: shed or refused, never lost; 202s ship."""
    from surge.http import _ingress

    # Publishing is instant on memory://, so requests never pile up by
    # themselves: hold every publish until the ingress has refused one.
    refused = asyncio.Event()
    answer, publish = _ingress._answer, surge.App.publish

    async def noting(send: Any, status: int, *args: Any) -> None:
        if status == 503:
            refused.set()
        await answer(send, status, *args)

    async def held(self: surge.App, *args: Any, **kwargs: Any) -> Any:
        await refused.wait()
        return await publish(self, *args, **kwargs)

    monkeypatch.setattr(_ingress, "_answer", noting)
    monkeypatch.setattr(surge.App, "publish", held)
    report = await http_demo(
        requests=1_500,
        concurrency=100,
        console=_quiet(),
        progress=False,
        client="loop",
        max_in_flight=4,
    )
    # The generator waits out each 503 and sends again: the refusals show as
    # shed, and every request ends accepted unless it ran out of retries.
    assert report.shed > 0
    assert report.accepted > 0
    assert report.accepted + report.refused == report.answered == 1_500
    assert set(report.statuses) <= {202, 503}
    assert report.pipeline.delivered == report.accepted
    assert report.lost == 0
    assert report.ok
    out = _quiet()
    print_http_report(report, out)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert f"refused (503, not lost): {report.refused:,}" in text
    assert f"shed and sent again: {report.shed:,}" in text


@pytest.mark.realtime
async def test_http_demo_counts_accepted_orders_that_never_ship(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An order answered 202 that is silently dropped is reported lost."""
    real = shop.charge_and_ship

    def drop_some(ev: shop.OrderScored, ctx: surge.Context) -> shop.OrderShipped | None:
        return None if ev.order_id.endswith("7") else real(ev, ctx)

    monkeypatch.setattr(shop, "charge_and_ship", drop_some)
    report = await http_demo(
        requests=500, concurrency=20, console=_quiet(), progress=False, client="loop"
    )
    assert report.accepted == 500
    assert report.lost == 50
    assert not report.ok


@pytest.mark.realtime
def test_demo_command_drives_http_and_writes_the_chart(tmp_path: Path) -> None:
    """`surge demo` by default POSTs over HTTP, prints the report and the chart path."""
    chart = tmp_path / "demo.html"
    result = CliRunner().invoke(
        main, ["demo", "-n", "1000", "-c", "20", "--no-progress", "--report", str(chart)]
    )
    assert result.exit_code == 0, result.output
    assert "surge demo over HTTP" in result.output
    assert "lost: 0" in result.output
    assert str(chart) in result.output.replace("\n", "")
    assert chart.exists()


@pytest.mark.realtime
def test_demo_command_takes_the_ingress_target_latency(tmp_path: Path) -> None:
    """`surge demo --target-latency S` runs the ingress's admission at that
    target (the report says it); it is refused with --in-process, which has
    no ingress, and when not positive."""
    chart = tmp_path / "demo.html"
    args = ["demo", "-n", "500", "-c", "20", "--no-progress", "--report", str(chart)]
    result = CliRunner().invoke(main, [*args, "--target-latency", "0.05"])
    assert result.exit_code == 0, result.output
    assert "target 50.0 ms" in result.output
    assert "lost: 0" in result.output
    for bad in (
        ["--in-process", "--target-latency", "0.1"],
        ["--target-latency", "0"],
        ["--target-latency", "nan"],
    ):
        refused = CliRunner().invoke(main, ["demo", "-n", "10", "--no-progress", *bad])
        assert refused.exit_code == 2, refused.output
