"""sqlite:// beyond the conformance suite: durability, bad files, leases, growth."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import surge
from surge._event import Envelope
from surge._transport import capabilities_of
from surge.transports import open_transport
from surge.transports._partitions import partition_of
from surge.transports.sqlite import SqliteTransport

from .conformance._helpers import Item, Reader, body, env, number


def _open(path: Path, clock: surge.Clock, **options: Any) -> SqliteTransport:
    t = open_transport(f"sqlite:///{path}", clock=clock, **options)
    assert isinstance(t, SqliteTransport)
    return t


@asynccontextmanager
async def started(path: Path, clock: surge.Clock, **options: Any) -> AsyncIterator[SqliteTransport]:
    t = _open(path, clock, **options)
    await t.start()
    try:
        yield t
    finally:
        await t.close()


def _count(path: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        n: int = conn.execute(sql).fetchone()[0]
    return n


def _value(path: Path, sql: str) -> Any:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        return conn.execute(sql).fetchone()[0]


def keyed(n: int, key: str) -> Envelope:
    """An envelope carrying ``Item(n)`` with ``key``, as the App publishes it."""
    return Envelope(surge.new_id(), "conf.item", key, 0.0, None, None, body(n), None)


async def _kill(t: SqliteTransport) -> None:
    """What SIGKILL leaves: the membership, the partitions and the leases
    stay in the file as they were, nothing is handed back."""
    await t.abandon()


async def _owns_all(t: SqliteTransport, group: str, reader: Reader) -> None:
    """Wait until ``t``, consuming ``group`` with ``reader``, owns every partition."""
    assert await reader.quiet(0.001)  # the reader's consume runs from here on
    own = t.ownership(group)
    assert own is not None
    async with asyncio.timeout(30):
        while len(own.owned) < own.partitions or own.releasing:
            await own.changed()


async def test_published_events_survive_reopening(tmp_path: Path, clock: surge.Clock) -> None:
    """What publish returned for is there for a new transport on the same file."""
    db = tmp_path / "d.db"
    async with started(db, clock) as t:
        await t.declare("g", ["conf.item"])
        await t.publish([env(i) for i in range(20)])
    async with started(db, clock) as t2:
        r = Reader(t2, "g")
        got = await r.take(20)
        assert [number(d) for d in got] == list(range(20))
        assert all(d.attempt == 1 for d in got)
        await t2.ack(got)
        await r.aclose()
    async with started(db, clock) as t3:
        stats = await t3.stats("g")
        assert (stats.backlog, stats.pending) == (0, 0)


async def test_close_hands_back_unsettled_deliveries(tmp_path: Path, clock: surge.Clock) -> None:
    """Deliveries held at close go to the next consumer at once, not after the lease."""
    db = tmp_path / "d.db"
    async with started(db, clock, lease=600) as t:
        await t.declare("g", ["conf.item"])
        await t.publish([env(1)])
        r = Reader(t, "g")
        await r.take(1)
        await r.aclose()
    before = clock.time()
    async with started(db, clock, lease=600) as t2:
        r2 = Reader(t2, "g")
        (d,) = await r2.take(1)
        assert d.attempt == 2
        assert clock.time() - before < 1
        await t2.ack([d])
        await r2.aclose()


async def test_close_hands_back_a_claim_still_under_way(tmp_path: Path, clock: surge.Clock) -> None:
    """A claim whose consumer was cancelled just before close is handed back
    by close too: the next consumer gets it at once, its attempt not counted."""
    db = tmp_path / "d.db"
    t = _open(db, clock, lease=600)
    await t.start()
    await t.declare("g", ["conf.item"])
    await t.publish([env(1)])
    it = t.consume("g", prefetch=10)
    claiming = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0)  # one loop step: the claim is on the connection's thread
    claiming.cancel()
    await t.close()
    await asyncio.gather(claiming, return_exceptions=True)
    before = clock.time()
    async with started(db, clock, lease=600) as t2:
        r2 = Reader(t2, "g")
        (d,) = await r2.take(1)
        assert (number(d), d.attempt) == (1, 1)
        assert clock.time() - before < 1
        await t2.ack([d])
        await r2.aclose()


def test_url_and_options_are_checked(tmp_path: Path) -> None:
    """Bad URLs and options raise ConfigurationError naming the problem."""
    with pytest.raises(surge.ConfigurationError, match="use sqlite:///"):
        open_transport("sqlite://")
    with pytest.raises(surge.ConfigurationError, match="synchronous"):
        open_transport(f"sqlite:///{tmp_path}/a.db?synchronous=off")
    with pytest.raises(surge.ConfigurationError, match="lease"):
        open_transport(f"sqlite:///{tmp_path}/a.db?lease=soon")
    with pytest.raises(surge.ConfigurationError, match="heartbeat"):
        open_transport(f"sqlite:///{tmp_path}/a.db?lease=5&heartbeat=5")
    with pytest.raises(surge.ConfigurationError, match="unknown sqlite options"):
        open_transport(f"sqlite:///{tmp_path}/a.db?leese=3")
    t = open_transport(f"sqlite:///{tmp_path}/a.db?synchronous=NORMAL&lease=9")
    assert isinstance(t, SqliteTransport)
    assert (t.synchronous, t.lease, t.heartbeat) == ("normal", 9.0, 3.0)
    assert t.path == tmp_path / "a.db"


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path, clock: surge.Clock) -> None:
    """A file that is not SQLite raises ConfigurationError and is left untouched."""
    db = tmp_path / "notes.txt"
    db.write_text("shopping list\n" * 100)
    t = _open(db, clock)
    with pytest.raises(surge.ConfigurationError, match="not a surge database"):
        await t.start()
    assert db.read_text() == "shopping list\n" * 100


async def test_a_foreign_sqlite_database_is_refused(tmp_path: Path, clock: surge.Clock) -> None:
    """An SQLite file with someone else's tables raises ConfigurationError."""
    db = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    t = _open(db, clock)
    with pytest.raises(surge.ConfigurationError, match="not a surge database"):
        await t.start()
    assert _count(db, "SELECT count(*) FROM sqlite_master WHERE type='table'") == 1


async def test_a_newer_schema_is_refused(tmp_path: Path, clock: surge.Clock) -> None:
    """A surge file of another schema version raises ConfigurationError."""
    db = tmp_path / "d.db"
    async with started(db, clock):
        pass
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'version'")
    t = _open(db, clock)
    with pytest.raises(surge.ConfigurationError, match="schema version 99"):
        await t.start()


async def test_a_corrupt_file_is_detected_at_start(tmp_path: Path, clock: surge.Clock) -> None:
    """Damaged pages fail the integrity check at start with TransportError."""
    db = tmp_path / "d.db"
    async with started(db, clock) as t:
        await t.declare("g", ["conf.item"])
        await t.publish([env(i) for i in range(300)])
    page = _count(db, "PRAGMA page_size")
    assert db.stat().st_size > 4 * page
    with db.open("r+b") as f:
        f.seek(2 * page)
        f.write(b"\xde\xad\xbe\xef" * (page // 2))
    t2 = _open(db, clock)
    with pytest.raises(surge.TransportError, match="corrupt"):
        await t2.start()


async def test_a_locked_database_raises_after_busy_timeout(
    tmp_path: Path, clock: surge.Clock
) -> None:
    """Another process's lock past busy_timeout fails publish with TransportError;
    consumers and acks ride it out (what could not be settled comes back)."""
    db = tmp_path / "d.db"
    async with started(db, clock, busy_timeout=0.05, lease=1.0, heartbeat=0) as t:
        await t.declare("g", ["conf.item"])
        await t.publish([env(1)])
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(surge.TransportError, match="locked"):
                await t.publish([env(2)])
            r = Reader(t, "g")
            assert await r.quiet(0.2), "claimed through another process's lock"
        finally:
            other.execute("ROLLBACK")
        (d,) = await r.take(1)
        assert (number(d), d.attempt) == (1, 1)
        other.execute("BEGIN EXCLUSIVE")
        try:
            await t.ack([d])  # cannot be written: logged, not raised
        finally:
            other.execute("ROLLBACK")
            other.close()
        (again,) = await r.take(1)
        assert (number(again), again.attempt) == (1, 2)
        await t.ack([again])
        await t.publish([env(3)])
        (d3,) = await r.take(1)
        assert number(d3) == 3
        await t.ack([d3])
        assert await r.quiet(2.0)
        await r.aclose()


async def test_full_disk_fails_publish_and_loses_nothing(
    tmp_path: Path, clock: surge.Clock
) -> None:
    """Past max_size publish raises TransportError; what was stored stays; space returns."""
    db = tmp_path / "d.db"
    async with started(db, clock, max_size=256 * 1024, retention=0) as t:
        await t.declare("g", ["conf.item"])
        stored = 0
        error: surge.TransportError | None = None
        for i in range(1000):
            try:
                await t.publish([env(i, pad=2000)])
            except surge.TransportError as exc:
                error = exc
                break
            stored += 1
        assert error is not None
        assert "full" in str(error)
        assert 10 < stored < 1000
        r = Reader(t, "g", prefetch=2000)
        got = await r.take(stored)
        assert sorted(number(d) for d in got) == list(range(stored))
        await t.ack(got)
        await t.compact()
        await t.publish([env(5000)])
        (d,) = await r.take(1)
        assert number(d) == 5000
        await t.ack([d])
        await r.aclose()


@pytest.mark.parametrize(("heartbeat", "runs"), [(0.3, 1), (0, 2)])
async def test_slow_handler_keeps_its_lease(
    tmp_path: Path, clock: surge.VirtualClock, heartbeat: float, runs: int
) -> None:
    """A handler slower than the lease runs once while heartbeats extend it (twice without)."""
    transport = _open(tmp_path / "d.db", clock, lease=1.0, heartbeat=heartbeat)
    app = surge.App("slow", transport=transport, clock=clock)
    calls: list[int] = []

    @app.on(Item)
    async def slow(ev: Item, ctx: surge.Context) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            await clock.sleep(3.5)

    async with app:
        await app.publish(Item(n=1))
        await app.drain()
    assert calls == list(range(1, runs + 1))


async def test_lease_expiry_and_stale_settles(tmp_path: Path, clock: surge.Clock) -> None:
    """A lease that ran out goes to another consumer; the old holder's ack changes nothing."""
    db = tmp_path / "d.db"
    async with (
        started(db, clock, lease=1.0, heartbeat=0) as stalled,
        started(db, clock, lease=30.0) as alive,
    ):
        await stalled.declare("g", ["conf.item"])
        await stalled.publish([env(1), env(2), env(3)])
        r1 = Reader(stalled, "g")
        old = await r1.take(3)
        r2 = Reader(alive, "g")
        assert await r2.quiet(0.9), "redelivered before the lease ran out"
        new = await r2.take(3)
        assert [d.attempt for d in new] == [2, 2, 2]
        # the stalled consumer wakes up and settles what it no longer holds
        await stalled.ack(old[:1])
        await stalled.nack(old[1], 0.0)
        rec = surge.DeadLetter(
            id=old[2].envelope.id,
            group="g",
            topic="conf.item",
            key=None,
            headers=None,
            body=b"",
            error_type="X",
            error="x",
            traceback="",
            attempts=1,
            first_attempt_at=0.0,
            failed_at=0.0,
        )
        await stalled.dead_letter(old[2], rec)
        assert stalled.stale_settles == 3
        assert (await alive.stats("g")).pending == 3
        assert await alive.dead_letters("g") == []
        await alive.ack(new)
        assert alive.stale_settles == 0
        assert await r2.quiet(5.0)
        stats = await alive.stats("g")
        assert (stats.backlog, stats.pending, stats.scheduled) == (0, 0, 0)
        await r1.aclose()
        await r2.aclose()


async def test_competing_transports_share_the_work(tmp_path: Path, clock: surge.Clock) -> None:
    """Two transports on one file (two processes) each get a share, none
    twice; each one's stats count every settle and both consumers (what
    admission reads a stage's rate from)."""
    db = tmp_path / "d.db"
    async with started(db, clock) as a, started(db, clock) as b:
        await a.declare("g", ["conf.item"])
        await b.declare("g", ["conf.item"])
        ra, rb = Reader(a, "g", prefetch=10), Reader(b, "g", prefetch=10)
        await a.publish([env(i) for i in range(100)])
        seen: list[int] = []
        for t, r in ((a, ra), (b, rb), (a, ra), (b, rb)) * 10:
            if len(seen) == 100:
                break
            batch = await r.batch()
            seen.extend(number(d) for d in batch)
            await t.ack(batch)
        assert sorted(seen) == list(range(100))
        for t in (a, b):
            stats = await t.stats("g")
            assert (stats.settled, stats.consumers) == (100, 2)
        await ra.aclose()
        await rb.aclose()


async def test_concurrent_publishes_share_transactions(tmp_path: Path, clock: surge.Clock) -> None:
    """Group commit: 500 concurrent publishes take a handful of transactions."""
    db = tmp_path / "d.db"
    async with started(db, clock) as t:
        await t.declare("g", ["conf.item"])
        before = t.transactions
        await asyncio.gather(*(t.publish([env(i)]) for i in range(500)))
        assert t.transactions - before <= 3
    assert _count(db, "SELECT count(*) FROM messages") == 500


async def test_sequential_publishes_each_commit(tmp_path: Path, clock: surge.Clock) -> None:
    """A publish that returned is committed: one after another, one transaction each."""
    db = tmp_path / "d.db"
    async with started(db, clock) as t:
        await t.declare("g", ["conf.item"])
        before = t.transactions
        for i in range(5):
            await t.publish([env(i)])
            assert _count(db, "SELECT count(*) FROM messages") == i + 1
        assert t.transactions - before == 5


async def test_retention_compacts_and_bounds_the_file(tmp_path: Path, clock: surge.Clock) -> None:
    """Events every group settled are deleted and the file stops growing; others stay."""
    db = tmp_path / "d.db"
    sizes = []
    async with started(db, clock, retention=0, maintenance=3600) as t:
        await t.declare("g", ["conf.item"])
        await t.declare("lazy", ["conf.keep"])
        await t.publish([env(-1, topic="conf.keep")])
        r = Reader(t, "g", prefetch=1000)
        for _ in range(6):
            await t.publish([env(i, pad=1000) for i in range(400)])
            got = await r.take(400)
            await t.ack(got)
            assert await t.compact() == 400
            wal = db.with_name(db.name + "-wal")
            sizes.append(db.stat().st_size + (wal.stat().st_size if wal.exists() else 0))
        assert _count(db, "SELECT count(*) FROM messages") == 1  # lazy's, unsettled
        await r.aclose()
        lazy = Reader(t, "lazy")
        await t.ack(await lazy.take(1))
        # a later sweep, starting again from the oldest event, takes it
        assert sum([await t.compact() for _ in range(70)]) == 1
        assert _count(db, "SELECT count(*) FROM messages") == 0
        await lazy.aclose()
    assert max(sizes[2:]) <= sizes[1] * 1.1, sizes


async def test_retention_keeps_settled_events_until_it_passes(
    tmp_path: Path, clock: surge.Clock
) -> None:
    """With retention, settled events stay that long, then go."""
    db = tmp_path / "d.db"
    async with started(db, clock, retention=10, maintenance=3600) as t:
        await t.declare("g", ["conf.item"])
        await t.publish([env(i) for i in range(50)])
        r = Reader(t, "g")
        await t.ack(await r.take(50))
        assert await t.compact() == 0
        assert await r.quiet(5.0)
        assert await t.compact() == 0
        assert await r.quiet(6.0)
        assert await t.compact() == 50
        assert _count(db, "SELECT count(*) FROM messages") == 0
        await r.aclose()


async def test_dedup_window_expires(tmp_path: Path, clock: surge.Clock) -> None:
    """A derived id is dropped within the window and accepted again after it."""
    db = tmp_path / "d.db"
    async with started(db, clock, dedup_window=5, maintenance=3600) as t:
        await t.declare("g", ["conf.item"])
        child = surge.derive_id(surge.new_id(), 0)
        await t.publish([env(1, id=child)])
        await t.publish([env(1, id=child)])
        r = Reader(t, "g")
        await t.ack(await r.take(1))
        assert await r.quiet(6.0)
        await t.publish([env(1, id=child)])
        (again,) = await r.take(1)
        assert again.envelope.id == child
        await t.ack([again])
        await r.aclose()


async def test_ephemeral_groups_go_at_close(tmp_path: Path, clock: surge.Clock) -> None:
    """A reply inbox (ephemeral group) and what it holds are deleted by close."""
    db = tmp_path / "d.db"
    async with started(db, clock) as t:
        await t.declare("inbox", ["inbox"], ephemeral=True)
        await t.declare("g", ["conf.item"])
        await t.publish([env(1, topic="inbox")])
    assert _count(db, "SELECT count(*) FROM groups WHERE name = 'inbox'") == 0
    assert _count(db, "SELECT count(*) FROM deliveries") == 0
    assert _count(db, "SELECT count(*) FROM groups WHERE name = 'g'") == 1


@pytest.mark.realtime
async def test_wal_and_synchronous_levels(tmp_path: Path) -> None:
    """The file is in WAL mode with incremental vacuum; synchronous follows the URL."""
    for level, code in (("full", 2), ("normal", 1)):
        t = open_transport(f"sqlite:///{tmp_path}/{level}.db?synchronous={level}")
        assert isinstance(t, SqliteTransport)
        await t.start()
        try:
            assert await t.pragma("synchronous") == code
        finally:
            await t.close()
        assert _count(tmp_path / f"{level}.db", "PRAGMA auto_vacuum") == 2
        with contextlib.closing(sqlite3.connect(tmp_path / f"{level}.db")) as conn, conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_uncommitted_publishes_are_bounded(tmp_path: Path, clock: surge.Clock) -> None:
    """Past max_pending uncommitted envelopes publish_nowait raises Overloaded; publish waits."""
    db = tmp_path / "d.db"
    async with started(db, clock, max_pending=5) as t:
        await t.declare("g", ["conf.item"])
        t.publish_nowait([env(i) for i in range(5)])
        with pytest.raises(surge.Overloaded):
            t.publish_nowait([env(5)])
        waiting = asyncio.ensure_future(t.publish([env(6)]))
        await asyncio.sleep(0)
        assert not waiting.done()
        await waiting  # once the first five are committed
        assert _count(db, "SELECT count(*) FROM messages") == 6
        r = Reader(t, "g")
        got = await r.take(6)
        assert sorted(number(d) for d in got) == [0, 1, 2, 3, 4, 6]
        await t.ack(got)
        await r.aclose()


async def test_partition_count_is_kept_in_the_file(tmp_path: Path, clock: surge.Clock) -> None:
    """The first transport writes its partition count; another count raises
    ConfigurationError naming both, and the file is left as it was."""
    db = tmp_path / "d.db"
    t = open_transport(f"sqlite:///{db}?partitions=4", clock=clock)
    assert isinstance(t, SqliteTransport)
    assert t.partitions == 4
    await t.start()
    await t.close()
    assert _value(db, "SELECT value FROM meta WHERE key = 'partitions'") == 4
    with pytest.raises(surge.ConfigurationError, match=r"4 partitions.*partitions=8"):
        await _open(db, clock).start()
    with pytest.raises(surge.ConfigurationError, match="partitions"):
        _open(db, clock, partitions=0)
    async with started(db, clock, partitions=4) as again:
        await again.declare("g", ["conf.item"])
    assert _value(db, "SELECT value FROM meta WHERE key = 'partitions'") == 4


async def test_a_joining_consumer_gets_its_partitions_within_a_round_trip(
    tmp_path: Path, clock: surge.Clock
) -> None:
    """A second consumer joins a group whose partitions the first holds:
    once the first sees it (at its next round) it gives half back at once
    (nothing of it unsettled), and the second takes it within a few 50 ms
    looks, not at its next round of lease/10 (3 s by default: a worker
    joining under load left those keys with no reader that long)."""
    db = tmp_path / "d.db"
    async with started(db, clock) as a, started(db, clock) as b:
        await a.declare("g", ["conf.item"])
        await b.declare("g", ["conf.item"])
        ra = Reader(a, "g")
        await _owns_all(a, "g", ra)
        rb = Reader(b, "g").start()
        own_a, own_b = a.ownership("g"), b.ownership("g")
        assert own_a is not None
        assert own_b is not None
        async with asyncio.timeout(60):
            while len(own_a.owned) == own_a.partitions:
                await own_a.changed()  # given back: nobody's until b takes it
        start = clock.time()
        async with asyncio.timeout(60):
            while len(own_b.owned) < own_b.partitions // 2 or own_a.releasing:
                await own_b.changed()
        assert clock.time() - start < 0.5, clock.time() - start
        assert own_a.owned.isdisjoint(own_b.owned)
        await ra.aclose()
        await rb.aclose()


async def test_a_dead_consumers_partitions_go_to_the_next_after_the_lease(
    tmp_path: Path, clock: surge.VirtualClock
) -> None:
    """A consumer killed holding a partition and deliveries of it: the next
    owner takes the partition once its lease runs out, reads nothing of it
    before the deliveries' leases run out too, then gets them first, in
    order, before what was published after them."""
    db = tmp_path / "d.db"
    lease = 3.0
    a = _open(db, clock, lease=lease, heartbeat=0)
    await a.start()
    await a.declare("g", ["conf.item"])
    ra = Reader(a, "g")
    await _owns_all(a, "g", ra)
    # (virtual time) claim between two renewals of the partition lease, so
    # that the partition's lease ends before the deliveries' leases do
    await clock.sleep(lease / 6)
    await a.publish([keyed(i, "k") for i in range(5)])
    got = await ra.take(5)
    assert [number(d) for d in got] == [0, 1, 2, 3, 4]
    await a.ack(got[:2])
    await _kill(a)
    await ra.aclose()
    part = partition_of("k", a.partitions)
    freed = _value(db, f"SELECT until FROM owners WHERE part = {part}")
    held_until = _value(db, "SELECT max(visible_at) FROM deliveries WHERE token IS NOT NULL")
    assert freed < held_until  # else this test would not test the wait for held_until
    async with started(db, clock, lease=lease, heartbeat=0) as b:
        await b.declare("g", ["conf.item"])
        await b.publish([keyed(i, "k") for i in range(5, 8)])
        rb = Reader(b, "g")
        assert await rb.quiet(held_until - clock.time() - 0.01)
        own = b.ownership("g")
        assert own is not None
        assert part in own.owned  # taken, and not read while a's leases held
        stats = await b.stats("g")  # a partition's entries are counted too
        assert (stats.backlog, stats.pending) == (3, 3)
        got = await rb.take(6)
        assert clock.time() >= held_until
        assert [(number(d), d.attempt) for d in got] == [
            (2, 2),
            (3, 2),
            (4, 2),
            (5, 1),
            (6, 1),
            (7, 1),
        ]
        await _owns_all(b, "g", rb)
        await b.ack(got)
        assert await rb.quiet(2 * lease)
        await rb.aclose()


async def test_released_deliveries_keep_their_place(tmp_path: Path, clock: surge.Clock) -> None:
    """Deliveries handed back with release (a stopping app) come first for
    the next owner of their partition, their attempt not counted; at close
    the partitions go at once, without waiting for a lease."""
    db = tmp_path / "d.db"
    async with started(db, clock, lease=600) as a:
        await a.declare("g", ["conf.item"])
        ra = Reader(a, "g")
        await _owns_all(a, "g", ra)
        await a.publish([keyed(i, "k") for i in range(3)])
        got = await ra.take(3)
        await a.release(got[1:])
        await a.ack(got[:1])
        await a.publish([keyed(3, "k")])
        await ra.aclose()
    before = clock.time()
    async with started(db, clock, lease=600) as b:
        await b.declare("g", ["conf.item"])
        rb = Reader(b, "g")
        got = await rb.take(3)
        assert [(number(d), d.attempt) for d in got] == [(1, 1), (2, 1), (3, 1)]
        assert clock.time() - before < 5
        await b.ack(got)
        await rb.aclose()


async def test_delayed_retried_and_replayed_keyed_events_keep_their_partition(
    tmp_path: Path, clock: surge.Clock
) -> None:
    """A keyed event published with not_before, nacked with a delay or
    replayed from the dead letters stays in the partition of its key; a
    reply inbox (ephemeral group) is never partitioned."""
    db = tmp_path / "d.db"
    part = partition_of("k", 8)
    async with started(db, clock) as t:
        await t.declare("g", ["conf.item"])
        await t.declare("inbox", ["conf.item"], ephemeral=True)
        r = Reader(t, "g")
        await _owns_all(t, "g", r)
        later = keyed(1, "k")
        later.not_before = clock.time() + 5
        await t.publish([later, keyed(2, "k")])
        assert _count(db, f"SELECT count(*) FROM deliveries WHERE grp = 1 AND part = {part}") == 2
        assert _count(db, "SELECT count(*) FROM deliveries WHERE grp = 2 AND part IS NULL") == 2
        (d2,) = await r.take(1)
        await t.nack(d2, 1.0)
        (again,) = await r.take(1)
        assert (number(again), again.attempt) == (2, 2)
        rec = surge.DeadLetter(
            id=again.envelope.id,
            group="g",
            topic="conf.item",
            key="k",
            headers=None,
            body=body(2),
            error_type="X",
            error="x",
            traceback="",
            attempts=2,
            first_attempt_at=0.0,
            failed_at=0.0,
        )
        await t.dead_letter(again, rec)
        (d1,) = await r.take(1)  # its not_before came
        assert number(d1) == 1
        await t.ack([d1])
        assert await t.replay("g") == 1
        (replayed,) = await r.take(1)
        assert (number(replayed), replayed.envelope.key) == (2, "k")
        assert _count(db, f"SELECT count(*) FROM deliveries WHERE grp = 1 AND part = {part}") == 1
        await t.ack([replayed])
        stats = await t.stats("g")
        assert (stats.backlog, stats.pending, stats.scheduled, stats.dead) == (0, 0, 0, 0)
        await r.aclose()


_VERSION_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE groups (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, patterns TEXT NOT NULL,
    ephemeral INTEGER NOT NULL DEFAULT 0, alive_until REAL);
CREATE TABLE messages (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, topic TEXT NOT NULL, key TEXT,
    time REAL NOT NULL, headers BLOB, body BLOB NOT NULL, not_before REAL);
CREATE TABLE deliveries (id INTEGER PRIMARY KEY, grp INTEGER NOT NULL, msg INTEGER NOT NULL,
    visible_at REAL NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, token INTEGER,
    first_time REAL);
CREATE INDEX deliveries_due ON deliveries (grp, visible_at);
CREATE INDEX deliveries_msg ON deliveries (msg);
CREATE TABLE dead_letters (grp INTEGER NOT NULL, id TEXT NOT NULL, topic TEXT NOT NULL, key TEXT,
    headers BLOB, body BLOB NOT NULL, error_type TEXT NOT NULL, error TEXT NOT NULL,
    traceback TEXT NOT NULL, attempts INTEGER NOT NULL, first_attempt_at REAL NOT NULL,
    failed_at REAL NOT NULL, PRIMARY KEY (grp, id));
CREATE TABLE seen (id TEXT PRIMARY KEY, time REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX seen_time ON seen (time);
INSERT INTO meta VALUES ('magic', 'surge-sqlite'), ('version', 1), ('seq', 1), ('groups', '0');
INSERT INTO groups (id, name, patterns) VALUES (1, 'g', '["conf.item"]');
"""


async def test_a_version_1_file_is_upgraded(tmp_path: Path, clock: surge.Clock) -> None:
    """A file written before partitions is upgraded in place: what it holds
    is delivered (from the shared queue), keyed events go to partitions."""
    db = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executescript(_VERSION_1)
        conn.execute(
            "INSERT INTO messages VALUES (1, ?, 'conf.item', 'k', 0.0, NULL, ?, NULL)",
            (surge.new_id(), body(1)),
        )
        conn.execute("INSERT INTO deliveries (grp, msg, visible_at) VALUES (1, 1, 0.0)")
    async with started(db, clock) as t:
        await t.declare("g", ["conf.item"])
        await t.publish([keyed(2, "k")])
        r = Reader(t, "g")
        got = await r.take(2)
        assert [number(d) for d in got] == [1, 2]
        await t.ack(got)
        await r.aclose()
    assert _value(db, "SELECT value FROM meta WHERE key = 'version'") == 2
    assert _value(db, "SELECT value FROM meta WHERE key = 'partitions'") == 8
    assert _count(db, "SELECT count(*) FROM deliveries") == 0
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        parts = [r[0] for r in conn.execute("SELECT part FROM deliveries")]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert parts == []
    assert {"members", "owners", "deliveries_part"} <= tables


async def test_sqlite_declares_its_capabilities(tmp_path: Path, clock: surge.Clock) -> None:
    """sqlite hands back, routes keys into its partitions, tells idleness and
    keeps state; it has no direct put (a publish is a transaction)."""
    async with started(tmp_path / "d.db", clock, partitions=4) as t:
        caps = capabilities_of(t)
        assert caps.hands_back is t
        assert caps.key_routing is t
        assert caps.partitions == 4
        assert caps.idle is t
        assert caps.state is t
        assert caps.direct_put is None
