"""A TCP proxy the fault tests put between surge and its broker.

``Proxy(upstream_port)`` listens on a free loopback port and forwards each
connection to the broker. The test turns the network bad and good again:

- ``blackhole()``: nothing is forwarded any more, in either direction, but
  no connection is closed and new ones are accepted (and held): what a
  client sees when a firewall starts dropping packets or a host vanishes.
  Bytes already sent stay in the kernel's buffers, as TCP would keep
  retransmitting them, and flow on at ``heal()`` unless a side closed
  meanwhile.
- ``reset()``: every connection is reset (RST, as ``SO_LINGER`` 0 makes a
  close) and new ones are reset as soon as they are accepted: a broker host
  that reboots, or a middlebox that drops its connection table.
- ``heal()``: forward again.

``connections`` counts the connections accepted so far, ``live`` those open.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

__all__ = ("Proxy",)

_LINGER_RST = struct.pack("ii", 1, 0)


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class Proxy:
    """A loopback TCP proxy to ``127.0.0.1:upstream_port`` (see the module)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._resetting = False
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def resetting(self) -> bool:
        """Connections are reset (from ``reset()`` to ``heal()``)."""
        return self._resetting

    @property
    def live(self) -> int:
        return len(self._pairs)

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self._flowing.set()
        for down, up in list(self._pairs):
            _rst(down)
            if up is not None:
                _rst(up)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Proxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- faults --------------------------------------------------------------------
    def blackhole(self) -> None:
        self._resetting = False
        self._flowing.clear()

    def reset(self) -> None:
        self._resetting = True
        self._flowing.set()
        for down, up in list(self._pairs):
            _rst(down)
            if up is not None:
                _rst(up)

    def heal(self) -> None:
        self._resetting = False
        self._flowing.set()

    # --- forwarding ----------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._resetting:
            _rst(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self._pairs.add(pair)
        try:
            # a connection accepted in a blackhole reaches the broker at the heal
            await self._flowing.wait()
            if self.resetting:
                _rst(writer)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self.upstream_port
                )
            except OSError:
                _rst(writer)
                return
            self._pairs.discard(pair)
            pair = (writer, up_writer)
            self._pairs.add(pair)
            await asyncio.gather(
                self._pump(reader, up_writer, writer), self._pump(up_reader, writer, up_writer)
            )
        finally:
            self._pairs.discard(pair)
            self._tasks.discard(task)
            for w in pair:
                if w is not None and not w.is_closing():
                    w.close()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, src_w: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await src.read(65536)
                # a blackhole that began while this read waited swallows nothing:
                # the bytes wait here, as in a retransmit queue, until the heal
                await self._flowing.wait()
                if not data or self._resetting:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            _rst(dst)  # one side broke: so does the other
            _rst(src_w)
        finally:
            if self._resetting:
                _rst(dst)
                _rst(src_w)
            elif not dst.is_closing():
                with contextlib.suppress(OSError, RuntimeError):
                    if dst.can_write_eof():
                        dst.write_eof()
                    else:
                        dst.close()
