"""Wake-ups on ``postgresql://``: a connection of its own LISTENs to the
schema's channel, on which the ``publish`` function NOTIFYs the groups each
committed batch touched (an outbox transaction's too, at its commit).

An idle consumer reacts to a new event in about a round trip. When the
listening connection is lost, it is opened again with a backoff capped at
one second, and every consumer is woken once it is back (what was notified
meanwhile is gone); until then, and always as a fallback, an idle consumer
looks for work at least every ``poll`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from ..._clock import Clock
from ._db import retryable, translate

__all__ = ("Listener",)

log = logging.getLogger("surge.postgres")


class Listener:
    """LISTENs on ``channel``; ``woken(gids)`` for each notification, and
    ``woken(None)`` (every group) after a reconnect."""

    def __init__(
        self, dsn: str, channel: str, *, clock: Clock, woken: Callable[[list[int] | None], None]
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._clock = clock
        self._woken = woken
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0
        self._reconnected = asyncio.Condition()

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.get_running_loop().create_task(
            self._keep(), name="surge-postgres-listen"
        )

    async def _connect(self) -> None:
        try:
            conn = await asyncpg.connect(self._dsn)
            await conn.add_listener(self._channel, self._notified)
        except asyncpg.PostgresError as exc:
            raise translate(exc, "LISTEN") from None
        conn.add_termination_listener(self._terminated)
        self._lost.clear()
        self._conn = conn

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            gids = [int(g) for g in payload.split(",") if g]
        except ValueError:
            gids = None
        self._woken(gids)

    def _terminated(self, conn: Any) -> None:
        self._lost.set()

    async def _keep(self) -> None:
        backoff = 0.05
        while True:
            await self._lost.wait()
            self._conn = None
            try:
                await self._connect()
            except Exception as exc:
                if not retryable(exc):
                    log.error("postgres: cannot LISTEN again: %s", exc)
                else:
                    log.warning("postgres: cannot LISTEN again yet: %s", exc)
                self._lost.set()
                await self._clock.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.05
            self.reconnects += 1
            self._woken(None)
            async with self._reconnected:
                self._reconnected.notify_all()

    async def wait_reconnects(self, n: int) -> None:
        """Return once the connection has been opened again ``n`` times."""
        async with self._reconnected:
            await self._reconnected.wait_for(lambda: self.reconnects >= n)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:
                conn.terminate()
