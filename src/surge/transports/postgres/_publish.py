"""Publishing on ``postgresql://``: envelopes as the columns of the schema's
``publish`` function, and the group commit that batches concurrent calls.

Publishes made in one turn of the event loop go to the server as one call
of ``publish`` (one round trip and one commit for all of them, up to
``batch`` envelopes a call); the function routes, deduplicates, stores and
NOTIFYs in the transaction. A call that fails for a transient reason (the
connection was lost, the server restarts) is tried again for
``reconnect_timeout`` seconds: an envelope whose commit was lost with the
connection may be stored twice, which at-least-once allows (a derived id is
deduplicated anyway).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from ..._clock import Clock
from ..._codec import Codec
from ..._errors import Closed, MessageTooLarge, Overloaded
from ..._event import Envelope
from .._partitions import partition_of
from ._db import Database
from ._schema import Schema

__all__ = ("Columns", "Publisher", "columns")

log = logging.getLogger("surge.postgres")

# Batches written at once. Publishes made while they are being written
# gather into the next batch (group commit): under load the batches grow
# instead of the round trips multiplying.
_IN_FLIGHT = 2

_encode_headers = msgspec.msgpack.Encoder().encode

# ids, topics, keys, times, headers, bodies, not_before, partitions
Columns = tuple[
    list[str],
    list[str],
    list[str | None],
    list[float],
    list[bytes | None],
    list[bytes],
    list[float | None],
    list[int | None],
]

CALL = (
    "SELECT {s}.publish($1, $2, $3::text[], $4::text[], $5::text[], $6::float8[], "
    "$7::bytea[], $8::bytea[], $9::float8[], $10::int[])"
)


def columns(envelopes: Sequence[Envelope], codec: Codec, partitions: int) -> Columns:
    """``envelopes`` as the arrays ``publish`` takes (bodies encoded)."""
    encode = codec.encode_event
    limit = codec.max_message_size
    cols: Columns = ([], [], [], [], [], [], [], [])
    ids, topics, keys, times, headers, bodies, nbs, parts = cols
    for env in envelopes:
        body = env.body
        if body is None:
            body = encode(env.event) if env.event is not None else b""
        if len(body) > limit:
            raise MessageTooLarge(
                f"event {env.id} on {env.topic!r} is {len(body)} bytes; the limit is {limit}"
            )
        ids.append(env.id)
        topics.append(env.topic)
        keys.append(env.key)
        times.append(env.time)
        headers.append(_encode_headers(env.headers) if env.headers else None)
        bodies.append(body)
        nbs.append(env.not_before)
        parts.append(None if env.key is None else partition_of(env.key, partitions))
    return cols


def _extend(into: Columns, more: Columns) -> None:
    for a, b in zip(into, more, strict=True):
        a.extend(b)  # type: ignore[attr-defined]


class Publisher:
    """Group commit and backpressure for one transport's publishes.

    ``published(gids)`` is called with the groups a committed batch touched
    (to wake this process's consumers at once, before the NOTIFY arrives).
    """

    def __init__(
        self,
        db: Database,
        schema: Schema,
        *,
        codec: Codec,
        clock: Clock,
        partitions: int,
        dedup_window: float,
        max_pending: int,
        batch: int,
        published: Callable[[Iterable[int]], None],
    ) -> None:
        self._db = db
        self._sql = schema.q(CALL)
        self._codec = codec
        self._clock = clock
        self._partitions = partitions
        self._window = dedup_window
        self.max_pending = max_pending
        self._batch = batch
        self._published = published
        self.queued = 0
        self.closed = False
        self._space: deque[asyncio.Future[None]] = deque()
        self._rows: Columns | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    def columns(self, envelopes: Sequence[Envelope]) -> Columns:
        return columns(envelopes, self._codec, self._partitions)

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        cols = self.columns(envelopes)
        if not cols[0]:
            return
        loop = asyncio.get_running_loop()
        while self.queued >= self.max_pending:
            fut = loop.create_future()
            self._space.append(fut)
            await fut
            if self.closed:
                raise Closed("the postgres transport is closed")
        await self._enqueue(cols)

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        cols = self.columns(envelopes)
        n = len(cols[0])
        if not n:
            return
        if self.queued + n > self.max_pending or self._space:
            raise Overloaded(f"{self.queued} envelopes wait to be committed to postgres")
        self._enqueue(cols).add_done_callback(_log_failure)

    def _enqueue(self, cols: Columns) -> asyncio.Future[None]:
        """Add ``cols`` to this loop turn's batch; a future for their commit."""
        self.queued += len(cols[0])
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if self._rows is None:
            self._rows = cols
            if len(self._flushing) < _IN_FLIGHT:
                loop.call_soon(self._flush)
        else:
            _extend(self._rows, cols)
        self._waiters.append(fut)
        return fut

    def _flush(self) -> None:
        if len(self._flushing) >= _IN_FLIGHT:
            return  # the next write to finish flushes what gathered meanwhile
        rows, waiters = self._rows, self._waiters
        self._rows, self._waiters = None, []
        if rows is None:
            return
        task = asyncio.get_running_loop().create_task(self._write(rows, waiters))
        self._flushing.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._flushing.discard(task)
        if self._rows is not None:
            self._flush()

    async def _write(self, rows: Columns, waiters: list[asyncio.Future[None]]) -> None:
        n = len(rows[0])
        error: BaseException | None = None
        touched: set[int] = set()
        try:
            step = self._batch
            for i in range(0, n, step):
                part = tuple(c[i : i + step] for c in rows)
                gids = await self._db.retry(lambda p=part: self._call(p), "publish")  # type: ignore[misc]
                touched.update(gids or ())
        except BaseException as exc:
            error = exc
        self.queued -= n
        space = self._space
        while space and (self.queued < self.max_pending or self.closed):
            fut = space.popleft()
            if not fut.done():
                fut.set_result(None)
        if touched:
            self._published(touched)
        for w in waiters:
            if w.done():
                continue
            if error is None:
                w.set_result(None)
            else:
                w.set_exception(error)
        if isinstance(error, asyncio.CancelledError):
            raise error

    async def _call(self, cols: tuple[list[Any], ...]) -> list[int] | None:
        now = self._clock.time()
        sql, window = self._sql, self._window
        gids: list[int] | None = await self._db.fetchval(sql, now, window, *cols)
        return gids

    async def close(self) -> None:
        """Wait for the batches being written, then wake the waiting publishers."""
        self.closed = True
        while self._rows is not None or self._flushing:
            if self._rows is not None:
                self._flush()
            await asyncio.gather(*self._flushing, return_exceptions=True)
        while self._space:
            fut = self._space.popleft()
            if not fut.done():
                fut.set_result(None)


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("postgres: a publish_nowait batch was not stored: %s", fut.exception())
