"""The Redis transport's link to its broker: the client, the scripts, health,
and how a lost broker is retried.

Every loop of the transport catches the broker's errors, logs a WARNING,
marks the connection unhealthy (``healthy``, ``last_error``) and retries with
a backoff capped at one second; settles are retried until they succeed
(``retrying``: they are idempotent). The broker's own errors are translated
into :class:`~surge.TransportError` here (``error``) and never leak.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry as _RedisRetry
from redis.backoff import NoBackoff

from ..._clock import Clock
from ..._errors import Closed, ConfigurationError, TransportError
from ._options import RedisOptions
from ._scripts import SCRIPTS

__all__ = ("CONNECTION_ERRORS", "Connection")

log = logging.getLogger("surge.redis")

# What a lost or unreachable broker raises: retried, never fatal.
CONNECTION_ERRORS = (rexc.ConnectionError, rexc.TimeoutError, OSError)

T = TypeVar("T")


def _raw(response: Any, **options: Any) -> Any:
    return response


class Connection:
    """One client of one broker, shared by every part of a transport.

    ``closed`` is True before ``open`` and from ``shut`` on: every loop of
    the transport ends when it sees it.
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_public_url",
        "_r",
        "_redis_options",
        "_scripts",
        "_url",
        "healthy",
        "last_error",
    )

    def __init__(self, options: RedisOptions, redis_options: dict[str, Any], clock: Clock) -> None:
        self._url = options.redis_url
        self._redis_options: dict[str, Any] = {
            "socket_connect_timeout": 5.0,
            "socket_timeout": max(10.0, 3 * options.block),
            "socket_keepalive": True,
            # the raw replies parsed here (XREADGROUP, XCLAIM...) are RESP2's shapes
            "protocol": 2,
            # retries are ours: a blind resend of a publish script could duplicate it
            "retry": _RedisRetry(NoBackoff(), 0),
            **redis_options,
        }
        self._clock = clock
        self._r: aredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._closed = True
        self.healthy = False
        """False while the broker cannot be reached; see ``last_error``."""
        self.last_error: str | None = None
        self._public_url = options.url

    # --- lifecycle -----------------------------------------------------------
    @property
    def connected(self) -> bool:
        """A client exists (from ``open`` until ``aclose``)."""
        return self._r is not None

    @property
    def closed(self) -> bool:
        return self._closed

    async def open(self) -> None:
        try:
            r = aredis.Redis.from_url(self._url, **self._redis_options)
        except ValueError as exc:
            raise ConfigurationError(f"{self._public_url!r}: {exc}") from None
        for cmd in ("XREADGROUP", "XCLAIM", "XPENDING", "XRANGE"):
            r.response_callbacks[cmd] = _raw
        self._scripts = {name: r.register_script(src) for name, src in SCRIPTS.items()}
        try:
            await r.ping()
        except Exception as exc:
            await r.aclose()
            raise self.error(exc, "cannot connect") from exc
        self._r = r
        self._closed = False
        self.ok()

    def shut(self) -> aredis.Redis | None:
        """Mark the connection closed (every loop ends) and return the client,
        still open, for the last words of a close."""
        self._closed = True
        return self._r

    async def aclose(self) -> None:
        """Close the client (``shut`` first, if not yet)."""
        r, self._r = self._r, None
        self._closed = True
        if r is not None:
            await r.aclose()

    # --- commands ------------------------------------------------------------
    def client(self) -> aredis.Redis:
        if self._r is None or self._closed:
            raise Closed("transport is closed")
        return self._r

    async def cmd(self, r: aredis.Redis, *args: Any) -> Any:
        """A command whose raw reply the caller parses (XREADGROUP, XCLAIM,
        XPENDING, XRANGE keep the server's shape)."""
        return await r.execute_command(*args)  # type: ignore[no-untyped-call]

    async def run(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[Any],
        client: aredis.Redis | None = None,
    ) -> Any:
        """Run one of ``_scripts.SCRIPTS`` (on ``client``, by default ours)."""
        return await self._scripts[script](
            keys=keys, args=args, client=client if client is not None else self.client()
        )

    async def retrying(self, doing: str, op: Callable[[aredis.Redis], Awaitable[T]]) -> T:
        """Run ``op`` until the broker answers: settles are idempotent."""
        delay = 0.05
        while True:
            r = self.client()
            try:
                result = await op(r)
            except CONNECTION_ERRORS as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # a cancel redis-py swallowed
                if self._closed:
                    raise self.error(exc, doing) from exc
                self.failed(exc, doing)
                delay = await self.backoff(delay)
                continue
            except rexc.RedisError as exc:
                raise self.error(exc, doing) from exc
            self.ok()
            return result

    # --- health --------------------------------------------------------------
    def error(self, exc: BaseException, doing: str) -> TransportError:
        """``exc`` of the broker, as the error the transport raises."""
        parts = urlsplit(self._public_url)
        return TransportError(f"redis at {parts.hostname}:{parts.port or 6379}: {doing}: {exc}")

    def ok(self) -> None:
        if not self.healthy:
            if self.last_error is not None:
                log.warning("redis: connection restored")
            self.healthy = True

    def failed(self, exc: BaseException, doing: str) -> None:
        msg = f"{doing}: {exc!r}"
        if self.healthy or msg != self.last_error:
            log.warning("redis: %s; retrying", msg)
        self.healthy = False
        self.last_error = msg

    async def backoff(self, delay: float) -> float:
        """Sleep ``delay`` (on the clock); the next delay, capped at 1 s."""
        await self._clock.sleep(delay)
        return min(1.0, delay * 2)
