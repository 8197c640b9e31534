"""Deliveries handed back untouched, remembered in the stream
``<stream>_released`` so that handing back does not cost an attempt.

JetStream counts every delivery in ``num_delivered``, a NAK's redelivery
included, and has no way to take one back. So a hand-back (``release`` at a
stop, what a closing consumer fetched and never handed out) first writes
how many times that message was handed back to that JetStream consumer, as
the last message of subject ``<stream>_released.<consumer>.<stream seq>``,
then NAKs; a delivery with ``num_delivered`` over 1 (only those: a first
delivery cannot have been handed back) reads it and subtracts. Every
process on the stream sees it, so the next owner of a partition gets the
attempt right. Once the delivery is acknowledged or dead-lettered here the
message is deleted.

A stream keeping one message per subject rather than a key-value bucket:
a bucket refuses to delete a message, and a key deleted leaves a marker
behind for good, one per delivery ever handed back.

What this costs: a read and a write per delivery handed back (at a stop,
all at once), a read per redelivery (a retry, a takeover), a delete per
settled delivery that had a count. If the stream cannot be reached, a
hand-back is NAKed anyway and counts an attempt, as a hand-back by ``nack``
would (logged); counts of messages that leave the events stream unsettled
(``max_age``, a purge) go with the same ``max_age``, or stay (a few bytes
each).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import nats.errors
import nats.js.errors

from ._connection import CancelGuard, Connection
from ._groups import ack_info
from ._layout import Layout

__all__ = ("Released",)

log = logging.getLogger("surge.nats")


class Released:
    """The hand-back counts of one transport's stream, and which deliveries
    read here have one."""

    def __init__(self, conn: Connection, layout: Layout) -> None:
        self._conn = conn
        self._layout = layout
        self._stream = layout.released_stream
        # token -> the stream sequence of its count, for the deliveries
        # read here with one and not settled
        self._counts: dict[str, int] = {}

    async def record(self, tokens: Sequence[str]) -> None:
        """Count a hand-back of each of ``tokens`` (before they are NAKed)."""
        if not tokens:
            return
        try:
            with CancelGuard():
                await asyncio.gather(*(self._count_one(t) for t in tokens))
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning(
                "nats: could not record %d deliveries handed back (%r): their next "
                "delivery counts an attempt",
                len(tokens),
                exc,
            )

    async def _count_one(self, token: str) -> None:
        n, _ = await self._read(self._subject(token))
        await self._conn.js.publish(self._subject(token), b"%d" % (n + 1), stream=self._stream)

    async def _read(self, subject: str) -> tuple[int, int]:
        """(count, its stream sequence) of ``subject``; (0, 0) for none."""
        try:
            msg = await self._conn.js.get_last_msg(self._stream, subject)
        except nats.js.errors.NotFoundError:
            return 0, 0
        try:
            return int(msg.data or b"0"), msg.seq or 0
        except ValueError:
            return 0, 0

    async def times(self, token: str) -> int:
        """How many times the message of this delivery was handed back to its
        consumer before (0 when that cannot be read: an attempt too many
        rather than a delivery held up)."""
        try:
            with CancelGuard():
                n, seq = await self._read(self._subject(token))
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("nats: could not read whether %s was handed back: %r", token, exc)
            return 0
        if n > 0:
            self._counts[token] = seq
        return n

    def has(self, token: str) -> bool:
        """This delivery has a count (to delete once it is settled)."""
        return token in self._counts

    async def settled(self, token: str) -> None:
        """The delivery was acknowledged or dead-lettered: delete its count."""
        seq = self._counts.pop(token, None)
        if seq is None:
            return
        try:
            with CancelGuard():
                await self._conn.js.delete_msg(self._stream, seq)
        except nats.js.errors.NotFoundError:
            pass  # replaced since (handed back again) or gone with max_age
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("nats: could not delete the hand-back count of %s: %r", token, exc)

    def moved(self, token: str) -> None:
        """The delivery goes back for another attempt (a nack): its count
        stays for that one, which reads it again under a new token."""
        self._counts.pop(token, None)

    def forget(self) -> None:
        """At close: nothing read here is held any more."""
        self._counts.clear()

    def _subject(self, token: str) -> str:
        consumer, _, seq, _, _ = ack_info(token)
        return self._layout.released(consumer, seq)
