"""``surge demo``: a bounded flood of orders through the shop example.

Producers publish orders as fast as backpressure lets them; a tracker
subscribed to the last event counts every order id it sees, so the report's
``lost`` and ``duplicates`` are counted, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from array import array
from collections.abc import Callable, Sequence
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
from rich.table import Table

from .._app import App, Subscription
from .._event import event_type, new_id
from ..examples import shop

__all__ = ("DemoReport", "StageReport", "demo", "order_amount", "run_demo")


class StageReport(msgspec.Struct, frozen=True):
    name: str
    executor: str
    handled: int
    retried: int
    dead_lettered: int


class DemoReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a demo run measured."""

    events: int
    producers: int
    transport: str
    elapsed: float
    """Seconds from the first publish to the last order accounted for."""
    latency_p50: float
    latency_p95: float
    latency_p99: float
    """Seconds from an order's publish to its shipment being handled."""
    stages: tuple[StageReport, ...]
    delivered: int
    dead_lettered: int
    duplicates: int
    lost: int

    @property
    def throughput(self) -> float:
        return self.events / self.elapsed if self.elapsed > 0 else math.inf

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0


def order_amount(i: int) -> float:
    """A spread of order amounts (0 to 999.99), the same in every run."""
    return (i * 7919) % 100_000 / 100


class Tracker:
    """Counts shipped orders of this run by their number."""

    def __init__(self, run: str, events: int, now: Callable[[], float]) -> None:
        self.prefix = f"{run}-"
        self.counts = bytearray(events)
        self.latencies = array("d")
        self.placed = array("d")
        """When each shipped order was placed (wall clock), as latencies."""
        self.unique = 0
        self.duplicates = 0
        self.strays = 0
        self.now = now
        self.complete = asyncio.Event()

    async def delivered(self, ev: shop.OrderShipped) -> None:
        oid = ev.order_id
        if not oid.startswith(self.prefix):
            self.strays += 1  # left on a durable transport by an earlier run
            return
        i = int(oid[len(self.prefix) :])
        c = self.counts[i]
        if c:
            self.duplicates += 1
            self.counts[i] = min(c + 1, 255)
            return
        self.counts[i] = 1
        self.unique += 1
        self.latencies.append(self.now() - ev.placed_at)
        self.placed.append(ev.placed_at)
        if self.unique == len(self.counts):
            self.complete.set()


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def demo(
    *,
    events: int = 100_000,
    producers: int = 1_000,
    transport: str = "memory://",
    console: Console | None = None,
    progress: bool = True,
    stall_timeout: float = 30.0,
    app_options: dict[str, Any] | None = None,
) -> DemoReport:
    """Run the shop app in this process and flood it with ``events`` orders
    from ``producers`` concurrent coroutines; what was measured.

    The run ends when every order is shipped or dead-lettered, or when the
    transport has settled (nothing queued, in flight or scheduled; memory://
    can tell), or after ``stall_timeout`` seconds without progress; orders
    that never arrived are reported as lost.
    """
    if events < 1 or producers < 1:
        raise ValueError("events and producers must be at least 1")
    console = console or Console(stderr=True)
    # Retries of the flaky payment stage are part of the show: counted in
    # the report rather than logged one by one. Errors still print.
    surge_log = logging.getLogger("surge")
    level = surge_log.level
    surge_log.setLevel(max(level, logging.ERROR))
    try:
        return await _demo(
            events, producers, transport, console, progress, stall_timeout, app_options
        )
    finally:
        surge_log.setLevel(level)


async def _demo(
    events: int,
    producers: int,
    transport: str,
    console: Console,
    progress: bool,
    stall_timeout: float,
    app_options: dict[str, Any] | None,
) -> DemoReport:
    # In process: no ingress, the producers publish directly.
    app = shop.make_app(transport=transport, **{"http": False, **(app_options or {})})
    clock = app.clock
    run = new_id()[-10:]
    tracker = Tracker(run, events, clock.time)
    app.on(shop.OrderShipped, name="delivered", concurrency=64)(tracker.delivered)
    subs = list(app.subscriptions.values())
    expected = {s.name: events for s in subs}
    reviewed = sum(1 for i in range(events) if order_amount(i) >= shop.REVIEW_THRESHOLD)
    for s in subs:
        if s.handler is shop.score_fraud:
            expected[s.name] = reviewed
        elif s.handler is shop.approve:
            expected[s.name] = events - reviewed

    published = 0
    producers = min(producers, events)

    async def produce(first: int) -> None:
        nonlocal published
        for i in range(first, events, producers):
            oid = f"{run}-{i}"
            order = shop.OrderPlaced(
                order_id=oid,
                customer=f"c{i % 5_000}",
                amount=order_amount(i),
                placed_at=clock.time(),
            )
            await app.publish(order, key=oid)
            published += 1

    bar = Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=False,
    )
    tasks: dict[str, TaskID] = {"": bar.add_task("published", total=events)}
    for s in subs:
        short = s.name.split(".", 1)[1]
        tasks[s.name] = bar.add_task(short, total=expected[s.name] or None)

    def dead_now() -> int:
        return sum(st.dead_lettered for st in app.statistics().subscriptions.values())

    def refresh() -> None:
        bar.update(tasks[""], completed=published)
        for name, st in app.statistics().subscriptions.items():
            bar.update(tasks[name], completed=st.succeeded)

    async with app:
        drainable = app.capabilities.idle is not None  # App.drain needs IdleAware
        start = clock.monotonic()
        flood = asyncio.gather(*(produce(p) for p in range(producers)))
        all_in = asyncio.ensure_future(tracker.complete.wait())
        # On a transport that can tell when it holds nothing more, "settled"
        # ends the wait exactly; elsewhere only the stall timeout does.
        settled: asyncio.Future[None] | None = None
        last_seen = (-1, start)
        with bar:
            while True:
                waits: set[asyncio.Future[Any]] = {all_in}
                if not flood.done():
                    waits.add(flood)
                elif drainable:
                    if settled is None:
                        settled = asyncio.ensure_future(app.drain())
                    waits.add(settled)
                await asyncio.wait(waits, timeout=0.1)
                refresh()
                accounted = tracker.unique + dead_now()
                if flood.done() and (
                    accounted >= events
                    or flood.exception() is not None
                    or (settled is not None and settled.done())
                ):
                    break
                now = clock.monotonic()
                if published + accounted != last_seen[0]:
                    last_seen = (published + accounted, now)
                elif now - last_seen[1] > stall_timeout:
                    console.print(f"[red]no progress for {stall_timeout:.0f}s; giving up[/red]")
                    break
            elapsed = clock.monotonic() - start
            for fut in (all_in, settled, flood):
                if fut is not None and not fut.done():
                    fut.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fut
            if not flood.cancelled():
                await flood  # re-raises a producer's error
            refresh()
        if drainable:
            # Late copies, if any, arrive before duplicates are counted.
            try:
                await asyncio.wait_for(app.drain(), stall_timeout)
            except TimeoutError:
                pass
        dead_ids = await dead_order_numbers(app, tracker)

    counts = tracker.counts
    lost = sum(1 for i in range(events) if not counts[i] and i not in dead_ids)
    return pipeline_report(
        app, subs, tracker, dead_ids, events=events, producers=producers,
        transport=transport, elapsed=elapsed, lost=lost,
    )  # fmt: skip


async def dead_order_numbers(app: App, tracker: Tracker) -> set[int]:
    """The numbers of this run's orders that ended in the dead letters."""
    dead_ids: set[int] = set()
    for letter in await app.dead_letters():
        tp = event_type(letter.topic)
        if tp is None:
            continue
        ev = app.codec.decode_event(letter.body, tp, topic=letter.topic)
        oid = getattr(ev, "order_id", "")
        if isinstance(oid, str) and oid.startswith(tracker.prefix):
            dead_ids.add(int(oid[len(tracker.prefix) :]))
    return dead_ids


def pipeline_report(
    app: App, subs: Sequence[Subscription], tracker: Tracker, dead_ids: set[int], *,
    events: int, producers: int, transport: str, elapsed: float, lost: int,
) -> DemoReport:  # fmt: skip
    """The pipeline half of a demo's report, from the app's counters."""
    stats = app.statistics().subscriptions
    lat = sorted(tracker.latencies)
    return DemoReport(
        events=events,
        producers=producers,
        transport=transport,
        elapsed=elapsed,
        latency_p50=_quantile(lat, 0.50),
        latency_p95=_quantile(lat, 0.95),
        latency_p99=_quantile(lat, 0.99),
        stages=tuple(
            StageReport(
                s.name.split(".", 1)[1],
                s.kind,
                stats[s.name].succeeded,
                stats[s.name].retried,
                stats[s.name].dead_lettered,
            )
            for s in subs
        ),
        delivered=tracker.unique,
        dead_lettered=len(dead_ids),
        duplicates=tracker.duplicates,
        lost=lost,
    )


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def print_report(report: DemoReport, console: Console, *, header: str | None = None) -> None:
    """The report: throughput, latency, per-stage counts and the loss check."""
    table = Table(title=None, box=None, pad_edge=False)
    table.add_column("stage")
    table.add_column("runs in")
    table.add_column("handled", justify="right")
    table.add_column("retried", justify="right")
    table.add_column("dead-lettered", justify="right")
    for st in report.stages:
        table.add_row(
            st.name, st.executor, f"{st.handled:,}", f"{st.retried:,}", f"{st.dead_lettered:,}"
        )
    handled = sum(st.handled for st in report.stages)
    console.print(
        header
        or f"\n[bold]surge demo[/bold]: {report.events:,} orders from {report.producers:,} "
        f"producers on {report.transport}"
    )
    console.print(f"time:        {report.elapsed:.2f} s")
    console.print(
        f"throughput:  {report.throughput:,.0f} events/s "
        f"({handled / report.elapsed if report.elapsed else 0:,.0f} handler runs/s)"
    )
    console.print(
        f"latency:     p50 {_duration(report.latency_p50)}  p95 {_duration(report.latency_p95)}"
        f"  p99 {_duration(report.latency_p99)}  (placed -> shipped)"
    )
    console.print(table)
    console.print(
        f"delivered:   {report.delivered:,}   dead-lettered: {report.dead_lettered:,}   "
        f"duplicates: {report.duplicates:,}"
    )
    style = "green" if report.lost == 0 else "bold red"
    console.print(f"[{style}]lost: {report.lost}[/{style}]", highlight=False)


def run_demo(
    *,
    events: int = 100_000,
    producers: int = 1_000,
    transport: str = "memory://",
    console: Console | None = None,
    progress: bool = True,
) -> DemoReport:
    """Run :func:`demo` on a new loop and print its report."""
    from .._app import run_loop

    console = console or Console()
    report = run_loop(
        demo(
            events=events,
            producers=producers,
            transport=transport,
            console=console,
            progress=progress,
        )
    )
    print_report(report, console)
    return report
