"""The application: subscriptions, publishing, request/reply and lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import multiprocessing
import operator
import os
import random
import signal
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from ._clock import Clock, RealClock
from ._codec import Codec, codec_for
from ._config import Retry
from ._dispatch import ASYNC, INLINE, PROCESS, THREAD, Runner
from ._errors import (
    Closed,
    ConfigurationError,
    DecodeError,
    InvalidSignature,
    KeyFailed,
    Overloaded,
    RequestTimeout,
    UnknownTopic,
)
from ._event import (
    Envelope,
    Event,
    derive_id,
    event_type,
    is_event_id,
    new_id,
    refill_ids,
)
from ._event import ids as _ids
from ._lag import LoopLag
from ._memory import resident_memory
from ._middleware import Middleware
from ._routing import Routing
from ._runtime import LocalState, Observer, Part, Runtime, Timings
from ._shutdown import Shutdown, StopReport
from ._signing import Signer
from ._stats import AppStats, SubscriptionStats
from ._transport import (
    Capabilities,
    DeadLetter,
    KnowsGroups,
    TopicPut,
    Transport,
    capabilities_of,
)

if TYPE_CHECKING:
    from .http import Ingress
    from .triggers import Condition, Misfire

__all__ = ("App", "Executor", "HandlerOptions", "Subscription")

log = logging.getLogger("surge")

E = TypeVar("E", bound=Event)
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

Executor = Literal["async", "thread", "process", "inline"]
"""Where a handler runs: ``"async"`` on the loop (coroutine functions),
``"inline"`` on the loop (plain functions that never block), ``"thread"`` in
the app's thread pool, ``"process"`` in its process pool."""


class Subscription(msgspec.Struct, frozen=True, kw_only=True):
    """A handler bound to topics, with how it is run. Made by ``App.on``."""

    name: str
    topics: tuple[str, ...]
    types: dict[str, type[Event]]
    handler: Callable[..., Any]
    kind: str
    wants_ctx: bool
    concurrency: int
    prefetch: int
    key: Callable[[Any], Hashable] | None
    retry: Retry
    timeout: float | None
    batch: int = 0
    """Events per call of a batch handler (it takes a list); 0: one event."""
    linger: float = 0.0
    """How long a batch handler's partial batch waits for more events."""
    publishes: tuple[type[Event], ...] = ()
    """Event types the handler declares it publishes through ``ctx.publish``
    (``app.on(publishes=...)``), beside those its return annotation names."""


class HandlerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The options of :meth:`App.on` that a trigger passes on to its handler."""

    concurrency: int | None = None
    key: Callable[[Any], Hashable] | str | None = None
    retry: Retry | None = None
    timeout: float | None = None
    executor: Executor | None = None
    prefetch: int | None = None

    def subscribe(self, app: App, *topics: str, name: str) -> Callable[[F], F]:
        """``app.on(*topics, name=name)`` with these options."""
        return app.on(
            *topics,
            name=name,
            concurrency=self.concurrency,
            key=self.key,
            retry=self.retry,
            timeout=self.timeout,
            executor=self.executor,
            prefetch=self.prefetch,
        )


class App:
    """An event-driven application.

    Handlers subscribe with :meth:`on`; :meth:`publish` sends events; the app
    runs inside ``async with app:`` or with :meth:`run`. Options:

    ``transport``        a URL (``memory://``, ``sqlite:///f.db``, ...) or a
                         transport object
    ``concurrency``      default in-flight limit per subscription
    ``retry``            default :class:`Retry` per subscription
    ``shutdown_timeout`` seconds a stop takes at most; handlers in flight get
                         three quarters of it to finish
    ``threads``          size of the pool that runs sync handlers
    ``processes``        size of the pool that runs ``executor="process"``
    ``middleware``       :class:`Middleware` hooks, outermost first
    ``clock``            a :class:`Clock`; tests pass a ``VirtualClock``
    ``seed``             seeds retry jitter, for reproducible runs
    ``signing_keys``     key id -> secret (32+ bytes): sign every envelope
                         published and dead-letter any consumed one that is
                         not signed by one of these keys (see _signing.py)
    ``sign_with``        the key id to sign with (needed with several keys)
    ``mandatory``        every ``publish`` and every handler's output must
                         reach a declared group, or raise :class:`Unroutable`
                         (default: counted and warned, see :meth:`publish`)
    """

    def __init__(
        self,
        name: str = "app",
        *,
        transport: str | Transport = "memory://",
        concurrency: int = 100,
        retry: Retry | None = None,
        shutdown_timeout: float = 10.0,
        threads: int | None = None,
        processes: int | None = None,
        middleware: Sequence[Middleware] = (),
        clock: Clock | None = None,
        codec: str | Codec = "msgpack",
        seed: int | None = None,
        signing_keys: Mapping[str, str | bytes] | None = None,
        sign_with: str | None = None,
        mandatory: bool = False,
    ) -> None:
        if not name or "/" in name or " " in name:
            raise ConfigurationError(f"app name {name!r}: use letters, digits, '.', '-', '_'")
        self.name = name
        self.clock: Clock = clock or RealClock()
        self._transport_spec = transport
        self._transport: Transport | None = transport if not isinstance(transport, str) else None
        self.concurrency = concurrency
        self.retry = retry or Retry()
        self.shutdown_timeout = shutdown_timeout
        self.mandatory = mandatory
        """Whether a publish no declared group receives raises (see :meth:`publish`)."""
        self._routing = Routing(name, self.clock)
        self.consume = True
        """Whether :meth:`start` consumes the subscriptions (``surge run
        --no-consume`` sets it False for a publish-only process)."""
        self.codec = codec_for(codec) if isinstance(codec, str) else codec
        self._signer: Signer | None = None
        if signing_keys is not None:
            if sign_with is None and len(signing_keys) == 1:
                sign_with = next(iter(signing_keys))
            if sign_with is None:
                raise ConfigurationError("with several signing_keys, name one in sign_with=")
            self._signer = Signer(signing_keys, sign_with, self.codec)
        elif sign_with is not None:
            raise ConfigurationError("sign_with= needs signing_keys=")
        self._threads = threads or min(32, (os.cpu_count() or 1) + 4)
        self._processes = processes or os.cpu_count() or 1
        self._middleware: tuple[Middleware, ...] = tuple(middleware)
        self._timings: Timings | None = None
        self._observer: Observer | None = None
        # how late the loop runs: a handler that blocks it is reported
        self._lag = LoopLag(self.clock, name)
        self._parts: list[Part] = [self._lag]
        # Trigger slots and other small state, when the transport keeps none.
        self._local_state = LocalState()
        self._caps = Capabilities()
        self._rng = random.Random(seed)  # noqa: S311 - retry jitter, not a secret
        self._subs: dict[str, Subscription] = {}
        # topic -> event type, for decoding pattern subscriptions: the types
        # this app declared win over the process-wide "last class defined".
        self._types: dict[str, type[Event]] = {}
        self._runners: dict[str, Runner] = {}
        self._consuming = True
        self._threadpool: ThreadPoolExecutor | None = None
        self._procpool: ProcessPoolExecutor | None = None
        self._pending: dict[str, tuple[asyncio.Future[Any], type[Event]]] = {}
        # replies refused for their signature (see _resolve)
        self._rejected_replies = 0
        self._inbox = f"_surge.reply.{name}.{new_id()[-12:]}"
        self._inbox_task: asyncio.Task[None] | None = None
        self._state: Literal["new", "running", "stopping", "stopped"] = "new"
        self._wall = self.clock.time
        # Set only while running, on a transport that is not durable and
        # has put_one (DirectPut): then publish is one synchronous put.
        # _put_one is the unhooked hot path, so only set without middleware
        # (with an observer it is put_one telling the observer, see
        # _observed_put: the same path, watched).
        self._direct_put: Callable[[Envelope], bool] | None = None
        self._put_one: Callable[[Envelope], bool] | None = None
        # The transport's putters (TopicPut), while _put_one is set.
        self._topic_put: TopicPut | None = None
        # Event type -> its topic and the put for it, for the types whose
        # plain publish is that one put: learnt on a type's first publish
        # while _put_one is set and its topic is known routed (for good, see
        # Routing), cleared with _put_one. One dict lookup stands for the
        # type, routing and option checks of every later publish of the type.
        self._put_types: dict[type[Event], tuple[str, Callable[[Envelope], bool]]] = {}
        self._publish: Callable[[Sequence[Envelope]], Awaitable[None]] = _not_running
        self._stop_requested: asyncio.Event | None = None
        self._stop_early = False  # request_stop came before start made the event
        self._http: Ingress | None = None
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        # topic -> the key functions of this app's keyed subscriptions of it,
        # set at start on a partitioned transport (see _partition_keys).
        self._keyers: dict[str, tuple[Callable[[Any], Hashable], ...]] = {}
        self._partitioned = False
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._after_stop: list[Callable[[], Awaitable[None]]] = []
        self._stop_report: StopReport | None = None
        self.extensions: dict[str, Any] = {}
        """Per-app state of optional parts (surge.observe, surge.http), by
        the part's dotted name; it lives and dies with the app."""

    # --- declaring -----------------------------------------------------------
    @property
    def transport(self) -> Transport:
        if self._transport is None:
            spec = self._transport_spec
            assert isinstance(spec, str)
            # Transports encode (and measure) with the app's codec, or the
            # app would decode what they wrote in another format.
            # Transports are a layer above the core: opened by URL, on use.
            from .transports import open_transport

            self._transport = open_transport(spec, clock=self.clock, codec=self.codec)
        return self._transport

    def use_transport(self, transport: str | Transport) -> None:
        """Run on ``transport`` (a URL or a transport object) instead of the
        one given to the constructor; only while the app is not running."""
        if self._state in ("running", "stopping"):
            raise ConfigurationError("choose the transport before the app starts")
        self._transport_spec = transport
        self._transport = None if isinstance(transport, str) else transport

    @property
    def state(self) -> Literal["new", "running", "stopping", "stopped"]:
        """Where the app is in its lifecycle."""
        return self._state

    @property
    def capabilities(self) -> Capabilities:
        """What the transport can do beyond ``Transport``, as resolved when
        the app last started (none before)."""
        return self._caps

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The middleware, outermost first."""
        return self._middleware

    def add_middleware(self, middleware: Middleware) -> None:
        """Add ``middleware`` innermost (its ``before_*`` hooks run after
        those given before it); only before the app starts."""
        if self._state in ("running", "stopping"):
            raise ConfigurationError("add middleware before the app starts")
        self._middleware = (*self._middleware, middleware)

    @property
    def timings(self) -> Timings | None:
        """The handler timings (``surge.observe.instrument``), if any."""
        return self._timings

    def use_timings(self, timings: Timings | None) -> None:
        """Time a sample of each subscription's attempts with
        ``timings(subscription)``; only before the app starts."""
        if self._state in ("running", "stopping"):
            raise ConfigurationError("choose the timings before the app starts")
        self._timings = timings

    @property
    def observer(self) -> Observer | None:
        """The observer (``surge.testing.Harness``), if any."""
        return self._observer

    def use_observer(self, observer: Observer | None) -> None:
        """Tell ``observer`` of every publish the transport accepted and of
        every handling and its outcome; only before the app starts.

        Unlike a middleware, an observer leaves the app on its plainest
        paths (the synchronous put, the runner's plain loop), so a test
        harness watching through one runs the code production runs."""
        if self._state in ("running", "stopping"):
            raise ConfigurationError("choose the observer before the app starts")
        self._observer = observer

    def attach(self, part: Part) -> None:
        """Run ``part`` inside the app: started with the app's runtime before
        its subscriptions consume, stopped first when the app stops."""
        if self._state in ("running", "stopping"):
            raise ConfigurationError("attach parts before the app starts")
        self._parts.append(part)

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        return dict(self._subs)

    def on(
        self,
        *topics: type[Event] | str,
        name: str | None = None,
        concurrency: int | None = None,
        key: Callable[[Any], Hashable] | str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        executor: Executor | None = None,
        prefetch: int | None = None,
        batch: int | None = None,
        linger: float | None = None,
        publishes: tuple[type[Event], ...] = (),
    ) -> Callable[[F], F]:
        """Subscribe the decorated function to ``topics`` (event types or
        topic names and patterns such as ``"orders.*"``).

        The handler takes ``(event)`` or ``(event, ctx)``. ``executor``
        says where it runs: by default coroutine functions on the loop and
        plain functions in the thread pool; ``"inline"`` runs a plain
        function on the loop itself (only for handlers that never block),
        ``"process"`` in the process pool (module-level functions whose
        events and results pickle; no ``ctx``).
        ``key`` (a callable or an attribute name) keeps events with the same
        key in order. The handler publishes what it returns: an event, a
        sequence of events, or None.

        With ``batch=n`` the handler takes a list of up to ``n`` events
        (and no ``ctx``): it is called once ``n`` events wait, or once the
        first of fewer has waited ``linger`` seconds (default 0: at once
        with what is there). The batch succeeds or fails together; raise
        :class:`BatchFailed` to fail some of its events and not the others
        (docs/guarantees.md, "Batch handlers"). ``concurrency`` then counts
        batches.

        ``publishes`` declares the event types the handler publishes through
        ``ctx.publish`` (a tuple of event types): the AsyncAPI document gives
        them send operations and the event graph (the HTTP ingress's
        admission) follows them, as it does the types of the return
        annotation. It declares; it does not restrict what is published.
        """
        if not topics:
            raise ConfigurationError("app.on() needs at least one event type or topic")
        names: list[str] = []
        types: dict[str, type[Event]] = {}
        for t in topics:
            if isinstance(t, str):
                names.append(t)
            elif isinstance(t, type) and issubclass(t, Event):
                names.append(t.__topic__)
                types[t.__topic__] = t
            else:
                raise ConfigurationError(f"app.on({t!r}): give Event subclasses or topic names")
        if key is None:
            # The events' own key (``__key__``), when they agree on one.
            declared = {tp.__key__ for tp in types.values()}
            if len(declared) == 1 and len(types) == len(names):
                key = declared.pop()
        key_fn: Callable[[Any], Hashable] | None
        key_fn = operator.attrgetter(key) if isinstance(key, str) else key
        conc = concurrency if concurrency is not None else self.concurrency
        if conc < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if batch is not None and batch < 1:
            raise ConfigurationError("batch must be at least 1")
        if linger is not None and (batch is None or linger < 0):
            raise ConfigurationError("linger= needs batch= and is at least 0 seconds")
        size = batch or 0
        if prefetch is not None and prefetch < size:
            raise ConfigurationError(
                f"prefetch={prefetch} is below batch={size}: a batch could never fill"
            )
        if not isinstance(publishes, tuple) or not all(
            isinstance(tp, type) and issubclass(tp, Event) for tp in publishes
        ):
            raise ConfigurationError(
                f"app.on(publishes={publishes!r}): give a tuple of Event subclasses"
            )
        declared_outputs = tuple(dict.fromkeys(publishes))

        def decorate(fn: F) -> F:
            kind = _kind_of(fn, executor)
            sub_name = f"{self.name}.{name or fn.__qualname__.rsplit('<locals>.', 1)[-1]}"
            if sub_name in self._subs:
                raise ConfigurationError(
                    f"two subscriptions named {sub_name!r}: pass name= to tell them apart"
                )
            if self._state != "new":
                raise ConfigurationError("subscribe before the app starts")
            wants_ctx = _positional_arity(fn) >= 2
            if size and wants_ctx:
                raise ConfigurationError(
                    f"{fn.__qualname__}: a batch handler takes (events) only, a list"
                )
            if kind == PROCESS and wants_ctx:
                raise ConfigurationError(
                    f"{fn.__qualname__}: process handlers take (event) only; a context "
                    "cannot cross to another process"
                )
            if kind == PROCESS and ("<locals>" in fn.__qualname__ or fn.__name__ == "<lambda>"):
                raise ConfigurationError(
                    f"{fn.__qualname__}: a process handler must be a module-level function"
                )
            # A thread handler holds a thread only while it runs, not while
            # its outputs are published: its `concurrency` is what it says,
            # and the runner lets at most the pool's size into threads.
            limit = conc
            if kind == PROCESS:
                limit = min(conc, self._processes)
            for topic, tp in types.items():
                self._types.setdefault(topic, tp)
            self._subs[sub_name] = Subscription(
                name=sub_name,
                topics=tuple(names),
                types=types,
                handler=fn,
                kind=kind,
                wants_ctx=wants_ctx,
                concurrency=limit,
                prefetch=prefetch or max(2 * limit, 256, 2 * size),
                key=key_fn,
                retry=retry or self.retry,
                timeout=timeout,
                batch=size,
                linger=linger or 0.0,
                publishes=declared_outputs,
            )
            return fn

        return decorate

    def register(self, *event_types: type[Event]) -> None:
        """Decode ``event_types``' topics into these classes in this app's
        pattern subscriptions (types named in ``app.on`` are registered
        already; otherwise the class defined last for a topic is used)."""
        for tp in event_types:
            if not (isinstance(tp, type) and issubclass(tp, Event)):
                raise ConfigurationError(f"register({tp!r}): give Event subclasses")
            self._types[tp.__topic__] = tp

    def register_topic(self, topic: str, event_type: type[Event]) -> None:
        """Decode ``topic`` into ``event_type`` in this app (a topic other
        than the type's own, such as a trigger's)."""
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise ConfigurationError(f"register_topic({event_type!r}): give an Event subclass")
        self._types[topic] = event_type

    def on_start(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Run ``fn`` once the app has started."""
        self._on_start.append(fn)
        return fn

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Run ``fn`` when the app begins to stop (handlers may still run:
        release what they use in an ``after_stop`` hook instead)."""
        self._on_stop.append(fn)
        return fn

    def after_stop(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Run ``fn`` once the app has stopped: no handler runs any more,
        what they settled is acknowledged and the transport is closed (the
        place to close a database pool the handlers used). Bounded by what
        is left of ``shutdown_timeout``, as the rest of the stop."""
        self._after_stop.append(fn)
        return fn

    # --- triggers (implemented in surge.triggers) and HTTP (in surge.http) --
    def every(
        self,
        *,
        seconds: float = 0,
        minutes: float = 0,
        hours: float = 0,
        name: str | None = None,
        misfire: Misfire = "skip",
        max_catch_up: int = 100,
        concurrency: int | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        executor: Executor | None = None,
        prefetch: int | None = None,
    ) -> Callable[[F], F]:
        """Run the decorated handler every interval, at whole multiples of
        it since the Unix epoch (docs/triggers.md).

        The handler takes ``()``, ``(tick)`` or ``(tick, ctx)``.
        ``misfire="skip"`` fires only future slots after a pause;
        ``"catch_up"`` first fires the slots missed since the last firing (at
        most ``max_catch_up``, the latest). The other options are
        :meth:`on`'s.
        """
        from .triggers import every

        options = HandlerOptions(
            concurrency=concurrency,
            retry=retry,
            timeout=timeout,
            executor=executor,
            prefetch=prefetch,
        )
        return every(
            self,
            seconds=seconds + 60 * minutes + 3600 * hours,
            name=name,
            misfire=misfire,
            max_catch_up=max_catch_up,
            options=options,
        )

    def cron(
        self,
        expression: str,
        *,
        tz: str = "UTC",
        name: str | None = None,
        misfire: Misfire = "skip",
        max_catch_up: int = 100,
        concurrency: int | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        executor: Executor | None = None,
        prefetch: int | None = None,
    ) -> Callable[[F], F]:
        """Run the decorated handler on a cron schedule read in the time
        zone ``tz`` (an IANA name; needs ``surge[cron]``); otherwise as
        :meth:`every`."""
        from .triggers import cron

        options = HandlerOptions(
            concurrency=concurrency,
            retry=retry,
            timeout=timeout,
            executor=executor,
            prefetch=prefetch,
        )
        return cron(
            self,
            expression,
            tz=tz,
            name=name,
            misfire=misfire,
            max_catch_up=max_catch_up,
            options=options,
        )

    def when(
        self,
        condition: Condition,
        *,
        name: str | None = None,
        concurrency: int | None = None,
        key: Callable[[Any], Hashable] | str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        executor: Executor | None = None,
        prefetch: int | None = None,
    ) -> Callable[[F], F]:
        """Run the decorated handler with a ``ConditionMet`` each time
        ``condition`` holds over the event stream (``surge.count``,
        ``surge.sequence``, ``surge.absence``). The handler takes ``()``,
        ``(met)`` or ``(met, ctx)``; the other options are :meth:`on`'s."""
        from .triggers import when

        options = HandlerOptions(
            concurrency=concurrency,
            key=key,
            retry=retry,
            timeout=timeout,
            executor=executor,
            prefetch=prefetch,
        )
        return when(self, condition, name=name, options=options)

    @property
    def http(self) -> Ingress:
        """The HTTP ingress of this app (``surge.http``), made on first use."""
        if self._http is None:
            from .http import Ingress

            self._http = Ingress(self)
        return self._http

    # --- publishing ----------------------------------------------------------
    def _envelope(
        self,
        event: Event,
        key: str | None,
        headers: dict[str, str] | None,
        event_id: str | None = None,
    ) -> Envelope:
        if not isinstance(event, Event):
            raise TypeError(f"publish takes an Event, not {type(event).__name__}")
        if event_id is None:
            event_id = new_id()
        elif not is_event_id(event_id):
            raise ValueError(
                f"id={event_id!r}: an event id is 32 lowercase hex digits "
                "(surge.id_for(key) makes one from an idempotency key)"
            )
        return Envelope(event_id, event.__topic__, key, self._wall(), headers, event)

    async def publish(
        self,
        event: Event,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        delay: float | None = None,
        at: datetime | float | None = None,
        connection: Any = None,
        id: str | None = None,
        mandatory: bool | None = None,
    ) -> str:
        """Publish ``event`` to every subscription of its topic; its id.

        Waits while the transport's buffers are full (backpressure). With
        ``delay`` (seconds) or ``at`` (a datetime or epoch seconds), no
        subscription receives it before then. With ``connection`` (a driver
        connection to the transport's database, inside its transaction),
        the event is written through it: delivered if that transaction
        commits, never if it rolls back (the transactional outbox; a
        transport without one raises ``ConfigurationError``).

        With ``id`` (32 hex digits), the event gets that id rather than a
        new one. A derived id (``surge.id_for(key)``, ``surge.derive_id``)
        makes the publish idempotent: the transport drops a second publish
        of it within its dedup window (docs/guarantees.md), so a caller that
        retries after a timeout publishes one event, not two.

        A topic that no group declared on the transport receives (by any
        process, running or not) is dropped by the transport: counted in
        ``statistics().unroutable`` and warned once per topic; with
        ``mandatory=True`` (default: the app's ``mandatory``) it raises
        :class:`Unroutable` and publishes nothing (needs a transport that
        knows its groups, ``KnowsGroups``; else ``NotImplementedError``).
        """
        put = self._put_types.get(type(event))
        if put is not None and delay is None and at is None and id is None and connection is None:
            # Running, no middleware, a transport that is not durable, a
            # routed topic: one synchronous put, and a wait only when the
            # transport is full. (mandatory cannot refuse a routed topic.)
            # new_id() inlined: a list pop, no Python call per event.
            env_id = _ids.pop() if _ids else refill_ids()
            env = Envelope(env_id, put[0], key, self._wall(), headers, event)
            if not put[1](env):
                await self._publish_put((env,))
            return env_id
        if mandatory is None:
            mandatory = self.mandatory
        if connection is not None:
            return await self._publish_in(connection, event, key, headers, delay, at, id, mandatory)
        if delay is not None or at is not None or id is not None:
            # a given id may be derived: it must reach the transport's dedup,
            # which the synchronous puts below skip (they take fresh ids only)
            return await self._publish_later(event, key, headers, delay, at, id, mandatory)
        put_one = self._put_one
        if put_one is not None:
            if type(event) not in _EVENT_TYPES:
                _check_event(event)
            blind = self._routing.blind
            if event.__topic__ in self._routing.routed and not (mandatory and blind):
                if not blind:  # a blind app's mandatory publish must come here
                    self._learn_put(type(event))
                env_id = _ids.pop() if _ids else refill_ids()
                env = Envelope(env_id, event.__topic__, key, self._wall(), headers, event)
                if not put_one(env):
                    await self._publish_put((env,))
                return env_id
        if self._state is not _RUNNING:
            raise Closed(f"app {self.name!r} is {self._state}; publish inside 'async with app'")
        if type(event) not in _EVENT_TYPES:
            _check_event(event)
        env = Envelope(new_id(), event.__topic__, key, self._wall(), headers, event)
        middleware = self._middleware
        for mw in middleware:
            mw.before_publish(env)
        if env.topic not in self._routing.routed or (mandatory and self._routing.blind):
            await self._check_routes((env,), mandatory)
        direct_put = self._direct_put
        if direct_put is None or not direct_put(env):
            await self._publish((env,))
        if self._observer is not None:
            self._observer.published((env,))
        for mw in reversed(middleware):
            mw.after_publish(env)
        return env.id

    async def publish_many(
        self, events: Iterable[Event], *, headers: dict[str, str] | None = None
    ) -> list[str]:
        """Publish ``events`` (each to every subscription of its topic) in
        as few round trips as the transport allows; their ids, in order.

        Each transport writes a batch its own native way: one Lua call on
        Redis, pipelined publishes whose acks are awaited together on NATS,
        one transaction on SQLite, one statement on PostgreSQL, confirms
        awaited together on RabbitMQ. Batches hold at most 1,000 events; a
        failure raises with the batches before it published and the rest
        not. Keys come from each event type's ``__key__`` (or the topic's
        keyed subscription), as for :meth:`publish`; ``headers`` go on every
        envelope.
        """
        if self._state is not _RUNNING:
            raise Closed(f"app {self.name!r} is {self._state}; publish inside 'async with app'")
        wall = self._wall
        envs: list[Envelope] = []
        for event in events:
            if type(event) not in _EVENT_TYPES:
                _check_event(event)
            envs.append(Envelope(new_id(), event.__topic__, None, wall(), headers, event))
        middleware = self._middleware
        for start in range(0, len(envs), _PUBLISH_BATCH):
            chunk = envs[start : start + _PUBLISH_BATCH]
            for env in chunk:
                for mw in middleware:
                    mw.before_publish(env)
            routed = self._routing.routed
            if any(env.topic not in routed for env in chunk) or (
                self.mandatory and self._routing.blind
            ):
                await self._check_routes(chunk, self.mandatory)
            await self._publish(chunk)
            if self._observer is not None:
                self._observer.published(chunk)
            for env in chunk:
                for mw in reversed(middleware):
                    mw.after_publish(env)
        return [env.id for env in envs]

    async def _publish_later(
        self,
        event: Event,
        key: str | None,
        headers: dict[str, str] | None,
        delay: float | None,
        at: datetime | float | None,
        event_id: str | None = None,
        mandatory: bool = False,
    ) -> str:
        env = self._envelope(event, key, headers, event_id)
        if self._state != "running":
            raise Closed(f"app {self.name!r} is {self._state}")
        _schedule(env, delay, at)
        await self._publish_envelopes([env], mandatory=mandatory)
        return env.id

    async def _publish_in(
        self,
        connection: Any,
        event: Event,
        key: str | None,
        headers: dict[str, str] | None,
        delay: float | None,
        at: datetime | float | None,
        event_id: str | None = None,
        mandatory: bool = False,
    ) -> str:
        """The transactional outbox: ``event`` written through ``connection``."""
        env = self._envelope(event, key, headers, event_id)
        if self._state != "running":
            raise Closed(f"app {self.name!r} is {self._state}")
        outbox = self._caps.outbox
        if outbox is None:
            raise ConfigurationError(
                f"publish(connection=...) needs a transport with a transactional outbox "
                f"(postgresql://); {self.transport.url} has none"
            )
        _schedule(env, delay, at)
        for mw in self._middleware:
            mw.before_publish(env)
        if env.topic not in self._routing.routed or (mandatory and self._routing.blind):
            await self._check_routes((env,), mandatory)
        if self._partitioned:
            self._fill_keys((env,))
        if self._signer is not None:
            self._signer.sign((env,))
        await outbox.publish_in(connection, (env,))
        if self._observer is not None:
            self._observer.published((env,))
        for mw in reversed(self._middleware):
            mw.after_publish(env)
        return env.id

    def publish_nowait(
        self,
        event: Event,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        id: str | None = None,
    ) -> str:
        """Publish without waiting; raises :class:`Overloaded` when full.
        ``id`` as for :meth:`publish`.

        It cannot wait for the transport to say whether a group receives the
        topic, so it never raises :class:`Unroutable`: an unroutable publish
        is counted (a moment later) and warned as :meth:`publish` does."""
        put = self._put_types.get(type(event))
        if put is not None and id is None:
            env_id = _ids.pop() if _ids else refill_ids()
            env = Envelope(env_id, put[0], key, self._wall(), headers, event)
            if not put[1](env):
                raise Overloaded(f"a subscription of {put[0]!r} holds all it can")
            return env_id
        put_one = self._put_one
        if put_one is not None and id is None:
            if type(event) not in _EVENT_TYPES:
                _check_event(event)
            if event.__topic__ in self._routing.routed:
                if not self._routing.blind:
                    self._learn_put(type(event))
                env_id = _ids.pop() if _ids else refill_ids()
                env = Envelope(env_id, event.__topic__, key, self._wall(), headers, event)
                if not put_one(env):
                    raise Overloaded(f"a subscription of {env.topic!r} holds all it can")
                return env_id
        env = self._envelope(event, key, headers, id)
        if self._state != "running":
            raise Closed(f"app {self.name!r} is {self._state}")
        for mw in self._middleware:
            mw.before_publish(env)
        direct_put = self._direct_put
        if direct_put is not None and id is None:
            if not direct_put(env):
                raise Overloaded(f"a subscription of {env.topic!r} holds all it can")
        else:
            if self._partitioned:
                self._fill_keys((env,))
            if self._signer is not None:
                self._signer.sign((env,))
            self.transport.publish_nowait((env,))
        if env.topic not in self._routing.routed:
            self._routing.note_soon((env,))
        if self._observer is not None:
            self._observer.published((env,))
        for mw in reversed(self._middleware):
            mw.after_publish(env)
        return env.id

    def _partition_keys(self) -> dict[str, tuple[Callable[[Any], Hashable], ...]]:
        """Which subscriptions order by a key the transport must see.

        A transport with ``partitions`` keeps one key in order across
        processes by routing each keyed envelope to the partition of its
        ``key``. An envelope published without ``key=`` gets its event
        type's ``__key__`` field or, when the type names none, the key of the
        first keyed subscription of its topic in this app (exact topic names;
        a pattern subscription's key needs ``key=`` at publish).
        """
        if not self._caps.partitions:
            return {}
        keyers: dict[str, list[Callable[[Any], Hashable]]] = {}
        for sub in self._subs.values():
            if sub.key is None:
                continue
            for topic in sub.topics:
                if "*" in topic or ">" in topic:
                    continue
                fns = keyers.setdefault(topic, [])
                if sub.key not in fns:
                    fns.append(sub.key)
        for topic, fns in keyers.items():
            if len(fns) > 1:
                log.warning(
                    "topic %r has %d keyed subscriptions with different keys: across "
                    "processes, its events keep the order of the first one's key",
                    topic,
                    len(fns),
                )
        return {topic: tuple(fns) for topic, fns in keyers.items()}

    def _fill_keys(self, envs: Sequence[Envelope]) -> None:
        """The key to partition by: the publisher's, else the event type's
        ``__key__`` field, else this app's keyed subscription's key.

        Raises :class:`KeyFailed` when one fails, before any is published."""
        keyers = self._keyers
        for env in envs:
            event = env.event
            if env.key is not None or event is None:
                continue
            field = type(event).__key__
            try:
                if field is not None:
                    env.key = str(getattr(event, field))
                elif (fns := keyers.get(env.topic)) is not None:
                    env.key = str(fns[0](event))
            except Exception as exc:
                # Published unkeyed, it would lose its per-key order across
                # processes without a word: refuse the whole batch instead.
                what = f"field {field!r}" if field is not None else "key function"
                raise KeyFailed(
                    f"{type(event).__name__} ({env.topic}): its {what} raised "
                    f"{type(exc).__name__}: {exc}; nothing was published",
                    topic=env.topic,
                ) from exc

    def _learn_put(self, event_type: type[Event]) -> None:
        """Keep the put for ``event_type``'s plain publish (``_put_types``):
        the transport's putter for its topic and type where it has one
        (``TopicPut``), else ``_put_one``; watched as ``_put_one`` is."""
        topic = event_type.__topic__
        put = self._put_one
        assert put is not None
        made = self._topic_put.putter(topic, event_type) if self._topic_put is not None else None
        if made is not None:
            put = made if self._observer is None else _observed_put(made, self._observer)
        self._put_types[event_type] = (topic, put)

    async def _publish_put(self, envs: Sequence[Envelope]) -> None:
        """What a synchronous put could not take (the transport is full)."""
        await self._publish(envs)
        if self._observer is not None:
            self._observer.published(envs)

    async def _publish_keyed(self, envs: Sequence[Envelope]) -> None:
        self._fill_keys(envs)
        await self.transport.publish(envs)

    async def _publish_signed(self, envs: Sequence[Envelope]) -> None:
        # Keys are filled first: the signature covers the key routed on.
        if self._partitioned:
            self._fill_keys(envs)
        assert self._signer is not None
        self._signer.sign(envs)
        await self.transport.publish(envs)

    async def _check_routes(self, envs: Sequence[Envelope], mandatory: bool) -> None:
        if mandatory:
            await self._routing.require(envs)
        else:
            # Counted in the background: a plain publish waits for no lookup.
            self._routing.note_soon(envs)

    async def _publish_envelopes(
        self, envs: list[Envelope], *, mandatory: bool | None = None
    ) -> None:
        """Publish events made by handlers: middleware, then reply routing;
        ``mandatory`` defaults to the app's."""
        for env in envs:
            for mw in self._middleware:
                mw.before_publish(env)
        if mandatory is None:
            mandatory = self.mandatory
        # A reply reaches its requester whoever else receives its topic: it
        # is neither unroutable nor refused as such.
        replies = [
            env
            for env in envs
            if (h := env.headers) is not None
            and h.get("surge-expect") == env.topic
            and h.get("surge-reply-to")
        ]
        routed = self._routing.routed
        if replies:
            answered = {id(env) for env in replies}
            checked = [env for env in envs if id(env) not in answered]
        else:
            checked = envs
        for env in checked:
            if env.topic not in routed or (mandatory and self._routing.blind):
                await self._check_routes(checked, mandatory)
                break
        extra: list[Envelope] = []
        for env in replies:
            h = env.headers
            assert h is not None
            reply_to = h["surge-reply-to"]
            if reply_to == self._inbox:
                self._resolve(env)
            else:
                extra.append(
                    Envelope(derive_id(env.id, "reply"), reply_to, None, env.time, h, env.event)
                )
        await self._publish(envs + extra if extra else envs)
        if self._observer is not None:
            self._observer.published(envs)
        for env in envs:
            for mw in reversed(self._middleware):
                mw.after_publish(env)

    # --- request / reply -----------------------------------------------------
    async def request(
        self,
        event: Event,
        *,
        expect: type[E],
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        id: str | None = None,
    ) -> E:
        """Publish ``event`` (with ``headers``) and wait for the first
        ``expect`` event that handling it (directly or downstream) publishes.

        Raises :class:`RequestTimeout` after ``timeout`` seconds. ``id`` as
        for :meth:`publish`: a request published again under a derived id
        is dropped by the transport, and so handled once; only the first
        request's caller gets the reply.
        """
        env = self._envelope(event, None, None, id)
        if self._state != "running":
            raise Closed(f"app {self.name!r} is {self._state}")
        if (waiting := self._pending.get(env.id)) is not None:
            # The same request (one derived id) is waiting already: its
            # publish went out, so wait for its reply rather than race it.
            try:
                async with asyncio.timeout(timeout):
                    joined: E = await asyncio.shield(waiting[0])
                    return joined
            except TimeoutError:
                raise RequestTimeout(
                    f"no {expect.__topic__} reply to {env.topic} {env.id} within {timeout}s"
                ) from None
        env.headers = {
            **(headers or {}),
            "surge-correlation-id": env.id,
            "surge-reply-to": self._inbox,
            "surge-expect": expect.__topic__,
        }
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[env.id] = (fut, expect)
        try:
            async with asyncio.timeout(timeout):
                await self._publish_envelopes([env])
                result: E = await fut
                return result
        except TimeoutError:
            raise RequestTimeout(
                f"no {expect.__topic__} reply to {env.topic} {env.id} within {timeout}s"
            ) from None
        finally:
            self._pending.pop(env.id, None)

    @property
    def pending_requests(self) -> int:
        """Requests waiting for their reply (futures held)."""
        return len(self._pending)

    def _resolve(self, env: Envelope) -> None:
        ev = env.event
        if ev is None and self._signer is not None:
            try:
                self._signer.verify(env)
            except InvalidSignature as exc:
                # Counted and logged, not dead-lettered: the inbox is this
                # process's ephemeral queue, gone with it, and a reply has
                # nothing to replay into. Nor does it fail the request: a
                # forger who read the correlation id off the broker could
                # then cancel it; the genuine reply still resolves it.
                self._rejected_replies += 1
                log.warning("reply rejected (%d so far): %s", self._rejected_replies, exc)
                return
        corr = (env.headers or {}).get("surge-correlation-id")
        entry = self._pending.get(corr or "")
        if entry is None:
            return
        fut, expect = entry
        if fut.done():
            return
        if ev is None:
            body = env.body or b""
            try:
                if len(body) > self.codec.max_message_size:
                    raise DecodeError(
                        f"{env.topic}: reply {env.id} carries {len(body)} bytes; "
                        f"the limit is {self.codec.max_message_size}",
                        topic=env.topic,
                    )
                ev = self.codec.decode_event(body, expect, topic=env.topic)
            except Exception as exc:
                fut.set_exception(exc)
                return
        fut.set_result(ev)

    async def _inbox_loop(self) -> None:
        async for batch in self.transport.consume(self._inbox, prefetch=1000):
            for d in batch:
                self._resolve(d.envelope)
            await self.transport.ack(batch)

    # --- decoding -----------------------------------------------------------
    def _decode(self, env: Envelope, sub: Subscription) -> Event:
        body = env.body
        if body is not None and len(body) > self.codec.max_message_size:
            # What another publisher (another limit, or none) put on the
            # broker: refused before decoding, dead-lettered with the reason.
            raise DecodeError(
                f"{env.topic}: envelope {env.id} carries {len(body)} bytes; "
                f"the limit is {self.codec.max_message_size}",
                topic=env.topic,
            )
        if self._signer is not None:
            self._signer.verify(env)
        tp = sub.types.get(env.topic) or self._types.get(env.topic) or event_type(env.topic)
        if tp is None:
            raise UnknownTopic(
                f"no event type is declared for topic {env.topic!r}", topic=env.topic
            )
        return self.codec.decode_event(env.body or b"", tp, topic=env.topic)

    # --- executors -----------------------------------------------------------
    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._threadpool is None:
            self._threadpool = ThreadPoolExecutor(self._threads, thread_name_prefix="surge")
        return self._threadpool

    def _process_pool(self) -> ProcessPoolExecutor:
        if self._procpool is None:
            # spawn: no fork of a process that holds a running loop and threads
            ctx = multiprocessing.get_context("spawn")
            self._procpool = ProcessPoolExecutor(self._processes, mp_context=ctx)
        return self._procpool

    # --- lifecycle -----------------------------------------------------------
    async def start(self, *, consume: bool | None = None) -> None:
        """Connect the transport, declare every group and start consuming.

        With ``consume=False`` (default: :attr:`consume`), the groups of every
        subscription are declared but nothing is consumed and no trigger runs:
        a publish-only process (a web front) that starts before any worker
        still has what it publishes kept for the workers' groups.
        """
        if consume is None:
            consume = self.consume
        if self._state == "running":
            return
        if self._state == "stopping":
            raise Closed("the app is stopping")
        self._stop_requested = asyncio.Event()
        if self._stop_early:  # a SIGTERM while the process started up
            self._stop_early = False
            self._stop_requested.set()
        transport = self.transport
        if self.mandatory and not isinstance(transport, KnowsGroups):
            raise ConfigurationError(
                f"App(mandatory=True) needs a transport that can tell which groups exist "
                f"(KnowsGroups, docs/transports.md); {type(transport).__name__} cannot"
            )
        await transport.start()
        for sub in self._subs.values():
            await transport.declare(sub.name, sub.topics)
        await transport.declare(self._inbox, (self._inbox,), ephemeral=True)
        self._state = _RUNNING
        self._runners.clear()
        caps = self._caps = capabilities_of(transport)
        self._routing.use(caps.groups, [t for sub in self._subs.values() for t in sub.topics])
        self._publish = transport.publish
        self._keyers = self._partition_keys()
        self._partitioned = caps.partitions > 0
        if self._partitioned:
            self._publish = self._publish_keyed
        if self._signer is not None:
            self._publish = self._publish_signed
        # A synchronous put is publication only where acceptance is (a
        # transport that is not durable); keyed routing needs publish, and
        # signing a signed publish.
        if (
            caps.direct_put is not None
            and not transport.durable
            and not self._partitioned
            and self._signer is None
        ):
            self._direct_put = caps.direct_put.put_one
            if not self._middleware:
                self._put_one = self._direct_put
                self._topic_put = caps.topic_put
                if self._observer is not None:
                    self._put_one = _observed_put(self._direct_put, self._observer)
        self._put_types.clear()
        self._wall = self.clock.time
        runtime = Runtime(
            app=self,
            transport=transport,
            clock=self.clock,
            codec=self.codec,
            middleware=self._middleware,
            hands_back=caps.hands_back,
            takes_now=caps.takes_now,
            fences=caps.fences,
            fenced_state=caps.fenced_state,
            state=caps.state or self._local_state,
            partitions=caps.partitions,
            rng=self._rng,
            timings=self._timings,
            decode=self._decode,
            publish=self._publish_envelopes,
            thread_pool=self._thread_pool,
            threads=self._threads,
            process_pool=self._process_pool,
            observer=self._observer,
        )
        self._consuming = consume
        if consume:
            for part in self._parts:
                await part.start(runtime)
            for sub in self._subs.values():
                runner = self._runners[sub.name] = Runner(runtime, sub)
                runner.start()
        self._inbox_task = asyncio.get_running_loop().create_task(self._inbox_loop())
        for fn in self._on_start:
            await fn()

    async def stop(self, *, drain: bool = False) -> None:
        """Stop taking events, let handlers in flight finish, hand back the
        rest and close the transport, all within ``shutdown_timeout``.

        The stop runs in named phases, each bounded and logged at DEBUG with
        its duration (``surge._shutdown``); :attr:`stop_report` tells how it
        went, and one INFO line sums it up. With ``drain=True``, first wait
        (within the handlers' share of the time) until the transport holds
        nothing more for this app to handle; on a transport that cannot tell
        (not ``IdleAware``) that raises ``NotImplementedError`` and the app
        keeps running.
        """
        if self._state != "running":
            return
        if drain and self._caps.idle is None:
            await self.drain()  # raises, naming what is missing
        stop = Shutdown(self.clock, self.shutdown_timeout)
        if drain:
            async with stop.phase("drain", early=True):
                await stop.wait(self.drain(), "drain")
        self._state = "stopping"
        self._put_one = self._direct_put = None
        self._topic_put = None
        self._put_types.clear()
        async with stop.phase("triggers", early=True):
            for part in reversed(self._parts) if self._consuming else ():
                await stop.wait(part.stop(), f"stopping {type(part).__name__}")
            for fn in self._on_stop:
                await stop.wait(fn(), f"on_stop hook {getattr(fn, '__qualname__', fn)}")
        runners = list(self._runners.values())
        # Subscriptions stop side by side: one whose consumer is slow to end
        # (a cancel swallowed in a blocking read) holds up no other.
        async with stop.phase("intake"):
            await stop.wait(_each(r.stop_intake() for r in runners), "stopping intake")
        async with stop.phase("handlers", early=True):
            idle = await stop.wait(_all_idle(runners), "handlers in flight")
        if not idle:
            log.warning(
                "%d handlers still running after %.1fs; cancelling them and handing their "
                "events back",
                sum(r.running for r in runners),
                stop.early - stop.started,
            )
            async with stop.phase("cancel"):
                for r in runners:
                    await stop.wait(r.cancel_workers(), f"{r.group}: cancelling handlers")
        async with stop.phase("acks"):
            await stop.wait(_each(r.close() for r in runners), "settling acks")
            if self._inbox_task is not None:
                self._inbox_task.cancel()
                await stop.wait(asyncio.wait((self._inbox_task,)), "the reply inbox")
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(Closed("the app stopped before the reply came"))
        async with stop.phase("close"):
            transport = self.transport
            idle_aware = self._caps.idle
            if not transport.durable and (idle_aware is None or not idle_aware.idle):
                stats = [await transport.stats(s) for s in self._subs]
                backlog = sum(s.backlog + s.scheduled for s in stats)
                if backlog:
                    log.warning(
                        "%s is not durable: %d undelivered events are dropped",
                        transport.url.split("?", 1)[0],
                        backlog,
                    )
            await stop.wait(self._routing.close(), "unroutable lookups")
            await stop.wait(transport.close(), "closing the transport")
            if self._threadpool is not None:
                self._threadpool.shutdown(wait=False, cancel_futures=True)
                self._threadpool = None
            if self._procpool is not None:
                self._procpool.shutdown(wait=True, cancel_futures=True)
                self._procpool = None
            for fn in self._after_stop:
                await stop.wait(fn(), f"after_stop hook {getattr(fn, '__qualname__', fn)}")
        self._state = "stopped"
        self._stop_report = report = stop.report()
        log.info("app %s %s", self.name, report)

    @property
    def stop_report(self) -> StopReport | None:
        """How the last stop went (its phases and their durations); None
        before the first."""
        return self._stop_report

    @contextlib.asynccontextmanager
    async def lifespan(self, host: object = None) -> AsyncIterator[None]:
        """Run this app for the life of an ASGI host app:
        ``FastAPI(lifespan=app.lifespan)`` or ``Starlette(lifespan=...)``
        starts it with the host and, when the host stops, drains it (when
        the transport can tell it is idle) and stops it. ``host`` is the
        host app, which the ASGI frameworks pass; it is not used. Compose it
        with a lifespan of your own by entering ``app.lifespan(host)``
        inside yours."""
        await self.start()
        try:
            yield
        finally:
            await self.stop(drain=self._caps.idle is not None)

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def drain(self) -> None:
        """Wait until every published event has been handled or settled and
        nothing is scheduled (retries included).

        Needs a transport that can tell (``IdleAware``, docs/transports.md);
        raises ``NotImplementedError`` on any other.
        """
        if self._state != _RUNNING:
            raise Closed(f"app {self.name!r} is {self._state}; drain inside 'async with app'")
        if not self._consuming:
            raise ConfigurationError(
                f"app {self.name!r} was started with consume=False: nothing here handles "
                "what drain() would wait for"
            )
        idle = self._caps.idle
        if idle is None:
            raise NotImplementedError(
                f"{type(self.transport).__name__} cannot tell when it is idle (no "
                "idle/wait_idle): drain() needs an IdleAware transport"
            )
        while True:
            await idle.wait_idle()
            for r in self._runners.values():
                await r.wait_idle()
            if idle.idle and all(r.idle for r in self._runners.values()):
                return

    async def wait_stop_requested(self) -> None:
        """Return once :meth:`request_stop` was called (or at once if stopped)."""
        if self._stop_requested is None or self._state in ("stopping", "stopped"):
            return
        await self._stop_requested.wait()

    def request_stop(self) -> None:
        """Ask :meth:`serve` to stop (safe from signal handlers)."""
        if self._stop_requested is not None:
            self._stop_requested.set()
        else:
            self._stop_early = True

    async def serve(self) -> None:
        """Run until :meth:`request_stop` (SIGINT / SIGTERM under :meth:`run`)."""
        async with self:
            assert self._stop_requested is not None
            await self._stop_requested.wait()

    def run(self, *, install_signals: bool = True) -> None:
        """Run the app on a new event loop (uvloop when installed) until
        SIGINT or SIGTERM, then stop gracefully."""

        async def main() -> None:
            if install_signals:
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, self.request_stop)
            await self.serve()

        run_loop(main())

    # --- introspection and dead letters -------------------------------------
    def statistics(self) -> AppStats:
        """A snapshot of every subscription's counters."""
        subs = {}
        for name in self._subs:
            r = self._runners.get(name)
            if r is None:
                subs[name] = SubscriptionStats()
                continue
            subs[name] = SubscriptionStats(
                received=r.received,
                succeeded=r.succeeded,
                failed=r.failed,
                retried=r.retried,
                dead_lettered=r.dead_lettered,
                in_flight=r.running,
                queued=r.queued,
                stuck_threads=r.timed_out_threads,
            )
        return AppStats(
            subscriptions=subs,
            unroutable=self._routing.unroutable,
            pending_requests=len(self._pending),
            rejected_replies=self._rejected_replies,
            loop_lag=self._lag.last,
            loop_lag_max=self._lag.max,
            resident_memory=resident_memory(),
        )

    def _group(self, subscription: str | Callable[..., Any] | None) -> str | None:
        if subscription is None:
            return None
        if callable(subscription):
            for s in self._subs.values():
                if s.handler is subscription:
                    return s.name
            raise ConfigurationError(f"{subscription!r} is not a handler of this app")
        if subscription in self._subs:
            return subscription
        full = f"{self.name}.{subscription}"
        if full in self._subs:
            return full
        raise ConfigurationError(
            f"no subscription {subscription!r}; subscriptions: {sorted(self._subs)}"
        )

    async def dead_letters(
        self, subscription: str | Callable[..., Any] | None = None
    ) -> list[DeadLetter]:
        """Dead letters of one subscription, or of all."""
        group = self._group(subscription)
        if group is None:
            letters = await self.transport.dead_letters(None)
            return [d for d in letters if d.group in self._subs]
        return await self.transport.dead_letters(group)

    async def replay(
        self, subscription: str | Callable[..., Any], ids: Sequence[str] | None = None
    ) -> int:
        """Deliver dead letters (all, or ``ids``) to their subscription again."""
        group = self._group(subscription)
        assert group is not None
        return await self.transport.replay(group, ids)

    async def purge(
        self, subscription: str | Callable[..., Any], ids: Sequence[str] | None = None
    ) -> int:
        """Delete dead letters (all, or ``ids``) of a subscription."""
        group = self._group(subscription)
        assert group is not None
        return await self.transport.purge(group, ids)

    def __repr__(self) -> str:
        return f"<App {self.name!r} {self._state} subscriptions={len(self._subs)}>"


_RUNNING: Literal["running"] = "running"
# Envelopes per transport call of publish_many: bounds one Lua call, SQL
# statement or confirm window, while amortising the round trip.
_PUBLISH_BATCH = 1000
# Event types already checked: isinstance() through msgspec's metaclass costs
# about 100 ns, a set lookup about 40.
_EVENT_TYPES: set[type[Any]] = set()


def _check_event(event: object) -> None:
    if not isinstance(event, Event):
        raise TypeError(f"publish takes an Event, not {type(event).__name__}")
    _EVENT_TYPES.add(type(event))


def _observed_put(
    put: Callable[[Envelope], bool], observer: Observer
) -> Callable[[Envelope], bool]:
    """``put``, telling ``observer`` of each envelope it took."""

    def put_one(env: Envelope) -> bool:
        if put(env):
            observer.published((env,))
            return True
        return False

    return put_one


async def _not_running(envelopes: Sequence[Envelope]) -> None:
    raise Closed("the app is not running")


async def _each(steps: Iterable[Awaitable[None]]) -> None:
    """Run ``steps`` side by side; raise the first failure once all ended."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def _all_idle(runners: Sequence[Runner]) -> None:
    for r in runners:
        await r.wait_idle()


def _kind_of(fn: Callable[..., Any], executor: Executor | None) -> str:
    is_async = inspect.iscoroutinefunction(fn)
    if executor is None:
        return ASYNC if is_async else THREAD
    if executor == "async" and not is_async:
        raise ConfigurationError(f"{fn.__qualname__} is not a coroutine function")
    if executor in (THREAD, PROCESS, INLINE) and is_async:
        raise ConfigurationError(
            f"{fn.__qualname__} is async; executor={executor!r} runs plain functions"
        )
    if executor not in (ASYNC, THREAD, PROCESS, INLINE):
        raise ConfigurationError(f"unknown executor {executor!r}")
    return executor


def _positional_arity(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return 2
    return sum(1 for p in params if p.kind in kinds)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a new loop: uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _schedule(env: Envelope, delay: float | None, at: datetime | float | None) -> None:
    """Set ``env.not_before`` from ``delay`` (seconds) or ``at``."""
    if at is not None:
        if delay is not None:
            raise ConfigurationError("give delay= or at=, not both")
        if isinstance(at, datetime):
            if at.tzinfo is None:
                raise ConfigurationError("at= needs an aware datetime (with tzinfo)")
            env.not_before = at.timestamp()
        else:
            env.not_before = float(at)
    elif delay is not None:
        env.not_before = env.time + delay
