"""Conditions across worker processes: 4 workers on sqlite, redis and nats
fire exactly what a brute-force reference computes from the published
sequence, key by key."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

import surge
from surge._clock import RealClock
from surge.cli._supervisor import Supervisor

from ._conditions_app import ALL_AT_LEAST, AT_LEAST, WITHIN, Opened, Pinged, Settled, build
from ._jepsen import wait_for
from ._servers import shared_amqp_url, shared_nats_url, shared_postgres_url, shared_redis_url
from .test_conditions import Ev, Fired, ref_absence, ref_count, ref_sequence


class _Stepped(RealClock):
    """Event times chosen by the test: the publisher's wall clock."""

    def __init__(self, start: float) -> None:
        self.now = start

    def time(self) -> float:
        return self.now


Firing = tuple[str, str | None, tuple[str, ...]]


def _expected(stream: list[Ev]) -> set[Firing]:
    def tag(name: str, fired: list[Fired]) -> set[Firing]:
        return {(name, k, ids) for k, _, ids in fired}

    pairs = [e for e in stream if e.role < 2]
    pinged = [Ev(e.seq, 0, "", e.time, e.id) for e in stream if e.role == 2]
    return (
        tag("count", ref_count(pairs, AT_LEAST, WITHIN))
        | tag("seq", ref_sequence(pairs, WITHIN))
        | tag("absent", ref_absence(pairs, WITHIN))
        | {("all", None, ids) for _, _, ids in ref_count(pinged, ALL_AT_LEAST, WITHIN)}
    )


def _fired(path: Path) -> dict[str, Firing]:
    """Recorded firings by ConditionMet id (a handler may run twice for one id)."""
    out: dict[str, Firing] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        eid, name, key, ids, _ = line.split("|")
        out[eid] = (name, None if key == "None" else key, tuple(ids.split(",")))
    return out


def _url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'cw.db'}"
    urls = {
        # A graceful leave leaves a redis partition's handed-back entries
        # pending, claimed by the next owner once idle for a lease (30 s by
        # default): a short lease keeps that handoff short here.
        "redis": lambda: shared_redis_url() + "&lease=5",
        "nats": shared_nats_url,
        "postgres": shared_postgres_url,
        "amqp": shared_amqp_url,
    }
    return urls[kind]()


@pytest.mark.realtime
@pytest.mark.parametrize(
    "kind",
    [
        "sqlite",
        "redis",
        "nats",
        # The same code; left to -m soak for the CI budget (their servers
        # take seconds to start).
        pytest.param("postgres", marks=[pytest.mark.slow, pytest.mark.soak]),
        pytest.param("amqp", marks=[pytest.mark.slow, pytest.mark.soak]),
    ],
)
async def test_four_workers_fire_what_the_reference_fires(tmp_path: Path, kind: str) -> None:
    """A random sequence over 5 keys of three types, published before 4
    worker processes start; partitions change hands while they join and
    when one leaves mid-stream and comes back. Every condition fires exactly
    the reference's firings, each under one ConditionMet id."""
    rng = random.Random(f"{kind}-18")
    url = _url(kind, tmp_path)
    # Event times in the past: every absence deadline is due at once.
    clock = _Stepped(time.time() - 600)
    publisher = build(surge.App("cw", transport=url, clock=clock))
    stream: list[Ev] = []
    await publisher.start(consume=False)
    try:
        for seq in range(90):
            role = rng.choice((0, 0, 1, 2))
            user = rng.randrange(5)
            clock.now += rng.choice((0.0, 0.5, 1.0, 2.0, 4.0))
            eid = await publisher.publish((Opened, Settled, Pinged)[role](user=user))
            stream.append(Ev(seq, role, str(user), clock.now, eid))
    finally:
        await publisher.stop()
    expected = _expected(stream)
    assert len(expected) > 10, "the sequence makes every condition fire"

    records = tmp_path / "fired.txt"
    env = dict(os.environ, SURGE_CONDITION_RECORDS=str(records))
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    sup = Supervisor("tests._conditions_app:worker_app", url, 4, env=env)
    running = asyncio.create_task(sup.run())
    try:
        await wait_for(
            lambda: len(_fired(records)) >= len(expected) // 3, timeout=60, what="a third"
        )
        # One worker leaves mid-stream (the supervisor starts another): its
        # partitions change hands with their keys' windows and pending events.
        pid = sup.ready_pids[0]
        os.kill(pid, signal.SIGTERM)
        # Stopping the supervisor while that worker still exits would SIGTERM
        # it a second time, after its app's handlers are gone: it then dies
        # of the signal and the stop counts as unclean (notes-conditions.md).
        await wait_for(lambda: pid not in sup.pids, timeout=30, what="the worker's exit")
        await wait_for(
            lambda: len(_fired(records)) >= len(expected), timeout=60, what="every firing"
        )
    finally:
        sup.request_stop()
        assert await running == 0
    fired = _fired(records)
    assert sorted(fired.values()) == sorted(expected)
