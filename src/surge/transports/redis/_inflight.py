"""What one consumer holds of one group: the deliveries it read and has not
settled, those claimed from a partition's previous owner and not yet handed
out (the backlog), those it released in place (still pending to it), and a
consumer waiting for room under its prefetch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from ..._clock import Clock
from ..._codec import Codec
from ..._errors import DecodeError
from ..._transport import DeadLetter, Delivery
from ._dead_letters import DeadLetters
from ._keys import GroupKeys

__all__ = ("Inflight",)

log = logging.getLogger("surge.redis")


class Inflight:
    """One group's unsettled deliveries in this process, by token."""

    __slots__ = ("_backlog", "_clock", "_codec", "_dead", "_held", "_keys", "_released", "_room")

    def __init__(self, keys: GroupKeys, *, codec: Codec, clock: Clock, dead: DeadLetters) -> None:
        self._keys = keys
        self._codec = codec
        self._clock = clock
        self._dead = dead
        self._held: dict[bytes, Delivery] = {}
        self._backlog: list[Delivery] = []  # claimed from a partition's previous owner
        # released in place (pending to this consumer): token -> its attempt
        self._released: dict[bytes, int] = {}
        self._room: asyncio.Future[None] | None = None  # a consumer waiting for room

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, token: bytes) -> bool:
        return token in self._held

    def tokens(self) -> Iterator[bytes]:
        return iter(self._held)

    def holds_partition(self, p: int) -> bool:
        """Something read from partition ``p`` is unsettled here."""
        prefix = b"%d/" % p
        return any(t.startswith(prefix) for t in self._held)

    async def take(
        self,
        entries: list[Any],
        counts: dict[bytes, int] | None,
        prefix: bytes = b"",
        own: frozenset[bytes] | set[bytes] = frozenset(),
    ) -> list[Delivery]:
        """Deliveries of stream ``entries``, now held; ``prefix`` names their
        partition in the tokens (``b"3/"``); ``counts`` are XPENDING delivery
        counts of claimed entries. ``own``: the claimed entries that were
        pending to this consumer without its holding them, read by a read
        whose reply never came (a cancel, a lost connection): that read's
        delivery is not counted. One this consumer released in place gets
        the attempt it had. An entry that is no envelope is dead-lettered."""
        decode = self._codec.decode_envelope
        now = self._clock.time()
        held = self._held
        name = self._keys.name
        out: list[Delivery] = []
        for entry in entries:
            if entry is None:  # claimed after it was deleted
                continue
            entry_id, fields = entry
            token = prefix + entry_id if prefix else entry_id
            payload = b""
            attempt = 1
            first = now
            try:
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
                    back = self._released.pop(token, None)
                    if back is not None:
                        attempt = back
                    else:
                        attempt += counts.get(entry_id, 1) - (entry_id in own)
                env = decode(payload)
            except (DecodeError, ValueError) as exc:
                # an entry some other writer put on the stream (a field surge
                # never writes, a retry count that is no number): dead-lettered
                # with the reason, never left to stop the consumer
                reason = (
                    exc
                    if isinstance(exc, DecodeError)
                    else DecodeError(f"stream entry {entry_id!r} is not an envelope: {exc}")
                )
                await self._poison(token, payload or _raw(fields), max(attempt, 1), reason)
                continue
            d = Delivery(env, name, attempt, token, first)
            held[token] = d
            out.append(d)
        return out

    async def _poison(self, token: bytes, payload: bytes, attempt: int, exc: DecodeError) -> None:
        """Dead-letter an entry that is not an envelope at all."""
        now = self._clock.time()
        name = self._keys.name
        rec = DeadLetter(
            id=token.decode(),
            group=name,
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
        log.error("redis: entry %s of %s is not an envelope (%s); dead-lettered", token, name, exc)
        await self._dead.bury(self._keys, token, rec)

    def settled(self, token: bytes) -> None:
        self._held.pop(token, None)
        self.make_room()

    def released(self, token: bytes, attempt: int) -> None:
        """Released in place: pending to this consumer, no longer held; a
        claim of it gives ``attempt`` back."""
        self._released[token] = attempt
        self.settled(token)

    def released_attempt(self, token: bytes) -> int | None:
        return self._released.get(token)

    def forget_released(self) -> None:
        """At close: what was released in place is its next owner's."""
        self._released.clear()

    # --- room and backlog ------------------------------------------------------
    async def wait_room(self) -> None:
        """Until a delivery is settled, or ``make_room`` is called."""
        await self.room()

    def room(self) -> asyncio.Future[None]:
        """A future done at the next settle or ``make_room``."""
        room = self._room
        if room is None or room.done():
            room = self._room = asyncio.get_running_loop().create_future()
        return room

    def make_room(self) -> None:
        """Wake a consumer waiting for room (a settle, work in the backlog, close)."""
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    @property
    def backlogged(self) -> bool:
        return bool(self._backlog)

    def queue(self, deliveries: list[Delivery]) -> None:
        """Add claimed deliveries (already held) to the backlog."""
        self._backlog.extend(deliveries)

    def take_backlog(self) -> list[Delivery]:
        taken, self._backlog = self._backlog, []
        return taken


def _raw(fields: list[bytes]) -> bytes:
    """The fields of a stream entry that has no envelope field, as one body
    (``b"name=value"`` pairs, space-separated) for its dead letter."""
    return b" ".join(b"%s=%s" % (fields[k], fields[k + 1]) for k in range(0, len(fields) - 1, 2))
