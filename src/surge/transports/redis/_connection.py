"""The Redis transport's link to its broker: the client, the scripts, health,
and how a lost broker is retried.

Every loop of the transport catches the broker's errors, logs a WARNING,
marks the connection unhealthy (``healthy``, ``last_error``) and retries with
a backoff capped at one second; settles are retried until they succeed
(``retrying``: they are idempotent). The broker's own errors are translated
into :class:`~surge.TransportError` here (``error``) and never leak.

A Redis Cluster is detected at ``open`` (``INFO cluster``) from a plain URL
of any node. Its keys are laid out by slot (``_keys``: the prefix's own
keys under one hash tag, each partition's under another) and every script,
transaction and multi-stream read stays within one slot; the connection
keeps a client per master and sends each command to the master of its key's
slot (``client(key)``), from the slot map of ``CLUSTER SLOTS``. A
redirection (``MOVED``, ``ASK``), ``TRYAGAIN``, ``CLUSTERDOWN`` or a write
refused by a replica counts as a lost broker: retried like one, and each
failure sends the connection looking for the cluster's masters again, among
every node it has seen (``_find_masters``), until each master the map names
answers as one (a failover has promoted a replica).

``wait=N`` (``run(..., replicated=True)``): the write and a ``WAIT N`` go
over one connection, repeated until N replicas have confirmed it or
``reconnect_timeout`` passes (then ``TransportError``; the write is on the
master, unconfirmed).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry as _RedisRetry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from ..._clock import Clock
from ..._errors import Closed, ConfigurationError, TransportError
from ._options import RedisOptions
from ._scripts import SCRIPTS

__all__ = ("CONNECTION_ERRORS", "Connection", "transient")

log = logging.getLogger("surge.redis")

# What a lost or unreachable broker raises: retried, never fatal. The cluster
# ones (MovedError is an AskError, MasterDownError a ClusterDownError) come
# only from a Redis Cluster: its slot moved, or a failover is under way.
CONNECTION_ERRORS = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    OSError,
    rexc.AskError,
    rexc.TryAgainError,
    rexc.ClusterDownError,
    rexc.ReadOnlyError,
)

T = TypeVar("T")


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` passes if waited out: a lost or timed-out connection,
    a failover (CONNECTION_ERRORS, LOADING among them: redis-py's
    ``BusyLoadingError`` is a ``ConnectionError``), or a server busy running
    a script past ``busy-reply-threshold`` (``BUSY``, which redis-py gives as
    a plain ``ResponseError``)."""
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith("BUSY")


_RAW = ("XREADGROUP", "XCLAIM", "XPENDING", "XRANGE")
"""Commands whose replies are parsed here, in the server's shape."""


def _raw(response: Any, **options: Any) -> Any:
    return response


class Connection:
    """One client of one broker, shared by every part of a transport.

    ``closed`` is True before ``open`` and from ``shut`` on: every loop of
    the transport ends when it sees it.
    """

    __slots__ = (
        "_clients",
        "_clock",
        "_closed",
        "_finding",
        "_home",
        "_nodes",
        "_prefix",
        "_public_url",
        "_r",
        "_ranges",
        "_reconnect_timeout",
        "_redis_options",
        "_released",
        "_said",
        "_scripts",
        "_slots",
        "_url",
        "_wait",
        "_wait_ms",
        "cluster",
        "epoch",
        "healthy",
        "last_error",
    )

    def __init__(self, options: RedisOptions, redis_options: dict[str, Any], clock: Clock) -> None:
        self._url = options.redis_url
        self._redis_options: dict[str, Any] = {
            "socket_connect_timeout": 5.0,
            "socket_timeout": max(10.0, 3 * options.block),
            "socket_keepalive": True,
            # the raw replies parsed here (XREADGROUP, XCLAIM...) are RESP2's shapes
            "protocol": 2,
            # retries are ours: a blind resend of a publish script could duplicate it
            "retry": _RedisRetry(NoBackoff(), 0),
            **redis_options,
        }
        self._clock = clock
        self._r: aredis.Redis | None = None  # the prefix's slot's master (a cluster's)
        self._released = False
        """``aclose`` ran: the pool is disconnected, and a command on a client
        taken before would connect it again (a socket nobody closes)."""
        self._scripts: dict[str, Any] = {}
        self._closed = True
        self.healthy = False
        """False while the broker cannot be reached; see ``last_error``."""
        self.epoch = 0
        """Failures seen so far (see ``ok``)."""
        self.last_error: str | None = None
        self._said: set[str] = set()  # the failures logged since the last success
        self._public_url = options.url
        self._prefix = options.prefix
        self._wait = options.wait
        self._wait_ms = int(options.wait_timeout * 1000)
        self._reconnect_timeout = options.reconnect_timeout
        self.cluster = False
        """The broker is a Redis Cluster (found at ``open``)."""
        self._nodes: list[tuple[str, int]] = []  # every cluster node seen
        self._home = key_slot(f"{{{self._prefix}}}".encode())
        # a cluster's slot map: (first slot, last slot, master), by first slot
        self._ranges: list[tuple[int, int, tuple[str, int]]] = []
        self._slots: dict[int, aredis.Redis] = {}  # slot -> its master's client, as used
        self._clients: dict[tuple[str, int], aredis.Redis] = {}  # master -> its client
        self._finding: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------
    @property
    def connected(self) -> bool:
        """A client exists (from ``open`` until ``aclose``)."""
        return self._r is not None

    @property
    def closed(self) -> bool:
        return self._closed

    async def open(self) -> None:
        r = self._client(self._url)
        self._scripts = {name: r.register_script(src) for name, src in SCRIPTS.items()}
        try:
            await r.ping()
            info = await r.info("cluster")
            self.cluster = bool(info.get("cluster_enabled"))
            if self.cluster:
                ranges = await self._slot_map(r)
                parts = urlsplit(self._url)
                here = (parts.hostname or "127.0.0.1", parts.port or 6379)
                clients = {
                    m: r if m == here else self._client(self._url_of(m)) for _, _, m in ranges
                }
                self._install(ranges, clients)
                if here not in clients:
                    await r.aclose()
                r = self._slot_client(self._home)
                await r.ping()
        except Exception as exc:
            await self._close_clients(r, *self._clients.values())
            self._clients = {}
            self._slots = {}
            raise self.error(exc, "cannot connect") from exc
        self._r = r
        self._closed = False
        self._released = False
        self.ok()

    def _client(self, url: str) -> aredis.Redis:
        try:
            r = aredis.Redis.from_url(url, **self._redis_options)
        except ValueError as exc:
            raise ConfigurationError(f"{self._public_url!r}: {exc}") from None
        for cmd in _RAW:
            r.response_callbacks[cmd] = _raw
        return r

    def _url_of(self, node: tuple[str, int]) -> str:
        """Our URL (credentials, TLS, options) with another node's address."""
        parts = urlsplit(self._url)
        user, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{user}{at}{node[0]}:{node[1]}"))

    # --- a cluster's masters -------------------------------------------------
    async def _slot_map(self, r: aredis.Redis) -> list[tuple[int, int, tuple[str, int]]]:
        """The slot ranges and their masters as ``r``'s node sees the cluster;
        remembers every node it names."""
        reply = await r.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
        out: list[tuple[int, int, tuple[str, int]]] = []
        for (start, end), where in _slot_ranges(reply):
            for node in where:
                if node not in self._nodes:
                    self._nodes.append(node)
            out.append((start, end, where[0]))
        out.sort()
        if not any(start <= self._home <= end for start, end, _ in out):
            raise rexc.ClusterDownError(f"no master serves slot {self._home}")
        return out

    def _install(
        self,
        ranges: list[tuple[int, int, tuple[str, int]]],
        clients: dict[tuple[str, int], aredis.Redis],
    ) -> list[aredis.Redis]:
        """Use ``ranges`` and a client of each of their masters; the clients
        of nodes no longer masters, to close."""
        stale = [c for node, c in self._clients.items() if clients.get(node) is not c]
        self._ranges = ranges
        self._clients = clients
        self._slots = {}
        if self._r is not None:
            self._r = self._slot_client(self._home)
        return stale

    def _slot_client(self, slot: int) -> aredis.Redis:
        """The client of ``slot``'s master (from the slot map)."""
        r = self._slots.get(slot)
        if r is not None:
            return r
        i = bisect.bisect_right(self._ranges, (slot, _LAST, ("", 0))) - 1
        if i < 0 or not self._ranges[i][0] <= slot <= self._ranges[i][1]:
            raise rexc.ClusterDownError(f"no master serves slot {slot}")
        r = self._slots[slot] = self._clients[self._ranges[i][2]]
        return r

    def _find_master_soon(self) -> None:
        if self.cluster and not self._closed and self._finding is None:
            self._finding = asyncio.get_running_loop().create_task(self._find_masters())

    async def _find_masters(self) -> None:
        """Ask the nodes seen so far for the slot map, until one gives a map
        whose masters all answer as masters; then talk to those. A failover
        takes the cluster a node timeout or two: the dead master is named
        until then."""
        delay = 0.05
        try:
            while not self._closed:
                for node in list(self._nodes):
                    found = await self._probe(node)
                    if found is None:
                        continue
                    ranges, clients = found
                    if self._shut_meanwhile():
                        await self._close_clients(
                            *(c for c in clients.values() if c not in self._clients.values())
                        )
                        return
                    home = self._master_at(self._home)
                    stale = self._install(ranges, clients)
                    now = self._master_at(self._home)
                    if now is not None and now != home:
                        log.warning("redis: slot of %r served by %s:%d now", self._prefix, *now)
                    await self._close_clients(*stale)
                    return
                delay = await self.backoff(delay)
        finally:
            self._finding = None

    def _master_at(self, slot: int) -> tuple[str, int] | None:
        for start, end, master in self._ranges:
            if start <= slot <= end:
                return master
        return None

    async def _probe(
        self, node: tuple[str, int]
    ) -> tuple[list[tuple[int, int, tuple[str, int]]], dict[tuple[str, int], aredis.Redis]] | None:
        """The slot map ``node`` gives and a client of each of its masters,
        if every one of them answers as a master; else None."""
        probe = self._clients.get(node) or self._client(self._url_of(node))
        made: list[aredis.Redis] = [] if probe in self._clients.values() else [probe]
        clients: dict[tuple[str, int], aredis.Redis] = {}
        try:
            ranges = await self._slot_map(probe)
            for master in {m for _, _, m in ranges}:
                c = self._clients.get(master)
                if c is None:
                    c = probe if master == node else self._client(self._url_of(master))
                    if c is not probe:
                        made.append(c)
                role = await c.execute_command("ROLE")  # type: ignore[no-untyped-call]
                if role[0] not in (b"master", "master"):
                    raise rexc.ReadOnlyError(f"{master} is no master")
                clients[master] = c
        except BaseException as exc:
            # also when cancelled (a close while a failover is being
            # followed): a client made here and dropped is a socket nobody
            # closes, met later by the garbage collector
            await self._close_clients(*made)
            if isinstance(exc, (rexc.RedisError, OSError)):
                return None
            raise
        await self._close_clients(*(c for c in made if c not in clients.values()))
        return ranges, clients

    async def _close_clients(self, *clients: aredis.Redis) -> None:
        for c in clients:
            with contextlib.suppress(Exception):
                await c.aclose()

    def shut(self) -> None:
        """Mark the connection closed (every loop ends); the clients stay
        open for the last words of a close (``node``)."""
        self._closed = True

    async def aclose(self) -> None:
        """Close the clients (``shut`` first, if not yet)."""
        r, self._r = self._r, None
        self._closed = True
        self._released = True
        finding, self._finding = self._finding, None
        if finding is not None:
            finding.cancel()
            await asyncio.gather(finding, return_exceptions=True)
        clients, self._clients = list(self._clients.values()), {}
        self._slots = {}
        if r is not None and r not in clients:
            clients.append(r)
        for c in clients:
            await c.aclose()

    def _shut_meanwhile(self) -> bool:
        return self._closed  # a method: mypy keeps no narrowing across awaits for it

    # --- commands ------------------------------------------------------------
    def client(self, key: str | None = None) -> aredis.Redis:
        """The client for ``key`` (on a cluster, its slot's master; no key:
        the prefix's own slot's)."""
        if self._r is None or self._closed:
            raise Closed("transport is closed")
        if key is None or not self.cluster:
            return self._r
        return self._slot_client(key_slot(key.encode()))

    def node(self, key: str | None = None) -> aredis.Redis:
        """``client(key)``, also once ``shut`` (for a close's last words)."""
        if self._r is None or self._released:
            raise Closed("transport is closed")
        if key is None or not self.cluster:
            return self._r
        return self._slot_client(key_slot(key.encode()))

    async def each(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run ``commands`` (each ``(name, key, *args)``), those of one master
        in one pipeline (no transaction), the masters at once; their replies,
        in order (an error as its exception)."""
        by_client: dict[int, tuple[aredis.Redis, list[int]]] = {}
        for i, c in enumerate(commands):
            r = self.client(c[1])
            by_client.setdefault(id(r), (r, []))[1].append(i)

        async def run(r: aredis.Redis, which: list[int]) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for i in which:
                pipe.execute_command(*commands[i])
            return await pipe.execute(raise_on_error=False)

        out: list[Any] = [None] * len(commands)
        groups = list(by_client.values())
        for (_, which), replies in zip(
            groups, await asyncio.gather(*(run(r, w) for r, w in groups)), strict=True
        ):
            for i, reply in zip(which, replies, strict=True):
                out[i] = reply
        return out

    async def cmd(self, r: aredis.Redis, *args: Any) -> Any:
        """A command whose raw reply the caller parses (XREADGROUP, XCLAIM,
        XPENDING, XRANGE keep the server's shape)."""
        if self._released:
            raise Closed("transport is closed")
        return await r.execute_command(*args)  # type: ignore[no-untyped-call]

    async def run(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[Any],
        client: aredis.Redis | None = None,
        *,
        replicated: bool = False,
    ) -> Any:
        """Run one of ``_scripts.SCRIPTS`` (on ``client``, by default the
        master of ``keys[0]``'s slot); ``replicated``: then wait for ``wait``
        replicas to have its writes."""
        if self._released:
            raise Closed("transport is closed")
        r = client if client is not None else self.client(keys[0] if keys else None)
        if not replicated or not self._wait:
            return await self._scripts[script](keys=keys, args=args, client=r)
        # WAIT counts the writes of its own connection: one for both.
        async with r.client() as one:
            result = await self._scripts[script](keys=keys, args=args, client=one)
            deadline = self._clock.monotonic() + self._reconnect_timeout
            while True:
                n = await one.execute_command("WAIT", self._wait, self._wait_ms)  # type: ignore[no-untyped-call]
                if n >= self._wait:
                    return result
                if self._clock.monotonic() >= deadline:
                    raise TransportError(
                        f"redis: a write ({script}) reached {n} of the {self._wait} replicas "
                        f"asked for within {self._reconnect_timeout}s (it is on the master only)"
                    )

    async def run_each(
        self, script: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]], *, replicated: bool
    ) -> list[Any]:
        """Run ``script`` once per (keys, args) of ``calls``, each on the
        master of its first key: those of one master in one pipeline (no
        transaction: each call stays atomic on its own), the masters at once;
        their outcomes, in order, once all ended (a failure as its exception).
        ``replicated`` with ``wait``: one call at a time per connection
        (``run``)."""
        if replicated and self._wait:
            outcomes = await asyncio.gather(
                *(self.run(script, k, a, replicated=True) for k, a in calls),
                return_exceptions=True,
            )
        else:
            by_client: dict[int, tuple[aredis.Redis, list[int]]] = {}
            for i, (keys, _) in enumerate(calls):
                r = self.client(keys[0])
                by_client.setdefault(id(r), (r, []))[1].append(i)
            groups = list(by_client.values())
            outcomes = [None] * len(calls)
            done: list[Any]
            if len(groups) == 1:  # one master (a single server): no task
                r, which = groups[0]
                try:
                    done = [await self._pipelined(script, r, [calls[i] for i in which])]
                except (rexc.RedisError, OSError) as exc:
                    done = [exc]
            else:
                done = await asyncio.gather(
                    *(self._pipelined(script, r, [calls[i] for i in which]) for r, which in groups),
                    return_exceptions=True,
                )
            for (_, which), replies in zip(groups, done, strict=True):
                for n, i in enumerate(which):
                    outcomes[i] = replies if isinstance(replies, BaseException) else replies[n]
        return outcomes

    async def _pipelined(
        self, script: str, r: aredis.Redis, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        if self._released:
            raise Closed("transport is closed")
        s = self._scripts[script]
        if len(calls) == 1:
            keys, args = calls[0]
            return [await s(keys=keys, args=args, client=r)]
        pipe = r.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", s.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        for n, reply in enumerate(replies):
            if isinstance(reply, rexc.NoScriptError):  # not run: load it, run it
                keys, args = calls[n]
                replies[n] = await s(keys=keys, args=args, client=r)
        return replies

    async def retrying(self, doing: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` until the broker answers: settles are idempotent."""
        delay = 0.05
        while True:
            self.client()  # Closed, when it is
            since = self.epoch
            try:
                result = await op()
            except (rexc.RedisError, OSError) as exc:
                if not transient(exc):
                    raise self.error(exc, doing) from exc
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # a cancel redis-py swallowed
                if self._closed:
                    raise self.error(exc, doing) from exc
                self.failed(exc, doing)
                delay = await self.backoff(delay)
                continue
            self.ok(since)
            return result

    # --- health --------------------------------------------------------------
    def error(self, exc: BaseException, doing: str) -> TransportError:
        """``exc`` of the broker, as the error the transport raises."""
        parts = urlsplit(self._public_url)
        return TransportError(f"redis at {parts.hostname}:{parts.port or 6379}: {doing}: {exc}")

    def ok(self, since: int | None = None) -> None:
        """The broker answered. ``since``: the ``epoch`` when the request
        was sent; an answer to a request sent before the last failure was
        seen says nothing of the broker now (it was answered before it went
        away, and read after), so it restores nothing."""
        if since is not None and since != self.epoch:
            return
        if not self.healthy:
            if self.last_error is not None:
                log.warning("redis: connection restored")
            self.healthy = True
            self._said.clear()

    def failed(self, exc: BaseException, doing: str) -> None:
        # redis-py's repr of its errors hides the server's words ("server:
        # ResponseError"): name the class and say the message. Each failure
        # once per outage, however many tasks meet it in turn.
        self.epoch += 1
        msg = f"{doing}: {type(exc).__name__}: {exc}"
        if msg not in self._said:
            self._said.add(msg)
            log.warning("redis: %s; retrying", msg)
        self.healthy = False
        self.last_error = msg
        self._find_master_soon()

    async def backoff(self, delay: float) -> float:
        """Sleep ``delay`` (on the clock); the next delay, capped at 1 s."""
        await self._clock.sleep(delay)
        return min(1.0, delay * 2)


_LAST = 1 << 14  # above every slot: bisects by first slot


def _slot_ranges(reply: Any) -> list[tuple[tuple[int, int], list[tuple[str, int]]]]:
    """``CLUSTER SLOTS`` as ((first, last), [master, replicas...]) pairs,
    whether redis-py parsed it (a dict) or not (the server's nested lists)."""
    out: list[tuple[tuple[int, int], list[tuple[str, int]]]] = []
    if isinstance(reply, dict):
        for (start, end), v in reply.items():
            nodes = [v["primary"], *v.get("replicas", [])]
            out.append(((int(start), int(end)), [_node(n) for n in nodes]))
        return out
    return [((int(e[0]), int(e[1])), [_node(n) for n in e[2:]]) for e in reply]


def _node(n: Any) -> tuple[str, int]:
    host = n[0].decode() if isinstance(n[0], bytes) else str(n[0])
    return (host, int(n[1]))
