"""The options of the Redis transport: keywords, overridden by the URL's
query string (``redis://h/0?lease=5``), validated once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..._errors import ConfigurationError

__all__ = ("RedisOptions",)

# Options that may be given in the URL's query string (``?lease=5``).
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "prefix": str,
    "lease": float,
    "heartbeat": float,
    "block": float,
    "dedup_window": float,
    "max_len": int,
    "batch": int,
    "buffer": int,
    "poll": float,
    "reconnect_timeout": float,
    "partitions": int,
    "wait": int,
    "wait_timeout": float,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisOptions:
    """What ``RedisTransport``'s docstring describes, resolved and checked.

    ``redis_url`` is the URL without the options above (what redis-py
    gets); ``partitions`` is the count asked for (None: what the prefix
    has, else the default); ``block`` is capped at half a lease.
    """

    url: str
    redis_url: str
    prefix: str
    lease: float
    heartbeat: float
    block: float
    dedup_window: int
    max_len: int | None
    batch: int
    buffer: int
    poll: float
    reconnect_timeout: float
    partitions: int | None
    wait: int = 0
    """Replicas that must confirm each publish and ack (``WAIT``); 0: none."""
    wait_timeout: float = 1.0
    """Seconds one ``WAIT`` blocks; it is repeated until ``reconnect_timeout``."""

    @classmethod
    def parse(
        cls,
        url: str,
        *,
        prefix: str,
        lease: float,
        heartbeat: float | None,
        block: float,
        dedup_window: float,
        max_len: int | None,
        batch: int,
        buffer: int,
        poll: float,
        reconnect_timeout: float,
        partitions: int | None,
        wait: int = 0,
        wait_timeout: float = 1.0,
    ) -> RedisOptions:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"{url!r} is not a redis:// or rediss:// URL")
        options: dict[str, Any] = {}
        rest: list[tuple[str, str]] = []
        for k, v in parse_qsl(parts.query):
            if k in _URL_OPTIONS:
                try:
                    options[k] = _URL_OPTIONS[k](v)
                except ValueError:
                    raise ConfigurationError(f"{url!r}: {k}={v!r} is not valid") from None
            else:
                rest.append((k, v))
        prefix = options.get("prefix", prefix)
        lease = options.get("lease", lease)
        heartbeat = options.get("heartbeat", heartbeat)
        block = options.get("block", block)
        dedup_window = options.get("dedup_window", dedup_window)
        max_len = options.get("max_len", max_len)
        batch = options.get("batch", batch)
        buffer = options.get("buffer", buffer)
        poll = options.get("poll", poll)
        reconnect_timeout = options.get("reconnect_timeout", reconnect_timeout)
        partitions = options.get("partitions", partitions)
        wait = options.get("wait", wait)
        wait_timeout = options.get("wait_timeout", wait_timeout)
        if wait < 0 or wait_timeout <= 0:
            raise ConfigurationError("wait must be >= 0 and wait_timeout positive")
        if partitions is not None and partitions < 1:
            raise ConfigurationError("partitions must be at least 1")
        if lease <= 0 or block <= 0 or poll <= 0 or dedup_window < 1:
            raise ConfigurationError("lease, block and poll must be positive, dedup_window >= 1")
        if batch < 1 or buffer < 1 or (max_len is not None and max_len < 1):
            raise ConfigurationError("batch, buffer and max_len must be at least 1")
        if not prefix or ":" in prefix:
            raise ConfigurationError(f"prefix {prefix!r}: a non-empty name without ':'")
        return cls(
            url=url,
            redis_url=urlunsplit(parts._replace(query=urlencode(rest))),
            prefix=prefix,
            lease=lease,
            heartbeat=lease / 3 if heartbeat is None else heartbeat,
            block=min(block, lease / 2),
            dedup_window=int(dedup_window),
            max_len=max_len,
            batch=batch,
            buffer=buffer,
            poll=poll,
            reconnect_timeout=reconnect_timeout,
            partitions=partitions,
            wait=wait,
            wait_timeout=wait_timeout,
        )

    @property
    def lease_ms(self) -> int:
        return int(self.lease * 1000)

    @property
    def alive_ms(self) -> int:
        """How long an ephemeral group outlives its last renewal (every
        lease/3 while consumed): then the next process to start deletes it."""
        return int(max(10 * self.lease, 1.0) * 1000)
