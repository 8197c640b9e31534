"""The context a handler receives: what it handles, and how to publish."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._event import Envelope, Event

if TYPE_CHECKING:
    from ._app import App
    from ._clock import Clock
    from ._transport import Delivery

__all__ = ("Context",)

log = logging.getLogger("surge.handler")


class Context:
    """Passed to handlers that take a second argument.

    Events given to :meth:`publish` are published, with the events the
    handler returns, after it succeeds and before its delivery is
    acknowledged; their ids derive from this event's id and their position,
    so a redelivered handler publishes the same events again and the
    transport's dedup window drops the copies.
    """

    __slots__ = ("_out", "app", "delivery", "subscription")

    def __init__(self, app: App, delivery: Delivery, subscription: str) -> None:
        self.app = app
        self.delivery = delivery
        self.subscription = subscription
        self._out: list[tuple[Event, str | None, dict[str, str] | None]] = []

    @property
    def envelope(self) -> Envelope:
        return self.delivery.envelope

    @property
    def id(self) -> str:
        """The id of the event being handled."""
        return self.delivery.envelope.id

    @property
    def topic(self) -> str:
        return self.delivery.envelope.topic

    @property
    def key(self) -> str | None:
        return self.delivery.envelope.key

    @property
    def attempt(self) -> int:
        """Which delivery of this event to this subscription this is, from 1."""
        return self.delivery.attempt

    @property
    def headers(self) -> dict[str, str]:
        return self.delivery.envelope.headers or {}

    @property
    def clock(self) -> Clock:
        return self.app.clock

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines carry the event id, topic and subscription."""
        env = self.delivery.envelope
        return logging.LoggerAdapter(
            log,
            {
                "event_id": env.id,
                "topic": env.topic,
                "subscription": self.subscription,
                "attempt": self.delivery.attempt,
            },
        )

    def publish(
        self, event: Event, *, key: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        """Publish ``event`` once this handler succeeds (thread-safe)."""
        if not isinstance(event, Event):
            raise TypeError(f"ctx.publish takes an Event, not {type(event).__name__}")
        self._out.append((event, key, headers))

    @property
    def outbox(self) -> list[tuple[Event, str | None, dict[str, str] | None]]:
        """What :meth:`publish` was given so far, as ``(event, key, headers)``
        in order: published once the handler succeeds."""
        return self._out

    def __repr__(self) -> str:
        return f"<Context {self.subscription} {self.delivery!r}>"
