"""The errors surge raises.

Every error derives from :class:`SurgeError`; leaves also derive from the
builtin that fits, so ``except TimeoutError`` catches a request timeout::

    SurgeError
    ├── ConfigurationError (ValueError)    an app or option that cannot work
    ├── DecodeError (ValueError)           a payload that does not fit its type
    │   ├── UnknownTopic (LookupError)     a topic no event type is declared for
    │   ├── UnknownVersion                 a payload version no upcaster leads from
    │   ├── InvalidSignature               an envelope unsigned, or signed wrongly
    │   └── InvalidCloudEvent              a request that is no valid CloudEvent (HTTP 400/415)
    ├── MessageTooLarge (ValueError)       an encoded event over the size limit
    ├── KeyFailed (ValueError)             an event's key function or ``__key__`` failed
    ├── Unroutable (LookupError)           ``mandatory=True``: no declared group receives it
    ├── Overloaded                         a bounded buffer is full (``*_nowait``)
    ├── Closed (RuntimeError)              the app or transport is not running
    ├── TransportError (ConnectionError)   a broker's own failure, translated
    ├── Unauthorized (PermissionError)     no or bad credentials (HTTP 401)
    ├── Forbidden (PermissionError)        known, but not allowed (HTTP 403)
    ├── HandlerTimeout (TimeoutError)      a handler ran past its ``timeout=``
    └── RequestTimeout (TimeoutError)      ``app.request`` got no reply in time

:class:`RetryLater` and :class:`BatchFailed` are not errors: a handler
raises the first to ask for another attempt after a given delay, a batch
handler the second to fail some events of its batch and not the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = (
    "BatchFailed",
    "Closed",
    "ConfigurationError",
    "DecodeError",
    "Forbidden",
    "HandlerTimeout",
    "InvalidCloudEvent",
    "InvalidSignature",
    "KeyFailed",
    "MessageTooLarge",
    "Overloaded",
    "RequestTimeout",
    "RetryLater",
    "SurgeError",
    "TransportError",
    "Unauthorized",
    "UnknownTopic",
    "UnknownVersion",
    "Unroutable",
)


class SurgeError(Exception):
    """The root of every error surge raises."""


class ConfigurationError(SurgeError, ValueError):
    """An application, subscription or option that cannot work as given."""


class DecodeError(SurgeError, ValueError):
    """A payload that is not valid for its declared event type.

    ``field`` is the JSON path of the offending field (``$.amount``) when the
    decoder could name one, ``topic`` the topic the payload was addressed to.
    """

    def __init__(self, message: str, *, topic: str = "", field: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.field = field


class UnknownTopic(DecodeError, LookupError):
    """A payload addressed to a topic that no event type is declared for."""


class UnknownVersion(DecodeError):
    """A payload whose version the event type cannot decode: newer than its
    ``__version__``, or older with no upcaster registered for a step
    (``surge.upcaster``). ``version`` is the payload's."""

    def __init__(self, message: str, *, topic: str = "", version: int = 0) -> None:
        super().__init__(message, topic=topic)
        self.version = version


class InvalidSignature(DecodeError):
    """An envelope without a valid signature where the app requires one
    (``App(signing_keys=...)``): dead-lettered with the reason, never handled."""


class InvalidCloudEvent(DecodeError):
    """A request that is not a valid CloudEvent 1.0 for its route.

    ``code`` says what kind of fault, stable for programs to match
    (``not-a-cloudevent``, ``missing-attribute``, ``invalid-attribute``,
    ``unsupported-specversion``, ``unknown-type``, ``invalid-json``,
    ``unsupported-format``); ``attribute`` names the CloudEvents attribute
    at fault, when there is one. The ingress answers 415 for
    ``unsupported-format`` and 400 for the others.
    """

    def __init__(self, message: str, *, code: str, attribute: str | None = None) -> None:
        super().__init__(message, field=attribute)
        self.code = code
        self.attribute = attribute


class Unauthorized(SurgeError, PermissionError):
    """An ``auth=`` hook found no valid credentials (the ingress answers 401)."""


class Forbidden(SurgeError, PermissionError):
    """An ``auth=`` hook knows the caller but refuses it (the ingress answers 403)."""


class MessageTooLarge(SurgeError, ValueError):
    """An encoded event larger than the transport's ``max_message_size``."""


class KeyFailed(SurgeError, ValueError):
    """The key of an event could not be computed at publish: its type's
    ``__key__`` field or a keyed subscription's key function raised.

    Nothing was published (an unkeyed copy would lose its per-key order
    across processes). ``topic`` is the event's topic; the error raised by
    the key function is ``__cause__``.
    """

    def __init__(self, message: str, *, topic: str) -> None:
        super().__init__(message)
        self.topic = topic


class Unroutable(SurgeError, LookupError):
    """A mandatory publish (``publish(..., mandatory=True)`` or
    ``App(mandatory=True)``) to a topic that no group declared on the
    transport receives: nothing was published.

    "Declared on the transport" counts every process sharing the store,
    running or not: a group a worker declared once keeps what is published
    for it while no worker runs. ``topic`` is the event's topic.
    """

    def __init__(self, message: str, *, topic: str) -> None:
        super().__init__(message)
        self.topic = topic


class Overloaded(SurgeError):
    """A bounded buffer is full; the ``_nowait`` call would have had to wait."""


class Closed(SurgeError, RuntimeError):
    """The app or transport is not running (not started, or shut down)."""


class TransportError(SurgeError, ConnectionError):
    """A transport failed to reach or use its broker or file."""


class HandlerTimeout(SurgeError, TimeoutError):
    """A handler ran longer than its subscription's ``timeout``."""


class RequestTimeout(SurgeError, TimeoutError):
    """``App.request`` received no reply within its timeout."""


class RetryLater(Exception):
    """Raised by a handler to ask for another attempt after ``delay`` seconds.

    The attempt still counts against the subscription's ``Retry.attempts``.
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        super().__init__(reason or f"retry later ({delay}s)")
        self.delay = delay


class BatchFailed(Exception):
    """Raised by a batch handler (``app.on(..., batch=n)``) to fail some
    events of its batch and not the others.

    ``failures`` maps a position in the list the handler was given to the
    exception that event failed with: each of those is retried or
    dead-lettered on its own, as if a per-event handler had raised it (its
    own attempt count, the subscription's ``Retry``; a ``RetryLater`` gives
    its delay). Every other event of the batch succeeded and is acknowledged,
    and ``outputs`` (events, as a handler would return them) are published
    first. Any other exception a batch handler raises fails every event of
    the batch with it.
    """

    def __init__(
        self, failures: Mapping[int, BaseException], *, outputs: Sequence[Any] = ()
    ) -> None:
        super().__init__(f"{len(failures)} events of the batch failed")
        self.failures = dict(failures)
        self.outputs = list(outputs)


def one_line(exc: SurgeError) -> str:
    """What an operator reads of ``exc``: the class a user can look up (a
    transport's private subclass shows as the public class it refines) and
    the message, on one line."""
    name = next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))
    return f"{name}: {exc}"
