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
        self._pool: asyncpg.Pool | None = None
        self.healthy = True
        self.last_error = ""

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=0,
                max_size=self.size,
                max_inactive_connection_lifetime=60,
                server_settings=self.settings,
                reset=_keep,
                # On a silent network (a host gone, packets dropped) a
                # statement's answer never comes and TCP may not say so for
                # minutes: give the connection up after command_timeout
                # (the statement's cancel request, and a new connection's
                # handshake, are bounded by it too), and retry() goes on.
                command_timeout=self.command_timeout,
                timeout=self.command_timeout or 60.0,
            )
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise translate(exc, f"cannot connect to {self.label}") from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise Closed(f"{self.label}: the postgres transport is not started")
        return self._pool

    async def call(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``fn(conn)`` on a pooled connection, errors translated."""
        try:
            async with self.pool.acquire() as conn:
                result = await fn(conn)
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

    async def retry(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        """``fn()`` until it succeeds, while its error is transient and
        ``reconnect_timeout`` has not passed since the call began: it raises
        within ``reconnect_timeout`` plus the attempt under way then (at most
        ``command_timeout`` waiting for an answer)."""
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
                now = clock.monotonic()
                if now >= deadline:
                    raise
                log.warning("postgres: %s failed, trying again: %s", what, exc)
                await clock.sleep(min(backoff, deadline - now))
                backoff = min(1.0, backoff * 2)


async def _keep(conn: asyncpg.Connection) -> None:
    """No reset when a connection goes back to the pool (asyncpg's default
    costs a round trip per statement): nothing here leaves session state
    behind (no LISTEN, no session locks, no SET), and a connection whose
    transaction failed was rolled back by the block that began it."""


def rowcount(status: str) -> int:
    """The row count of a command status (``DELETE 3`` -> 3)."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0
