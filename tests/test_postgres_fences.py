"""Fencing on ``postgresql://`` (``surge.Fences``), against the session's
cluster: an owner cut off from the server (the fault proxy's blackhole) or
stalled starts none of its partition's deliveries from 2/3 of a lease after
its lease was last written, and they come back in order, to the next owner
or to itself once the partition is taken again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

import surge
from surge._transport import capabilities_of
from surge.transports.postgres import PostgresTransport

from ._servers import drop_postgres_schema, shared_postgres, shared_postgres_url
from .conformance._helpers import Reader, body, number
from .faults._proxy import Proxy

pytestmark = pytest.mark.realtime

LEASE = 1.5


@pytest.fixture
def url() -> Iterator[str]:
    u = shared_postgres_url()
    yield u
    drop_postgres_schema(u)


def _proxied(url: str, proxy: Proxy) -> str:
    """``url`` through ``proxy`` (the session's cluster, the same schema)."""
    return f"postgresql://surge@127.0.0.1:{proxy.port}/postgres?{url.split('?', 1)[1]}"


def _keyed(n: int) -> surge.Envelope:
    return surge.Envelope(surge.new_id(), "conf.item", "k", 0.0, None, None, body(n))


async def _partitioned(url: str, me: str) -> PostgresTransport:
    """A started transport on group "g" with one partition, whose member id
    is ``me`` (members are ordered by id: the smallest owns partition 0)."""
    t = PostgresTransport(url, partitions=1, lease=LEASE)
    t.member_id = me
    await t.start()
    await t.declare("g", ["conf.item"])
    return t


async def _owning(t: PostgresTransport, parts: set[int]) -> None:
    own = t.ownership("g")
    assert own is not None
    async with asyncio.timeout(20):
        while own.owned != parts:
            await own.changed()


async def _owner_with_five(t: PostgresTransport) -> tuple[Reader, list[surge.Delivery]]:
    """``t`` reading "g", owning partition 0, holding its first 5 deliveries."""
    r = Reader(t, "g", prefetch=10).start()
    await _owning(t, {0})
    await t.publish([_keyed(n) for n in range(5)])
    got = await r.take(5, timeout=20)
    assert not any(t.fenced(d) for d in got)
    return r, got


async def test_capabilities(url: str) -> None:
    """capabilities_of finds that postgres fences."""
    t = PostgresTransport(url)
    assert capabilities_of(t).fences is t


async def test_a_cut_off_owner_fences_its_partition_for_the_next_owner(url: str) -> None:
    """An owner cut off from the server (blackholed: no reply, no close)
    starts none of its partition's deliveries from 2/3 of a lease after its
    last renewal was sent on (forgotten, the partition dropped); the next
    owner, after the lease, gets them, in order, as second attempts."""
    async with Proxy(shared_postgres().port) as proxy:
        a = await _partitioned(_proxied(url, proxy), "a")
        b = await _partitioned(url, "b")
        try:
            _, got = await _owner_with_five(a)
            proxy.blackhole()
            rb = Reader(b, "g").start()
            # a renewal sent before the cut was the last: its window ends
            # 2/3 of a lease after it at the latest
            await asyncio.sleep(LEASE * 2 / 3 + 0.05)
            assert [a.fenced(d) for d in got] == [True] * 5
            assert a.ownership("g").owned == set()  # type: ignore[union-attr]
            taken = await rb.take(5, timeout=20)
            assert [(number(d), d.attempt) for d in taken] == [(n, 2) for n in range(5)]
            await b.ack(taken)
            await rb.aclose()
        finally:
            proxy.heal()
            await a.close()
            await b.close()


async def test_a_lapsed_partition_still_ours_keeps_its_order(url: str) -> None:
    """A partition whose lease lapsed here (a short cut) and that comes back
    to the same owner: what was fenced comes back first, then what was
    published since, in order (it is taken again as a new owner would, once
    the leases of what it forgot ran out)."""
    async with Proxy(shared_postgres().port) as proxy:
        a = await _partitioned(_proxied(url, proxy), "a")
        try:
            r, got = await _owner_with_five(a)
            proxy.blackhole()
            await asyncio.sleep(LEASE * 2 / 3 + 0.05)
            assert [a.fenced(d) for d in got] == [True] * 5
            proxy.heal()
            await a.publish([_keyed(n) for n in range(5, 8)])
            again = await r.take(8, timeout=20)
            assert [(number(d), d.attempt) for d in again] == [
                *((n, 2) for n in range(5)),
                *((n, 1) for n in range(5, 8)),
            ]
            await a.ack(again)
            await r.aclose()
        finally:
            proxy.heal()
            await a.close()


async def test_an_extension_in_flight_at_a_lapse_holds_back_the_retake(url: str) -> None:
    """The heartbeat's lease extension is under way when the stall ends and
    the partition lapses: its statement still matches the forgotten rows
    and moves their leases on. The round that takes the partition again
    waits for it, so it reads when those leases now end, and the key's later
    events do not overtake them (CI: 5, 6, 7 came before 0-4's
    redeliveries)."""
    a = await _partitioned(url, "a")
    try:
        r, _ = await _owner_with_five(a)
        own = a.ownership("g")
        member = a._members["g"]
        assert own is not None
        entered, gate = asyncio.Event(), asyncio.Event()
        extend = a._queue.extend

        async def held_extend(*args: Any) -> Any:
            entered.set()
            await gate.wait()
            return await extend(*args)

        a._queue.extend = held_extend  # type: ignore[method-assign,assignment]
        rounds = asyncio.Event()
        step = member._step

        async def counted_step(*args: Any, **kwargs: Any) -> Any:
            try:
                return await step(*args, **kwargs)
            finally:
                rounds.set()

        member._step = counted_step  # type: ignore[method-assign]
        extending = asyncio.get_running_loop().create_task(a.extend())
        await asyncio.wait_for(entered.wait(), 10)
        dropped = own.changed()
        time.sleep(LEASE * 2 / 3 + 0.1)  # noqa: ASYNC251  (the stall under test)
        async with asyncio.timeout(10):
            await dropped
        assert own.owned == set()
        rounds.clear()
        async with asyncio.timeout(10):
            await rounds.wait()  # a round after the lapse (it may not take it back)
        gate.set()
        await extending
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


async def test_a_stalled_owner_fences_at_its_next_round(url: str) -> None:
    """A process stalled past 2/3 of a lease (its loop blocked): the round
    that renews its partition after the stall finds the window ended, so the
    partition's deliveries are forgotten before anything asks, and come back
    in order, before what was published since."""
    a = await _partitioned(url, "a")
    try:
        r, got = await _owner_with_five(a)
        own = a.ownership("g")
        assert own is not None
        dropped = own.changed()
        # the stall: nothing of this process runs (the fault under test)
        time.sleep(LEASE * 2 / 3 + 0.1)  # noqa: ASYNC251
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
