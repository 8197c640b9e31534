"""The contract between the runtime and a transport, and what they exchange.

A transport moves envelopes from publishers to consumer groups. Every group
(one per subscription) receives every envelope whose topic matches one of its
patterns (fan-out); within a group, each envelope goes to one consumer at a
time and stays pending until it is acknowledged (at-least-once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

from ._event import Envelope

__all__ = ("DeadLetter", "Delivery", "Transport", "TransportStats", "topic_matches")


class Delivery(msgspec.Struct, gc=False):
    """One envelope handed to one consumer group, until it is settled.

    ``attempt`` counts deliveries of this envelope to this group, from 1.
    ``token`` is the transport's own receipt (a stream id, a row id).
    ``first_time`` is when the first attempt was delivered (0 if unknown).
    """

    envelope: Envelope
    group: str
    attempt: int = 1
    token: Any = None
    first_time: float = 0.0


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """An envelope that its group gave up on, with why."""

    id: str
    group: str
    topic: str
    key: str | None
    headers: dict[str, str] | None
    body: bytes
    error_type: str
    error: str
    traceback: str
    attempts: int
    first_attempt_at: float
    failed_at: float


class TransportStats(msgspec.Struct, frozen=True):
    """A group's state on its transport, when the transport can tell."""

    backlog: int
    pending: int
    scheduled: int
    dead: int


@runtime_checkable
class Transport(Protocol):
    """What the runtime needs from a transport; one module per transport.

    Lifecycle: ``start``, ``declare`` every group before publishing, then
    any number of ``publish`` / ``consume`` / ``ack`` / ``nack`` calls, and
    finally ``close``.
    """

    url: str
    durable: bool
    """True when an event survives the publishing process's crash."""

    async def start(self) -> None: ...

    async def declare(self, group: str, topics: Sequence[str], *, ephemeral: bool = False) -> None:
        """Create ``group`` (idempotent): from now on it receives ``topics``.

        Topics are exact names or patterns: ``*`` matches one dot-separated
        token, a final ``>`` matches one or more. An ``ephemeral`` group (a
        process's reply inbox) is deleted, with what it holds, by ``close``.
        """
        ...

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Store ``envelopes``; waits while buffers are full (backpressure).

        When it returns, the envelopes are as durable as the transport
        promises. An envelope whose id was published within the dedup window
        is dropped silently (only derived ids, UUIDv8, can repeat; see
        ``surge._event.is_derived``). No group receives an envelope before
        its ``not_before`` time.
        """
        ...

    def publish_nowait(self, envelopes: Sequence[Envelope]) -> None:
        """Accept ``envelopes`` for publishing, or raise ``Overloaded``."""
        ...

    def consume(self, group: str, *, prefetch: int) -> AsyncIterator[list[Delivery]]:
        """Batches of deliveries for ``group``; at most ``prefetch`` unsettled."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Settle ``deliveries``: they will not be delivered again."""
        ...

    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Hand ``delivery`` back, to be delivered again after ``delay`` s."""
        ...

    async def dead_letter(self, delivery: Delivery, record: DeadLetter) -> None:
        """Settle ``delivery`` by moving it to its group's dead letters."""
        ...

    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        """Dead letters of ``group`` (every group when None), oldest first."""
        ...

    async def replay(self, group: str, ids: Sequence[str] | None = None) -> int:
        """Deliver dead letters (all, or ``ids``) to ``group`` again; count."""
        ...

    async def purge(self, group: str, ids: Sequence[str] | None = None) -> int:
        """Delete dead letters (all, or ``ids``) of ``group``; count."""
        ...

    async def stats(self, group: str) -> TransportStats: ...

    async def close(self) -> None: ...


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches ``pattern`` (``*`` one token, ``>`` the rest)."""
    if pattern == topic:
        return True
    if "*" not in pattern and ">" not in pattern:
        return False
    pt = pattern.split(".")
    tt = topic.split(".")
    for i, p in enumerate(pt):
        if p == ">":
            return i == len(pt) - 1 and len(tt) > i
        if i >= len(tt) or (p != "*" and p != tt[i]):
            return False
    return len(pt) == len(tt)
