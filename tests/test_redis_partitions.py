"""Partitions of the Redis transport: per-key order across consumers.

The conformance suite (tests/conformance/test_order.py) checks order while
consumers join and leave gracefully; these tests check what only Redis
shows: the count fixed per prefix, a dead owner's partitions and unsettled
entries taken over in order, and delayed, retried and replayed entries going
back to their partition.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

import surge
from surge._event import Envelope
from surge.transports._partitions import partition_of
from surge.transports.redis import RedisTransport
from surge.transports.redis._partitions import PartitionOwner

from ._servers import redis_server
from .conformance._helpers import Reader, balanced, body, number

pytestmark = pytest.mark.realtime

GROUP = "parts.g"
TOPIC = "conf.item"


def _keyed(n: int, key: str, not_before: float | None = None) -> Envelope:
    return Envelope(surge.new_id(), TOPIC, key, time.time(), None, None, body(n), not_before)


async def _started(url: str, **options: object) -> RedisTransport:
    t = RedisTransport(url, **options)  # type: ignore[arg-type]
    await t.start()
    await t.declare(GROUP, [TOPIC])
    return t


async def _owning(t: RedisTransport, parts: set[int], timeout: float = 10.0) -> None:
    """Wait until ``t`` reads exactly ``parts``."""
    own = t.ownership(GROUP)
    assert own is not None
    async with asyncio.timeout(timeout):
        while set(own.readable) != parts:
            await own.changed()


async def test_partition_count_is_fixed_per_prefix(tmp_path: Path) -> None:
    with redis_server(tmp_path) as (url, _):
        first = RedisTransport(url, partitions=4)
        await first.start()
        try:
            other = RedisTransport(f"{url}?partitions=8")
            with pytest.raises(surge.ConfigurationError, match="has 4 partitions, not the 8"):
                await other.start()
            assert other.closed
            adopting = RedisTransport(url)
            await adopting.start()
            assert adopting.partitions == 4
            await adopting.close()
            elsewhere = RedisTransport(f"{url}?partitions=8&prefix=other")
            await elsewhere.start()
            assert elsewhere.partitions == 8
            await elsewhere.close()
        finally:
            await first.close()
        with pytest.raises(surge.ConfigurationError, match="at least 1"):
            RedisTransport(url, partitions=0)


async def test_a_single_server_keeps_the_layout_without_hash_tags(tmp_path: Path) -> None:
    """On one redis-server the keys keep their names (no hash tags, no layout
    key): a prefix written before partitions got slots of their own on a
    cluster reads on."""
    with redis_server(tmp_path) as (url, _):
        t = await _started(url, partitions=4)
        try:
            await t.publish([_keyed(1, "k")])
            r = aredis.Redis.from_url(url)
            try:
                p = partition_of("k", 4)
                assert await r.xlen(f"surge:p{p}:{GROUP}") == 1
                assert await r.exists(f"surge:s:{GROUP}", "surge:partitions") == 2
                assert not await r.exists("surge:layout")
            finally:
                await r.aclose()
        finally:
            await t.close()


async def test_dead_owner_partitions_and_entries_are_taken_over_in_order(
    tmp_path: Path,
) -> None:
    """A consumer killed while holding keyed entries: after its lease the
    survivor owns every partition and gets those entries, in order, before
    the ones published after the kill."""
    lease = 1.0
    with redis_server(tmp_path) as (url, _):
        dead = await _started(url, lease=lease)
        reader = Reader(dead, GROUP).start()
        await _owning(dead, set(range(dead.partitions)))
        await dead.publish([_keyed(n, "k") for n in range(10)])
        held = await reader.take(10)
        assert [number(d) for d in held] == list(range(10))
        part = partition_of("k", dead.partitions)
        assert all(d.token.startswith(b"%d/" % part) for d in held)
        # Die as SIGKILL would: no settle, no hand-over, leases left to expire.
        await reader.aclose()
        await dead.abandon()

        survivor = await _started(url, lease=lease)
        try:
            await survivor.publish([_keyed(n, "k") for n in range(10, 15)])
            t0 = time.monotonic()
            got = await Reader(survivor, GROUP).take(15, timeout=10 * lease)
            waited = time.monotonic() - t0
            assert [number(d) for d in got] == list(range(15))
            assert [d.attempt for d in got] == [2] * 10 + [1] * 5
            assert waited >= lease * 0.5  # the dead owner's lease had to run out
            await survivor.ack(got)
            stats = await survivor.stats(GROUP)
            assert (stats.backlog, stats.pending) == (0, 0)
        finally:
            await survivor.close()


async def test_delayed_retried_and_replayed_entries_keep_their_partition(
    tmp_path: Path,
) -> None:
    with redis_server(tmp_path) as (url, _):
        t = await _started(url, lease=5.0, poll=0.05)
        try:
            part = partition_of("order-7", t.partitions)
            prefix = b"%d/" % part
            reader = Reader(t, GROUP).start()
            await _owning(t, set(range(t.partitions)))
            await t.publish([_keyed(1, "order-7", not_before=time.time() + 0.2)])
            (d,) = await reader.take(1)
            assert d.token.startswith(prefix)
            assert number(d) == 1
            await t.nack(d, 0.1)
            (again,) = await reader.take(1)
            assert again.token.startswith(prefix)
            assert again.attempt == 2
            record = surge.DeadLetter(
                id=again.envelope.id,
                group=GROUP,
                topic=TOPIC,
                key="order-7",
                headers=None,
                body=again.envelope.body or b"",
                error_type="ValueError",
                error="boom",
                traceback="",
                attempts=2,
                first_attempt_at=0.0,
                failed_at=0.0,
            )
            await t.dead_letter(again, record)
            assert [r.id for r in await t.dead_letters(GROUP)] == [again.envelope.id]
            assert await t.replay(GROUP) == 1
            (replayed,) = await reader.take(1)
            assert replayed.token.startswith(prefix)
            assert number(replayed) == 1
            await t.ack([replayed])
            await reader.aclose()
        finally:
            await t.close()


async def test_two_consumers_split_the_partitions_and_hand_over_on_close(
    tmp_path: Path,
) -> None:
    with redis_server(tmp_path) as (url, _):
        a = await _started(url, lease=1.0)
        b = await _started(url, lease=1.0)
        ra, rb = Reader(a, GROUP).start(), Reader(b, GROUP).start()
        own_a, own_b = a.ownership(GROUP), b.ownership(GROUP)
        assert own_a is not None
        assert own_b is not None
        n = a.partitions
        await balanced([a, b], GROUP, timeout=10)
        assert len(own_a.owned) == len(own_b.owned) == n // 2
        # Keys of b's partitions reach b only.
        keys = [f"k{i}" for i in range(64)]
        mine = [k for k in keys if partition_of(k, n) in own_b.owned]
        await a.publish([_keyed(i, k) for i, k in enumerate(mine)])
        got = await rb.take(len(mine))
        assert sorted(number(d) for d in got) == list(range(len(mine)))
        assert await ra.quiet(0.3)
        await b.ack(got)
        await rb.aclose()
        await b.close()  # hands its partitions over without waiting for a lease
        t0 = time.monotonic()
        await _owning(a, set(range(n)), timeout=5.0)
        assert time.monotonic() - t0 < 1.0 + 0.5  # a tick (lease/3) or two, not a lease
        await ra.aclose()
        await a.close()


class Step(surge.Event):
    __topic__ = "parts.step"
    key: str
    seq: int


async def test_a_stopping_consumer_keeps_a_partition_until_its_handler_ends(
    tmp_path: Path,
) -> None:
    """Stopping while a keyed handler runs past several leases: the partition
    (and the delivery) stay with the stopping consumer until the handler
    ends, then move, so the next event of the key runs after it, elsewhere."""
    lease = 0.5
    with redis_server(tmp_path) as (url, _):
        events: list[str] = []
        started, release, handled_next = asyncio.Event(), asyncio.Event(), asyncio.Event()

        def make(name: str) -> surge.App:
            app = surge.App("ord", transport=RedisTransport(url, lease=lease), shutdown_timeout=20)

            @app.on(Step, key="key", name="step")
            async def step(ev: Step) -> None:
                events.append(f"{name} start {ev.seq}")
                if ev.seq == 0:
                    started.set()
                    await release.wait()
                events.append(f"{name} end {ev.seq}")
                if ev.seq == 1:
                    handled_next.set()

            return app

        a, b = make("a"), make("b")
        async with a:
            await b.start()
            ta, tb = a.transport, b.transport
            assert isinstance(ta, RedisTransport)
            assert isinstance(tb, RedisTransport)
            own_a, own_b = ta.ownership("ord.step"), tb.ownership("ord.step")
            assert own_a is not None
            assert own_b is not None
            await balanced([ta, tb], "ord.step", timeout=10)
            key = next(k for k in (f"k{i}" for i in range(100)) if
                       partition_of(k, ta.partitions) in own_b.owned)  # fmt: skip
            await a.publish(Step(key=key, seq=0))
            async with asyncio.timeout(10):
                await started.wait()
            stopping = asyncio.ensure_future(b.stop())
            await a.publish(Step(key=key, seq=1))
            # Three leases pass; b renews its partition while its handler runs.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(3 * lease):
                    await handled_next.wait()
            assert events == ["b start 0"]
            release.set()
            await stopping
            async with asyncio.timeout(10):
                await handled_next.wait()
        assert events == ["b start 0", "b end 0", "a start 1", "a end 1"]


async def test_entries_left_pending_to_another_consumer_are_claimed_by_the_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries of an owned partition pending to another consumer (a former
    owner that read them after this one's takeover claim, its lease
    reverted by a failover, then fenced itself and left them) are claimed
    by the owner within a round, not left for good."""
    lease = 1.0
    with redis_server(tmp_path) as (url, _):
        t = await _started(url, lease=lease)
        owner = t._group(GROUP)._owner
        assert owner is not None
        reader = Reader(t, GROUP).start()
        try:
            await _owning(t, set(range(t.partitions)))
            paused = True  # t reads nothing meanwhile
            readable = PartitionOwner.readable
            monkeypatch.setattr(
                PartitionOwner, "readable", lambda self: [] if paused else readable(self)
            )
            part = partition_of("k", t.partitions)
            stream = t._group(GROUP).keys.pstreams[part]
            await t.publish([_keyed(n, "k") for n in range(3)])
            r = aredis.Redis.from_url(url)
            try:
                got: Any = await r.xreadgroup(GROUP, "ghost", {stream: ">"})
                assert len(got[0][1]) == 3  # pending to the ghost now
            finally:
                await r.aclose()
            paused = False
            await t.publish([_keyed(n, "k") for n in range(3, 5)])
            delivered = await reader.take(5, timeout=10 * lease)
            assert sorted(number(d) for d in delivered) == list(range(5))
            await t.ack(delivered)
            stats = await t.stats(GROUP)
            assert (stats.backlog, stats.pending) == (0, 0)
        finally:
            await reader.aclose()
            await t.close()
