"""The connection to RabbitMQ: opened, watched, and opened again after a loss.

One :class:`Link` per transport. Channels are opened on its current
connection; when that connection drops (a network reset, a node restart)
the link reconnects with a growing pause and then calls every ``on_up``
hook in order (the publisher reopens its channel, consumers subscribe
again), so the parts above never reconnect on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import aiormq.exceptions as aexc

from ..._clock import Clock
from ..._errors import Closed, ConfigurationError, TransportError

__all__ = ("Link", "safe_url", "translate")

log = logging.getLogger("surge.amqp")

Hook = Callable[[], Awaitable[None]]

_connecting = contextvars.ContextVar("surge_amqp_connecting", default=False)
"""True in the task of a Link's connection attempt."""


class _OwnConnectErrors(logging.Filter):
    """Drops aiormq's ERROR record of a failed connection attempt made by a
    Link: the Link reports that failure itself (the ``TransportError`` of
    ``open``, one line for the operator; ``last_error`` while reconnecting),
    so a refused connection is not told twice, once with a traceback-like
    repr. Other aiormq users of the process keep the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_connecting.get() and record.msg == "error when creating transport: %r")


logging.getLogger("aiormq.connection").addFilter(_OwnConnectErrors())


def safe_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=user + host))


def translate(exc: BaseException, doing: str) -> Exception:
    """A surge error for an aiormq one (a broker's errors never leak out)."""
    if isinstance(exc, aexc.ChannelNotFoundEntity):
        return ConfigurationError(f"{doing}: {exc}")
    if isinstance(exc, aexc.ChannelPreconditionFailed):
        return ConfigurationError(f"{doing}: the broker refused it ({exc})")
    if isinstance(exc, aexc.ChannelAccessRefused | aexc.AuthenticationError):
        return TransportError(f"{doing}: access refused ({exc})")
    return TransportError(f"{doing}: {exc!r}")


# What a lost connection or channel looks like from a call on it.
LOST = (
    aexc.AMQPConnectionError,
    aexc.ChannelClosed,
    aexc.ChannelInvalidStateError,
    ConnectionError,
    OSError,
)


class Link:
    """One AMQP connection that comes back after it drops."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock,
        connect_timeout: float = 5.0,
        reconnect_max: float = 2.0,
    ) -> None:
        self.url = url
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.reconnect_max = reconnect_max
        self.generation = 0
        """Counts connections: a channel of an older one is dead."""
        self.last_error: str | None = None
        self._conn: aiormq.abc.AbstractConnection | None = None
        self._up = asyncio.Event()
        # set once _watch has seen the current connection drop (or at close)
        self._seen_down = asyncio.Event()
        self._hooks: list[Hook] = []
        self._watcher: asyncio.Task[None] | None = None
        self._closed = True
        self.unanswered = False
        """A channel close went unanswered while closing (see close_channel)."""
        self._sockets: _Sockets | None = None

    @property
    def connected(self) -> bool:
        return self._up.is_set() and self._usable()

    def _usable(self) -> bool:
        """The current connection is open. A connection that dropped is
        closed at once, while ``_up`` stays set until ``_watch`` runs: a
        caller that took ``_up`` alone for a connection, and looped without
        waiting, would keep ``_watch`` from ever running."""
        conn = self._conn
        return conn is not None and not conn.is_closed

    @property
    def closed(self) -> bool:
        return self._closed

    def on_up(self, hook: Hook) -> None:
        """Call ``hook`` after every reconnection (not after the first open)."""
        self._hooks.append(hook)

    async def open(self) -> None:
        """Connect, or raise ``TransportError`` saying why not."""
        self._closed = False
        try:
            await self._connect()
        except BaseException:
            self._closed = True
            raise
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(), name="surge-amqp-link"
        )

    async def _connect(self) -> None:
        token = _connecting.set(True)
        try:
            async with asyncio.timeout(self.connect_timeout):
                sockets = _Sockets.of(self.url)
                if sockets is None:
                    conn = await aiormq.connect(self.url)
                else:
                    conn = await aiormq.connect(self.url, transport_factory=sockets)
                    self._sockets = sockets
        except (aexc.AMQPError, OSError, TimeoutError) as exc:
            raise TransportError(
                f"cannot connect to RabbitMQ at {safe_url(self.url)}: {exc!r}"
            ) from exc
        finally:
            _connecting.reset(token)
        self._conn = conn
        self.generation += 1
        self.last_error = None
        self._seen_down.clear()
        self._up.set()

    def _ended(self) -> bool:
        return self._closed

    async def _watch(self) -> None:
        """Reconnect whenever the connection drops, until ``close``."""
        while not self._ended():
            conn = self._conn
            assert conn is not None
            with contextlib.suppress(BaseException):
                await asyncio.shield(conn.closing)
            if self._ended():
                return
            self._up.clear()
            self._seen_down.set()
            self.last_error = "connection lost"
            log.warning("lost the connection to RabbitMQ at %s; reconnecting", safe_url(self.url))
            pause = 0.1
            while not self._ended():
                try:
                    await self._connect()
                    break
                except TransportError as exc:
                    self.last_error = str(exc)
                    await self.clock.sleep(pause)
                    pause = min(pause * 2, self.reconnect_max)
            if self._ended():
                return
            log.warning("reconnected to RabbitMQ at %s", safe_url(self.url))
            for hook in list(self._hooks):
                try:
                    await hook()
                except LOST:
                    break  # dropped again: the next round redoes them all
                except Exception:
                    log.exception("amqp: a reconnection step failed")

    async def wait_up(self, timeout: float | None = None) -> None:
        """Return once connected; ``Closed`` if the link closes first."""
        if self._closed:
            raise Closed("transport is closed")
        async with asyncio.timeout(timeout):
            while True:
                await self._up.wait()
                if self._closed or self._usable():
                    break
                # dropped, not yet seen by _watch: let it run, clear _up
                # and connect again
                await self._seen_down.wait()
        if self._closed:
            raise Closed("transport is closed")

    async def channel(self, *, confirms: bool = False) -> aiormq.abc.AbstractChannel:
        """A new channel on the current connection."""
        if self._closed:
            raise Closed("transport is closed")
        conn = self._conn
        # not connected() alone: on a connection that dropped (and _watch
        # has not seen it yet) aiormq raises a bare RuntimeError, which
        # callers would not know for a lost connection
        if conn is None or not self.connected:
            raise aexc.ConnectionClosed(320, "not connected")
        return await conn.channel(publisher_confirms=confirms)

    @property
    def server_version(self) -> str:
        conn = self._conn
        props = conn.server_properties if conn is not None else {}
        version = props.get("version", b"") if props else b""
        return version.decode() if isinstance(version, bytes) else str(version)

    async def close_channel(
        self,
        ch: aiormq.abc.AbstractChannel | None,
        before: Callable[[], Awaitable[None]] | None = None,
        bound: float = 1.0,
    ) -> None:
        """Close ``ch`` (after ``before``, a flush of its acks, say) within
        ``bound`` seconds. Once one close went unanswered (a broker that
        stopped answering, a blackholed link), the next are skipped and the
        connection's own close is cut short: it ends every channel, and a
        stop waited each bound out in turn (a worker's exit took 5.3 s)."""
        if ch is None or ch.is_closed or self.unanswered:
            return
        try:
            async with asyncio.timeout(bound):
                if before is not None:
                    await before()
                await ch.close()
        except TimeoutError:
            self.unanswered = True
            log.warning("amqp: the broker did not answer a channel close in %.1fs", bound)
        except Exception as exc:  # a channel the broker closed meanwhile
            log.debug("amqp: closing a channel: %r", exc)

    def _end(self) -> asyncio.Task[None] | None:
        """Closed from now on: waiters wake and see Closed, and the watcher
        (returned, cancelled) reconnects no more."""
        self._closed = True
        self._up.set()
        self._seen_down.set()
        watcher = self._watcher
        if watcher is not None:
            watcher.cancel()
        return watcher

    def abort(self) -> None:
        """End the link at once, as a killed process's: no reconnecting, the
        socket dropped, nothing sent (the broker requeues what was held)."""
        if self._closed and self._conn is None:
            return
        self._end()
        self._conn = None
        if self._sockets is not None:
            self._sockets.abort()

    async def close(self) -> None:
        if self._closed:
            return
        watcher = self._end()
        if watcher is not None:
            with contextlib.suppress(BaseException):
                await watcher
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                with contextlib.suppress(Exception):
                    # a close never holds up a worker's exit; after a channel
                    # close went unanswered, this one will not be answered
                    async with asyncio.timeout(0.2 if self.unanswered else 2.0):
                        await conn.close()
            finally:
                # Cut short (its bound, or a stop's deadline cancelling it):
                # the socket is dropped as a killed process's would be, or
                # the client's writer waits forever to flush to a silent
                # peer (a task no loop's end could cancel).
                if self._sockets is not None:
                    self._sockets.abort()


class _Sockets:
    """aiormq's transport factory (TCP or TLS), keeping the stream writers it
    made, so that a close cut short can abort the socket (aiormq keeps its
    writer to itself). None where this aiormq has no transport factories."""

    def __init__(self, base: Any) -> None:
        self._base = base
        self._writers: list[asyncio.StreamWriter] = []

    @classmethod
    def of(cls, url: str) -> _Sockets | None:
        conn_mod = getattr(aiormq, "connection", None)
        tcp = getattr(conn_mod, "TCPTransportFactory", None)
        tls = getattr(conn_mod, "TLSTransportFactory", None)
        if tcp is None or tls is None:
            return None
        return cls(tls() if url.startswith("amqps:") else tcp())

    async def create(
        self, url: Any, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._base.create(url, **kwargs)
        self._writers = [w for w in self._writers if not w.is_closing()]
        self._writers.append(writer)
        return reader, writer

    def abort(self) -> None:
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()
