"""Wake-ups between the processes that share one database file.

SQLite tells no one of a commit: a consumer learns of another process's
publish when it looks (it naps 5 ms, doubling to ``poll``, between looks),
so at 500 events/s an event waited up to a nap before a worker in another
process claimed it (p99 7.4 ms, BENCHMARKS.md). Here each transport that
consumes binds a Unix datagram socket in a directory named after the file
(under the temporary directory, the user's own, mode 0700), and a transport
that committed publishes sends each socket there one byte.

A wake-up is a hint, never a promise: a consumer woken claims as it would
after a nap, and one that is not woken still polls (a full socket buffer,
which means a wake-up waits there already; a socket bound after the list
was read; a platform without Unix sockets; a directory another user owns).
A socket whose process died refuses the byte and is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable

log = logging.getLogger("surge.sqlite")

_RELIST = 1.0
"""Seconds after which the directory is read again even if its mtime did not
change (a coarse mtime may hide a socket bound in the same tick)."""

SPACING = 0.001
"""The least seconds between two rounds of wake-ups from one transport; a
commit inside it is told at its end. A consumer woken claims at once, so
woken at every commit of a fast publisher it claimed a few events a time,
each claim a write transaction beside the publisher's (the saturated rate
case lost 10-15 % so); at 500 commits/s nothing waits."""


def wake_dir(db_path: str) -> str:
    """The directory of the wake-up sockets of the database at ``db_path``."""
    digest = hashlib.sha256(os.path.realpath(db_path).encode()).hexdigest()[:24]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"surge-{uid}-{digest}")


def _ours(path: str) -> bool:
    """``path`` is a directory (not a link to one) that only this user can
    write: its sockets can be trusted to be our processes', its files to be
    ours to remove. The name is predictable, so another user may have made
    it first; then nothing in it is touched and consumers only poll."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and (not hasattr(os, "getuid") or st.st_uid == os.getuid())
        and not st.st_mode & 0o077
    )


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


class Wakeups:
    """One transport's socket (once it consumes) and its sends."""

    def __init__(self, db_path: str) -> None:
        self.dir = wake_dir(db_path)
        self._sock: socket.socket | None = None
        self._path: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: socket.socket | None = None
        self._peers: list[str] = []
        self._seen = -1  # the directory's mtime when _peers was read
        self._listed = -_RELIST
        self._sent_at = -SPACING
        self._later: asyncio.TimerHandle | None = None
        self._closed = False
        self.sent = 0
        """Wake-ups sent (for tests and diagnostics)."""
        self.received = 0
        """Times this transport was woken by another."""

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def listen(self, loop: asyncio.AbstractEventLoop, on_wake: Callable[[], None]) -> None:
        """Bind this transport's socket and call ``on_wake`` on the loop when
        another process commits publishes; nothing (polling only) if it
        cannot be bound."""
        if self._sock is not None or self._closed or not hasattr(socket, "AF_UNIX"):
            return
        for _ in range(2):  # the directory may be removed by a last close meanwhile
            try:
                sock = self._bind()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.debug("sqlite: no wake-ups between processes in %s (%s)", self.dir, exc)
                return
            break
        else:
            return
        self._sock, self._loop = sock, loop

        def readable() -> None:
            try:
                while sock.recv(64):
                    pass
            except OSError:  # drained (BlockingIOError), or closed meanwhile
                pass
            self.received += 1
            on_wake()

        loop.add_reader(sock.fileno(), readable)

    def _bind(self) -> socket.socket:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if not _ours(self.dir):
            raise PermissionError(f"{self.dir} is not a directory only this user can write")
        self._sweep()
        path = os.path.join(self.dir, f"{os.getpid()}-{os.urandom(4).hex()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        self._path = path
        return sock

    def _sweep(self) -> None:
        """Remove the sockets that killed processes left (they refuse a
        byte); the live ones get a wake-up, which costs them a look."""
        try:
            with os.scandir(self.dir) as entries:
                paths = [e.path for e in entries]
        except OSError:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.setblocking(False)
            for path in paths:
                if not _is_socket(path):
                    continue
                try:
                    probe.sendto(b"!", path)
                except (ConnectionRefusedError, FileNotFoundError):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                except OSError:
                    pass  # alive, its buffer full

    def notify(self) -> None:
        """Wake the consumers of the other transports on the file (publishes
        were committed), now or at the end of ``SPACING``. Never raises."""
        if self._later is not None:
            return  # a round is due already
        wait = self._sent_at + SPACING - time.monotonic()
        if wait > 0:
            self._later = asyncio.get_running_loop().call_later(wait, self._send_later)
            return
        self._send()

    def _send_later(self) -> None:
        self._later = None
        self._send()

    def _send(self) -> None:
        try:
            self._send_round()
        finally:
            self._sent_at = time.monotonic()  # the spacing counts from the round's end

    def _send_round(self) -> None:
        try:
            mtime = os.lstat(self.dir).st_mtime_ns
        except OSError:
            return  # no one has listened yet
        now = time.monotonic()
        if mtime != self._seen or now - self._listed >= _RELIST:
            self._seen, self._listed = mtime, now
            self._peers = []
            if _ours(self.dir):
                try:
                    with os.scandir(self.dir) as entries:
                        self._peers = [e.path for e in entries if e.path != self._path]
                except OSError:
                    pass
        if not self._peers:
            return
        out = self._out
        if out is None:
            try:
                out = self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                out.setblocking(False)
            except OSError:
                return
        gone: list[str] = []
        for path in self._peers:
            try:
                out.sendto(b"!", path)
                self.sent += 1
            except BlockingIOError:
                pass  # its buffer is full: a wake-up waits there already
            except (ConnectionRefusedError, FileNotFoundError):
                gone.append(path)  # its process ended without removing it (SIGKILL)
            except OSError as exc:
                log.debug("sqlite: could not wake %s: %s", path, exc)
        for path in gone:
            self._peers.remove(path)
            if _is_socket(path):  # a socket its process left (SIGKILL), nothing else
                with contextlib.suppress(OSError):
                    os.unlink(path)
        if gone and not self._peers and self._sock is None:
            with contextlib.suppress(OSError):
                os.rmdir(self.dir)  # the last listener was killed: nothing else is left

    def close(self) -> None:
        """Unbind and remove this transport's socket (and the directory, if
        it was the last); for good: it does not listen again."""
        self._closed = True
        if self._later is not None:
            self._later.cancel()
            self._later = None
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
            if self._path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._path)
            with contextlib.suppress(OSError):
                os.rmdir(self.dir)  # fails while others listen: theirs
        out, self._out = self._out, None
        if out is not None:
            out.close()
