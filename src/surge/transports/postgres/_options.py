"""The URL and options of ``postgresql://``, checked once, as a frozen value."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..._codec import Codec, MsgpackCodec
from ..._errors import ConfigurationError
from .._partitions import DEFAULT_PARTITIONS

__all__ = ("Options", "parse")

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# name -> (default, least); heartbeat's default is lease / 3
_NUMBERS: dict[str, tuple[float, float]] = {
    "lease": (30.0, 0.001),
    "heartbeat": (-1.0, 0.0),
    "retention": (600.0, 0.0),
    "dedup_window": (600.0, 0.0),
    "poll": (1.0, 0.001),
    "max_pending": (10_000, 1),
    "maintenance": (1.0, 0.001),
    "partitions": (DEFAULT_PARTITIONS, 1),
    "pool": (4, 2),
    "reconnect_timeout": (30.0, 0.0),
    "command_timeout": (30.0, 0.001),
    "batch": (2000, 1),
}


@dataclass(frozen=True, slots=True)
class Options:
    """What a ``postgresql://`` URL and keyword arguments say (see the package)."""

    dsn: str
    """The URL for the driver: our own options taken out."""
    database: str
    schema: str
    lease: float
    heartbeat: float
    retention: float
    dedup_window: float
    poll: float
    max_pending: int
    maintenance: float
    partitions: int
    pool: int
    reconnect_timeout: float
    command_timeout: float
    batch: int
    codec: Codec


def parse(url: str, given: dict[str, Any]) -> Options:
    """The options of ``url`` and ``given`` (keyword arguments win)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"{url!r} is not a postgresql:// or postgres:// URL")
    database = parts.path.lstrip("/")
    if not database:
        raise ConfigurationError(
            f"postgres URL {url!r} names no database: "
            "use postgresql://user@host:5432/DATABASE (surge makes its tables in a schema there)"
        )
    opts: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for k, v in parse_qsl(parts.query):
        if k in _NUMBERS or k == "schema":
            opts[k] = v
        else:
            rest.append((k, v))  # the driver's (sslmode, ...)
    opts.update(given)
    schema = str(opts.pop("schema", "surge"))
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            f"postgres schema={schema!r}: use a lowercase name of letters, digits and _"
        )
    codec = opts.pop("codec", None)
    numbers: dict[str, float] = {}
    for name, (default, least) in _NUMBERS.items():
        raw = opts.pop(name, default)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigurationError(f"postgres option {name}={raw!r} is not a number") from None
        if value < least and not (name == "heartbeat" and value == default):
            raise ConfigurationError(f"postgres option {name}={raw!r} must be at least {least}")
        numbers[name] = value
    if opts:
        raise ConfigurationError(f"unknown postgres options: {sorted(opts)}")
    lease = numbers["lease"]
    heartbeat = lease / 3 if numbers["heartbeat"] < 0 else numbers["heartbeat"]
    if heartbeat >= lease:
        raise ConfigurationError(
            f"postgres heartbeat={heartbeat:g} must be shorter than lease={lease:g} "
            "(or 0, never extend), or leases run out between extensions"
        )
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), ""))
    return Options(
        dsn=dsn,
        database=database,
        schema=schema,
        lease=lease,
        heartbeat=heartbeat,
        retention=numbers["retention"],
        dedup_window=numbers["dedup_window"],
        poll=numbers["poll"],
        max_pending=int(numbers["max_pending"]),
        maintenance=numbers["maintenance"],
        partitions=int(numbers["partitions"]),
        pool=int(numbers["pool"]),
        reconnect_timeout=numbers["reconnect_timeout"],
        command_timeout=numbers["command_timeout"],
        batch=int(numbers["batch"]),
        codec=codec if isinstance(codec, Codec) else MsgpackCodec(),
    )
