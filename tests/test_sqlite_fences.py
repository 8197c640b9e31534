"""Fencing on ``sqlite://`` (``surge.Fences``): an owner stalled past 2/3 of
a lease (its loop blocked here; SIGSTOP in tests/test_crash_sqlite.py)
starts none of its partition's deliveries held before the stall, and they
come back in order, to the next owner or to itself once the partition is
taken again. Real time: the stall is a blocked loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import surge
from surge._transport import capabilities_of
from surge.transports.sqlite import SqliteTransport

from .conformance._helpers import Reader, body, number

pytestmark = pytest.mark.realtime

LEASE = 1.5


def _keyed(n: int) -> surge.Envelope:
    return surge.Envelope(surge.new_id(), "conf.item", "k", 0.0, None, None, body(n))


async def _partitioned(path: Path, me: str) -> SqliteTransport:
    """A started transport on group "g" with one partition, whose member id
    is ``me`` (members are ordered by id: the smallest owns partition 0)."""
    t = SqliteTransport(f"sqlite:///{path}", partitions=1, lease=LEASE)
    t.member_id = me
    await t.start()
    await t.declare("g", ["conf.item"])
    return t


async def _owning(t: SqliteTransport, parts: set[int]) -> None:
    own = t.ownership("g")
    assert own is not None
    async with asyncio.timeout(20):
        while own.owned != parts:
            await own.changed()


async def _owner_with_five(t: SqliteTransport) -> tuple[Reader, list[surge.Delivery]]:
    """``t`` reading "g", owning partition 0, holding its first 5 deliveries."""
    r = Reader(t, "g", prefetch=10).start()
    await _owning(t, {0})
    await t.publish([_keyed(n) for n in range(5)])
    got = await r.take(5, timeout=20)
    assert not any(t.fenced(d) for d in got)
    return r, got


def _stall() -> None:
    """Nothing of this process runs for longer than 2/3 of a lease (the
    fault under test, as SIGSTOP or a loop blocked by a handler)."""
    time.sleep(LEASE * 2 / 3 + 0.1)


async def test_capabilities(tmp_path: Path) -> None:
    """capabilities_of finds that sqlite fences."""
    t = SqliteTransport(f"sqlite:///{tmp_path / 'd.db'}")
    assert capabilities_of(t).fences is t


async def test_a_stalled_owner_fences_at_its_next_round(tmp_path: Path) -> None:
    """The round that renews a partition after a stall finds its window
    ended, so the partition's deliveries are forgotten before anything
    asks, and come back in order (attempt 2, once their leases ran out),
    before what was published since."""
    a = await _partitioned(tmp_path / "d.db", "a")
    try:
        r, got = await _owner_with_five(a)
        own = a.ownership("g")
        assert own is not None
        dropped = own.changed()
        _stall()
        async with asyncio.timeout(10):
            await dropped
        assert own.owned == set()
        assert [a.fenced(d) for d in got] == [True] * 5
        await a.publish([_keyed(n) for n in range(5, 8)])
        again = await r.take(8, timeout=20)
        assert [(number(d), d.attempt) for d in again] == [
            *((n, 2) for n in range(5)),
            *((n, 1) for n in range(5, 8)),
        ]
        await a.ack(again)
        await r.aclose()
    finally:
        await a.close()


async def test_a_stalled_owners_deliveries_go_to_the_next_owner_in_order(
    tmp_path: Path,
) -> None:
    """After a stall, what the owner held is fenced (asked first, before any
    round ran), and a consumer that joins then gets the partition and its
    deliveries, in order, as second attempts."""
    old = await _partitioned(tmp_path / "d.db", "m2")
    new = await _partitioned(tmp_path / "d.db", "m1")  # the smaller id: p0 is its own
    try:
        _, got = await _owner_with_five(old)
        _stall()
        assert [old.fenced(d) for d in got] == [True] * 5
        rn = Reader(new, "g").start()
        taken = await rn.take(5, timeout=20)
        assert [(number(d), d.attempt) for d in taken] == [(n, 2) for n in range(5)]
        await new.ack(taken)
        await rn.aclose()
    finally:
        await old.close()
        await new.close()
