"""The connections of ``postgresql://``: a pool for statements and the
translation of the driver's errors at this boundary.

asyncpg, not psycopg 3: measured on one connection to a local server, a
round trip took 65 us against 153 us, an ``unnest`` insert of 1,000-row
batches ran at 303,000 rows/s against 81,000, and reading 1,000-row pages
at 798,000 rows/s against 557,000 (binary). The outbox accepts a psycopg
``AsyncConnection`` too (:mod:`._outbox`): it needs one statement there.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from ..._clock import Clock
from ..._errors import Closed, ConfigurationError, SurgeError, TransportError

__all__ = ("Database", "retryable", "rowcount", "translate")

log = logging.getLogger("surge.postgres")

T = TypeVar("T")

# The server went away, restarts, or ended our backend (pg_terminate_backend:
# class 57), a deadlock or serialization failure (class 40): try again.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
    asyncpg.TransactionRollbackError,
    asyncpg.CannotConnectNowError,
    # a connection reset while released to the pool after its backend died
    asyncpg.exceptions.InternalClientError,
)


_LOGIN = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError)


def retryable(exc: BaseException) -> bool:
    """Whether ``exc`` (the driver's, or ours wrapping it) may pass if tried again."""
    if isinstance(exc, TransportError):
        return bool(getattr(exc, "retryable", False))
    return isinstance(exc, _TRANSIENT)


class _Lost(TransportError):
    """The server could not be reached or dropped the connection."""

    retryable = True


def translate(exc: BaseException, where: str = "") -> SurgeError:
    """A surge error for one of the driver's (or the socket's)."""
    if isinstance(exc, SurgeError):
        return exc
    text = f"{where}: " if where else ""
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return ConfigurationError(f"{text}{exc}: create the database, or name one that exists")
    if isinstance(exc, _LOGIN):
        return ConfigurationError(f"{text}the server refused the login: {exc}")
    if isinstance(exc, _TRANSIENT):
        return _Lost(f"{text}{type(exc).__name__}: {exc}")
    return TransportError(f"{text}{type(exc).__name__}: {exc}")


class Database:
    """A pool of connections to one database, opened by :meth:`open`.

    Every call translates the driver's errors; :meth:`retry` runs a call
    again, with a backoff capped at one second, while its errors are
    transient and ``reconnect_timeout`` has not passed.
    """

    def __init__(
        self,
        dsn: str,
        *,
        size: int,
        clock: Clock,
        reconnect_timeout: float,
        command_timeout: float | None = None,
        label: str,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.settings = settings or {}
        self.size = size
        self.clock = clock
        self.reconnect_timeout = reconnect_timeout
        self.command_timeout = command_timeout
        self.label = label
        self._pool: _Pool | None = None
        self.healthy = True
        self.last_error = ""

    async def open(self) -> None:
        # Connections are opened as statements need them: the first
        # statement is the first connection.
        self._pool = _Pool(
            self.dsn,
            size=self.size,
            settings=self.settings,
            command_timeout=self.command_timeout,
            monotonic=self.clock.monotonic,
        )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(5.0)

    def prune(self) -> None:
        """Close the connections left idle for a minute (after a burst)."""
        if self._pool is not None:
            self._pool.prune()

    @property
    def pool(self) -> _Pool:
        if self._pool is None:
            raise Closed(f"{self.label}: the postgres transport is not started")
        return self._pool

    async def call(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``fn(conn)`` on a pooled connection, errors translated."""
        pool = self.pool
        try:
            conn = await pool.acquire()
            try:
                result = await fn(conn)
            except BaseException as exc:
                pool.release(conn, exc)
                raise
            pool.release(conn)
        except TimeoutError:
            # asyncpg's command_timeout (or a new connection's handshake)
            error = _Lost(
                f"{self.label}: no answer within {self.command_timeout}s "
                "(command_timeout; is the server reachable?)"
            )
            self.healthy = False
            self.last_error = str(error)
            raise error from None
        except (asyncpg.PostgresError, *_TRANSIENT) as exc:
            self.healthy = False
            self.last_error = str(exc)
            raise translate(exc, self.label) from None
        self.healthy = True
        return result

    async def transaction(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``fn(conn)`` in a transaction of its own, errors translated."""

        async def run(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                return await fn(conn)

        return await self.call(run)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.call(lambda c: c.fetch(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.call(lambda c: c.fetchval(sql, *args))

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.call(lambda c: c.execute(sql, *args))

    @property
    def reached(self) -> bool:
        """A connection to the server has been opened (since :meth:`open`)."""
        return self._pool is not None and self._pool.reached

    async def retry(
        self, fn: Callable[[], Awaitable[T]], what: str, *, once_reached: bool = False
    ) -> T:
        """``fn()`` until it succeeds, while its error is transient and
        ``reconnect_timeout`` has not passed since the call began: it raises
        within ``reconnect_timeout`` plus the attempt under way then (at most
        ``command_timeout`` waiting for an answer). ``once_reached``: only
        after the server answered once (a server never reached is an error
        at once: a wrong address should not take ``reconnect_timeout``)."""
        clock = self.clock
        # from the call's start, not its first failure: on a silent network
        # the first attempt alone takes command_timeout
        deadline = clock.monotonic() + self.reconnect_timeout
        backoff = 0.05
        while True:
            try:
                return await fn()
            except TransportError as exc:
                if not retryable(exc) or self._pool is None:
                    raise
                if once_reached and not self._pool.reached:
                    raise
                now = clock.monotonic()
                if now >= deadline:
                    raise
                log.warning("postgres: %s failed, trying again: %s", what, exc)
                await clock.sleep(min(backoff, deadline - now))
                backoff = min(1.0, backoff * 2)


# The connection broke, or its state is not known (a statement timed out or
# was cancelled mid-way): such a connection is closed, never reused.
_BROKEN = (asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError)


class _Pool:
    """Up to ``size`` connections, the last released reused first.

    Not asyncpg's pool: its acquire and release cost a statement about
    130 us of the process's CPU and 120 us of latency (measured with
    ``SELECT 1`` against a local server: 384 us a round trip through it,
    263 us on a bare connection), in a task created for every release, a
    timer re-armed, a proxy per acquire and a reset; a claim and an ack are
    a statement each. Here a release is a list append, and nothing carries
    session state across uses (no LISTEN, no session locks, no SET; a
    transaction left open is rolled back by the block that began it, and
    a connection still in one is closed).
    """

    def __init__(
        self,
        dsn: str,
        *,
        size: int,
        settings: dict[str, str],
        command_timeout: float | None,
        monotonic: Callable[[], float],
    ) -> None:
        self._dsn = dsn
        self._size = size
        self._settings = settings
        self._command_timeout = command_timeout
        self._monotonic = monotonic
        self._idle: list[tuple[asyncpg.Connection, float]] = []  # with when released
        self._busy: set[asyncpg.Connection] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._closed = False
        self.reached = False
        """A connection has been opened."""

    async def acquire(self) -> asyncpg.Connection:
        while True:
            if self._closed:
                raise Closed("the postgres transport is closed")
            idle = self._idle
            while idle:
                conn = idle.pop()[0]
                if not conn.is_closed():
                    self._busy.add(conn)
                    return conn
            if len(self._busy) + self._opening < self._size:
                return await self._open()
            fut: asyncio.Future[asyncpg.Connection | None] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiters.append(fut)
            try:
                conn = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and (got := fut.result()) is not None:
                    self.release(got)  # handed over as the wait was cancelled
                raise
            if conn is not None:
                return conn  # handed over by release, already counted busy
            # None: a connection was dropped, there is room to open one

    async def _open(self) -> asyncpg.Connection:
        self._opening += 1
        try:
            conn = await asyncpg.connect(
                self._dsn,
                server_settings=self._settings,
                # On a silent network (a host gone, packets dropped) a
                # statement's answer never comes and TCP may not say so for
                # minutes: give the connection up after command_timeout
                # (the statement's cancel request, and a new connection's
                # handshake, are bounded by it too), and retry() goes on.
                command_timeout=self._command_timeout,
                timeout=self._command_timeout or 60.0,
            )
        except BaseException:
            self._wake_one()
            raise
        finally:
            self._opening -= 1
        self.reached = True
        if self._closed:
            conn.terminate()
            raise Closed("the postgres transport is closed")
        self._busy.add(conn)
        return conn

    def release(self, conn: asyncpg.Connection, error: BaseException | None = None) -> None:
        """Give ``conn`` back; after ``error`` it is kept only if the server
        refused the statement and the connection is plainly idle."""
        self._busy.discard(conn)
        reusable = not self._closed and not conn.is_closed() and not conn.is_in_transaction()
        if error is not None and not (
            isinstance(error, asyncpg.PostgresError) and not isinstance(error, _BROKEN)
        ):
            reusable = False
        if not reusable:
            conn.terminate()
            self._wake_one()
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._busy.add(conn)
                fut.set_result(conn)
                return
        self._idle.append((conn, self._monotonic()))

    def _wake_one(self) -> None:
        """A connection went away: a waiter may open one in its place."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def prune(self, idle_for: float = 60.0) -> None:
        """Close connections idle for ``idle_for`` seconds (the oldest first)."""
        edge = self._monotonic() - idle_for
        idle = self._idle
        n = 0
        while n < len(idle) and idle[n][1] < edge:
            idle[n][0].terminate()
            n += 1
        del idle[:n]

    async def close(self, bound: float) -> None:
        """Close every connection: the idle ones politely within ``bound``
        seconds; the ones in use (a statement still out) at once."""
        self._closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(Closed("the postgres transport is closed"))
        idle, self._idle = [c for c, _ in self._idle], []
        for conn in self._busy:
            conn.terminate()
        self._busy.clear()
        if idle:
            try:
                async with asyncio.timeout(bound):
                    await asyncio.gather(*(c.close() for c in idle), return_exceptions=True)
            except TimeoutError:
                pass
            for conn in idle:
                conn.terminate()


def rowcount(status: str) -> int:
    """The row count of a command status (``DELETE 3`` -> 3)."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0
