"""sqlite:// beyond the conformance suite: durability, bad files, leases, growth."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import surge
from surge.transports import open_transport
from surge.transports._sqlite import SqliteTransport

from .conformance._helpers import Item, Reader, env, number


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
    with sqlite3.connect(path) as conn:
        n: int = conn.execute(sql).fetchone()[0]
    return n


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
    with sqlite3.connect(db) as conn:
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
    with sqlite3.connect(db) as conn:
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
    """Two transports on one file (two processes) each get a share, none twice."""
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
            conn = t._db.conn
            assert conn is not None
            got = await t._submit(
                lambda c=conn: c.execute("PRAGMA synchronous").fetchone()[0], write=False
            )
            assert got == code
        finally:
            await t.close()
        assert _count(tmp_path / f"{level}.db", "PRAGMA auto_vacuum") == 2
        with sqlite3.connect(tmp_path / f"{level}.db") as conn:
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
