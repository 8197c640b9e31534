"""The background work of one group in this process, in one task per group
that runs from the group's first ``consume`` until close (not until that
consumer ends: held deliveries keep their leases while their handlers
finish at shutdown).

- Delayed entries (``nack(delay)``, a future ``not_before``) wait in the
  group's sorted set; the mover script puts the due ones back into their
  stream (ZRANGEBYSCORE + XADD + ZREM), at the earliest due time it knows of
  and every ``poll`` seconds for entries that other processes scheduled.
- A delivery idle for longer than ``lease`` seconds belongs to a dead
  consumer (``Group.reclaim``); so every ``heartbeat`` seconds the keeper
  resets the idle time of what this consumer holds (XCLAIM JUSTID), and a
  slow handler is not run twice.
- Every lease/3 (quicker while partitions change hands) it renews the
  consumer's membership and leases (``PartitionOwner.balance``), or an
  inbox's liveness key.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.exceptions as rexc

from ..._clock import Clock
from ..._errors import Closed
from ._connection import CONNECTION_ERRORS, Connection
from ._inflight import Inflight
from ._keys import GroupKeys
from ._options import RedisOptions
from ._partitions import PartitionOwner

__all__ = ("Keeper",)

_MOVE_PAGE = 500
"""Due entries moved per script call."""


class Keeper:
    """The maintenance task of one group; ``reading`` says whether a consumer
    of the group is running here (it owns partitions only while one is)."""

    __slots__ = (
        "_alive_ms",
        "_clock",
        "_conn",
        "_consumer",
        "_due",
        "_ephemeral",
        "_heartbeat",
        "_inflight",
        "_keys",
        "_lease",
        "_owner",
        "_poll",
        "_reading",
        "_task",
        "_wake",
    )

    def __init__(
        self,
        conn: Connection,
        keys: GroupKeys,
        options: RedisOptions,
        *,
        clock: Clock,
        consumer: str,
        inflight: Inflight,
        owner: PartitionOwner | None,
        ephemeral: bool,
    ) -> None:
        self._conn = conn
        self._keys = keys
        self._clock = clock
        self._consumer = consumer
        self._inflight = inflight
        self._owner = owner
        self._ephemeral = ephemeral
        self._lease = options.lease
        self._heartbeat = options.heartbeat
        self._poll = options.poll
        self._alive_ms = options.alive_ms
        self._due = 0.0  # when the sorted set next needs the mover (epoch s)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._reading = False

    @property
    def reading(self) -> bool:
        return self._reading

    def start(self) -> None:
        """A consumer starts: run the task (if it does not run yet), move
        what is due now, and take partitions again."""
        self._reading = True
        self._due = 0.0
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(self._wake), name=f"surge-redis-{self._keys.name}"
            )
        else:
            self.poke()

    def stop_reading(self) -> None:
        """The consumer ended: hand the partitions over once what it read
        from them is settled (the task sees to it)."""
        self._reading = False
        self.poke()

    def poke(self) -> None:
        """Run a round now (partitions to claim, reading started or ended)."""
        if self._wake is not None:
            self._wake.set()

    def due_by(self, when: float) -> None:
        """An entry of the sorted set is due at ``when`` (epoch s)."""
        if when < self._due and self._wake is not None:
            self._due = when
            self._wake.set()

    def cancel(self) -> asyncio.Task[None] | None:
        """Cancel the task; it, to await, if it was running."""
        task = self._task
        if task is None or task.done():
            return None
        task.cancel()
        return task

    async def _move(self, now: float) -> float:
        """Move what is due (``now``) from the delayed sets back into their
        streams: the group's, and on a cluster each owned partition's (its
        owner moves a partition's: it is the one to read them); when to
        move again."""
        keys = self._keys
        conn = self._conn
        if not keys.slotted:
            pends = keys.pstream_ends if keys.parts else ("", "")
            sets = [(keys.zset, keys.stream, pends)]
        else:
            owned = self._owner.ownership.owned if self._owner is not None else ()
            sets = [(keys.zset, keys.stream, ("", ""))]
            sets += [(keys.pzsets[p], keys.pstreams[p], ("", "")) for p in sorted(owned)]
        due = now + self._poll
        for zset, stream, ends in sets:
            moved, nxt = await conn.run(
                "move", keys=[zset, stream], args=[repr(now), _MOVE_PAGE, *ends]
            )
            if moved >= _MOVE_PAGE:
                due = now
            elif nxt:
                due = min(due, float(nxt))
        return due

    async def _run(self, wake: asyncio.Event) -> None:
        keys = self._keys
        conn = self._conn
        clock = self._clock
        owner = self._owner
        next_extend = clock.monotonic() + self._heartbeat
        next_balance = clock.monotonic()
        reading = self._reading
        delay = 0.05
        task = asyncio.current_task()
        assert task is not None
        while not conn.closed:
            if task.cancelling():  # see Group.consume(): redis-py may swallow a cancel
                raise asyncio.CancelledError
            try:
                now = clock.time()
                if self._due <= now:
                    self._due = await self._move(now)
                if self._heartbeat > 0 and clock.monotonic() >= next_extend:
                    next_extend = clock.monotonic() + self._heartbeat
                    by_stream: dict[str, list[bytes]] = {}
                    for token in self._inflight.tokens():
                        stream, entry = keys.locate(token)
                        if b"/" in token and (owner is None or not owner.still_ours(token)):
                            continue  # its partition moved on: let the new owner keep it
                        by_stream.setdefault(stream, []).append(entry)
                    for stream, entries in by_stream.items():
                        await conn.cmd(
                            conn.client(stream),
                            "XCLAIM", stream, keys.name, self._consumer, 0, *entries, "JUSTID",
                        )  # fmt: skip
                if clock.monotonic() >= next_balance or self._reading != reading:
                    reading = self._reading
                    pace = self._lease / 3
                    r = conn.client()
                    if owner is not None and await owner.balance(r, leaving=not reading):
                        # Quicker while partitions change hands: ours go as soon as
                        # they are settled; others' are taken soon after they go.
                        pace = min(pace, 0.05 if owner.ownership.releasing else 0.25)
                    elif self._ephemeral:
                        await conn.cmd(r, "SET", keys.alive, 1, "PX", self._alive_ms)
                    next_balance = clock.monotonic() + pace
                delay = 0.05
            except Closed:
                return  # the transport closed under this round
            except CONNECTION_ERRORS as exc:
                conn.failed(exc, f"maintaining {keys.name!r}")
                delay = await conn.backoff(delay)
                continue
            except rexc.RedisError as exc:
                conn.failed(exc, f"maintaining {keys.name!r}")
                delay = await conn.backoff(delay)
                continue
            wait = self._due - clock.time()
            if self._heartbeat > 0:
                wait = min(wait, next_extend - clock.monotonic())
            if owner is not None or self._ephemeral:
                wait = min(wait, next_balance - clock.monotonic())
            if wait > 0:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await wake.wait()
