"""What a running app hands the parts that run inside it.

The runners (``surge._dispatch``) and the triggers (``surge.triggers``) need
a few things from their app: its transport and what that transport can do,
its middleware, how it decodes and publishes, its executors. They get them
as one :class:`Runtime`, made by ``App.start``, and never reach into the
app's own attributes; the app stays free to change how it keeps them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING, Protocol

from ._clock import Clock
from ._codec import Codec
from ._event import Envelope, Event
from ._middleware import Middleware
from ._transport import Delivery, FencedState, Fences, HandsBack, StateStore, TakesNow, Transport

if TYPE_CHECKING:
    from ._app import App, Subscription

__all__ = ("HandlerTimer", "LocalState", "Observer", "Part", "Runtime", "Timings")


class HandlerTimer(Protocol):
    """Times a sample of one subscription's attempts (``surge.observe``).

    The runner counts ``countdown`` down from ``every`` and times the attempt
    that reaches zero: ``now()`` before it, ``done(t0, event_time)`` after.
    ``sample()`` is ``now()`` for a timed attempt and -1.0 for the others.
    """

    every: int
    countdown: int

    def now(self) -> float: ...

    def sample(self) -> float: ...

    def done(self, t0: float, event_time: float) -> None: ...


Timings = Callable[[str], HandlerTimer]
"""Gives the :class:`HandlerTimer` of a subscription, by name."""


class Observer(Protocol):
    """Watches an app run without changing the path its events take
    (``surge.testing.Harness``; ``App.use_observer``).

    A middleware would do as much, but any middleware switches off the
    runner's plainest loop and the app's synchronous put, so a test through
    one would not run the code production runs. The runtime calls an
    observer from those paths too; unset, it costs an ``is None`` test
    before and after each handler. Calls come on the event loop,
    synchronously: keep them cheap.
    """

    def published(self, envelopes: Sequence[Envelope]) -> None:
        """The transport accepted ``envelopes`` (the app's publishes, its
        handlers' outputs and trigger firings)."""

    def handling(self, subscription: str, delivery: Delivery) -> None:
        """The handler is about to run for ``delivery`` (after the
        middleware's ``before_handle``); raising here fails the attempt as
        the handler raising would."""

    def handled(self, subscription: str, delivery: Delivery) -> None:
        """The handler succeeded on ``delivery`` and its outputs were
        published; the acknowledgement follows."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    """One start of an app, as its runners and triggers see it."""

    app: App
    """The app itself, for what is public on it (its name, ``Context.app``)."""
    transport: Transport
    clock: Clock
    codec: Codec
    middleware: tuple[Middleware, ...]
    hands_back: HandsBack | None
    """The transport's ``release``, when it has one (else: ``nack(d, 0)``)."""
    takes_now: TakesNow | None
    """The transport's ``taker``, when it has one: workers refill themselves."""
    fences: Fences | None = None
    """The transport's ``fenced``, asked before each keyed delivery starts."""
    fenced_state: FencedState | None = None
    """The transport's ``save_state_held``: a condition's state saved only
    while its source event's delivery is still this process's."""
    state: StateStore
    """The transport's state store, or one kept in the app's memory."""
    partitions: int = 0
    """The transport's partitions of keyed envelopes (0: it has none, and
    per-key order holds within one process only)."""
    rng: Random
    """Retry jitter, seeded by the app."""
    timings: Timings | None
    decode: Callable[[Envelope, Subscription], Event]
    """The subscription's event from a wire envelope (raises DecodeError)."""
    publish: Callable[[list[Envelope]], Awaitable[None]]
    """Publish envelopes made inside the app (handler outputs, trigger
    firings): middleware hooks, reply routing, partition keys."""
    thread_pool: Callable[[], Executor]
    threads: int
    """The thread pool's size."""
    process_pool: Callable[[], Executor]
    observer: Observer | None = None
    """Told of each handling and its outcome (``App.use_observer``)."""


class Part(Protocol):
    """Something that runs inside an app (triggers): started with its
    runtime before the app's subscriptions consume, stopped before they stop."""

    async def start(self, runtime: Runtime) -> None: ...

    async def stop(self) -> None: ...


class LocalState:
    """The state store of an app whose transport has none: small values kept
    in the app's memory, for as long as the app lives (a restarted process
    starts empty)."""

    def __init__(self) -> None:
        self._values: dict[str, bytes] = {}

    async def load_state(self, key: str) -> bytes | None:
        return self._values.get(key)

    async def save_state(self, key: str, value: bytes) -> None:
        self._values[key] = value
