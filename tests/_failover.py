"""A broker node killed under load: the figures of a cluster's failover.

:func:`run_failover` runs ``workers`` supervised processes of the keyed
Jepsen app (:data:`tests._jepsen.keyed_app`: one keyed subscription, each
handling recorded when it starts and ends), publishes ``keys * per_key``
keyed events from this process (each key's in publish order), and once a
share of them is handled calls ``kill()``, which SIGKILLs a broker node (the
stream's leader, the master of a group's slot) and returns. No worker is
killed, yet a node's death loses settles (an ack sent to it, or not yet
copied to a replica): those events run again, as after a worker's kill. So
the order verdict here is :func:`tests._jepsen.key_order`'s without its
rerun rules: a key's first handlings in publish order (no event started
before an earlier one ever was) and one handling of a key at a time hold;
events started again are counted (``reruns``), not judged.

The figures: acknowledged (``publish`` returned), handled, lost, duplicates,
the order verdict, and ``resumed``: seconds from the kill until an event
whose publish was acknowledged after the kill was handled (publishing and
handling both back).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from surge.cli._supervisor import Supervisor

from ._jepsen import (
    KEYED_APP_REF,
    KEYED_GROUP,
    CrashResult,
    Keyed,
    KeyOrder,
    drain,
    key_order,
    produce_keyed,
    read_keyed_records,
    tally,
    wait_for,
    worker_env,
)

__all__ = ("FailoverResult", "run_failover")


@dataclass(frozen=True)
class FailoverResult:
    """The figures of one failover run; :meth:`check` asserts the promises."""

    crash: CrashResult
    order: KeyOrder
    resumed: float
    """Seconds from the kill to the first handling of an event acknowledged after it."""

    def check(self, *, lost: int = 0, order: bool = True) -> None:
        """At most ``lost`` acknowledged events lost (0: none), nothing
        invented or left, and (``order``) per-key order with no rerun."""
        c = self.crash
        assert c.lost <= lost, f"lost acknowledged events: {c.lost_sample} ({self})"
        assert c.unexpected == 0, f"handled events never published ({self})"
        assert c.left == 0, f"deliveries left on the transport ({self})"
        assert not order or not self.violations, (
            f"{len(self.violations)} order violations, first {self.violations[:5]} ({self})"
        )

    @property
    def violations(self) -> list[str]:
        """Order violations but reruns (see the module docstring)."""
        return [v for v in self.order.violations if not _is_rerun(v)]

    @property
    def reruns(self) -> int:
        """Events started again (after a lost settle): by the checker's count
        of allowed reruns plus the ones it calls violations without a kill."""
        return self.order.reruns + sum(_is_rerun(v) for v in self.order.violations)

    def __str__(self) -> str:
        c = self.crash
        return (
            f"acked={c.acked} handled={c.handled} lost={c.lost} duplicates={c.duplicates} "
            f"deliveries={c.deliveries} left={c.left} resumed={self.resumed:.2f}s "
            f"keys={self.order.keys} handovers={self.order.handovers} "
            f"reruns={self.reruns} order_violations={len(self.violations)} "
            f"seconds={c.seconds:.1f}"
        )


def _is_rerun(violation: str) -> bool:
    # key_order's words for a start of an event started before (tests/_jepsen.py)
    return " reran " in violation or " went back from " in violation


def phase(what: str) -> None:
    """A failover test's step, with the wall time, on stdout: pytest shows
    it with a failure, the timeout's included, so a slow step is named."""
    print(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {what}", flush=True)


async def run_failover(
    url: str,
    tmp: Path,
    kill: Callable[[], Awaitable[object]],
    *,
    keys: int = 8,
    per_key: int = 150,
    kill_after: float = 0.3,
    workers: int = 2,
    delay: float = 0.002,
    resume_timeout: float = 30.0,
    drain_timeout: float = 60.0,
) -> FailoverResult:
    """Publish and handle ``keys * per_key`` keyed events; ``kill()`` a node
    once ``kill_after`` of them are handled (publishing trickles from then
    until the kill, so the kill finds events flowing); drain; the figures."""
    records = tmp / "failover.txt"
    names = [f"k{i}" for i in range(keys)]
    events = keys * per_key
    sup = Supervisor(
        KEYED_APP_REF,
        url,
        workers,
        shutdown_timeout=5.0,
        backoff=0.05,
        backoff_cap=0.5,
        stable_after=0.5,
        env=worker_env(records, concurrency=8, prefetch=16, delay=delay),
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    running = loop.create_task(sup.run())
    acked: list[tuple[str, int]] = []
    killed = loop.create_future()
    threshold = int(events * kill_after)

    def hold() -> bool:  # until the kill, publish no more than its share
        return not killed.done() and len(acked) >= threshold

    def handled() -> set[tuple[str, int]]:
        return {(r.key, r.seq) for r in read_keyed_records(records) if r.kind == "h"}

    resumed = float("nan")
    try:
        await sup.wait_ready()
        phase("workers ready")
        producing = loop.create_task(produce_keyed(url, names, per_key, acked, slow_when=hold))
        await wait_for(
            lambda: len(handled()) >= threshold * 0.9,
            timeout=resume_timeout,
            what="handling before the kill",
        )
        phase("handling before the kill seen; killing")
        await kill()
        phase("killed")
        at_kill = len(acked)
        kill_time = loop.time()
        killed.set_result(None)

        def resumed_after() -> bool:
            after = acked[at_kill:]
            return bool(after) and not handled().isdisjoint(after)

        await wait_for(resumed_after, timeout=resume_timeout, what="handling after the kill")
        resumed = loop.time() - kill_time
        phase("handling resumed")
        await producing
        phase("every event published")
        stats = await drain(
            url,
            records,
            acked,
            group=KEYED_GROUP,
            topics=(Keyed.__topic__,),
            handled=lambda _: set(handled()),
            timeout=drain_timeout,
        )
        phase("drained")
    finally:
        if not killed.done():
            killed.set_result(None)
        sup.request_stop()
        with contextlib.suppress(Exception):
            await running
        phase("workers stopped")
    lines = read_keyed_records(records)
    crash = tally(
        [(k, seq) for k in names for seq in range(per_key)],
        acked,
        [(r.key, r.seq) for r in lines if r.kind == "h"],
        kills=0,
        bound_per_kill=0,
        left=stats.backlog + stats.pending + stats.scheduled,
        seconds=loop.time() - start,
    )
    return FailoverResult(crash, key_order(lines), resumed)
