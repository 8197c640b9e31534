"""The options of ``sqlite://``, read from the URL and keyword arguments and
checked once (the table is in the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..._codec import Codec, MsgpackCodec
from ..._errors import ConfigurationError
from .._partitions import DEFAULT_PARTITIONS

__all__ = ("Options", "unopenable")


def unopenable(path: Path, reason: object) -> str:
    """Why the database at ``path`` cannot be opened, naming the absolute
    path tried and the two URL forms (a relative path is the usual slip:
    ``sqlite:///tmp/x.db`` is ``tmp/x.db`` under the working directory)."""
    full = path.absolute()
    text = f"cannot open the sqlite database {full}: {reason}"
    if not full.parent.is_dir():
        text += f" (the directory {full.parent} does not exist)"
    form = "relative to the working directory" if not path.is_absolute() else "absolute"
    return (
        f"{text}; the URL named a path {form}: sqlite:///x.db is x.db in the working "
        "directory, sqlite:////tmp/x.db is /tmp/x.db"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """A transport's checked options."""

    path: Path
    synchronous: str
    lease: float
    heartbeat: float
    retention: float
    dedup_window: float
    poll: float
    busy_timeout: float
    check: str
    max_size: int | None
    max_pending: int
    maintenance: float
    partitions: int
    wakeups: bool
    codec: Codec

    @classmethod
    def parse(cls, url: str, given: dict[str, Any]) -> Options:
        """The options of ``url``'s query string, overridden by ``given``;
        ``ConfigurationError`` names the first that does not fit."""
        parts = urlsplit(url)
        if parts.scheme != "sqlite" or not parts.path or parts.netloc:
            raise ConfigurationError(
                f"sqlite URL {url!r}: use sqlite:///relative.db or sqlite:////absolute/path.db"
            )
        path = parts.path[1:]
        if not path or path == ":memory:":
            raise ConfigurationError(f"sqlite URL {url!r} names no file (processes share a file)")
        opts: dict[str, Any] = dict(parse_qsl(parts.query))
        opts.update(given)
        sync = str(opts.pop("synchronous", "full")).lower()
        if sync not in ("full", "normal"):
            raise ConfigurationError(f"sqlite synchronous={sync!r}: use full or normal")
        lease = _number(opts, "lease", 30.0, least=0.001)
        heartbeat = _number(opts, "heartbeat", lease / 3)
        if heartbeat >= lease:
            raise ConfigurationError(
                f"sqlite heartbeat={heartbeat:g} must be shorter than lease={lease:g} "
                "(or 0, never extend), or leases run out between extensions"
            )
        retention = _number(opts, "retention", 600.0)
        dedup_window = _number(opts, "dedup_window", 600.0)
        poll = _number(opts, "poll", 0.025, least=0.001)
        busy = _number(opts, "busy_timeout", 5.0)
        check = str(opts.pop("check", "quick")).lower()
        if check not in ("quick", "full", "off"):
            raise ConfigurationError(f"sqlite check={check!r}: use quick, full or off")
        max_size = _number(opts, "max_size", 0) or None
        max_pending = int(_number(opts, "max_pending", 10_000, least=1))
        maintenance = _number(opts, "maintenance", 1.0, least=0.001)
        partitions = int(_number(opts, "partitions", DEFAULT_PARTITIONS, least=1))
        wakeups = opts.pop("wakeups", True)
        if isinstance(wakeups, str):
            if wakeups.lower() not in ("true", "false", "1", "0", "on", "off"):
                raise ConfigurationError(f"sqlite wakeups={wakeups!r}: use true or false")
            wakeups = wakeups.lower() in ("true", "1", "on")
        elif not isinstance(wakeups, bool):
            raise ConfigurationError(f"sqlite wakeups={wakeups!r}: use true or false")
        codec = opts.pop("codec", None)
        if opts:
            raise ConfigurationError(f"unknown sqlite options: {sorted(opts)}")
        return cls(
            path=Path(path),
            synchronous=sync,
            lease=lease,
            heartbeat=heartbeat,
            retention=retention,
            dedup_window=dedup_window,
            poll=poll,
            busy_timeout=busy,
            check=check,
            max_size=None if max_size is None else int(max_size),
            max_pending=max_pending,
            maintenance=maintenance,
            partitions=partitions,
            wakeups=wakeups,
            codec=codec if isinstance(codec, Codec) else MsgpackCodec(),
        )


def _number(opts: dict[str, Any], name: str, default: float, *, least: float = 0.0) -> float:
    raw = opts.pop(name, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigurationError(f"sqlite option {name}={raw!r} is not a number") from None
    if value < least:
        raise ConfigurationError(f"sqlite option {name}={raw!r} must be at least {least}")
    return value
