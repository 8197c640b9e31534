"""The NATS transport's settings: one frozen value, read from keywords and
the URL's query, shared by every part of the transport."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..._errors import ConfigurationError
from ._layout import UNSAFE

__all__ = ("NatsOptions",)


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsOptions:
    """What the transport was asked for, and the timings derived from it."""

    stream: str = "surge"
    lease: float = 30.0
    dedup_window: float = 120.0
    max_pending: int = 4096
    max_deliver: int = 100
    max_ack_pending: int = 20_000
    heartbeat: float = 1.0
    ack_timeout: float = 5.0
    publish_timeout: float = 60.0
    ephemeral_ttl: float = 60.0
    max_age: float | None = None
    partitions: int | None = None
    """Asked for (None: the stream's, or the default for a new stream)."""
    extend_leases: bool = True
    replicas: int = 1
    """Copies of the streams and key-value buckets in a JetStream cluster."""

    @classmethod
    def parse(cls, url: str, **given: Any) -> tuple[str, NatsOptions]:
        """(the URL without its query, the options): simple options may come
        in the query, and win there (``nats://host:4222?stream=shop&lease=10``)."""
        url, _, query = url.partition("?")
        q = dict(urllib.parse.parse_qsl(query))
        kinds: dict[str, Any] = {
            "stream": str,
            "lease": float,
            "dedup_window": float,
            "heartbeat": float,
            "ack_timeout": float,
            "publish_timeout": float,
            "max_pending": int,
            "max_deliver": int,
            "max_ack_pending": int,
            "max_age": float,
            "partitions": int,
            "replicas": int,
        }
        try:
            for name, kind in kinds.items():
                if name in q:
                    given[name] = kind(q.pop(name))
        except ValueError as exc:
            raise ConfigurationError(f"bad option in the NATS URL query {query!r}: {exc}") from None
        if q:
            raise ConfigurationError(f"unknown options in the NATS URL: {sorted(q)}")
        options = cls(**given)
        if UNSAFE.search(options.stream):
            raise ConfigurationError(
                f"stream name {options.stream!r}: use letters, digits, _ and -"
            )
        if (
            min(options.lease, options.heartbeat, options.ack_timeout, options.publish_timeout) <= 0
            or options.max_pending < 1
        ):
            raise ConfigurationError(
                "lease, heartbeat, ack_timeout, publish_timeout and max_pending must be positive"
            )
        if not 1 <= options.replicas <= 5:
            raise ConfigurationError("replicas must be 1 to 5 (JetStream's limit)")
        if options.partitions is not None and options.partitions < 1:
            raise ConfigurationError("partitions must be at least 1")
        return url, options

    @property
    def pull_expires(self) -> float:
        """How long a pull request of a shared consumer lives: at most half a
        lease, so a consumer that stops asking (its process hangs) stops
        receiving before its deliveries time out and go elsewhere."""
        return min(5 * self.heartbeat, self.lease / 2)

    @property
    def pull_heartbeat(self) -> float:
        """Idle heartbeats of a shared pull: 4 per request at least."""
        return min(self.heartbeat, self.pull_expires / 4)

    @property
    def part_expires(self) -> float:
        """A partition's pull is short, and ends with a status rather than
        heartbeats: a partition to give up (or a stopping app) waits for it."""
        return min(self.pull_expires, 1.0)
