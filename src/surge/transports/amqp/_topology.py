"""What surge declares on RabbitMQ, and the names and routing keys it uses.

For ``prefix="surge"`` (the default), in the URL's vhost:

==============================  ==============================================
exchange ``surge`` (topic)      every event. Routing key ``u.<topic>`` for an
                                unkeyed envelope, ``k.<p>.<topic>`` for one
                                whose key hashes to partition p. Surge's
                                ``*`` is AMQP's ``*``; a final ``>`` (one or
                                more tokens) becomes ``*.#``
queue ``surge.g.<group>``       quorum; the group's unkeyed events
queue ``surge.g.<group>.p<p>``  quorum, ``x-single-active-consumer``; the
                                group's keyed events of partition p
exchange ``surge.delay`` (topic) delayed events: routing key
                                ``<ms>.x.<routing key>`` (to every group, a
                                ``not_before`` publish) or ``<ms>.q.<queue>``
                                (one queue, a retry)
queue ``surge.delay.<ms>``      classic, ``x-message-ttl`` = ms, bound
                                ``<ms>.#``; what expires is dead-lettered,
                                routing key unchanged, to ``surge.retry``
exchange ``surge.retry`` (topic) where delayed events come due: each group
                                queue is bound ``*.x.<its binding>`` and
                                ``*.q.<its name>``
exchange ``surge.dlx`` (fanout) the quorum queues' dead-letter exchange
                                (``x-delivery-limit`` exceeded)
queue ``surge.dlq``             quorum; dead letters of every group
queue ``surge.state.<key>``     quorum, ``x-max-length`` 1: the last value
==============================  ==============================================

Why per-delay TTL queues rather than the delayed-message exchange: that
plugin is not part of RabbitMQ (Debian's package lacks it), keeps its
schedule in one node's Mnesia table (not replicated) and is documented as
unfit for large numbers of delayed messages. TTL queues are core RabbitMQ;
delays are rounded up to two significant digits (never early, at most 10%
late), so a few dozen queues serve every backoff, and an unused one deletes
itself (``x-expires``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import aiormq

from ..._clock import Clock
from ..._errors import ConfigurationError
from ..._transport import topic_matches

__all__ = ("Topology", "binding_key", "delay_bucket")

_TOKEN = re.compile(r"^[^.*#>\s]+$")


def binding_key(pattern: str) -> str:
    """Surge's topic pattern as an AMQP topic binding key."""
    words = pattern.split(".")
    for i, w in enumerate(words):
        if w == "*" or (w == ">" and i == len(words) - 1):
            continue
        if not _TOKEN.match(w):
            raise ConfigurationError(
                f"topic {pattern!r}: tokens must be non-empty, without spaces, "
                "'#', or '*' / '>' inside a word"
            )
    if words[-1] == ">":
        words[-1:] = ["*", "#"]
    return ".".join(words)


def delay_bucket(delay: float) -> int:
    """``delay`` (s) in ms, rounded up to two significant digits (>= 1 ms)."""
    ms = max(1, math.ceil(delay * 1000))
    if ms < 100:
        return ms
    scale = 10 ** (len(str(ms)) - 2)
    return int(math.ceil(ms / scale) * scale)


class GroupSpec:
    """One declared group: its queues and what it listens to."""

    __slots__ = ("bindings", "ephemeral", "name", "partitions", "queue", "topics")

    def __init__(self, name: str, queue: str, *, ephemeral: bool, partitions: int) -> None:
        self.name = name
        self.queue = queue
        self.ephemeral = ephemeral
        self.partitions = 0 if ephemeral else partitions
        self.topics: list[str] = []
        self.bindings: list[str] = []

    def partition_queue(self, p: int) -> str:
        return f"{self.queue}.p{p}"

    @property
    def queues(self) -> list[str]:
        return [self.queue, *(self.partition_queue(p) for p in range(self.partitions))]

    def matches(self, topic: str) -> bool:
        return any(topic_matches(t, topic) for t in self.topics)


class Topology:
    """Declares exchanges and queues, once per connection, and names them."""

    def __init__(
        self,
        prefix: str,
        *,
        partitions: int,
        max_deliver: int,
        clock: Clock,
        delay_expiry: float = 600.0,
    ) -> None:
        self.prefix = prefix
        self.partitions = partitions
        self.max_deliver = max_deliver
        self.clock = clock
        self.events = prefix
        self.delay = f"{prefix}.delay"
        self.retry = f"{prefix}.retry"
        self.dlx = f"{prefix}.dlx"
        self.dlq = f"{prefix}.dlq"
        self.delay_expiry = delay_expiry
        self.groups: dict[str, GroupSpec] = {}
        # delay bucket (ms) -> clock time it was last declared (which resets
        # its x-expires timer)
        self._delays: dict[int, float] = {}

    # --- names --------------------------------------------------------------
    def group_queue(self, group: str) -> str:
        return f"{self.prefix}.g.{group}"

    def state_queue(self, key: str) -> str:
        return f"{self.prefix}.state.{key}"

    def routing_key(self, topic: str, partition: int | None) -> str:
        return f"u.{topic}" if partition is None else f"k.{partition}.{topic}"

    def group_of_queue(self, queue: str) -> str:
        """The group a queue belongs to (for dead letters the broker made)."""
        base = queue.removeprefix(f"{self.prefix}.g.")
        m = re.match(r"^(.*)\.p\d+$", base)
        if m and m.group(1) in self.groups:
            return m.group(1)
        if base in self.groups:
            return base
        return m.group(1) if m and self.partitions else base

    def local_groups(self, topic: str) -> list[GroupSpec]:
        """Groups declared by this process that receive ``topic``."""
        return [g for g in self.groups.values() if g.matches(topic)]

    # --- declaring ------------------------------------------------------------
    async def declare_base(self, ch: aiormq.abc.AbstractChannel) -> None:
        """The exchanges and the dead-letter queue (idempotent)."""
        args: dict[str, Any] = {"x-surge-partitions": self.partitions}
        await ch.exchange_declare(self.events, exchange_type="topic", durable=True, arguments=args)
        await ch.exchange_declare(self.delay, exchange_type="topic", durable=True)
        await ch.exchange_declare(self.retry, exchange_type="topic", durable=True)
        await ch.exchange_declare(self.dlx, exchange_type="fanout", durable=True)
        await ch.queue_declare(self.dlq, durable=True, arguments={"x-queue-type": "quorum"})
        await ch.queue_bind(self.dlq, self.dlx, routing_key="")

    def group(self, name: str, *, ephemeral: bool) -> GroupSpec:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = GroupSpec(
                name, self.group_queue(name), ephemeral=ephemeral, partitions=self.partitions
            )
        return g

    def _queue_args(self, *, single: bool) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.dlx,
            # A safety net against an event that kills its worker every
            # time; retries and dead letters are the runner's.
            "x-delivery-limit": self.max_deliver,
        }
        if single:
            args["x-single-active-consumer"] = True
        return args

    async def declare_group(
        self, ch: aiormq.abc.AbstractChannel, g: GroupSpec, topics: Sequence[str]
    ) -> None:
        """Queues of ``g`` and their bindings for ``topics`` (idempotent)."""
        keys = [binding_key(t) for t in topics]
        if g.ephemeral:
            await ch.queue_declare(g.queue, exclusive=True, auto_delete=True)
        else:
            await ch.queue_declare(g.queue, durable=True, arguments=self._queue_args(single=False))
            for p in range(g.partitions):
                await ch.queue_declare(
                    g.partition_queue(p), durable=True, arguments=self._queue_args(single=True)
                )
        for q in g.queues:
            await ch.queue_bind(q, self.retry, routing_key=f"*.q.{q}")
        for key in keys:
            routes = [(g.queue, f"u.{key}")]
            if g.ephemeral:  # never partitioned: keyed envelopes too
                routes.append((g.queue, f"k.*.{key}"))
            routes += [(g.partition_queue(p), f"k.{p}.{key}") for p in range(g.partitions)]
            for q, rk in routes:
                await ch.queue_bind(q, self.events, routing_key=rk)
                await ch.queue_bind(q, self.retry, routing_key=f"*.x.{rk}")
        for t in topics:
            if t not in g.topics:
                g.topics.append(t)
        g.bindings = [binding_key(t) for t in g.topics]

    async def redeclare(self, ch: aiormq.abc.AbstractChannel) -> None:
        """Everything this process declared, again (after a reconnection:
        exclusive queues died with the connection, a restarted node may have
        lost what was not durable)."""
        await self.declare_base(ch)
        for g in self.groups.values():
            await self.declare_group(ch, g, list(g.topics))
        self._delays.clear()

    def delay_queue(self, ms: int) -> str:
        return f"{self.prefix}.delay.{ms}"

    async def delay_route(self, ch: aiormq.abc.AbstractChannel, delay: float) -> int:
        """The bucket (ms) for ``delay``, its queue declared recently enough
        that it cannot expire before what is published now comes due."""
        ms = delay_bucket(delay)
        now = self.clock.monotonic()
        last = self._delays.get(ms)
        if last is None or now - last > self.delay_expiry / 2:
            q = self.delay_queue(ms)
            await ch.queue_declare(
                q,
                durable=True,
                arguments={
                    "x-message-ttl": ms,
                    "x-dead-letter-exchange": self.retry,
                    "x-expires": ms + int(self.delay_expiry * 1000),
                },
            )
            await ch.queue_bind(q, self.delay, routing_key=f"{ms}.#")
            self._delays[ms] = now
        return ms

    @property
    def delay_queues(self) -> list[str]:
        return [self.delay_queue(ms) for ms in self._delays]
