"""The thread that owns the connection, and the event loop's handle on it.

SQLite calls block, so one thread per transport owns the connection and runs
every statement (:class:`~._database.Database`). The loop hands it calls
through a queue (:meth:`DatabaseThread.submit`, which returns a future);
the thread takes everything queued at once and runs it as one batch (one
transaction, see ``Database.run``), joined by what was queued while it
waited for the write lock (group commit: under contention a writer waits
about one transaction of each other process, and what came in meanwhile
commits with it instead of waiting a turn of its own), then hands the
batch back to the loop,
which resolves the futures in order and runs each job's ``after`` callback
first (so a transport's books change in the same loop step as the file).

Under a :class:`~surge.VirtualClock` each job holds the clock while it is
queued or running: work on the thread takes no virtual
time, so virtual time must not race ahead of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..._clock import Clock, VirtualClock, virtual_clock_of
from ..._errors import Closed
from ._database import Database, Job, translate

__all__ = ("DatabaseThread",)

log = logging.getLogger("surge.sqlite")

_STOP: Any = object()  # the job that closes the connection and ends the thread
# The most calls one transaction takes in after the lock was won: bounds the
# transaction's length (and so the other processes' wait for their turn).
_JOIN = 512


class DatabaseThread:
    """Runs calls on ``database`` in a thread of its own, from one event loop."""

    def __init__(self, database: Database, clock: Clock) -> None:
        self.database = database
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._pending: deque[Job] = deque()  # taken off the queue, not yet run
        self._joined: list[Job] = []  # taken into the running batch by _more
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._virtual = clock if isinstance(clock, VirtualClock) else None

    @property
    def running(self) -> bool:
        """Started and not yet told to stop: ``submit`` accepts calls."""
        return self._thread is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the thread; its results come back on ``loop``."""
        self._loop = loop
        if self._virtual is None:
            # an app given no clock, run on a virtual loop (CI: such a
            # worker's partition rounds all came back 'late', past the
            # fence's window, while virtual time raced ahead of the thread,
            # and lapsed again and again)
            self._virtual = virtual_clock_of(loop)
        self._thread = threading.Thread(
            target=self._serve,
            name=f"surge-sqlite-{self.database.path.name}",
            daemon=True,
        )
        self._thread.start()

    async def stop(self) -> None:
        """Close the connection once what is queued ran, and end the thread."""
        if self._thread is None:
            return
        fut = self.submit(_STOP)
        self._thread = None
        await fut

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        write: bool = True,
        after: Callable[[Any], None] | None = None,
        fut: asyncio.Future[Any] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue ``fn(*args)`` (a ``Database`` method) for the thread; a
        future of its result. ``after(result)`` (None on failure) runs on
        the loop before the future resolves, even when nobody awaits it."""
        if self._thread is None:
            raise Closed("sqlite transport is not started")
        loop = self._loop
        assert loop is not None
        if fut is None:
            fut = loop.create_future()
        if self._virtual is not None:
            self._virtual.hold()
        self._jobs.put(Job(fn, args, write, fut, after))
        return fut

    # --- the thread ----------------------------------------------------------
    def _serve(self) -> None:
        """Run what is queued, batch by batch, and hand each batch back to
        the loop, until the stop job."""
        database = self.database
        pending = self._pending
        loop = self._loop
        assert loop is not None
        while True:
            if not pending:
                pending.append(self._jobs.get())
            self._drain()
            jobs = list(pending)
            pending.clear()
            stop = any(j.fn is _STOP for j in jobs)
            work = [j for j in jobs if j.fn is not _STOP]
            joined = self._joined
            try:
                if work:
                    # what comes after a stop waits for it (and fails there);
                    # run() extends the list it is given by the joined calls,
                    # which are settled from self._joined
                    database.run(list(work), None if stop else self._more)
                if stop:
                    database.close()
            except BaseException as exc:  # a bug here must not strand the waiters
                for job in (*work, *joined):
                    if job.error is None:
                        job.error = exc
            done = [*work, *joined, *(j for j in jobs if j.fn is _STOP)]
            joined.clear()
            try:
                loop.call_soon_threadsafe(self._settle, done)
            except RuntimeError:  # the loop is gone: nobody waits any more
                return
            if stop:
                return

    def _drain(self) -> None:
        jobs_q = self._jobs
        pending = self._pending
        with contextlib.suppress(queue.Empty):
            while True:
                pending.append(jobs_q.get_nowait())

    def _more(self, soft: bool) -> list[Job]:
        """The calls queued since the batch was taken, up to the first that
        must run alone (a stop, an open, a checkpoint), or with ``soft`` the
        first that needs an fsync (see ``Database.soft``), to join the
        batch's transaction: called by ``Database.run`` with the write lock
        held."""
        self._drain()
        pending = self._pending
        alone = self.database.alone
        needs_no_sync = self.database.soft
        out: list[Job] = []
        while pending and len(out) < _JOIN:
            fn = pending[0].fn
            if fn is _STOP or fn in alone or (soft and fn not in needs_no_sync):
                break
            out.append(pending.popleft())
        self._joined.extend(out)
        return out

    # --- back on the loop ----------------------------------------------------
    def _settle(self, jobs: list[Job]) -> None:
        virtual = self._virtual
        for job in jobs:
            if virtual is not None:
                virtual.release()
            err = job.error
            if job.after is not None:
                try:
                    job.after(job.result if err is None else None)
                except Exception:
                    log.exception("sqlite: settling a %s job failed", job.fn)
            fut = job.fut
            if fut.done():
                continue
            if err is None:
                fut.set_result(job.result)
            else:
                if isinstance(err, sqlite3.Error):
                    err = translate(self.database.path, err)
                fut.set_exception(err)
