"""A small keep-alive HTTP/1.1 client over asyncio, for the load generator,
the demo and tests. Responses are parsed by httptools (uvicorn's parser)."""

from __future__ import annotations

import asyncio
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import msgspec

__all__ = ("Connection", "Response", "build_request", "fetch", "split_url")


class Response(msgspec.Struct, frozen=True):
    status: int
    headers: dict[str, str]
    """Lower-cased names; the last value of a repeated header."""
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


def split_url(url: str) -> tuple[str, int, str]:
    """``(host, port, path?query)`` of an ``http://`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: give an http://host[:port]/path URL")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 80, path


def build_request(
    method: str,
    host: str,
    port: int,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """The bytes of one HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        if not headers or not any(k.lower() == "content-type" for k in headers):
            lines.append("content-type: application/json")
        lines.append(f"content-length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


class Connection(asyncio.Protocol):
    """One keep-alive connection; :meth:`send` one request at a time."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self.closed = False
        self.keep_alive = True

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP response: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = {}
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = bool(self._parser.should_keep_alive())
        response = Response(self._parser.get_status_code(), self._headers, b"".join(self._body))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    async def send(self, request: bytes) -> Response:
        """Write ``request`` (bytes from :func:`build_request`) and wait for
        its response; ``ConnectionError`` if the connection closes first."""
        if self.closed or self._transport is None:
            raise ConnectionResetError("the connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self.closed = True
            self._transport.close()


async def fetch(
    url: str,
    method: str = "GET",
    *,
    body: bytes | None = None,
    json: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request on a new connection (closed afterwards)."""
    host, port, path = split_url(url)
    if json is not None:
        body = msgspec.json.encode(json)
    async with asyncio.timeout(timeout):
        conn = await Connection.open(host, port)
        try:
            return await conn.send(build_request(method, host, port, path, body, headers))
        finally:
            conn.close()
