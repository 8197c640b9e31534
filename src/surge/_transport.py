"""The contract between the runtime and a transport, and what they exchange.

A transport moves envelopes from publishers to consumer groups. Every group
(one per subscription) receives every envelope whose topic matches one of its
patterns (fan-out); within a group, each envelope goes to one consumer at a
time and stays pending until it is acknowledged (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import msgspec

from ._event import Envelope

__all__ = (
    "Capabilities",
    "DeadLetter",
    "Delivery",
    "DirectPut",
    "FencedState",
    "Fences",
    "HandsBack",
    "IdleAware",
    "KeyRouting",
    "KnowsGroups",
    "Outbox",
    "StateStore",
    "TakesNow",
    "TopicPut",
    "Transport",
    "TransportStats",
    "capabilities_of",
    "publishing_group",
    "topic_matches",
)


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
    settled: int | None = None
    """Attempts every consumer of the group finished (acknowledged, retried
    or dead-lettered), counted on the transport since the group was
    declared; None: the transport does not count them (then each process
    knows only its own, from ``App.statistics()``)."""
    consumers: int | None = None
    """Processes consuming the group now; None: the transport cannot tell."""


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


# --- optional capabilities ----------------------------------------------------
# The runtime needs only ``Transport``. A transport that can do more says so
# by implementing one of these small protocols; ``capabilities_of`` resolves
# them once, when the app starts, and the runtime degrades as each docstring
# says when one is missing (docs/transports.md: "writing a transport").


@runtime_checkable
class HandsBack(Protocol):
    """Deliveries fetched but never handled go back without costing an attempt.

    Without it, the runtime hands them back at a stop with ``nack(d, 0)``,
    which counts a delivery attempt (a handler's retry budget shrinks by one
    per stop that caught its event in a prefetch buffer).
    """

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Make ``deliveries`` deliverable again at once, in their place
        (before later envelopes of their partition), attempt not counted."""
        ...


@runtime_checkable
class Fences(Protocol):
    """A keyed delivery does not start once its partition's lease may have
    passed to another consumer.

    A consumer cut off from its broker (a partition, a long pause) cannot
    renew its partition leases, and after a lease's expiry the partition's
    next owner handles what it finds pending, while the cut-off consumer
    still holds deliveries it fetched before. With ``fenced``, the runtime
    asks before it starts each keyed delivery, and skips one that is fenced:
    the transport has forgotten it (neither handled nor settled here; the
    partition's owner handles it). Without it, per-key exclusion across
    processes holds only while every consumer renews its leases in time.
    """

    def fenced(self, delivery: Delivery) -> bool:
        """True when ``delivery`` must not start here (the transport has
        forgotten it); answered from local state, without a round trip."""
        ...


@runtime_checkable
class FencedState(Protocol):
    """A state save that takes effect only while a delivery is still this
    consumer's (conditions save each key's state before the event's ack).

    A consumer stalled past its lease while handling a keyed delivery (a
    pause, a blocked loop) may wake after the partition's next owner took
    the delivery again and went on with later events of its key. Without
    it, the stalled consumer's save then overwrites the next owner's, and
    the key forgets what the next owner took in since; with it, that save
    is refused, and the handling fails (``RetryLater``): what it would have
    published is not, and the next owner handles the event from the state
    it saved.
    """

    async def save_state_held(self, key: str, value: bytes, delivery: Delivery) -> bool:
        """``save_state(key, value)`` in one write with a check that
        ``delivery`` is still leased to this consumer and its lease is not
        over (at the store's time); False, nothing saved, when it is not."""
        ...


@runtime_checkable
class KeyRouting(Protocol):
    """Keyed envelopes are routed by ``Envelope.key`` into ``partitions``,
    each read by one consumer at a time, so one key keeps its order across
    processes.

    With it, the app fills ``Envelope.key`` before publishing (from the
    event type's ``__key__`` or the topic's keyed subscription); without it,
    per-key order holds within one process only.
    """

    partitions: int
    """How many partitions a group's keyed envelopes are split into (>= 1)."""


@runtime_checkable
class IdleAware(Protocol):
    """The transport can tell when nothing is left for this process's groups.

    ``App.drain()`` and ``App.stop(drain=True)`` need it; without it they
    raise ``NotImplementedError``.
    """

    @property
    def idle(self) -> bool:
        """No declared group held an undelivered, unsettled or scheduled
        envelope at the last look (cheap; may be stale)."""
        ...

    async def wait_idle(self) -> None:
        """Return once no declared group holds anything (as ``idle``)."""
        ...


@runtime_checkable
class StateStore(Protocol):
    """Small durable values shared by the processes of an app (trigger
    slots; with ``KeyRouting``, each condition key's state).

    Without it, triggers keep their last fired slot in the app's memory: a
    restarted process may fire a slot a second time.
    """

    async def load_state(self, key: str) -> bytes | None: ...

    async def save_state(self, key: str, value: bytes) -> None: ...


@runtime_checkable
class DirectPut(Protocol):
    """A synchronous hand-off of one fresh envelope (in-process transports).

    Used by ``App.publish`` / ``publish_nowait`` when no middleware is
    installed, to skip a coroutine per event.
    """

    def put_one(self, env: Envelope) -> bool:
        """Queue ``env`` (a fresh UUIDv7, never a duplicate) if every group
        has room and return True; else take nothing and return False."""
        ...


@runtime_checkable
class TopicPut(Protocol):
    """``DirectPut`` made once per topic and event type (in-process
    transports): the app keeps what ``putter`` returns for each type it
    publishes and calls it instead of ``put_one``, skipping per event what
    the topic and type settle once (routing, whether the type always fits).
    """

    def putter(self, topic: str, event_type: type) -> Callable[[Envelope], bool] | None:
        """A function with ``put_one``'s contract for fresh envelopes of
        ``topic`` carrying ``event_type`` events and no ``not_before``, or
        None where there is none cheaper. It stays correct for the
        transport's life: after routes change or the transport closes, it
        hands each envelope to ``put_one``."""
        ...


publishing_group: contextvars.ContextVar[tuple[str, asyncio.Task[Any] | None] | None] = (
    contextvars.ContextVar("surge_publishing_group", default=None)
)
"""While a handler's outputs are published, the group whose handler made
them and the task publishing them (else None: a task started meanwhile
inherits the variable, and is told apart by not being that task). A
transport with a bounded buffer lets such outputs into that same group past
its bound rather than wait: room there is made only by that group's
consumer, whose workers may all be waiting on this publish (a
subscription that receives its own outputs, such as one on ``shop.>``
emitting ``shop.done``, would deadlock under a burst)."""


Taker = tuple[
    Callable[[int, Sequence[Delivery]], list[Delivery]], Callable[[Sequence[Delivery]], None]
]


@runtime_checkable
class TakesNow(Protocol):
    """A group's deliveries taken and settled without awaiting (in-process
    transports): a worker that runs out of deliveries settles what its
    runner handled and takes the next batch itself, instead of ending and
    leaving the refill to the consume loop (task switches per batch that
    cost in-process dispatch about a third of its speed; BENCHMARKS.md,
    issue 17). ``consume`` still waits for deliveries when there are none.
    """

    def taker(self, group: str) -> Taker | None:
        """``(settle_take, settle)`` for ``group``, or None where there is
        none (the app asks only for groups it declared).
        ``settle_take(prefetch, deliveries)`` acknowledges
        ``deliveries`` (of ``group``) and returns at once what
        ``consume(group, prefetch=prefetch)`` would yield next, or an empty
        list where it would wait; ``settle(deliveries)`` is ``ack`` done
        before it returns."""
        ...


@runtime_checkable
class Outbox(Protocol):
    """Envelopes written through the caller's own database connection,
    inside its open transaction (the transactional outbox): rolled back,
    they never existed; committed, they are delivered like any publish.

    ``App.publish(event, connection=conn)`` needs it; without it, that call
    raises ``ConfigurationError``.
    """

    async def publish_in(self, connection: Any, envelopes: Sequence[Envelope]) -> None:
        """Write ``envelopes`` through ``connection`` (a driver connection
        to the transport's own database); raises ``ConfigurationError`` for
        a connection this transport cannot write through."""
        ...


@runtime_checkable
class KnowsGroups(Protocol):
    """The transport can tell which declared groups receive a topic, counting
    the groups every process sharing its store declared.

    ``publish(..., mandatory=True)`` needs it (a publish no group receives
    raises ``Unroutable``), and so does the count of unroutable publishes;
    without it, ``mandatory=True`` raises ``NotImplementedError`` and
    nothing is counted.
    """

    async def groups_for(self, topic: str) -> list[str]:
        """The names of the groups declared on this store (by any process,
        running or not) whose topics match ``topic``, at a fresh look."""
        ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a transport can do beyond ``Transport``, resolved once."""

    hands_back: HandsBack | None = None
    key_routing: KeyRouting | None = None
    idle: IdleAware | None = None
    state: StateStore | None = None
    direct_put: DirectPut | None = None
    topic_put: TopicPut | None = None
    takes_now: TakesNow | None = None
    outbox: Outbox | None = None
    groups: KnowsGroups | None = None
    fences: Fences | None = None
    fenced_state: FencedState | None = None

    @property
    def partitions(self) -> int:
        """Partitions of keyed envelopes (0 when the transport has none)."""
        return 0 if self.key_routing is None else self.key_routing.partitions


def capabilities_of(transport: Transport) -> Capabilities:
    """The optional protocols ``transport`` implements (call once it started:
    a transport may learn its partition count from its broker)."""
    return Capabilities(
        hands_back=transport if isinstance(transport, HandsBack) else None,
        key_routing=transport if isinstance(transport, KeyRouting) else None,
        idle=transport if isinstance(transport, IdleAware) else None,
        state=transport if isinstance(transport, StateStore) else None,
        direct_put=transport if isinstance(transport, DirectPut) else None,
        topic_put=transport if isinstance(transport, TopicPut) else None,
        takes_now=transport if isinstance(transport, TakesNow) else None,
        outbox=transport if isinstance(transport, Outbox) else None,
        groups=transport if isinstance(transport, KnowsGroups) else None,
        fences=transport if isinstance(transport, Fences) else None,
        fenced_state=transport if isinstance(transport, FencedState) else None,
    )


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
