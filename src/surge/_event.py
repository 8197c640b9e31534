"""Events, the envelope that carries them, and event ids."""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import TYPE_CHECKING, Any, ClassVar, dataclass_transform

import msgspec

__all__ = (
    "Envelope",
    "Event",
    "derive_id",
    "event_type",
    "id_at",
    "id_for",
    "is_derived",
    "is_event_id",
    "new_id",
)


if TYPE_CHECKING:
    # What type checkers see: a frozen, keyword-only dataclass-like base, so
    # user subclasses need no ``frozen=True`` of their own to type-check.
    @dataclass_transform(
        frozen_default=True, kw_only_default=True, field_specifiers=(msgspec.field,)
    )
    class Event:
        """Base class of every event: a frozen, typed msgspec Struct."""

        __topic__: ClassVar[str]
        __key__: ClassVar[str | None]

        def __init_subclass__(cls, **kwargs: Any) -> None: ...

else:

    class Event(msgspec.Struct, frozen=True, kw_only=True):
        """Base class of every event: a frozen, typed msgspec Struct.

        The topic defaults to the class name; set ``__topic__`` in the class body
        to choose another (``__topic__ = "orders.placed"``). ``__key__`` names
        the field that orders events of this type (``__key__ = "order_id"``):
        subscriptions default to it, and every publisher sets the envelope's
        key from it, so order holds across processes (see docs/guarantees.md).
        """

        __topic__: ClassVar[str] = ""
        __key__: ClassVar[str | None] = None

        def __init_subclass__(cls, **kwargs: Any) -> None:
            super().__init_subclass__(**kwargs)
            if "__topic__" not in cls.__dict__:
                cls.__topic__ = cls.__name__
            _TYPES[cls.__topic__] = cls


_TYPES: dict[str, type[Event]] = {}


def event_type(topic: str) -> type[Event] | None:
    """The most recently defined event class for ``topic``, if any."""
    return _TYPES.get(topic)


class Envelope(msgspec.Struct, gc=False):
    """What travels on a transport: an event and where it came from.

    In process the ``event`` is passed as an object; on the wire it is
    encoded into ``body`` and decoded again, against the type declared by the
    subscription, at the consuming edge.
    """

    id: str
    topic: str
    key: str | None = None
    time: float = 0.0
    headers: dict[str, str] | None = None
    event: Any = None
    body: bytes | None = None
    not_before: float | None = None
    """Wall-clock time (epoch seconds) before which no group may receive it."""


# --- ids ---------------------------------------------------------------------
# UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 bits that start
# random each millisecond and count up within it, so ids from one process are
# strictly increasing and ids across processes sort by time.

_VERSION_VARIANT = (0x7 << 76) | (0x2 << 62)
# Ids derived from another (handler outputs, trigger firings) are UUIDv8:
# the same inputs always give the same id, and only such ids can repeat, so
# a transport may skip its dedup check for any other id.
_DERIVED_VARIANT = (0x8 << 76) | (0x2 << 62)
_RAND_MASK = (1 << 74) - 1
_LOW62 = (1 << 62) - 1
_last_ms = 0
_base = 0
_seq = 0
_time_ns = time.time_ns
# Ids are made 32 at a time, reading the clock once (as often as the id
# generator always read it: every 32nd id), and handed out by popping this
# list, last first: App.publish pops it inline, a C call rather than a
# Python one per event (issue 17: the in-process hot path). A block shares
# its first 30 hex digits (the counter is aligned to 256 at each refresh),
# so an id is that stem plus two digits from a table, not an int formatted.
ID_BLOCK = 32
ids: list[str] = []
_HEX2 = tuple(f"{i:02x}" for i in range(256))


def new_id() -> str:
    """A new time-sortable event id: a UUIDv7 as 32 lowercase hex digits."""
    return ids.pop() if ids else refill_ids()


def refill_ids() -> str:
    """Make the next block of ids; return its first and keep the rest in
    :data:`ids` (popped from the end, so in increasing order)."""
    global _seq
    ms = _time_ns() // 1_000_000
    if ms > _last_ms:
        _refresh(ms)
    value = _base + _seq
    _seq += ID_BLOCK
    stem = f"{value >> 8:030x}"
    low = value & 255
    block = [stem + h for h in _HEX2[low + ID_BLOCK - 1 : low : -1]]
    ids[:] = block
    return stem + _HEX2[low]


def _refresh(ms: int) -> None:
    global _last_ms, _base, _seq
    _last_ms = ms
    rand = int.from_bytes(os.urandom(10), "big") & _RAND_MASK
    # The low bits count up from a random start within the millisecond;
    # clearing their top bits leaves room to count without carrying, and
    # their lowest 8 lets a block share its stem.
    low = rand & (_LOW62 >> 24) & ~255
    _base = (ms << 80) | _VERSION_VARIANT | ((rand >> 62) << 64) | low
    _seq = 0


_refresh(_time_ns() // 1_000_000)


def derive_id(parent: str, position: int | str) -> str:
    """The id of the ``position``-th event published while handling ``parent``.

    It keeps the parent's time prefix (so it sorts beside its parent) and is
    otherwise a hash, so a redelivered handler republishes the same ids and a
    transport's dedup window drops the copies.
    """
    digest = hashlib.blake2b(f"{parent}/{position}".encode(), digest_size=10).digest()
    tail = int.from_bytes(digest, "big") & _RAND_MASK
    value = (int(parent[:12], 16) << 80) | _DERIVED_VARIANT
    value |= ((tail >> 62) << 64) | (tail & _LOW62)
    return f"{value:032x}"


def is_derived(event_id: str) -> bool:
    """Whether ``event_id`` was derived (and so may be published again)."""
    return event_id[12:13] == "8"


def id_for(key: str) -> str:
    """The derived event id of an idempotency key: the same ``key`` always
    gives the same id, so ``app.publish(event, id=id_for(key))`` retried
    publishes one event within the transport's dedup window.

    Unlike other ids its first 48 bits are a hash too, not a time: a retry
    cannot know when the first attempt was made. Scope the key yourself
    (``f"orders:{client}:{key}"``): one key names one event everywhere.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=16, person=b"surge.id_for").digest()
    bits = int.from_bytes(digest, "big")
    tail = bits & _RAND_MASK
    value = ((bits >> 80) << 80) | _DERIVED_VARIANT | ((tail >> 62) << 64) | (tail & _LOW62)
    return f"{value:032x}"


def is_event_id(value: object) -> bool:
    """Whether ``value`` has the form of an event id (32 lowercase hex digits)."""
    return isinstance(value, str) and len(value) == 32 and _HEX.fullmatch(value) is not None


_HEX = re.compile(r"[0-9a-f]{32}")


def id_at(name: str, when: float) -> str:
    """A deterministic id for something scheduled at ``when`` (epoch seconds)."""
    ms = int(when * 1000)
    return derive_id(f"{ms:012x}{name}", "at")
