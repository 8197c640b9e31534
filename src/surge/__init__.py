"""surge: event-driven high-concurrency applications.

Typed events on a bus, handlers that react to them, and one code base on
every transport: in-process memory, SQLite, Redis Streams, NATS JetStream.
"""

from ._app import App, Subscription
from ._clock import Clock, RealClock, VirtualClock
from ._codec import Codec, JsonCodec, MsgpackCodec
from ._config import Retry
from ._context import Context
from ._errors import (
    BatchFailed,
    Closed,
    ConfigurationError,
    DecodeError,
    Forbidden,
    HandlerTimeout,
    InvalidCloudEvent,
    InvalidSignature,
    KeyFailed,
    MessageTooLarge,
    Overloaded,
    RequestTimeout,
    RetryLater,
    SurgeError,
    TransportError,
    Unauthorized,
    UnknownTopic,
    UnknownVersion,
    Unroutable,
)
from ._event import Envelope, Event, derive_id, id_for, is_derived, new_id, upcaster
from ._middleware import Middleware
from ._shutdown import StopPhase, StopReport
from ._signing import SIGNATURE_HEADER, Signer
from ._stats import AppStats, SubscriptionStats
from ._transport import (
    Capabilities,
    DeadLetter,
    Delivery,
    DirectPut,
    FencedState,
    Fences,
    HandsBack,
    IdleAware,
    KeyRouting,
    KnowsGroups,
    Outbox,
    StateStore,
    TakesNow,
    Transport,
    TransportStats,
    capabilities_of,
    publishing_group,
    topic_matches,
)
from .triggers import Condition, ConditionMet, Tick, absence, count, sequence

__version__ = "0.1.0"

__all__ = (
    "SIGNATURE_HEADER",
    "App",
    "AppStats",
    "BatchFailed",
    "Capabilities",
    "Clock",
    "Closed",
    "Codec",
    "Condition",
    "ConditionMet",
    "ConfigurationError",
    "Context",
    "DeadLetter",
    "DecodeError",
    "Delivery",
    "DirectPut",
    "Envelope",
    "Event",
    "FencedState",
    "Fences",
    "Forbidden",
    "HandlerTimeout",
    "HandsBack",
    "IdleAware",
    "InvalidCloudEvent",
    "InvalidSignature",
    "JsonCodec",
    "KeyFailed",
    "KeyRouting",
    "KnowsGroups",
    "MessageTooLarge",
    "Middleware",
    "MsgpackCodec",
    "Outbox",
    "Overloaded",
    "RealClock",
    "RequestTimeout",
    "Retry",
    "RetryLater",
    "Signer",
    "StateStore",
    "StopPhase",
    "StopReport",
    "Subscription",
    "SubscriptionStats",
    "SurgeError",
    "TakesNow",
    "Tick",
    "Transport",
    "TransportError",
    "TransportStats",
    "Unauthorized",
    "UnknownTopic",
    "UnknownVersion",
    "Unroutable",
    "VirtualClock",
    "__version__",
    "absence",
    "capabilities_of",
    "count",
    "derive_id",
    "id_for",
    "is_derived",
    "new_id",
    "publishing_group",
    "sequence",
    "topic_matches",
    "upcaster",
)
