"""Worker processes partitioned from the broker by the network itself.

Section 8 of RELIABILITY.md with a real partition instead of a proxy: a
network namespace joined to this one by a veth pair (``_netns.py``), the
broker (redis, nats) listening on this side's end of the pair,
``surge run --workers 2`` of the keyed Jepsen app inside the namespace
(:data:`tests._jepsen.keyed_app`: each handling appends a start line and,
``HOLD`` later, an end line to a records file, with its pid), one more
worker of it out here (a :class:`Supervisor`), and keyed events published
from here. Once the workers inside handle keyed work the link goes down
for ``CUT`` seconds (past 3 leases), then up again.

What must hold: no key is handled by two processes at once (two handlings
of one key by different pids overlapping in the records' file order: each
line is one ``O_APPEND`` write, so file order is time order), nothing
acknowledged is lost, and every event is handled after the heal.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from surge.cli._supervisor import Supervisor

from .._jepsen import (
    KEYED_APP_REF,
    KEYED_GROUP,
    Keyed,
    KeyedRecord,
    drain,
    overlaps,
    produce_keyed,
    tally,
    wait_for,
    worker_env,
)
from .._servers import nats_server, redis_server
from ._netns import VethNamespace, veth_namespace

pytestmark = pytest.mark.realtime

ROOT = Path(__file__).resolve().parents[2]
LEASE = 2.0
CUT = 3.5 * LEASE
# a handling shorter than lease/3 (the fence's promise), long enough that
# the prefetched tail of a cut-off worker outlasts its lease without it
HOLD = 0.3


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _records(path: Path, start: int = 0, end: int | None = None) -> list[KeyedRecord]:
    """The records written between byte offsets ``start`` and ``end`` (each
    line is one write, so a size read at any moment ends a line)."""
    data = path.read_bytes()[start:end] if path.exists() else b""
    out = []
    for line in data.decode().splitlines():
        kind, key, seq, pid, attempt = line.split(",")
        out.append(KeyedRecord(kind, key, int(seq), int(pid), int(attempt)))
    return out


@contextlib.contextmanager
def _broker(kind: str, tmp_path: Path, ns: VethNamespace) -> Iterator[tuple[str, str]]:
    """A broker of ``kind`` reachable from both sides; (the URL out here,
    the URL inside the namespace)."""
    if kind == "redis":
        with redis_server(tmp_path, listen=(ns.host,)) as (url, server):
            opts = f"?lease={LEASE}&socket_timeout=2&prefix=netns"
            yield url + opts, f"redis://{ns.host}:{server.port}/0{opts}"
    else:
        # One listener, on this side's end of the pair: its address stays
        # local here while the link is down.
        with nats_server(tmp_path, host=ns.host) as srv:
            url = f"{srv.url}?stream=netns&lease={LEASE}"
            yield url, url


@pytest.mark.slow
@pytest.mark.soak  # about 30 s each: past CI's 20 minutes; run with -m soak
@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_workers_partitioned_by_a_veth_link_never_share_a_key(
    kind: str, tmp_path: Path
) -> None:
    """8 keys x 40 events, handlings of 0.3 s, lease 2 s; the veth
    link of the two workers inside the namespace goes down for 7 s (3.5
    leases) once they handle keyed work: no key is handled by two processes
    at once, lost 0, all handled after the heal. The workers inside start
    no keyed delivery past 2/3 of a lease after their last renewal was sent
    (``surge.Fences``): they log that their leases lapsed. Without the
    fence: 53 overlaps (redis), 23 (nats)."""
    loop = asyncio.get_running_loop()
    records = tmp_path / "keyed.txt"
    inside_log = tmp_path / "inside.log"
    keys = [f"k{i}" for i in range(8)]
    per_key = 40
    acked: list[tuple[str, int]] = []
    env = worker_env(records, concurrency=8, prefetch=32, delay=HOLD, shutdown_timeout=5.0)
    with (
        veth_namespace() as ns,
        _broker(kind, tmp_path, ns) as (outside_url, inside_url),
        inside_log.open("wb") as log,
    ):
        sup = Supervisor(
            KEYED_APP_REF,
            outside_url,
            1,
            shutdown_timeout=5.0,
            backoff=0.05,
            backoff_cap=0.5,
            stable_after=0.5,
            env=env,
        )
        inside = await asyncio.create_subprocess_exec(
            *ns.command(sys.executable, "-m", "surge", "run", KEYED_APP_REF,
                        "--transport", inside_url, "--workers", "2"),
            env=env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        running = loop.create_task(sup.run())
        producing: asyncio.Task[None] | None = None
        try:
            await sup.wait_ready()
            outside = set(sup.pids)

            def inside_handled(offset: int) -> bool:
                return any(
                    r.kind == "h" and r.pid not in outside for r in _records(records, offset)
                )

            # one event per key every 0.1 s: each key's backlog grows (its
            # handlings take 0.3 s), so the workers hold prefetched ones
            producing = loop.create_task(
                produce_keyed(
                    outside_url, keys, per_key, acked, slow_when=lambda: True, trickle=80.0
                )
            )
            await wait_for(lambda: inside_handled(0), timeout=30, what="handling inside")
            at_cut = _size(records)
            ns.cut()
            await asyncio.sleep(CUT)  # the fault's length
            ns.heal()
            healed = loop.time()
            at_heal = _size(records)
            await wait_for(
                lambda: inside_handled(at_heal), timeout=30, what="handling inside after the heal"
            )
            rejoined = loop.time() - healed
            await producing
            stats = await drain(
                outside_url,
                records,
                acked,
                group=KEYED_GROUP,
                topics=(Keyed.__topic__,),
                handled=lambda p: {(r.key, r.seq) for r in _records(p) if r.kind == "h"},
                timeout=60,
            )
            drained = loop.time() - healed
        finally:
            if ns.cut_now:
                ns.heal()
            if producing is not None:
                producing.cancel()
                with contextlib.suppress(BaseException):
                    await producing
            with contextlib.suppress(ProcessLookupError):
                inside.send_signal(signal.SIGTERM)
            try:
                inside_code = await asyncio.wait_for(inside.wait(), 20)
            except TimeoutError:
                inside.kill()
                inside_code = await inside.wait()
            sup.request_stop()
            await running
    lines = _records(records)
    inside_during = [
        r for r in _records(records, at_cut, at_heal) if r.kind == "s" and r.pid not in outside
    ]
    found = overlaps(lines)
    crash = tally(
        [(k, seq) for k in keys for seq in range(per_key)],
        acked,
        [(r.key, r.seq) for r in lines if r.kind == "h"],
        kills=0,
        bound_per_kill=0,
        left=stats.backlog + stats.pending + stats.scheduled,
    )
    text = inside_log.read_text(errors="replace")
    fenced = text.count("lease was not renewed in time")
    print(
        f"\nFIGURE netns-partition[{kind}] handlings={crash.deliveries} acked={crash.acked} "
        f"handled={crash.handled} lost={crash.lost} duplicates={crash.duplicates} "
        f"left={crash.left} overlaps={len(found)} {found[:3]} "
        f"inside_starts_while_cut={len(inside_during)} fenced_warnings={fenced} "
        f"rejoined={rejoined:.2f}s drained={drained:.2f}s pids={sorted({r.pid for r in lines})} "
        f"outside={sorted(outside)} inside_exit={inside_code}"
    )
    assert found == [], f"{len(found)} overlapping handlings: {found[:10]}"
    assert crash.lost == 0, f"lost acknowledged events: {crash.lost_sample}"
    assert crash.unexpected == 0, str(crash)
    assert crash.left == 0, str(crash)
    assert fenced >= 1, "the workers inside never fenced: the cut did not outlast their lease?"
    assert inside_code == 0, text[-3000:]
