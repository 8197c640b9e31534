"""The consuming side of the Redis transport: reading a group's streams,
taking over a dead consumer's deliveries, and the per-group maintenance
task (delayed entries, lease extension, partition ownership).

The functions take a :class:`~surge.transports._redis.RedisTransport`; its
``consume`` delegates here. See that module for the layout and the why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import redis.asyncio as aredis
import redis.exceptions as rexc

from .._errors import ConfigurationError, DecodeError, TransportError
from .._transport import DeadLetter, Delivery
from . import _redis_partitions as _parts
from ._redis_groups import CONNECTION_ERRORS, GroupState

if TYPE_CHECKING:
    from ._redis import RedisTransport

__all__ = ("consume", "deliveries")

log = logging.getLogger("surge.redis")


async def _cmd(r: aredis.Redis, *args: Any) -> Any:
    """A command whose raw reply we parse ourselves (see ``_redis._raw``)."""
    return await r.execute_command(*args)  # type: ignore[no-untyped-call]


async def consume(t: RedisTransport, group: str, prefetch: int) -> AsyncIterator[list[Delivery]]:
    g = t._group(group)
    r = t._redis()
    if prefetch < 1:
        raise ConfigurationError("prefetch must be at least 1")
    g.consuming = True
    g.active = True
    g.due = 0.0
    loop = asyncio.get_running_loop()
    if g.keeper is None or g.keeper.done():
        # Runs until close, not until this consumer ends: held deliveries
        # keep their leases while their handlers finish at shutdown.
        g.wake = asyncio.Event()
        g.keeper = loop.create_task(_maintain(t, g), name=f"surge-redis-{group}")
        t._tasks.add(g.keeper)
    else:
        assert g.wake is not None
        g.wake.set()  # take partitions again
    next_scan = 0.0
    delay = 0.05
    block_ms = max(1, int(t.block * 1000))
    try:
        while not t._closed:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancel that redis-py swallowed (into an empty reply or
                # a connection error) must still end this consumer.
                raise asyncio.CancelledError
            if g.backlog:  # left by a partition's previous owner: first
                claimed, g.backlog = g.backlog, []
                yield claimed
                continue
            room = prefetch - len(g.held)
            if room <= 0:
                g.room = loop.create_future()
                await g.room
                g.room = None
                continue
            try:
                batch: list[Delivery] = []
                if t.clock.monotonic() >= next_scan:
                    next_scan = t.clock.monotonic() + t.lease / 2
                    batch = await _reclaim(t, r, g, room)
                if not batch:
                    streams, count = _plan_read(g, min(room, t.batch))
                    try:
                        reply = await _cmd(r,
                            "XREADGROUP", "GROUP", group, t.consumer,
                            "COUNT", count, "BLOCK", block_ms,
                            "STREAMS", *streams, *(">" for _ in streams),
                        )  # fmt: skip
                        task = asyncio.current_task()
                        if task is not None and task.cancelling():
                            # redis-py can turn a cancel that lands in a
                            # blocking read into an empty reply; do not lose
                            # it. (Ask for the current task each time: each
                            # anext() of this generator may run in a task of
                            # its own.)
                            raise asyncio.CancelledError
                        if reply:
                            g.spread = len(reply)
                        for stream, entries in reply or ():
                            part = g.pindex.get(stream)
                            prefix = b"" if part is None else b"%d/" % part
                            batch += await deliveries(t, g, entries, None, prefix)
                    except BaseException:
                        # The read may have run on the server with its reply
                        # lost: those entries are pending to us but not held.
                        # Claim them (in order) before reading these again.
                        if g.reading:
                            g.rescan |= g.reading
                            if g.wake is not None:
                                g.wake.set()
                        raise
                    finally:
                        g.reading = frozenset()
            except CONNECTION_ERRORS as exc:
                if t.closed:
                    return
                t._failed(exc, f"reading {group!r}")
                delay = await t._backoff(delay)
                continue
            except rexc.RedisError as exc:
                # Never let the consumer die silently: say so, back off, retry.
                if isinstance(exc, rexc.ResponseError) and "NOGROUP" in str(exc):
                    # The broker lost the group (restarted without persistence).
                    with contextlib.suppress(TransportError, *CONNECTION_ERRORS):
                        await t.declare(group, g.patterns, ephemeral=g.ephemeral)
                        log.warning(
                            "redis: group %r was gone from the broker; declared it again",
                            group,
                        )
                else:
                    t._failed(exc, f"reading {group!r}")
                delay = await t._backoff(delay)
                continue
            delay = 0.05
            t._ok()
            if batch:
                yield batch
    finally:
        # Stop owning partitions: each is handed over once what this
        # consumer read from it is settled (the maintenance task sees to it).
        g.active = False
        if g.wake is not None:
            g.wake.set()


def _still_ours(g: GroupState, token: bytes) -> bool:
    return g.own is not None and int(token.partition(b"/")[0]) in g.own.owned


def _plan_read(g: GroupState, room: int) -> tuple[list[str], int]:
    """The streams of the next read and its COUNT, and ``g.reading``.

    Redis applies COUNT to each stream of a read. When the last read found
    entries in one stream only (the common case: unkeyed events, or one
    busy partition), the whole room goes to each stream, for big batches;
    when it found several, the room is split among them (at least one
    each). So a consumer holds at most ``prefetch`` plus one per partition
    it owns, except right after events start flowing into several streams
    at once (up to ``prefetch`` per stream, for one read)."""
    parts = sorted(g.own.readable - g.rescan) if g.own is not None else []
    g.reading = frozenset(parts)
    streams = [g.stream, *(g.pstreams[p] for p in parts)]
    if g.spread <= 1:
        return streams, room
    return streams, max(1, room // len(streams))


async def deliveries(
    t: RedisTransport,
    g: GroupState,
    entries: list[Any],
    counts: dict[bytes, int] | None,
    prefix: bytes = b"",
) -> list[Delivery]:
    """Deliveries of stream ``entries``; ``prefix`` names their partition
    in the tokens (``b"3/"``); ``counts`` are XPENDING delivery counts."""
    decode = t.codec.decode_envelope
    now = t.clock.time()
    held = g.held
    name = g.name
    out: list[Delivery] = []
    for entry in entries:
        if entry is None:  # claimed after it was deleted
            continue
        entry_id, fields = entry
        token = prefix + entry_id if prefix else entry_id
        payload = b""
        attempt = 1
        first = now
        if len(fields) == 2:
            payload = fields[1]
        else:
            for k in range(0, len(fields), 2):
                f = fields[k]
                if f == b"e":
                    payload = fields[k + 1]
                elif f == b"a":
                    attempt = int(fields[k + 1])
                elif f == b"f":
                    first = float(fields[k + 1]) or now
        if counts is not None:
            attempt += counts.get(entry_id, 1)
        try:
            env = decode(payload)
        except DecodeError as exc:
            await _poison(t, g, token, payload, attempt, exc)
            continue
        d = Delivery(env, name, attempt, token, first)
        held[token] = d
        out.append(d)
    return out


async def _poison(
    t: RedisTransport, g: GroupState, token: bytes, payload: bytes, attempt: int, exc: DecodeError
) -> None:
    """Dead-letter an entry that is not an envelope at all."""
    now = t.clock.time()
    rec = DeadLetter(
        id=token.decode(),
        group=g.name,
        topic="",
        key=None,
        headers=None,
        body=payload,
        error_type=type(exc).__qualname__,
        error=str(exc),
        traceback="",
        attempts=attempt,
        first_attempt_at=now,
        failed_at=now,
    )
    log.error("redis: entry %s of %s is not an envelope (%s); dead-lettered", token, g.name, exc)
    await t._dead(g, token, rec)


async def _reclaim(t: RedisTransport, r: aredis.Redis, g: GroupState, room: int) -> list[Delivery]:
    """Take over deliveries whose consumer has been silent for a lease."""
    lease_ms = int(t.lease * 1000)
    pending = await _cmd(r, "XPENDING", g.stream, g.name, "IDLE", lease_ms, "-", "+", room)
    counts = {p[0]: int(p[3]) for p in pending if p[0] not in g.held}
    if not counts:
        return []
    claimed = await _cmd(r, "XCLAIM", g.stream, g.name, t.consumer, lease_ms, *counts)
    out = await deliveries(t, g, claimed, counts)
    if out:
        log.warning(
            "redis: took over %d deliveries of %s idle for more than %.1fs",
            len(out),
            g.name,
            t.lease,
        )
    return out


async def _maintain(t: RedisTransport, g: GroupState) -> None:
    """Move due delayed entries into the stream, extend held leases and
    keep this consumer's share of the partitions."""
    assert g.wake is not None
    wake = g.wake
    clock = t.clock
    move = t._scripts["move"]
    next_extend = clock.monotonic() + t.heartbeat
    next_balance = clock.monotonic()
    active = g.active
    pbefore, pafter = (f"{t.prefix}:p", f":{g.name}") if g.parts else ("", "")
    delay = 0.05
    task = asyncio.current_task()
    assert task is not None
    while not t._closed:
        if task.cancelling():  # see consume(): redis-py may swallow a cancel
            raise asyncio.CancelledError
        r = t._redis()
        try:
            now = clock.time()
            if g.due <= now:
                moved, nxt = await move(
                    keys=[g.zset, g.stream], args=[repr(now), 500, pbefore, pafter], client=r
                )
                if moved >= 500:
                    g.due = now
                else:
                    g.due = min(float(nxt) if nxt else now + t.poll, now + t.poll)
            if t.heartbeat > 0 and clock.monotonic() >= next_extend:
                next_extend = clock.monotonic() + t.heartbeat
                by_stream: dict[str, list[bytes]] = {}
                for token in g.held:
                    stream, entry = g.locate(token)
                    if b"/" in token and not _still_ours(g, token):
                        continue  # its partition moved on: let the new owner keep it
                    by_stream.setdefault(stream, []).append(entry)
                for stream, entries in by_stream.items():
                    await _cmd(r, "XCLAIM", stream, g.name, t.consumer, 0, *entries, "JUSTID")
            if clock.monotonic() >= next_balance or g.active != active:
                active = g.active
                pace = t.lease / 3
                if g.own is not None and await _parts.balance(t, r, g):
                    # Quicker while partitions change hands: ours go as soon as
                    # they are settled; others' are taken soon after they go.
                    pace = min(pace, 0.05 if g.own.releasing else 0.25)
                elif g.ephemeral:
                    await r.set(g.alive, 1, px=t.alive_ms)
                next_balance = clock.monotonic() + pace
            delay = 0.05
        except CONNECTION_ERRORS as exc:
            t._failed(exc, f"maintaining {g.name!r}")
            delay = await t._backoff(delay)
            continue
        except rexc.RedisError as exc:
            t._failed(exc, f"maintaining {g.name!r}")
            delay = await t._backoff(delay)
            continue
        wait = g.due - clock.time()
        if t.heartbeat > 0:
            wait = min(wait, next_extend - clock.monotonic())
        if g.own is not None or g.ephemeral:
            wait = min(wait, next_balance - clock.monotonic())
        if wait > 0:
            wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await wake.wait()
