"""Transports, chosen by URL; each lives in its own module, imported lazily.

==============  ==========================================================
``memory://``   in-process queues (the default)
``sqlite:///p`` a durable log in one SQLite file, shared by local processes
``redis://``    Redis Streams (``pip install 'surge[redis]'``)
``nats://``     NATS JetStream (``pip install 'surge[nats]'``)
``amqp://``     RabbitMQ quorum queues (``pip install 'surge[amqp]'``)
==============  ==========================================================

``postgresql://`` (or ``postgres://``): PostgreSQL, with a transactional
outbox (``pip install 'surge[postgres]'``).
"""

from __future__ import annotations

import importlib
from typing import Any

from .._errors import ConfigurationError
from .._transport import DeadLetter, Delivery, Transport, TransportStats
from .memory import MemoryTransport

__all__ = (
    "DeadLetter",
    "Delivery",
    "MemoryTransport",
    "Transport",
    "TransportStats",
    "open_transport",
    "register",
)

# scheme -> (module, class name, the extra that brings its dependencies)
_SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "memory": ("surge.transports.memory", "MemoryTransport", None),
    "sqlite": ("surge.transports.sqlite", "SqliteTransport", None),
    "redis": ("surge.transports.redis", "RedisTransport", "redis"),
    "rediss": ("surge.transports.redis", "RedisTransport", "redis"),
    "nats": ("surge.transports.nats", "NatsTransport", "nats"),
    "tls": ("surge.transports.nats", "NatsTransport", "nats"),
    "postgresql": ("surge.transports.postgres", "PostgresTransport", "postgres"),
    "postgres": ("surge.transports.postgres", "PostgresTransport", "postgres"),
    "amqp": ("surge.transports.amqp", "AmqpTransport", "amqp"),
    "amqps": ("surge.transports.amqp", "AmqpTransport", "amqp"),
}


def register(scheme: str, module: str, class_name: str, extra: str | None = None) -> None:
    """Make ``scheme://`` URLs open ``module.class_name`` (for third parties)."""
    _SCHEMES[scheme] = (module, class_name, extra)


def open_transport(url: str, **options: Any) -> Transport:
    """A transport for ``url``; ``options`` go to its constructor."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    entry = _SCHEMES.get(scheme)
    if entry is None:
        raise ConfigurationError(
            f"unknown transport URL {url!r}: use one of "
            + ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        )
    module_name, class_name, extra = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None or module_name in str(exc):
            raise
        raise ImportError(
            f"the {scheme}:// transport needs an extra: pip install 'surge[{extra}]' ({exc})"
        ) from exc
    transport: Transport = getattr(module, class_name)(url, **options)
    return transport
