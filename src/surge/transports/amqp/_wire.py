"""An envelope as an AMQP message, and a dead letter as one.

The body is the codec's encoded envelope (as on every surge transport);
``message_id`` is the event id; persistent delivery. Retries are new
messages (RabbitMQ cannot delay a message in place), so what the broker
counts (``x-delivery-count``, quorum queues) is added to what the copy
carries in its headers:

===================  ==========================================================
``x-surge-attempts`` attempts made before this copy was published (0 if absent)
``x-surge-first``    when the first attempt was delivered (epoch s)
``x-surge-dead``     on a dead letter that surge wrote: its body is the
                     :class:`DeadLetter` record (msgpack), not an envelope
``x-surge-group``    on a dead letter: its group
===================  ==========================================================
"""

from __future__ import annotations

from typing import Any

import msgspec
from pamqp.commands import Basic

from ..._transport import DeadLetter

__all__ = (
    "ATTEMPTS",
    "DEAD",
    "FIRST",
    "GROUP",
    "attempts_before",
    "dead_message",
    "dead_record",
    "first_time",
    "props",
)

ATTEMPTS = "x-surge-attempts"
FIRST = "x-surge-first"
DEAD = "x-surge-dead"
GROUP = "x-surge-group"

_DEAD_ENCODER = msgspec.msgpack.Encoder()
_DEAD_DECODER = msgspec.msgpack.Decoder(DeadLetter)


def props(
    message_id: str, headers: dict[str, Any] | None = None, *, expiration: str | None = None
) -> Basic.Properties:
    return Basic.Properties(
        message_id=message_id, delivery_mode=2, headers=headers, expiration=expiration
    )


def dead_message(record: DeadLetter) -> tuple[bytes, Basic.Properties]:
    """The body and properties of the message that keeps ``record``."""
    return _DEAD_ENCODER.encode(record), props(record.id, {GROUP: record.group, DEAD: 1})


def dead_record(headers: dict[str, Any], body: bytes) -> DeadLetter | None:
    """The record of a dead letter surge wrote, or None (the broker's own,
    or not decodable)."""
    if not headers.get(DEAD):
        return None
    try:
        return _DEAD_DECODER.decode(body)
    except msgspec.DecodeError:
        return None


def attempts_before(headers: dict[str, Any]) -> int:
    """Attempts a delivered message already had: its copy's count plus the
    broker's returns of this copy (a crashed consumer, a requeue)."""
    base = headers.get(ATTEMPTS, 0)
    returned = headers.get("x-delivery-count", 0)
    return (base if isinstance(base, int) else 0) + (returned if isinstance(returned, int) else 0)


def first_time(headers: dict[str, Any]) -> float:
    t = headers.get(FIRST, 0.0)
    return float(t) if isinstance(t, int | float) else 0.0
