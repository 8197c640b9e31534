"""Soak: the example shop behind its ingress, two workers, a steady rate for minutes.

Every other load test is a burst; these hold a rate, as a service sees it,
and assert what a user of one would (RELIABILITY.md, "Sustained load"):

- no answer 5xx but 503 (and no request left unanswered);
- no transport trouble in the workers' logs (a lock waited past its bound,
  a settle or a publish that failed, an error of any kind);
- request latency p99 within a stated bound (the long runs; the CI soak
  prints it);
- the resident memory of the workers' process trees flat over the second
  half of the run (growth under 10 %).

The CI soak runs the shop on sqlite for about 60 s at 200 requests/s (its
p99 is printed; the figure measured is in RELIABILITY.md). The ``slow``
ones run 10 minutes on each durable transport; ``SURGE_SOAK_SECONDS``,
``SURGE_SOAK_RATE`` and ``SURGE_SOAK_P99`` change their length, rate and
bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from surge.cli._supervisor import Supervisor
from surge.tools import LoadReport, run_load

from ._servers import (
    drop_postgres_schema,
    free_port,
    shared_amqp_url,
    shared_nats_url,
    shared_postgres_url,
    shared_redis_url,
)

pytestmark = pytest.mark.realtime

SHOP = "surge.examples.shop:app"

# What transport trouble looks like in a worker's log: the lines the
# transports, the runner and the ingress write when the broker fails them.
TROUBLE = re.compile(
    r"TransportError|database is locked|could not settle|could not hand back|cannot claim|"
    r"housekeeping failed|publishing its outputs failed|acknowledging \d+ deliveries failed|"
    r"the transport failed|a background write failed|Traceback| ERROR | CRITICAL "
)


@dataclass
class Soak:
    """What one soak measured."""

    report: LoadReport
    rss: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the load began, kB resident in the workers' trees)."""
    log: str = ""

    @property
    def growth(self) -> float:
        """Resident memory growth over the second half: the mean of the last
        three samples over the mean of the three from the middle, minus 1."""
        half = [kb for t, kb in self.rss if t >= self.report.duration / 2]
        assert len(half) >= 6, f"too few memory samples: {self.rss}"
        return (sum(half[-3:]) / 3) / (sum(half[:3]) / 3) - 1

    def trouble(self) -> list[str]:
        return [line for line in self.log.splitlines() if TROUBLE.search(line)]

    def summary(self) -> str:
        r = self.report
        return (
            f"{r.completed}/{r.requests} answered in {r.duration:.1f}s ({r.rps:.0f}/s), "
            f"statuses {r.statuses}, errors {r.errors}, 503 sent again {r.retried}; "
            f"ms p50 {r.p50 * 1e3:.1f} p99 {r.p99 * 1e3:.1f} max {r.max * 1e3:.1f}; "
            f"rss kB {self.rss[0][1] if self.rss else 0} -> {self.rss[-1][1] if self.rss else 0}"
            f" (second half {self.growth:+.1%}); load average {os.getloadavg()[0]:.1f}"
        )


def _tree_rss(roots: list[int]) -> int:
    """kB resident in ``roots`` and every process descended from them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    total = 0
    todo = list(roots)
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


async def soak(
    url: str,
    *,
    rate: float,
    seconds: float,
    read_log: Callable[[], str],
    env: dict[str, str] | None = None,
) -> Soak:
    """Run the shop on ``url`` with two workers serving HTTP, drive ``POST
    /orders`` at ``rate`` for ``seconds``, sample the workers' memory 40
    times, stop the workers; what was measured."""
    port = free_port()
    sup = Supervisor(SHOP, url, 2, http=("127.0.0.1", port), env=env, shutdown_timeout=10.0)
    running = asyncio.create_task(sup.run())
    samples: list[tuple[float, int]] = []
    loop = asyncio.get_running_loop()
    try:
        await sup.wait_ready()
        start = loop.time()

        async def sample() -> None:
            while True:
                samples.append((loop.time() - start, _tree_rss(sup.pids)))
                await asyncio.sleep(seconds / 40)

        sampler = asyncio.create_task(sample())
        try:
            report = await run_load(
                f"http://127.0.0.1:{port}/orders",
                int(rate * seconds),
                100,
                rate,
                lambda i: (
                    b'{"order_id":"o%d","customer":"c%d","amount":%d.5,"placed_at":0}'
                    % (i, i % 997, i % 1000)
                ),
            )
        finally:
            sampler.cancel()
    finally:
        sup.request_stop()
        code = await running
    assert code == 0, f"the workers did not stop cleanly (exit {code})"
    return Soak(report, samples, read_log())


def _check(result: Soak, p99_bound: float | None) -> None:
    r = result.report
    print(result.summary())
    assert r.errors == {}, f"unanswered requests: {r.errors}"
    assert r.completed == r.requests
    bad = {s: n for s, n in r.statuses.items() if s >= 500 and s != 503}
    assert not bad, f"5xx answers other than 503: {bad}"
    # the log is really read: the shop's payments that fail once are in it
    assert "PaymentDeclined" in result.log, "no worker log was captured"
    trouble = result.trouble()
    assert not trouble, f"{len(trouble)} lines of transport trouble, first: {trouble[:3]}"
    if p99_bound is not None:
        assert r.p99 <= p99_bound, (
            f"p99 {r.p99 * 1e3:.0f} ms over the bound of {p99_bound * 1e3:.0f}"
        )
    assert result.growth < 0.10, f"memory grew {result.growth:.1%} over the second half"


async def test_ci_soak_shop_on_sqlite(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The shop on sqlite, 2 workers, 200 requests/s for 60 s: no 5xx but 503,
    no transport trouble logged, memory flat in the second half. Its p99 is
    printed, not asserted: on a shared 2-core machine it measures the
    neighbours (2.4 s in a CI run beside seven other sessions' tests, 240-268
    ms at load 13 in RELIABILITY.md); the soak-marked runs assert theirs."""
    db = tmp_path / "soak.db"
    result = await soak(
        f"sqlite:///{db}", rate=200, seconds=60, read_log=lambda: capfd.readouterr().err
    )
    _check(result, None)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    assert dead == 0


_SLOW_SECONDS = float(os.environ.get("SURGE_SOAK_SECONDS", "600"))
_SLOW_RATE = float(os.environ.get("SURGE_SOAK_RATE", "500"))
_SLOW_P99 = float(os.environ.get("SURGE_SOAK_P99", "0.25"))


@pytest.mark.slow
@pytest.mark.soak  # 10 minutes per transport: past CI's budget, run with -m soak
@pytest.mark.timeout(int(_SLOW_SECONDS) + 300)
@pytest.mark.parametrize("transport", ["sqlite", "redis", "nats", "postgres", "amqp"])
async def test_ten_minute_soak(
    transport: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The shop on each durable transport, 2 workers, 500 requests/s for 10
    minutes: no 5xx but 503, no transport trouble, p99 at most 250 ms, memory
    flat over the second half."""
    urls: dict[str, Callable[[], str]] = {
        "sqlite": lambda: f"sqlite:///{tmp_path / 'soak.db'}",
        "redis": lambda: shared_redis_url(tmp_path),
        "nats": lambda: shared_nats_url(tmp_path),
        "postgres": lambda: shared_postgres_url(tmp_path),
        "amqp": lambda: shared_amqp_url(tmp_path),
    }
    url = urls[transport]()
    try:
        result = await soak(
            url, rate=_SLOW_RATE, seconds=_SLOW_SECONDS, read_log=lambda: capfd.readouterr().err
        )
    finally:
        if transport == "postgres":
            drop_postgres_schema(url)
    _check(result, _SLOW_P99)


def test_the_trouble_pattern_knows_the_lines_of_transport_trouble() -> None:
    """The log check catches what the transports, runner and ingress write
    when the broker fails them, and lets the shop's own retried payments pass."""
    trouble = [
        "WARNING [worker 9] surge.sqlite: sqlite: could not settle deliveries, they will come back",
        "WARNING [worker 9] surge.sqlite: sqlite: cannot claim for shop.approve: ...",
        "WARNING [worker 9] surge: handler shop.approve succeeded on event 1 but publishing "
        "its outputs failed: x; publishing again in 0.05s (the attempt is not counted)",
        "WARNING [worker 9] surge.http: POST /orders: the transport failed, answered 503: x",
        "surge.TransportError: /tmp/s.db: the database is locked by another process",
        "2026-12-02 05:00:00,000 ERROR [worker 9] surge: handler shop.x failed; dead-lettered",
    ]
    fine = (
        "2026-12-02 05:00:01,218 WARNING [worker 9] surge: handler shop.charge_and_ship failed "
        "on event 1 (OrderScored, attempt 1 of 5): PaymentDeclined('gateway timeout'); retrying"
    )
    assert all(TROUBLE.search(line) for line in trouble)
    assert not TROUBLE.search(fine)
