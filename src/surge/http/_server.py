"""Serving the ingress with uvicorn in the app's own process and loop.

uvicorn's httptools protocol is kept and extended by a subclass, because the
hardening the ingress needs sits below ASGI:

* a whole request (line, headers, body) must arrive within
  ``Limits.header_timeout`` of its first byte, or of the connection opening;
  uvicorn only times out idle keep-alive connections, so a slowloris client
  that trickles header bytes would hold its socket forever. One sweep per
  server closes overdue connections (with a 408) instead of one timer per
  request on the hot path.
* httptools has no header size cap (it buffers whatever arrives) and uvicorn
  adds none, so the subclass counts header bytes and answers 431 past
  ``Limits.max_header``, both while headers are still arriving and, exactly,
  once they are complete.
* a connection serves at most ``Limits.max_requests_per_connection``
  requests, then closes (``connection: close`` on the last answer).
* past ``Limits.max_connections`` open connections, a new one is answered
  503 and closed before anything is read, so a flood costs no more file
  descriptors than the process can spare.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .._errors import ConfigurationError
from ._config import Limits
from ._ingress import ADMIN_LISTENER, ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from .._app import App

__all__ = ("Server", "bind_socket", "run", "serve")

log = logging.getLogger("surge.http")


class _HeaderOverflow(Exception):
    pass


def _canned(status: int, reason: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"%sconnection: close\r\n\r\n%s" % (status, reason.encode(), len(body), extra, body)
    )


_431 = _canned(431, "Request Header Fields Too Large", b'{"error":"request headers too large"}')
_408 = _canned(408, "Request Timeout", b'{"error":"request not received in time"}')
_503 = _canned(
    503,
    "Service Unavailable",
    b'{"error":"overloaded: too many connections"}',
    b"retry-after: 1\r\n",
)


# seconds a refused connection may keep sending before it is closed
LINGER = 1.0


class _Ending:
    """The transport a request's cycle writes to: ``close`` is
    :meth:`_Protocol.end`, and once the connection is ended (a 408 from the
    sweep, a refusal) it is closing for the cycle and drops its writes. A
    request still being answered then, say one pipelined by a client that
    never reads, would otherwise write after ``write_eof``, which raises,
    and uvicorn would log the app as failing."""

    __slots__ = ("_protocol", "_transport", "close")

    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol
        self._transport = protocol.transport
        self.close = protocol.end

    def write(self, data: bytes) -> None:
        if self._protocol.lingering is None:
            self._transport.write(data)

    def is_closing(self) -> bool:
        return self._protocol.lingering is not None or self._transport.is_closing()


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines and header limits.

    ``max_header``, ``max_requests``, ``max_connections`` and ``on_lost``
    are set on a subclass per server.
    """

    max_header = 16 * 1024
    max_requests = 10_000
    max_connections = 10_000
    on_lost: Callable[[], None] | None = None
    """Called after each connection closes (the server's ``wait_idle``)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        # The deadline starts at connect: a client that never sends counts too.
        self.began: float | None = self.loop.time()
        self.lingering: float | None = None
        self._head = 0
        self._chunk = 0
        self._in_head = True
        self._overflow = False
        self._served = 0
        self._ending = _Ending(self)
        if len(self.connections) > self.max_connections:
            self.refuse(_503)

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:
            return  # refused: discard what the client still sends
        self._unset_keepalive_if_required()
        self._chunk = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._overflow:
                self.refuse(_431)
            else:
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._in_head:
            # No complete head yet: all of this chunk belongs to it.
            self._head += self._chunk
            if self._head > self.max_header:
                self.refuse(_431)

    def refuse(self, response: bytes) -> None:
        """Answer ``response`` and end the connection."""
        if self.transport.is_closing() or self.lingering is not None:
            return
        self.transport.write(response)
        self.end()

    def end(self) -> None:
        """End the connection without losing what was written.

        Closing a socket with unread input makes the kernel send a reset,
        which may destroy the answer before the client reads it (a 413 sent
        while the body still streams in); so end our side only (FIN after
        the answer), discard what still comes, and close when the client
        does or ``LINGER`` seconds later (the sweep).
        """
        transport = self.transport
        if transport.is_closing() or self.lingering is not None:
            return
        self.began = None
        try:
            transport.write_eof()
        except (NotImplementedError, RuntimeError, OSError):
            transport.close()
            return
        self.lingering = self.loop.time() + LINGER

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head = 0
        if self.began is None:
            self.began = self.loop.time()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head + self._chunk > self.max_header:
            # Only a head that may be too large is measured exactly.
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > self.max_header:
                self._overflow = True
                raise _HeaderOverflow
        # The request's cycle gets a transport whose close() ends the
        # connection gracefully (see end()).
        real = self.transport
        self.transport = self._ending  # type: ignore[assignment]
        try:
            super().on_headers_complete()
        finally:
            self.transport = real
        self._served += 1
        if self._served >= self.max_requests and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.began = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.began = None
        if self.on_lost is not None:
            self.on_lost()


def bind_socket(
    host: str = "127.0.0.1", port: int = 8000, *, reuse_port: bool = True, backlog: int = 4096
) -> socket.socket:
    """A listening TCP socket; with ``reuse_port`` (SO_REUSEPORT) several
    processes may bind the same port and the kernel spreads connections."""
    # "" is socket's INADDR_ANY, asked for by the caller (the CLI never passes it)
    host = host or "0.0.0.0"  # noqa: S104
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose
    # proto says TCP, and accepted sockets inherit it; without it Nagle and
    # delayed ACKs hold each answer's second write back by ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Server:
    """One uvicorn server for an app's ingress, in the running loop.

    ``async with Server(app, port=0) as server:`` listens (``server.url``)
    until the block ends or the app stops; it does not start the app (see
    :func:`serve`). ``asgi`` wraps or replaces ``app.http``.

    With ``tls_cert`` and ``tls_key`` (PEM files) it serves HTTPS; with
    ``tls_ca`` too, only to clients with a certificate that CA signed.

    An ``admin`` server is an admin listener: it serves the operator
    surface (``/metrics``, ``/_surge/``) as well as the routes; see
    :meth:`Ingress.set_admin_token` for who may use it. Bind it to loopback
    or a private interface.
    """

    def __init__(
        self,
        app: App,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        limits: Limits | None = None,
        sock: socket.socket | None = None,
        reuse_port: bool = True,
        asgi: ASGIApp | None = None,
        admin: bool = False,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None) or (tls_ca is not None and tls_cert is None):
            raise ConfigurationError("HTTPS needs tls_cert and tls_key (and tls_ca only with them)")
        self.app = app
        self.admin = admin
        self._tls = (tls_cert, tls_key, tls_ca)
        self.ingress = app.http
        if limits is not None:
            self.ingress.configure(limits)
        self.limits: Limits = self.ingress.limits
        self.host = host
        self.port = port
        self._sock = sock
        self._reuse_port = reuse_port
        self._asgi: ASGIApp = asgi or self.ingress
        if admin:
            self._asgi = _as_admin(self._asgi)
        self._uvicorn: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()  # set as each connection closes
        self._unhook: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self._tls[0] else "http"
        host = self.host or "127.0.0.1"
        if host in ("0.0.0.0", "::"):  # noqa: S104 - compared, not bound
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104 - same
        return (
            f"{scheme}://[{host}]:{self.port}" if ":" in host else f"{scheme}://{host}:{self.port}"
        )

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._uvicorn.server_state.connections) if self._uvicorn else 0

    async def start(self) -> None:
        """Bind (unless given a socket) and start accepting connections."""
        limits = self.limits
        if self._sock is None:
            self._sock = bind_socket(
                self.host, self.port, reuse_port=self._reuse_port, backlog=limits.backlog
            )
        self.port = self._sock.getsockname()[1]
        protocol = type(
            "_SurgeProtocol",
            (_Protocol,),
            {
                "max_header": limits.max_header,
                "max_requests": limits.max_requests_per_connection,
                "max_connections": limits.connection_cap(),
                "on_lost": self._connection_lost,
            },
        )
        cert, key, ca = self._tls
        tls: dict[str, Any] = {}
        if cert is not None:
            tls = {"ssl_certfile": cert, "ssl_keyfile": key}
            if ca is not None:
                tls |= {"ssl_ca_certs": ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            self._asgi,
            http=protocol,
            ws="none",
            lifespan="off",
            loop="none",
            interface="asgi3",
            proxy_headers=False,
            server_header=False,
            access_log=False,
            log_level="warning",
            backlog=limits.backlog,
            timeout_keep_alive=limits.keep_alive,  # type: ignore[arg-type]
            timeout_graceful_shutdown=limits.graceful_timeout,  # type: ignore[arg-type]
            **tls,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._sock])
        self._uvicorn = server
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(server.main_loop(), name="surge.http.tick"),
            loop.create_task(self._sweep(server), name="surge.http.deadlines"),
        ]
        self._unhook = self.ingress.on_shutdown(self.stop)
        self.ingress.serving()

    async def _sweep(self, server: uvicorn.Server) -> None:
        timeout = self.limits.header_timeout
        period = min(max(timeout / 4, 0.05), 1.0)
        clock = self.app.clock
        while True:
            await clock.sleep(period)
            now = clock.monotonic()
            for conn in list(server.server_state.connections):
                if not isinstance(conn, _Protocol):
                    continue
                if conn.began is not None and now - conn.began > timeout:
                    conn.refuse(_408)
                elif conn.lingering is not None and now > conn.lingering:
                    conn.transport.close()

    def _connection_lost(self) -> None:
        self._lost.set()

    async def wait_idle(self) -> None:
        """Wait until no connection is open."""
        await self.wait_connections(0)

    async def wait_connections(self, at_most: int) -> None:
        """Wait until at most ``at_most`` connections are open (refused
        ones are given back as their clients close, or ``LINGER`` seconds
        after the refusal)."""
        while self.connections > at_most:
            self._lost.clear()
            await self._lost.wait()

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (within
        ``Limits.graceful_timeout``), close every connection."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        server = self._uvicorn
        if server is None:
            self._stopped.set()
            return
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        server.should_exit = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(server.server_state.connections):
            if isinstance(conn, _Protocol) and conn.lingering is not None:
                conn.transport.close()  # the sweep that would close it is gone
        try:
            await server.shutdown(sockets=[self._sock] if self._sock else None)
        finally:
            self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _as_admin(asgi: ASGIApp) -> ASGIApp:
    async def admin_listener(scope: Scope, receive: Receive, send: Send) -> None:
        scope[ADMIN_LISTENER] = True
        await asgi(scope, receive, send)

    return admin_listener


async def serve(
    app: App,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    admin: tuple[str, int] | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    sock: socket.socket | None = None,
    reuse_port: bool = True,
    ready: Callable[[Server], object] | None = None,
    install_signals: bool | None = None,
    **limits: Any,
) -> None:
    """Serve ``app.http`` on ``host:port`` until the app is asked to stop.

    Starts the app if it is not running (and then stops it at the end);
    ``limits`` are :class:`Limits` fields. ``ready`` is called with the
    :class:`Server` once it listens (its ``port`` is the bound one), and
    then with the admin one. ``admin=(host, port)`` also serves an admin
    listener there (see :class:`Server`; ``tls_*`` serve both over HTTPS);
    without it, the operator surface
    is served only with an admin token (:meth:`Ingress.set_admin_token`).
    SIGINT and SIGTERM ask the app to stop when ``install_signals`` is true;
    by default, only where nobody else handles them (the main thread, with
    Python's default handlers), so a worker process stops gracefully.
    """
    given = Limits(**limits) if limits else None
    server = Server(
        app,
        host,
        port,
        limits=given,
        sock=sock,
        reuse_port=reuse_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )
    servers = [server]
    if admin is not None:
        servers.append(
            Server(
                app,
                admin[0],
                admin[1],
                reuse_port=reuse_port,
                admin=True,
                tls_cert=tls_cert,
                tls_key=tls_key,
                tls_ca=tls_ca,
            )
        )
    started = app.state != "running"
    # Before the start: a SIGTERM while the app starts asks it to stop once
    # started (the default action would kill it half started).
    installed = _install_signals(app, install_signals)
    if started:
        try:
            await app.start()
        except BaseException:
            loop = asyncio.get_running_loop()
            for sig in installed:
                loop.remove_signal_handler(sig)
            raise
    try:
        for each in servers:
            await each.start()
            if ready is not None:
                ready(each)
        waits = [
            *(asyncio.ensure_future(each.wait_stopped()) for each in servers),
            asyncio.ensure_future(app.wait_stop_requested()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
    finally:
        try:
            for each in servers:
                await each.stop()
            if started:
                await app.stop()
        finally:
            # Only now: a second SIGTERM while the stop runs (systemd's
            # control-group kill signals the workers and their supervisor,
            # which signals them again) finds request_stop, a no-op by then,
            # not the default action that kills a draining process.
            loop = asyncio.get_running_loop()
            for sig in installed:
                loop.remove_signal_handler(sig)


def _install_signals(app: App, install: bool | None) -> list[int]:
    if install is False or threading.current_thread() is not threading.main_thread():
        return []
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if install or current in (signal.SIG_DFL, signal.default_int_handler):
            try:
                loop.add_signal_handler(sig, app.request_stop)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - not Unix
                continue
            installed.append(sig)
    return installed


def run(app: App, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Serve ``app`` (see :func:`serve`) on a new loop until SIGINT/SIGTERM."""
    from .._app import run_loop

    options.setdefault("install_signals", True)
    run_loop(serve(app, host, port, **options))
