"""``Idempotency-Key``: a client's retry of a POST makes one event, not two.

The key becomes the event's id: a derived id (``surge.id_for``) of the
route, the caller's principal (when the route has ``auth=``) and the key,
so every attempt publishes the same id and the transport drops the repeats
within its dedup window (docs/guarantees.md has each transport's). That is
where the guarantee lives, and why it holds across processes wherever the
transport's dedup is shared (sqlite, redis, nats, postgres) and within one
process on memory and amqp.

A publish route's answer, ``202 {"id": ...}``, is the same for every attempt
by construction. A reply route's answer exists only in the process that
waited for it, so each process keeps the answers it gave for a while
(:class:`Answers`: bounded, with a time to live); a retry that reaches
another process, or comes later, is published again, dropped as a
duplicate, and waits its ``timeout`` out (504): the event is still handled
once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .._event import id_for

__all__ = ("HEADER", "Answers", "idempotent_id")

HEADER = b"idempotency-key"
MAX_KEY = 255


def idempotent_id(raw: list[tuple[bytes, bytes]], route: str, principal: str) -> str | None:
    """The event id an ``Idempotency-Key`` header asks for, or None without
    one. Raises ``ValueError`` (answered 400) for a key that is empty, longer
    than 255 characters or not printable ASCII."""
    found = None
    for name, value in raw:
        if name == HEADER:
            found = value
            break
    if found is None:
        return None
    key = found.strip()
    if len(key) >= 2 and key[:1] == b'"' == key[-1:]:
        key = key[1:-1]  # the IETF draft's structured-field string: "..."
    if not key or len(key) > MAX_KEY or not all(0x20 <= c < 0x7F for c in key):
        raise ValueError(f"Idempotency-Key must be 1-{MAX_KEY} printable ASCII characters")
    return id_for(f"http\0{route}\0{principal}\0{key.decode('ascii')}")


class Answers:
    """Reply routes' answers by event id, for a retry to get the same one:
    at most ``size`` kept, each for ``ttl`` seconds of ``now``."""

    __slots__ = ("_entries", "_now", "size", "ttl")

    def __init__(self, now: Callable[[], float], *, ttl: float = 600.0, size: int = 10_000) -> None:
        self._now = now
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, event_id: str) -> bytes | None:
        entry = self._entries.get(event_id)
        if entry is None:
            return None
        if entry[0] <= self._now():
            del self._entries[event_id]
            return None
        return entry[1]

    def put(self, event_id: str, body: bytes) -> None:
        entries = self._entries
        now = self._now()
        entries[event_id] = (now + self.ttl, body)
        entries.move_to_end(event_id)
        # the oldest first: expired ones, then whatever is over the size
        while entries:
            first = next(iter(entries.values()))
            if len(entries) <= self.size and first[0] > now:
                break
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
