"""The groups of a prefix as the broker knows them, and the routes of topics.

Every process declares its groups into one hash (group -> patterns) whose
version key each change bumps; a publisher routes a topic to the streams of
the matching groups from its copy, and the publish script refuses a batch
routed on a stale version (see ``_publisher``). The partition count is fixed
per prefix by the first process; an inbox's liveness key lets the next
process to start delete the inboxes of processes that died.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import redis.exceptions as rexc

from ..._errors import ConfigurationError
from ..._transport import topic_matches
from .._partitions import partition_of
from ._connection import Connection
from ._keys import LAYOUT, GroupKeys, Keys
from ._options import RedisOptions

__all__ = ("KeyedRoute", "Registry")

log = logging.getLogger("surge.redis")


class KeyedRoute(NamedTuple):
    """Where a keyed envelope goes: ``part``, its partition; the streams and
    delayed sets of the groups with partitions (partition ``part``'s); those
    of the groups without (inboxes: their shared stream, in the prefix's
    slot)."""

    part: int
    streams: tuple[str, ...]
    zsets: tuple[str, ...]
    home_streams: tuple[str, ...]
    home_zsets: tuple[str, ...]


class Registry:
    """This process's copy of the prefix's group registry, and its routes.

    ``partitions`` is the prefix's partition count once ``fix_partitions``
    ran (until then, the count asked for or the default).
    """

    __slots__ = (
        "_again",
        "_alive_ms",
        "_asked",
        "_conn",
        "_declared",
        "_groups",
        "_keyed_routes",
        "_parts",
        "_routes",
        "_version",
        "keys",
        "partitions",
    )

    def __init__(
        self, conn: Connection, keys: Keys, options: RedisOptions, partitions: int
    ) -> None:
        self._conn = conn
        self.keys = keys
        self._alive_ms = options.alive_ms
        self._asked = options.partitions
        self.partitions = partitions
        self._groups: dict[str, list[str]] = {}
        # the groups declared through this copy, to declare again at once
        # when the broker lost them (restarted without persistence)
        self._declared: dict[str, tuple[GroupKeys, list[str]]] = {}
        self._again: asyncio.Future[list[str]] | None = None  # declare_again in flight
        self._parts: dict[str, int] = {}  # group -> its partitions (0: none)
        self._version = b""
        self._routes: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._keyed_routes: dict[tuple[str, int], KeyedRoute] = {}

    @property
    def version(self) -> bytes:
        """The registry version the routes were computed from."""
        return self._version

    def use_keys(self, keys: Keys) -> None:
        """Name everything with ``keys`` (a cluster's slotted layout), before
        any group is declared."""
        self.keys = keys
        self._routes.clear()
        self._keyed_routes.clear()

    # --- at start ------------------------------------------------------------
    async def fix_partitions(self) -> None:
        """Keyed envelopes written under one partition count must not be read
        under another: the first process fixes it for the prefix. Raises
        ``ConfigurationError`` when the count asked for is not the prefix's."""
        r = self._conn.client()
        key = self.keys.partitions
        try:
            if self.keys.slotted:
                layout = await self._conn.run(
                    "layout", keys=[self.keys.layout, key], args=[LAYOUT], client=r
                )
                layout = layout.decode() if isinstance(layout, bytes) else str(layout)
                if layout != LAYOUT:
                    held = f"layout {layout}" if layout else "layout 1 (every key in one slot)"
                    raise ConfigurationError(
                        f"redis prefix {self.keys.prefix!r} holds keys of {held}, not of "
                        f"layout {LAYOUT}: drain it and delete its keys, or use another prefix"
                    )
            await r.set(key, self.partitions, nx=True)
            stored = int(await r.get(key) or 0)
        except ConfigurationError:
            raise
        except Exception as exc:
            raise self._conn.error(exc, "reading the partition count") from exc
        if self._asked is not None and stored != self._asked:
            raise ConfigurationError(
                f"redis prefix {self.keys.prefix!r} has {stored} partitions, not the "
                f"{self._asked} asked for: use another prefix to change it"
            )
        self.partitions = stored

    async def sweep(self) -> None:
        """Delete the reply inboxes of processes that died (liveness expired)."""
        k = self.keys
        try:
            n = await self._conn.run(
                "sweep", keys=[k.registry, k.version, k.registry_parts], args=[k.prefix]
            )
        except rexc.RedisError as exc:  # housekeeping: never fatal
            log.warning(
                "redis: could not sweep the inboxes of dead processes: %s: %s",
                type(exc).__name__,
                exc,
            )
            return
        if n:
            log.info("redis: removed %d reply inboxes of processes that are gone", n)

    # --- groups --------------------------------------------------------------
    async def declare(self, keys: GroupKeys, patterns: Sequence[str]) -> None:
        """Create the group's streams and register its ``patterns`` (all it
        has, idempotent); then reload. A group without partitions is an
        inbox: its liveness key is set."""
        k = self.keys
        try:
            if keys.slotted:
                # other slots than the script's: each partition's stream first
                for stream in keys.pstreams:
                    await self._create(stream, keys.name)
            version = await self._conn.run(
                "declare",
                keys=[k.registry, k.version, keys.stream, k.registry_parts, keys.alive],
                args=[keys.name, keys.parts, *keys.pstream_ends, self._alive_ms, *patterns],
            )
            if k.slotted:
                # before the declare returns: publishes check it there
                await self.raise_copies(range(self.partitions), version)
        except Exception as exc:
            raise self._conn.error(exc, f"declaring {keys.name!r}") from exc
        self._declared[keys.name] = (keys, list(patterns))
        await self.load()

    async def declare_again(self) -> list[str]:
        """Declare every group declared here again (the broker lost them: one
        read found its group gone); their names. All at once, so that a
        publish right after routes to each of them, not only to the group
        that noticed first (CI: an event published once one group was back
        never reached the other, whose read was still backing off)."""
        again = self._again
        if again is None or again.done():
            # one for every group that noticed at once, not one each
            again = self._again = asyncio.ensure_future(self._declare_all())
            # retrieved even when every caller was cancelled meanwhile
            again.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(again)

    async def _declare_all(self) -> list[str]:
        declared = list(self._declared.values())
        failed: list[Exception] = []
        for keys, patterns in declared:
            try:
                await self.declare(keys, patterns)
            except Exception as exc:  # the others all the same; the first raised after
                failed.append(exc)
        if failed:
            raise failed[0]
        return [keys.name for keys, _ in declared]

    async def raise_copies(
        self, parts: Iterable[int], version: bytes | str, *, force: bool = False
    ) -> list[int]:
        """Raise the copies of the registry version in the slots of ``parts``
        (a cluster's) to ``version`` (``force``: set them to it); the parts
        whose copy is ahead of it."""
        if not version:
            return []
        parts = list(parts)
        flag = "1" if force else "0"
        calls = [([self.keys.version_of(p)], [version, flag]) for p in parts]
        ahead = []
        for p, outcome in zip(
            parts, await self._conn.run_each("raise", calls, replicated=False), strict=True
        ):
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome:
                ahead.append(p)
        return ahead

    async def _create(self, stream: str, group: str) -> None:
        """The consumer group ``group`` of ``stream`` (and the stream), if not yet."""
        conn = self._conn
        try:
            await conn.cmd(conn.client(stream), "XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
        except rexc.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def drop(self, keys: GroupKeys) -> None:
        """Delete an inbox and what it holds (at close)."""
        self._declared.pop(keys.name, None)
        pipe = self._conn.node().pipeline(transaction=True)
        pipe.hdel(self.keys.registry, keys.name)
        pipe.incr(self.keys.version)
        pipe.delete(keys.stream, keys.zset, keys.dead, keys.alive)
        await pipe.execute()

    async def load(self) -> None:
        """Read the registry again (and forget the routes)."""
        k = self.keys
        pipe = self._conn.client().pipeline(transaction=True)
        pipe.get(k.version)
        pipe.hgetall(k.registry)
        pipe.hgetall(k.registry_parts)
        version, groups, parts = await pipe.execute()
        self._version = version or b""
        self._groups = {
            k.decode(): [p for p in v.decode().split("\n") if p] for k, v in groups.items()
        }
        self._parts = {k.decode(): int(v) for k, v in parts.items()}
        self._routes.clear()
        self._keyed_routes.clear()

    async def names(self) -> list[str]:
        """Every group of the prefix, declared by any process."""
        await self.load()
        return sorted(self._groups)

    async def groups_for(self, topic: str) -> list[str]:
        """The groups of the prefix, declared by any process, that receive ``topic``."""
        try:
            await self.load()
        except Exception as exc:
            raise self._conn.error(exc, "reading the groups") from exc
        return self._route_names(topic)

    async def known(self, name: str) -> GroupKeys:
        """The keys of a group declared by any process (for dead letters
        and stats); ``ConfigurationError`` when there is none."""
        if not await self._conn.client().hexists(self.keys.registry, name):
            raise ConfigurationError(f"no group {name!r}; groups: {sorted(self._groups)}")
        await self.load()
        return self.keys.group(name, self._parts.get(name, 0))

    # --- routes --------------------------------------------------------------
    def route(self, topic: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The shared streams and delayed sets an envelope of ``topic`` goes to."""
        route = self._routes.get(topic)
        if route is None:
            names = self._route_names(topic)
            k = self.keys
            route = self._routes[topic] = (
                tuple(k.stream(g) for g in names),
                tuple(k.zset(g) for g in names),
            )
        return route

    def keyed_route(self, topic: str, key: str) -> KeyedRoute:
        """Where a keyed envelope of ``topic`` goes: see ``KeyedRoute``."""
        part = partition_of(key, self.partitions)
        route = self._keyed_routes.get((topic, part))
        if route is None:
            k = self.keys
            names = self._route_names(topic)
            streams, zsets = self.route(topic)
            parted = [i for i, g in enumerate(names) if self._parts.get(g)]
            rest = [i for i, g in enumerate(names) if not self._parts.get(g)]
            route = self._keyed_routes[(topic, part)] = KeyedRoute(
                part,
                tuple(k.partition_stream(names[i], part) for i in parted),
                tuple(k.partition_zset(names[i], part) for i in parted),
                tuple(streams[i] for i in rest),
                tuple(zsets[i] for i in rest),
            )
        return route

    def _route_names(self, topic: str) -> list[str]:
        return sorted(
            g for g, pats in self._groups.items() if any(topic_matches(p, topic) for p in pats)
        )
