"""sqlite://'s writers take turns: the fair write lock, its bound and its yield.

The lock's waits run on a fake clock here (``sleep`` advances it), so the
bound and the turn-taking are asserted exactly, without real waiting; the
other writer is a raw file descriptor holding the lock files as a writer
of another process would.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import surge
from surge._clock import RealClock
from surge.transports.sqlite._database import Database
from surge.transports.sqlite._thread import DatabaseThread
from surge.transports.sqlite._writelock import WriteLock


class FakeTime:
    """monotonic() and sleep() for a WriteLock: sleeping advances time and
    runs ``on_sleep`` (what other writers do meanwhile)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.naps: list[float] = []
        self.on_sleep: Callable[[int], None] = lambda _: None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds
        self.on_sleep(len(self.naps))


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "d.db"


@pytest.fixture
def lock(db: Path, fake: FakeTime) -> Iterator[WriteLock]:
    w = WriteLock(db, 5.0, sleep=fake.sleep, monotonic=fake.monotonic)
    w.open()
    yield w
    w.close()


class Other:
    """Another process's writer, as raw descriptors on the lock files."""

    def __init__(self, db: Path) -> None:
        self.lock_fd = os.open(f"{db}-lock", os.O_RDWR)
        self.queue_fd = os.open(f"{db}-queue", os.O_RDWR)

    def take(self) -> None:
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def give(self) -> None:
        fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def wait(self) -> None:
        fcntl.flock(self.queue_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)

    def stop_waiting(self) -> None:
        fcntl.flock(self.queue_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.lock_fd)
        os.close(self.queue_fd)


@pytest.fixture
def other(db: Path, lock: WriteLock) -> Iterator[Other]:
    o = Other(db)
    yield o
    o.close()


def test_an_uncontended_writer_never_waits(lock: WriteLock, fake: FakeTime) -> None:
    """Alone, acquire takes the lock at once, every time, without a nap."""
    for _ in range(100):
        lock.acquire()
        assert lock.held
        lock.release()
    assert (fake.naps, lock.waits, lock.yields) == ([], 0, 0)


def test_a_taken_lock_is_waited_out_in_short_naps(
    lock: WriteLock, other: Other, fake: FakeTime
) -> None:
    """A lock another writer holds is looked at every 2 ms at most, and taken
    as soon as it is given back, while the first writer is marked waiting."""
    other.take()
    seen_waiting: list[bool] = []

    def meanwhile(naps: int) -> None:
        seen_waiting.append(_someone_waits(other))
        if naps == 40:
            other.give()

    fake.on_sleep = meanwhile
    lock.acquire()
    assert lock.held
    assert len(fake.naps) == 40
    assert max(fake.naps) == pytest.approx(0.002)
    assert all(seen_waiting)
    assert not _someone_waits(other), "still marked waiting after taking the lock"
    assert lock.waits == 1


def test_a_lock_held_past_the_bound_raises(lock: WriteLock, other: Other, fake: FakeTime) -> None:
    """Past ``bound`` seconds of waiting, acquire raises TransportError naming
    the lock, and leaves no waiting mark behind."""
    other.take()
    start = fake.now
    with pytest.raises(surge.TransportError, match="locked by another process"):
        lock.acquire()
    assert 5.0 <= fake.now - start <= 5.0 + 0.002
    assert not lock.held
    assert not _someone_waits(other)
    other.give()
    lock.acquire()
    assert lock.held


def test_a_writer_lets_a_waiting_one_go_first(
    lock: WriteLock, other: Other, fake: FakeTime
) -> None:
    """A writer locking again while another waits lets it write first, then
    queues behind it: the other's turn comes before the writer's next."""
    lock.acquire()
    other.wait()  # the other process found the lock taken
    lock.release()
    order: list[str] = []

    def meanwhile(naps: int) -> None:
        if naps == 1:  # the waiter wakes up and takes its turn
            other.take()
            other.stop_waiting()
            order.append("other writes")
        elif naps == 3:
            other.give()
            order.append("other done")

    fake.on_sleep = meanwhile
    lock.acquire()
    order.append("writer writes")
    assert order == ["other writes", "other done", "writer writes"]
    assert (lock.yields, lock.waits) == (1, 1)


def test_a_waiter_that_never_takes_its_turn_delays_the_writer_briefly(
    lock: WriteLock, other: Other, fake: FakeTime
) -> None:
    """A waiting mark left by a stuck writer costs the next writer at most
    the yield (50 ms), never its bound."""
    other.wait()
    start = fake.now
    lock.acquire()
    assert lock.held
    assert fake.now - start == pytest.approx(0.05, abs=0.0021)
    assert lock.yields == 1


def test_a_writer_stopped_inside_its_probe_does_not_hang_the_waiters(
    lock: WriteLock, other: Other, fake: FakeTime
) -> None:
    """A writer stopped (SIGSTOP) while it holds the lock and its
    contended() probe (the queue file, exclusively) leaves the others
    waiting only up to their bound: marking itself waiting never blocks."""
    other.take()
    fcntl.flock(other.queue_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # stopped mid-probe
    outcome: list[BaseException | None] = []

    def acquire() -> None:
        try:
            lock.acquire()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=acquire, daemon=True)
    waiter.start()
    waiter.join(10.0)
    assert not waiter.is_alive(), "acquire blocked on the queue file"
    [exc] = outcome
    assert isinstance(exc, surge.TransportError)
    assert "locked by another process" in str(exc)
    assert not lock.held


def test_two_transports_in_one_process_exclude_each_other(db: Path) -> None:
    """The lock belongs to an open file, not to a process: a second WriteLock
    on the same file in the same process cannot take it while the first holds it."""
    a = WriteLock(db, 0.0)
    b = WriteLock(db, 0.0)
    a.open()
    b.open()
    try:
        a.acquire()
        with pytest.raises(surge.TransportError):
            b.acquire()
        a.release()
        b.acquire()
        assert b.held
    finally:
        a.close()
        b.close()


def _someone_waits(other: Other) -> bool:
    try:
        fcntl.flock(other.queue_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(other.queue_fd, fcntl.LOCK_UN)
    return False


def _database(db: Path) -> Database:
    """A transport's connection object on ``db``, to run on a DatabaseThread."""
    return Database(
        db,
        synchronous="normal",
        busy_timeout=10.0,
        check="off",
        max_size=None,
        dedup_window=60.0,
        partitions=4,
    )


async def test_calls_queued_while_waiting_for_the_lock_commit_with_the_waiter(db: Path) -> None:
    """Group commit: a batch that waits for the write lock takes in the calls
    queued meanwhile, up to the first that must run alone (a checkpoint),
    and commits them in one transaction, in queue order; the rest run after."""
    database = _database(db)
    waiting = threading.Event()
    proceed = threading.Event()

    def nap(seconds: float) -> None:  # the database thread, finding the lock taken
        waiting.set()
        assert proceed.wait(10.0), "the test never let the writer go"

    database.writer = WriteLock(db, 10.0, sleep=nap)
    thread = DatabaseThread(database, RealClock())
    thread.start(asyncio.get_running_loop())
    await thread.submit(database.open)
    other = Other(db)
    try:
        other.take()
        first = thread.submit(database.save_state, "k", b"1")
        assert await asyncio.to_thread(waiting.wait, 10.0), "the writer never waited"
        before = database.transactions
        settled: list[object] = []
        later = [
            thread.submit(database.save_state, "k", str(i).encode(), after=settled.append)
            for i in (2, 3, 4)
        ]
        check = thread.submit(database.checkpoint)
        after = thread.submit(database.load_state, "k", write=False)
        last = thread.submit(database.save_state, "k", b"5")
        other.give()
        proceed.set()
        await asyncio.gather(first, *later, check, last)
        # one transaction for the four saves (the last joined wrote last),
        # then the checkpoint alone, then the rest (the read after the
        # write of its batch, see the next test)
        assert database.transactions - before == 2
        assert settled == [None, None, None], "each joined call is settled once"
        assert await after == b"5"
        assert await thread.submit(database.load_state, "k", write=False) == b"5"
    finally:
        proceed.set()
        other.close()
        await thread.stop()


async def test_reads_run_after_their_batchs_writes_outside_the_write_lock(db: Path) -> None:
    """A batch of reads and writes commits the writes, lets the write lock
    go, then runs the reads: the other processes do not wait for them, and
    each read sees at least what was committed when it was queued."""
    database = _database(db)
    thread = DatabaseThread(database, RealClock())
    thread.start(asyncio.get_running_loop())
    await thread.submit(database.open)
    gate = threading.Event()
    try:
        # the thread is busy, so what comes next is queued as one batch
        busy = thread.submit(lambda: gate.wait(10.0), write=False)
        read = thread.submit(lambda: (database.writer.held, database.load_state("k")), write=False)
        write = thread.submit(database.save_state, "k", b"v")
        gate.set()
        assert await busy
        await write
        assert await read == (False, b"v")
    finally:
        gate.set()
        await thread.stop()


async def test_only_what_publishes_waits_for_an_fsync(db: Path) -> None:
    """synchronous=full (the default): a transaction that publishes (or
    saves state) commits with an fsync; one of claims, settles and leases
    only commits without one (NORMAL: durable with the next that syncs)."""
    database = _database(db)
    database.synchronous = "full"
    thread = DatabaseThread(database, RealClock())
    thread.start(asyncio.get_running_loop())
    await thread.submit(database.open)

    async def level() -> int:
        found: int = await thread.submit(database.pragma, "synchronous", write=False)
        return found

    try:
        assert await level() == 2
        await thread.submit(database.ack, [])
        assert await level() == 1
        await thread.submit(database.extend, [], 0.0, 0.0, "me")
        assert await level() == 1
        await thread.submit(database.save_state, "k", b"v")
        assert await level() == 2
        # one batch of a settle and a save: the save's fsync covers both
        gate = threading.Event()
        busy = thread.submit(lambda: gate.wait(10.0), write=False)
        settle = thread.submit(database.ack, [])
        save = thread.submit(database.save_state, "k", b"w")
        gate.set()
        await asyncio.gather(busy, settle, save)
        assert await level() == 2
    finally:
        await thread.stop()
