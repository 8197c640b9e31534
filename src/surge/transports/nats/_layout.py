"""Names on the server: subjects, streams, consumers and buckets of one
``stream`` (see the table in ``surge.transports.nats``), and the two streams
ensured at start."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from ..._errors import ConfigurationError, TransportError

__all__ = ("UNSAFE", "Layout", "consumer_name", "partition_durable")

UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

_PARTITIONS = "surge_partitions"  # the stream's metadata key for the partition count


def consumer_name(group: str) -> str:
    """A valid, stable durable name (and subject token) for ``group``."""
    digest = hashlib.blake2b(group.encode(), digest_size=4).hexdigest()
    return f"{UNSAFE.sub('_', group)[:48]}-{digest}"


def partition_durable(durable: str, part: int) -> str:
    """The consumer name of partition ``part`` of the group named ``durable``."""
    return f"{durable}-p{part}"


@dataclass(frozen=True, slots=True)
class Layout:
    """The names of one app's stream and what hangs off it, and on how many
    servers of a cluster each is kept."""

    stream: str
    replicas: int = 1
    """Copies of the streams and buckets (``?replicas=3`` on a 3-node cluster)."""

    @property
    def dlq_stream(self) -> str:
        return f"{self.stream}_dlq"

    @property
    def released_stream(self) -> str:
        return f"{self.stream}_released"

    @property
    def parts_bucket(self) -> str:
        return f"{self.stream}_parts"

    @property
    def state_bucket(self) -> str:
        return f"{self.stream}_state"

    def subject(self, topic: str) -> str:
        """Where unkeyed envelopes of ``topic`` go."""
        return f"{self.stream}.{topic}"

    def keyed(self, part: int | str, topic: str) -> str:
        """Where keyed envelopes of ``topic`` in partition ``part`` go
        (``part="*"``: a filter for every partition)."""
        return f"{self.stream}_k.{part}.{topic}"

    def replay(self, durable: str) -> str:
        """The subject only the shared consumer of group ``durable`` reads."""
        return f"{self.stream}_replay.{durable}"

    def dead(self, durable: str) -> str:
        """The dead letters of group ``durable`` (``">"``: of every group)."""
        return f"{self.stream}_dlq.{durable}"

    def released(self, consumer: str, seq: int) -> str:
        """Where the hand-back count of message ``seq`` to JetStream consumer
        ``consumer`` is kept (``_released``)."""
        return f"{self.stream}_released.{consumer}.{seq}"

    def topic_of(self, subject: str) -> str:
        """The topic of a message from its subject."""
        keyed = subject.startswith(f"{self.stream}_k.")
        return subject.split(".", 2 if keyed else 1)[-1]

    async def ensure_streams(
        self, js: Any, *, dedup_window: float, max_age: float | None, partitions: int, asked: bool
    ) -> int:
        """Create or update the events stream, the dead-letter stream and the
        stream of hand-back counts; the partition count of the events stream
        (``partitions`` for a new one; a stream's count never changes under
        its data: a different one ``asked`` for is refused)."""
        partitions = await _ensure_stream(
            js,
            StreamConfig(
                name=self.stream,
                subjects=[f"{self.stream}.>", f"{self.stream}_k.>", f"{self.stream}_replay.>"],
                storage=StorageType.FILE,
                retention=RetentionPolicy.INTEREST,
                duplicate_window=dedup_window,
                max_age=max_age,
                metadata={_PARTITIONS: str(partitions)},
                num_replicas=self.replicas,
            ),
            partitions=partitions,
            asked=asked,
        )
        await _ensure_stream(
            js,
            StreamConfig(
                name=self.dlq_stream,
                subjects=[self.dead(">")],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                duplicate_window=dedup_window,
                num_replicas=self.replicas,
            ),
        )
        await _ensure_stream(
            js,
            StreamConfig(
                name=self.released_stream,
                subjects=[f"{self.released_stream}.>"],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                max_msgs_per_subject=1,
                max_age=max_age,
                duplicate_window=dedup_window,
                num_replicas=self.replicas,
            ),
        )
        return partitions


_NO_SUITABLE_PEERS = 10005
"""JetStream's error code for 'no suitable peers for placement'."""


class PeersOffline(TransportError):
    """A replicated stream cannot be placed because too few of the cluster's
    nodes are online: for a moment after a node (re)started, or for good on a
    cluster smaller than ``replicas``."""


async def _ensure_stream(
    js: Any, config: StreamConfig, *, partitions: int | None = None, asked: bool = False
) -> int:
    """Create or update one stream; the events stream (``partitions`` given)
    also carries the partition count in its metadata."""
    name = config.name
    interest = partitions is not None
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            error = f"cannot create stream {name!r}: {exc.description}"
            if exc.err_code == _NO_SUITABLE_PEERS:
                raise PeersOffline(error) from exc
            raise TransportError(error) from exc
        return partitions or 0
    metadata = info.config.metadata or {}
    stored = metadata.get(_PARTITIONS)
    if partitions is not None and stored is not None and int(stored) != partitions:
        if asked:
            raise ConfigurationError(
                f"stream {name!r} has {stored} partitions, not the "
                f"{partitions} asked for: use another stream to change it"
            )
        partitions = int(stored)
    if (
        set(info.config.subjects or ()) != set(config.subjects or ())
        or info.config.duplicate_window != config.duplicate_window
        or (info.config.num_replicas or 1) != config.num_replicas
        or (interest and (info.config.max_age or None) != config.max_age)
        or (interest and stored is None)
    ):
        config.retention = info.config.retention  # retention cannot change on update
        if partitions is not None:
            config.metadata = {**metadata, _PARTITIONS: str(partitions)}
        await js.update_stream(config)
    return partitions or 0
