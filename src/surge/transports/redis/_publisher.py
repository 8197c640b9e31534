"""Publishing to Redis: a group commit.

Concurrent ``publish`` calls are gathered by one flusher into a single Lua
call that, atomically, checks the registry version (a stale route makes it
refuse, reload and retry, so a group declared before the publish always
receives it), drops derived ids seen within ``dedup_window`` seconds
(``SET NX EX``) and XADDs (or ZADDs, for a future ``not_before``) to every
matching group. ``await publish`` returns when its batch is in Redis (as
durable as Redis's AOF setting makes it). A publish keeps retrying a lost
broker for ``reconnect_timeout`` seconds, then raises ``TransportError``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions as rexc

from ..._clock import Clock
from ..._codec import Codec
from ..._errors import Closed, Overloaded, TransportError
from ..._event import Envelope
from ._connection import Connection, transient
from ._options import RedisOptions
from ._registry import Registry

__all__ = ("Publisher",)

log = logging.getLogger("surge.redis")

# topic, encoded envelope, its id if derived (deduplicated; else ''), not_before, key
_Item = tuple[str, bytes, str, float | None, str | None]


class _Pending:
    """One publish call waiting in the flusher's buffer."""

    __slots__ = ("future", "items")

    def __init__(self, items: list[_Item], future: asyncio.Future[None] | None) -> None:
        self.items = items
        self.future = future


class Publisher:
    """The buffer of envelopes accepted but not yet written, and its flusher.

    ``scheduled(t)`` is called with the earliest ``not_before`` of a batch
    that put envelopes into delayed sets (a local mover may have to wake);
    ``touched()`` whenever envelopes are accepted (the transport is busy).
    """

    __slots__ = (
        "_batch",
        "_buf",
        "_buffer",
        "_buffered",
        "_clock",
        "_codec",
        "_conn",
        "_dedup_window",
        "_flusher",
        "_lead",
        "_max_len",
        "_reconnect_timeout",
        "_registry",
        "_scheduled",
        "_space",
        "_touched",
        "_wake",
        "_writing",
    )

    def __init__(
        self,
        conn: Connection,
        registry: Registry,
        options: RedisOptions,
        *,
        codec: Codec,
        clock: Clock,
        scheduled: Callable[[float], None],
        touched: Callable[[], None],
    ) -> None:
        self._conn = conn
        self._registry = registry
        self._codec = codec
        self._clock = clock
        self._scheduled = scheduled
        self._touched = touched
        self._batch = options.batch
        self._buffer = options.buffer
        self._dedup_window = options.dedup_window
        self._max_len = options.max_len
        self._reconnect_timeout = options.reconnect_timeout
        self._buf: list[_Pending] = []
        self._buffered = 0
        self._space: list[asyncio.Future[None]] = []
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._writing = False  # a publish script is on the wire
        self._lead: asyncio.Future[None] | None = None  # an inline write's end

    @property
    def buffered(self) -> bool:
        """Envelopes wait to be written."""
        return bool(self._buf)

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._flusher = asyncio.get_running_loop().create_task(
            self._flush_loop(), name="surge-redis-flush"
        )

    async def flush(self) -> None:
        """Wait until what was accepted is written (or failed), if the
        flusher still runs (before a close)."""
        if self._buf and self._flusher is not None and not self._flusher.done():
            waiters = [p.future for p in self._buf if p.future is not None]
            if waiters:
                await asyncio.gather(*waiters, return_exceptions=True)

    async def written(self) -> None:
        """Wait until nothing accepted is left unwritten (for ``wait_idle``)."""
        if self._lead is not None:
            await self._lead
        while self._buf:
            await asyncio.gather(
                *(p.future for p in list(self._buf) if p.future is not None),
                return_exceptions=True,
            )

    def cancel(self) -> asyncio.Task[None] | None:
        """Cancel the flusher (at close); its task, to await, if it was running."""
        if self._wake is not None:
            self._wake.set()
        task = self._flusher
        if task is None or task.done():
            return None
        task.cancel()
        return task

    def fail_pending(self) -> None:
        """What is still buffered fails with ``Closed``; waiters for room go."""
        for p in self._buf:
            if p.future is not None and not p.future.done():
                p.future.set_exception(Closed("transport closed before the publish was written"))
        self._buf.clear()
        for fut in self._space:
            if not fut.done():
                fut.set_result(None)

    # --- publishing ----------------------------------------------------------
    def _encode(self, envelopes: Sequence[Envelope]) -> list[_Item]:
        encode = self._codec.encode_envelope
        return [
            (
                env.topic,
                encode(env),
                env.id if env.id[12:13] == "8" else "",
                env.not_before,
                env.key,
            )
            for env in envelopes
        ]

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if self._conn.closed:
            raise Closed("transport is closed")
        if not envelopes:
            return
        items = self._encode(envelopes)
        while self._buffered >= self._buffer:
            fut = asyncio.get_running_loop().create_future()
            self._space.append(fut)
            await fut
            if self._conn.closed:
                raise Closed("transport is closed")
        if self._writing or self._buf:
            # A write is on the wire: join the next batch (group commit).
            fut = asyncio.get_running_loop().create_future()
            self._put(_Pending(items, fut))
            await fut
            return
        # Nobody is writing: write now, without a hop through the flusher.
        self._writing = True
        self._touched()
        lead = self._lead = asyncio.get_running_loop().create_future()
        try:
            await self._write_or_raise(items)
        finally:
            self._writing = False
            self._lead = None
            lead.set_result(None)
            if self._buf:
                assert self._wake is not None
                self._wake.set()

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        if self._conn.closed:
            raise Closed("transport is closed")
        if self._buffered + len(envelopes) > self._buffer or self._space:
            raise Overloaded(f"{self._buffered} envelopes wait to be written to redis")
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_log_failure)
        self._put(_Pending(self._encode(envelopes), fut))

    def _put(self, pending: _Pending) -> None:
        self._buf.append(pending)
        self._buffered += len(pending.items)
        self._touched()
        assert self._wake is not None
        self._wake.set()

    async def _flush_loop(self) -> None:
        wake = self._wake
        assert wake is not None
        task = asyncio.current_task()
        assert task is not None
        while not self._conn.closed:
            if task.cancelling():  # see Group.consume(): redis-py may swallow a cancel
                raise asyncio.CancelledError
            if not self._buf or self._writing:
                wake.clear()
                await wake.wait()
                continue
            # Take whole publish calls up to ``batch`` envelopes (at least one call).
            taken: list[_Pending] = []
            n = 0
            buf = self._buf
            while buf and (not taken or n + len(buf[0].items) <= self._batch):
                p = buf.pop(0)
                taken.append(p)
                n += len(p.items)
            self._writing = True
            try:
                await self._write_or_raise([item for p in taken for item in p.items])
            except Exception as exc:
                for p in taken:
                    if p.future is not None and not p.future.done():
                        p.future.set_exception(exc)
            else:
                for p in taken:
                    if p.future is not None and not p.future.done():
                        p.future.set_result(None)
            finally:
                self._writing = False
                self._buffered -= n
                while self._space and self._buffered < self._buffer:
                    fut = self._space.pop(0)
                    if not fut.done():
                        fut.set_result(None)

    async def _write_or_raise(self, items: list[_Item]) -> None:
        try:
            await self._write(items)
        except (TransportError, Closed):
            raise
        except Exception as exc:
            raise self._conn.error(exc, "publish") from exc

    def _route(self, items: list[_Item]) -> tuple[list[Any], dict[int, list[Any]], list[float]]:
        """The publish script's entries for the prefix's slot and, on a
        cluster, for each partition's slot; the not_before times of delayed
        entries."""
        registry = self._registry
        keys = registry.keys
        slotted = keys.slotted
        now = self._clock.time()
        home: list[Any] = []
        parts: dict[int, list[Any]] = {}
        later: list[float] = []
        for topic, payload, did, not_before, key in items:
            streams, zsets = registry.route(topic)
            if not streams:
                continue
            delayed = not_before is not None and not_before > now
            if delayed:
                assert not_before is not None
                later.append(not_before)
            if key is None:
                _entry(home, keys.dedup, did, delayed, not_before, "", streams, zsets, payload)
                continue
            route = registry.keyed_route(topic, key)
            part = f"{route.part}/"
            if not slotted:  # one slot: one entry
                _entry(
                    home, keys.dedup, did, delayed, not_before, part,
                    route.streams + route.home_streams, route.zsets + route.home_zsets, payload,
                )  # fmt: skip
                continue
            if route.streams:
                _entry(
                    parts.setdefault(route.part, []), keys.dedup_of(route.part), did, delayed,
                    not_before, part, route.streams, route.zsets, payload,
                )  # fmt: skip
            if route.home_streams:
                _entry(
                    home, keys.dedup, did, delayed, not_before, part,
                    route.home_streams, route.home_zsets, payload,
                )  # fmt: skip
        return home, parts, later

    async def _write(self, items: list[_Item]) -> None:
        """Write ``items``: one script per slot they go to (a single server:
        one), those of one master in one pipeline, the masters at once. Each
        checks the registry version routed on (a partition's slot its copy,
        raised by every declare before it returns): a stale one refuses, and
        its slot is routed again and retried; a slot written is not written
        again. A batch that goes to partitions only skips the prefix's slot:
        the partitions' checks tell whether the routes are current."""
        conn = self._conn
        registry = self._registry
        keys = registry.keys
        clock = self._clock
        deadline = clock.monotonic() + self._reconnect_timeout
        delay = 0.05
        head = [self._dedup_window, self._max_len or ""]
        done: set[int] = set()  # slots written (-1: the prefix's)
        later: list[float] = []
        rounds = 0  # refused as stale
        while True:
            since = conn.epoch
            version = registry.version
            home, parts, later = self._route(items)
            calls: list[tuple[int, list[str], list[Any]]] = []
            # Nothing routed still asks the script: our copy of the registry
            # may predate the groups that want these topics (a publisher
            # started before the workers declared them), and only the
            # script's version check tells (-1 below).
            if -1 not in done and (home or not parts):
                calls.append((-1, [keys.version], [version, *head, *home]))
            for p, entries in parts.items():
                if p not in done:
                    calls.append((p, [keys.version_of(p)], [version, *head, *entries]))
            try:
                outcomes = await conn.run_each(
                    "publish", [(k, a) for _, k, a in calls], replicated=True
                )
                stale: list[int] = []
                failed: BaseException | None = None
                for (slot, _, _), outcome in zip(calls, outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        failed = failed or outcome
                    elif outcome == -1:
                        stale.append(slot)
                    else:
                        done.add(slot)
                if failed is not None:
                    raise failed
                if stale:  # a group was declared since we routed: reroute
                    await registry.load()
                    lag = [p for p in stale if p >= 0]
                    if lag and registry.version == version:
                        # The prefix's version is ours: those copies lag (a
                        # declare cut short before it raised them), or are
                        # ahead (the prefix's master lost its data: set back).
                        ahead = await registry.raise_copies(lag, version)
                        if ahead:
                            await registry.load()
                            if registry.version == version:
                                await registry.raise_copies(ahead, version, force=True)
                    rounds += 1
                    if rounds > 3:  # never spin: something keeps moving
                        if clock.monotonic() > deadline:
                            raise TransportError("redis: publish: the registry kept changing")
                        delay = await conn.backoff(delay)
                    continue
            except (rexc.RedisError, OSError) as exc:
                if not transient(exc) or conn.closed or clock.monotonic() > deadline:
                    raise conn.error(exc, "publish") from exc
                conn.failed(exc, "publish")
                delay = await conn.backoff(delay)
                continue
            conn.ok(since)
            if later:
                self._scheduled(min(later))
            return


def _entry(
    out: list[Any],
    dedup: str,
    did: str,
    delayed: bool,
    not_before: float | None,
    part: str,
    streams: tuple[str, ...],
    zsets: tuple[str, ...],
    payload: bytes,
) -> None:
    """One envelope's entry of the publish script (see ``_scripts.PUBLISH``)."""
    dkey = dedup + did if did else ""
    if delayed:
        out += ("z", dkey, repr(not_before), part, len(zsets), *zsets, payload)
    else:
        out += ("s", dkey, "", "", len(streams), *streams, payload)


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("redis: publish_nowait failed: %s", fut.exception())
