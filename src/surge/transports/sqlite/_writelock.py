"""The host's writers of one file take turns: a fair write lock beside SQLite's.

SQLite lets one connection write at a time. A connection that finds the
file locked waits in SQLite's busy handler, which sleeps 1, 2, 5 ... up to
100 ms between looks and never queues: under steady load the process that
holds the lock commits, finds its next batch queued and locks again within
microseconds, so the other process, asleep between looks, misses the gap
again and again. Measured with the shop on two workers: write transactions
waited up to 3.6 s for the lock, and past ``busy_timeout`` (5 s) the caller
got ``database is locked``, though the file was never locked for long.

:class:`WriteLock` queues writers instead, with two ``flock`` files beside
the database (``<file>-lock`` and ``<file>-queue``; ``flock`` locks belong
to an open file, so two transports in one process exclude each other too):

- a writer holds ``-lock`` exclusively around its write transaction;
- a writer that finds it taken holds ``-queue`` shared while it waits;
- a writer about to lock again first looks for waiters (an exclusive
  ``-queue`` probe fails) and, if there are any, lets one of them write
  first (up to ``_YIELD`` seconds), then queues behind it.

So under contention the processes' transactions alternate, and a batch
waits for about one transaction of each other process, not for luck. The
wait is bounded by ``bound`` (the transport's ``busy_timeout``); past it
``acquire`` raises ``TransportError``. SQLite's own busy handler stays as
the second line, for writers that are not surge transports (the sqlite3
shell, a backup).

The waits are real time, on the thread that owns the connection, like
SQLite's busy handler: work on that thread takes no virtual time (see
``_thread``), so the injected ``Clock`` does not apply here; ``sleep`` and
``monotonic`` can be replaced for tests.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..._errors import TransportError
from ._options import unopenable

__all__ = ("WriteLock",)

# Between looks at a taken lock: short, because a turn is one transaction
# (a millisecond or an fsync); the first look after 0.2 ms, doubling to 2 ms.
_FIRST_NAP = 0.0002
_LONGEST_NAP = 0.002
# How long a writer lets a waiting one go first before queueing itself: a
# waiter looks every 2 ms at most, so it normally takes its turn long before.
_YIELD = 0.05


class WriteLock:
    """The write lock of one database file, shared fairly by the host's writers."""

    def __init__(
        self,
        path: Path,
        bound: float,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.bound = bound
        self._sleep = sleep
        self._monotonic = monotonic
        self._lock: int | None = None
        self._queue: int | None = None
        self._held = False
        self.waits = 0
        """Acquisitions that found the lock taken."""
        self.yields = 0
        """Acquisitions that let a waiting writer go first."""

    def open(self) -> None:
        """Open (create) the two lock files beside the database."""
        try:
            self._lock = os.open(f"{self.path}-lock", os.O_RDWR | os.O_CREAT, 0o644)
            self._queue = os.open(f"{self.path}-queue", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self.close()
            raise TransportError(unopenable(self.path, exc.strerror or exc)) from None

    def close(self) -> None:
        """Close the lock files (a lock held is released)."""
        for fd in (self._lock, self._queue):
            if fd is not None:
                os.close(fd)
        self._lock = self._queue = None
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def contended(self) -> bool:
        """Whether another writer waits for the lock now."""
        queue = self._queue
        assert queue is not None, "the write lock is not open"
        try:
            fcntl.flock(queue, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(queue, fcntl.LOCK_UN)
        return False

    def acquire(self) -> None:
        """Take the lock, after a waiting writer's turn; ``TransportError``
        when it stays taken for ``bound`` seconds."""
        lock = self._lock
        assert lock is not None, "the write lock is not open"
        assert not self._held, "the write lock is not reentrant"
        start = self._monotonic()
        deadline = start + self.bound
        if self.contended():
            # Someone waited while this writer wrote: their turn first.
            self.yields += 1
            nap = _FIRST_NAP
            until = min(deadline, start + _YIELD)
            while self.contended() and self._monotonic() < until:
                self._sleep(nap)
                nap = min(_LONGEST_NAP, nap * 2)
        if self._try(lock):
            return
        self.waits += 1
        queue = self._queue
        assert queue is not None
        # "I am waiting", seen by contended(); never a blocking flock: a
        # writer stopped (SIGSTOP, a VM pause) inside its contended() probe
        # holds the queue file exclusively, and the bound must still hold
        marked = self._mark(queue)
        try:
            nap = _FIRST_NAP
            while not self._try(lock):
                if self._monotonic() >= deadline:
                    raise TransportError(
                        f"{self.path}: the database is locked by another process "
                        f"(still locked after busy_timeout={self.bound:g}s)"
                    )
                self._sleep(nap)
                nap = min(_LONGEST_NAP, nap * 2)
                marked = marked or self._mark(queue)
        finally:
            if marked:
                fcntl.flock(queue, fcntl.LOCK_UN)

    @staticmethod
    def _mark(queue: int) -> bool:
        try:
            fcntl.flock(queue, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a writer is probing (or stopped while probing)
        return True

    def _try(self, lock: int) -> bool:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._held = True
        return True

    def release(self) -> None:
        """Let the next writer in."""
        if self._held and self._lock is not None:
            self._held = False
            fcntl.flock(self._lock, fcntl.LOCK_UN)
