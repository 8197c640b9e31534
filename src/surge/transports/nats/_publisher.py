"""Publishing to JetStream: many messages in flight, every ack awaited.

Each message goes out with its own reply subject under one inbox; the acks
come back on one subscription and settle a future per message. At most
``max_pending`` messages await their ack; an ack that does not come within
``ack_timeout`` (a dropped connection, a restarted server) has its message
resent under the same ``Nats-Msg-Id``, which the server deduplicates.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..._clock import Clock
from ..._errors import Closed, ConfigurationError, Overloaded, TransportError
from ._connection import CancelGuard, Connection, safe_url, translate
from ._options import NatsOptions

__all__ = ("Item", "Publisher")

log = logging.getLogger("surge.nats")

_DUPLICATE_IN_PROCESS = 10158  # JSStreamDuplicateMessageConflict
_IN_PROCESS_RETRY = 0.02  # s
_NO_STREAM_RETRY = 0.1  # s

Item = tuple[str, bytes, dict[str, str]]
"""(subject, payload, headers) of one message."""


class Publisher:
    """Messages in flight to JetStream and their acks, for one connection."""

    def __init__(self, conn: Connection, options: NatsOptions, clock: Clock) -> None:
        self._conn = conn
        self._clock = clock
        self._stream = options.stream
        self._ack_timeout = options.ack_timeout
        self._publish_timeout = options.publish_timeout
        self.max_pending = options.max_pending
        self._acks: dict[str, _Pending] = {}
        self._ack_prefix = ""
        self._ack_sub: Subscription | None = None
        self._next_token = 0
        self._queued = 0  # accepted by publish_nowait, not yet sent
        self._outbox: deque[Item] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._space: deque[asyncio.Future[None]] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Listen for acks (the connection is open)."""
        nc = self._conn.client()
        self._ack_prefix = nc.new_inbox() + "."
        self._ack_sub = await nc.subscribe(self._ack_prefix + "*", cb=self._on_ack)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    @property
    def busy(self) -> bool:
        """Some publish is not acknowledged yet."""
        return bool(self._acks or self._tasks or self._outbox)

    async def publish(self, items: list[Item]) -> None:
        futs = []
        with CancelGuard():  # once per batch, not per message (the hot path)
            for subject, data, headers in items:
                while len(self._acks) + self._queued >= self.max_pending:
                    await self._wait_space()
                futs.append(await self.send(subject, data, headers))
        await self.confirm(futs)

    def publish_nowait(self, items: list[Item]) -> None:
        held = len(self._acks) + self._queued
        if held + len(items) > self.max_pending or self._space:
            raise Overloaded(f"{held} publishes await JetStream acks (max_pending)")
        self._outbox.extend(items)
        self._queued += len(items)
        if self._sender is None:
            # one task sends whatever accumulates, not a task per call
            self._sender = asyncio.get_running_loop().create_task(self._send_outbox())
            self._tasks.add(self._sender)
            self._sender.add_done_callback(self._published)

    async def _send_outbox(self) -> None:
        outbox = self._outbox
        try:
            while outbox:
                futs = []
                while outbox:
                    s, d, h = outbox.popleft()
                    self._queued -= 1
                    futs.append(await self.send(s, d, h))
                task = asyncio.get_running_loop().create_task(self.confirm(futs))
                self._tasks.add(task)
                task.add_done_callback(self._published)
        finally:
            self._sender = None
            if outbox:  # failed half way: those are not published
                log.error("publish_nowait: %d events not published", len(outbox))
                self._queued -= len(outbox)
                outbox.clear()

    async def flush(self) -> None:
        """Wait until JetStream acknowledged everything published so far."""
        while self._tasks or self._acks:
            if self._tasks:
                await asyncio.wait(list(self._tasks))
            futs = [e.fut for e in self._acks.values()]
            if futs:
                await asyncio.wait(futs)

    def _published(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("publish_nowait could not publish: %r", task.exception())

    async def _wait_space(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._space.append(fut)
        await fut
        self._conn.client()

    async def send(
        self, subject: str, data: bytes, headers: dict[str, str]
    ) -> asyncio.Future[None]:
        self._next_token += 1
        token = str(self._next_token)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        now = self._clock.monotonic()
        self._acks[token] = _Pending(fut, subject, data, headers, now)
        await self._put(token, subject, data, headers)
        return fut

    async def _put(self, token: str, subject: str, data: bytes, headers: dict[str, str]) -> None:
        nc = self._conn.client()
        try:
            await nc.publish(subject, data, reply=self._ack_prefix + token, headers=headers)
        except (nats.errors.OutboundBufferLimitError, nats.errors.ConnectionReconnectingError):
            pass  # disconnected with a full buffer: resent after a reconnect
        except nats.errors.BadSubjectError:
            self._settle(token, ConfigurationError(f"{subject!r} is not a valid NATS subject"))
        except nats.errors.MaxPayloadError:
            self._settle(token, TransportError(f"a message on {subject!r} exceeds max_payload"))
        except nats.errors.Error as exc:
            self._settle(token, translate(exc, f"publishing to {subject!r}"))

    def _settle(self, token: str, error: BaseException | None) -> None:
        entry = self._acks.pop(token, None)
        if entry is None:
            return
        fut = entry.fut
        if not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
        space = self._space
        while space and len(self._acks) + self._queued < self.max_pending:
            w = space.popleft()
            if not w.done():
                w.set_result(None)
                break

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._ack_prefix) :]
        data = msg.data
        if data and b'"error"' not in data:
            self._settle(token, None)
            return
        if not data:
            status = (msg.headers or {}).get("Status")
            entry = self._acks.get(token)
            if status == "503" and entry is not None:
                # No responders: the stream was there at start (ensured), so
                # in a cluster its leader is being elected (its node died).
                # Ask again shortly; past publish_timeout the sweeper fails it.
                entry.unanswered = True
                asyncio.get_running_loop().call_later(_NO_STREAM_RETRY, self._resend, [token])
            return  # anything else: the sweeper resends it after ack_timeout
        err = json.loads(data).get("error", {})
        if err.get("err_code") == _DUPLICATE_IN_PROCESS:
            # A cluster's stream is still replicating another message with
            # this Nats-Msg-Id (the same derived id published twice at once).
            # It may yet fail (its leader dies): ask again shortly, until the
            # server answers "duplicate" (stored) or stores this one.
            asyncio.get_running_loop().call_later(_IN_PROCESS_RETRY, self._resend, [token])
            return
        self._settle(
            token, TransportError(f"JetStream refused a publish: {err.get('description', err)}")
        )

    async def confirm(self, futs: list[asyncio.Future[None]]) -> None:
        """Wait for the acks of ``futs``; raise the first error.

        No timer per call: the sweeper resends what waits too long and fails
        what waited past ``publish_timeout``.
        """
        try:
            for f in futs:
                if not f.done():
                    await f
                f.result()
        except BaseException:
            for f in futs:  # their errors are reported by this one
                if f.done():
                    _retrieve(f)
                else:
                    f.add_done_callback(_retrieve)
            raise

    async def _sweep(self) -> None:
        clock = self._clock
        conn = self._conn
        period = max(0.05, self._ack_timeout / 2)
        while conn.open:
            await clock.sleep(period)
            if not self._acks:
                continue
            now = clock.monotonic()
            late: list[str] = []
            for token, e in list(self._acks.items()):
                if now - e.first > self._publish_timeout:
                    why = (
                        f"no JetStream stream {self._stream!r} answered"
                        if e.unanswered
                        else "JetStream did not acknowledge a publish"
                    )
                    self._settle(
                        token,
                        TransportError(
                            f"{why} within {self._publish_timeout}s "
                            f"(is {safe_url(conn.url)} reachable?)"
                        ),
                    )
                elif now - e.last > self._ack_timeout:
                    e.last = now
                    late.append(token)
            if late and conn.connected:
                log.warning(
                    "%d publishes unacknowledged after %.1fs; resending",
                    len(late),
                    self._ack_timeout,
                )
                self._resend(late)

    def _resend(self, tokens: list[str]) -> None:
        if not tokens or not self._conn.connected:
            return

        async def resend() -> None:
            for t in tokens:
                e = self._acks.get(t)
                if e is not None and self._conn.open:
                    await self._put(t, e.subject, e.data, e.headers)

        task = asyncio.get_running_loop().create_task(resend())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reconnected(self) -> None:
        """Resend what awaits an ack now rather than after ``ack_timeout``."""
        self._resend(list(self._acks))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for e in self._acks.values():
            fut = e.fut
            if not fut.done():
                fut.set_exception(Closed("transport closed before JetStream acknowledged"))
        self._acks.clear()
        for w in self._space:
            if not w.done():
                w.set_result(None)
        self._space.clear()


class _Pending:
    """A message awaiting its ack, kept for resending."""

    __slots__ = ("data", "first", "fut", "headers", "last", "subject", "unanswered")

    def __init__(
        self,
        fut: asyncio.Future[None],
        subject: str,
        data: bytes,
        headers: dict[str, str],
        now: float,
    ) -> None:
        self.fut = fut
        self.subject = subject
        self.data = data
        self.headers = headers
        self.first = now
        self.last = now
        self.unanswered = False  # a 503: no stream took it


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
