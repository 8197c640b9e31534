"""Events, the envelope that carries them, and event ids."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, dataclass_transform

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
    "upcaster",
)

VERSION_FIELD = "_v"
"""The field that carries an event's ``__version__`` in its payload (only
for versions above 1: a payload without it is version 1)."""

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the fields of a version-N payload into those of version N+1."""

U = TypeVar("U", bound=Upcaster)


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
        __version__: ClassVar[int]
        __upcasters__: ClassVar[dict[int, Upcaster]]

        def __init_subclass__(cls, **kwargs: Any) -> None: ...

else:

    class _EventMeta(type(msgspec.Struct)):  # type: ignore[misc]
        """Puts ``__version__`` (above 1) into the payload: the class is
        a msgspec tagged struct whose tag field is ``_v``."""

        def __new__(mcls, name: str, bases: Any, ns: dict[str, Any], **kw: Any) -> Any:
            version = ns.get("__version__")
            if version is not None:
                if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                    raise TypeError(f"{name}.__version__ = {version!r}: give an int >= 1")
                if version > 1:
                    kw.setdefault("tag_field", VERSION_FIELD)
                    kw.setdefault("tag", version)
            return super().__new__(mcls, name, bases, ns, **kw)

    class Event(msgspec.Struct, frozen=True, kw_only=True, metaclass=_EventMeta):
        """Base class of every event: a frozen, typed msgspec Struct.

        The topic defaults to the class name; set ``__topic__`` in the class body
        to choose another (``__topic__ = "orders.placed"``). ``__key__`` names
        the field that orders events of this type (``__key__ = "order_id"``):
        subscriptions default to it, and every publisher sets the envelope's
        key from it, so order holds across processes (see docs/guarantees.md).
        ``__version__`` (default 1) is the version of its fields: payloads of
        earlier versions are turned into this one by the type's upcasters
        (:func:`upcaster`) when they are decoded.
        """

        __topic__: ClassVar[str] = ""
        __key__: ClassVar[str | None] = None
        __version__: ClassVar[int] = 1
        __upcasters__: ClassVar[dict[int, Upcaster]] = {}

        def __init_subclass__(cls, **kwargs: Any) -> None:
            super().__init_subclass__(**kwargs)
            if "__topic__" not in cls.__dict__:
                cls.__topic__ = cls.__name__
            cls.__upcasters__ = {}
            _TYPES[cls.__topic__] = cls


_TYPES: dict[str, type[Event]] = {}


def upcaster(event_type: type[Event], *, from_version: int) -> Callable[[U], U]:
    """Register the decorated function as the upcaster of ``event_type``'s
    payloads from ``from_version`` to ``from_version + 1``: it takes the
    payload's fields (a dict, without the version) and returns the next
    version's. A payload of version N is decoded through the upcasters of
    N, N+1, ... up to the type's ``__version__``."""
    if not (isinstance(event_type, type) and issubclass(event_type, Event)):
        raise TypeError(f"upcaster({event_type!r}): give an Event subclass")
    if not 1 <= from_version < event_type.__version__:
        raise ValueError(
            f"upcaster({event_type.__name__}, from_version={from_version}): "
            f"{event_type.__name__} is version {event_type.__version__}, so give 1 to "
            f"{event_type.__version__ - 1}"
        )

    def register(fn: U) -> U:
        event_type.__upcasters__[from_version] = fn
        return fn

    return register


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
