"""The ingress: an ASGI application that turns HTTP requests into events.

Plain ASGI rather than a framework: the hot path is a dict lookup, one
``receive``, one msgspec decode, one publish and two ``send`` calls, and
every status this module answers is decided here, where it can be tested.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import msgspec

from .._codec import field_of
from .._errors import (
    Closed,
    ConfigurationError,
    Forbidden,
    InvalidCloudEvent,
    MessageTooLarge,
    RequestTimeout,
    TransportError,
    Unauthorized,
)
from .._event import Event
from ._admission import AdaptiveLimit, Admission, AdmissionStats
from ._auth import PRINCIPAL_HEADER, Auth
from ._cloudevents import CloudEventsReader, CloudEventsRoute, cloudevent_types
from ._config import Limits
from ._idempotency import HEADER as IDEMPOTENCY_HEADER
from ._idempotency import Answers, idempotent_id
from ._metrics import Metrics, RouteStats

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from .._app import App

__all__ = (
    "ADMIN_LISTENER",
    "ASGIApp",
    "HttpStats",
    "Ingress",
    "Receive",
    "RequestHandler",
    "RequestWrapper",
    "Route",
    "Scope",
    "Send",
)

log = logging.getLogger("surge.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RequestHandler = Callable[[Scope, Receive, Send], Awaitable[int]]
"""Handles one routed request; returns the status it answered."""
RequestWrapper = Callable[[RequestHandler, Scope, Receive, Send], Awaitable[int]]
"""Runs around a :data:`RequestHandler` (``Ingress.around_requests``)."""

RESERVED = ("/healthz", "/readyz", "/metrics")
ADMIN_LISTENER = "surge.admin"
"""The scope key an admin listener sets (``True``) on each request it
accepts; only an ASGI server can set it, never a client."""
_FORWARDED = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
_BEARER = (b"www-authenticate", b'Bearer realm="surge-admin"')
_CHALLENGE = (b"www-authenticate", b'Bearer realm="surge"')
_JSON = (b"content-type", b"application/json")
_CLOSE = (b"connection", b"close")
_RETRY = (b"retry-after", b"1")
_BUSY = b'{"error":"overloaded: too many requests in flight, retry later"}'
_SHED = b'{"error":"overloaded: the pipeline behind this route is behind, retry later"}'
_UNAVAILABLE = b'{"error":"the event store is unavailable for now, retry later"}'
_PROMETHEUS = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """A path that publishes its decoded body as ``publish`` and answers 202,
    or, with ``reply``, waits up to ``timeout`` for that event and answers
    200 with it. ``auth`` decides who may call it (else the ingress's
    :meth:`~Ingress.set_auth` hook, if any). ``target_latency`` bounds how
    long what it admits may queue behind it (None: ``Limits.target_latency``;
    ``math.inf``: never shed)."""

    method: str
    path: str
    publish: type[Event]
    reply: type[Event] | None = None
    timeout: float = 5.0
    auth: Auth | None = None
    target_latency: float | None = None


class HttpStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the ingress's counters."""

    in_flight: int
    requests: dict[str, dict[int, int]]
    """``"POST /orders"`` -> status -> count."""
    admission: dict[str, AdmissionStats] = msgspec.field(default_factory=dict)
    """``"POST /orders"`` -> its admission, for routes that have one."""


class _Reject(Exception):
    """Ends a request early with ``status`` (raised on the error paths only)."""

    def __init__(self, status: int, error: str, *, close: bool = False, **extra: str) -> None:
        super().__init__(error)
        self.status = status
        self.body = msgspec.json.encode({"error": error, **extra})
        self.close = close


_Reader = Callable[
    [list[tuple[bytes, bytes]], bytes, dict[str, str] | None], tuple[Event, dict[str, str], str]
]
"""Reads a request of a route that is not plain JSON (CloudEvents): the
event, its headers and its id."""


class _Bound:
    """A route with what its hot path needs at hand."""

    __slots__ = (
        "admission",
        "auth",
        "decoder",
        "key",
        "reader",
        "reply",
        "route",
        "stats",
        "timeout",
    )

    def __init__(
        self, route: Route | CloudEventsRoute, stats: RouteStats, reader: _Reader | None = None
    ) -> None:
        self.route = route
        self.admission: AdaptiveLimit | None = None
        self.auth = route.auth
        self.stats = stats
        self.reader = reader
        self.key = f"{route.method} {route.path}"
        if isinstance(route, Route):
            self.decoder = msgspec.json.Decoder(route.publish)
            self.reply = route.reply
            self.timeout = route.timeout
        else:
            self.reply = None


class Ingress:
    """The HTTP face of an app (``app.http``): routes, health and metrics.

    An ASGI application: ``surge.http.serve(app, host, port)`` serves it with
    uvicorn in the app's own process and loop, and any ASGI server can mount
    it (with the lifespan protocol it starts and stops the app).
    """

    def __init__(self, app: App, *, limits: Limits | None = None) -> None:
        self.app = app
        self._routes: dict[tuple[str, str], _Bound] = {}
        self._stats: dict[tuple[str, str], RouteStats] = {}
        self._paths: dict[str, list[str]] = {}
        self.metrics = Metrics(self._stats)
        self._mounts: list[tuple[str, ASGIApp, bool]] = []
        self._admin_token: bytes | None = None
        self._auth: Auth | None = None
        self._refreshers: list[Callable[[], Awaitable[object]]] = []
        self._around: RequestWrapper | None = None
        self._stopping = False
        self._shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self._admission: Admission | None = None
        self.configure(limits or Limits())
        self._now = app.clock.monotonic
        self.answers = Answers(self._now)
        """Reply routes' answers kept for retries under one Idempotency-Key
        (``ttl`` and ``size`` can be set)."""
        for path in RESERVED:
            self._paths[path] = ["GET"]
        app.on_stop(self._on_app_stop)

    # --- declaring -----------------------------------------------------------
    def configure(self, limits: Limits) -> None:
        """Apply ``limits`` (the server's share is read when it starts)."""
        self.limits = limits
        self._max_in_flight = limits.max_in_flight
        self._max_body = limits.max_body

    def post(
        self,
        path: str,
        *,
        publish: type[Event],
        reply: type[Event] | None = None,
        timeout: float = 5.0,
        auth: Auth | None = None,
        target_latency: float | None = None,
    ) -> Route:
        """``POST path``: decode the JSON body into ``publish`` and publish it;
        answer 202 ``{"id": ...}``, or with ``reply`` the reply event (200).
        With ``auth`` (or an app-wide :meth:`set_auth` hook), only callers
        it accepts (401/403 otherwise, before the body is read); the
        principal goes with the event as its ``surge-principal`` header.
        ``target_latency``: see :class:`Route` and docs/http.md."""
        return self.route(
            "POST",
            path,
            publish=publish,
            reply=reply,
            timeout=timeout,
            auth=auth,
            target_latency=target_latency,
        )

    def put(
        self,
        path: str,
        *,
        publish: type[Event],
        reply: type[Event] | None = None,
        timeout: float = 5.0,
        auth: Auth | None = None,
        target_latency: float | None = None,
    ) -> Route:
        """Like :meth:`post`, for ``PUT``."""
        return self.route(
            "PUT",
            path,
            publish=publish,
            reply=reply,
            timeout=timeout,
            auth=auth,
            target_latency=target_latency,
        )

    def route(
        self,
        method: str,
        path: str,
        *,
        publish: type[Event],
        reply: type[Event] | None = None,
        timeout: float = 5.0,
        auth: Auth | None = None,
        target_latency: float | None = None,
    ) -> Route:
        """Declare a route; see :meth:`post`."""
        method = method.upper()
        if not path.startswith("/"):
            raise ConfigurationError(f"route path {path!r} must start with '/'")
        if path in RESERVED:
            raise ConfigurationError(f"{path} is the ingress's own endpoint")
        if (method, path) in self._routes:
            raise ConfigurationError(f"{method} {path} is declared twice")
        for name, tp in (("publish", publish), ("reply", reply)):
            if tp is not None and not (isinstance(tp, type) and issubclass(tp, Event)):
                raise ConfigurationError(f"{name}= takes an Event subclass, not {tp!r}")
        if timeout <= 0:
            raise ConfigurationError("timeout must be positive")
        if auth is not None and not callable(auth):
            raise ConfigurationError(f"auth= takes a callable, not {auth!r}")
        if target_latency is not None and not target_latency > 0:
            raise ConfigurationError("target_latency must be positive (math.inf: never shed)")
        route = Route(
            method=method,
            path=path,
            publish=publish,
            reply=reply,
            timeout=timeout,
            auth=auth,
            target_latency=target_latency,
        )
        self._routes[(method, path)] = _Bound(route, self._stats_for(method, path))
        self._paths.setdefault(path, []).append(method)
        if self._admission is None and self.app.state not in ("running", "stopping"):
            # The pipelines behind the routes are known once the app starts
            # (subscriptions may come after the routes): a part of the app
            # samples them while it runs.
            self._admission = Admission(
                self._admission_routes,
                self._bind_admission,
                lambda: self.limits.target_latency,
                lambda: self.limits.admission_interval,
            )
            self.app.attach(self._admission)
        return route

    def cloudevents(
        self,
        path: str,
        *types: type[Event] | Mapping[str, type[Event]],
        auth: Auth | None = None,
    ) -> CloudEventsRoute:
        """``POST path`` takes CloudEvents 1.0 in binary mode (``ce-*``
        headers) and structured mode (``application/cloudevents+json``) and
        publishes each as the event class its ``type`` names: a class stands
        for its topic (``OrderPlaced`` takes type ``"OrderPlaced"``, or its
        ``__topic__``); a mapping names other types (``{"com.example.placed":
        OrderPlaced}``). Answers 202 ``{"id": ...}``; the event id is derived
        from ``source`` and ``id``, so a repeat is dropped; the attributes go
        with the event as ``ce-*`` headers. See docs/http.md."""
        if not path.startswith("/") or path in RESERVED:
            raise ConfigurationError(f"route path {path!r} must start with '/', not be reserved")
        if ("POST", path) in self._routes:
            raise ConfigurationError(f"POST {path} is declared twice")
        if auth is not None and not callable(auth):
            raise ConfigurationError(f"auth= takes a callable, not {auth!r}")
        table = cloudevent_types(types)
        route = CloudEventsRoute(path=path, types=table, auth=auth)
        bound = _Bound(route, self._stats_for("POST", path), CloudEventsReader(table))
        self._routes[("POST", path)] = bound
        self._paths.setdefault(path, []).append("POST")
        return route

    def _admission_routes(self) -> list[tuple[tuple[str, str], tuple[str, ...], float | None]]:
        """Each route's key, the topics it publishes and its own target."""
        found: list[tuple[tuple[str, str], tuple[str, ...], float | None]] = []
        for key, b in self._routes.items():
            route = b.route
            if isinstance(route, Route):
                found.append((key, (route.publish.__topic__,), route.target_latency))
            else:
                topics = tuple(dict.fromkeys(tp.__topic__ for tp in route.types.values()))
                found.append((key, topics, None))
        return found

    def _bind_admission(self, key: tuple[str, str], limit: AdaptiveLimit | None) -> None:
        bound = self._routes.get(key)
        if bound is not None:
            bound.admission = limit

    # --- extensions: surge.observe adds its routes, metrics and spans here ----
    def mount(self, prefix: str, app: ASGIApp, *, admin: bool = True) -> None:
        """Serve the paths under ``prefix`` (such as ``"/_surge/"``) that no
        route takes with the ASGI ``app``; its answers count under ``prefix``.
        A prefix without the closing slash (``"/asyncapi.json"``) is one
        path, served alone.

        An ``admin`` mount (the default) is an operator surface, guarded like
        ``/metrics``: see :meth:`set_admin_token`."""
        if not prefix.startswith("/") or prefix == "/" or prefix in RESERVED:
            raise ConfigurationError(f"mount prefix {prefix!r}: write it as '/name/' or '/name'")
        if any(prefix == known for known, _, _ in self._mounts):
            raise ConfigurationError(f"{prefix} is mounted twice")
        self._mounts.append((prefix, app, admin))

    @property
    def mounted(self) -> tuple[str, ...]:
        """The prefixes (and single paths) other apps are mounted at."""
        return tuple(prefix for prefix, _, _ in self._mounts)

    def set_auth(self, auth: Auth | None) -> None:
        """Check every route without an ``auth=`` of its own with ``auth``
        (see :mod:`surge.http` for the hook; ``None`` removes it)."""
        if auth is not None and not callable(auth):
            raise ConfigurationError(f"set_auth takes a callable, not {auth!r}")
        self._auth = auth

    def set_admin_token(self, token: str | None) -> None:
        """Guard the operator surface (``/metrics`` and admin mounts such as
        ``/_surge/``) with ``Authorization: Bearer <token>``.

        Without a token the operator surface is served on an admin listener
        only (``serve(..., admin=(host, port))``), to requests that carry no
        ``Forwarded``/``X-Forwarded-For`` header (a proxy's requests are
        remote ones) and name the host by address or ``localhost`` (a
        rebound DNS name is refused); a public listener answers 404. With a
        token, every listener serves it to requests bearing the token, and
        only to those. The client's address is never taken as identity.
        """
        if token is not None and not token.strip():
            raise ConfigurationError("the admin token must not be empty")
        self._admin_token = None if token is None else f"Bearer {token}".encode()

    @property
    def admin_protected(self) -> bool:
        """An admin token is set."""
        return self._admin_token is not None

    def add_collector(
        self, collector: Collector, *, refresh: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        """Export ``collector``'s families at ``/metrics`` too; ``refresh``
        is awaited before each scrape (a Prometheus collector is synchronous,
        so what needs a round trip is read there)."""
        self.metrics.registry.register(collector)
        if refresh is not None:
            self._refreshers.append(refresh)

    def around_requests(self, wrapper: RequestWrapper) -> None:
        """Handle each routed request through ``wrapper(handle, scope,
        receive, send)``, which awaits ``handle(scope, receive, send)`` and
        returns its status (a tracing span per request). A wrapper added
        later runs inside the earlier ones."""
        outer = self._around
        if outer is None:
            self._around = wrapper
            return

        async def nested(handle: RequestHandler, scope: Scope, receive: Receive, send: Send) -> int:
            async def inner(sc: Scope, rc: Receive, sd: Send) -> int:
                return await wrapper(handle, sc, rc, sd)

            return await outer(inner, scope, receive, send)

        self._around = nested

    @property
    def routes(self) -> list[Route]:
        """The JSON routes (``post``, ``put``, ``route``)."""
        return [b.route for b in self._routes.values() if isinstance(b.route, Route)]

    @property
    def cloudevent_routes(self) -> list[CloudEventsRoute]:
        """The CloudEvents routes (:meth:`cloudevents`)."""
        return [b.route for b in self._routes.values() if isinstance(b.route, CloudEventsRoute)]

    def statistics(self) -> HttpStats:
        """Requests answered per route and status, and requests in flight."""
        return HttpStats(
            in_flight=self.metrics.in_flight,
            requests={f"{s.method} {s.path}": dict(s.statuses) for s in self._stats.values()},
            admission={
                f"{m} {p}": b.admission.statistics()
                for (m, p), b in self._routes.items()
                if b.admission is not None
            },
        )

    @property
    def ready(self) -> bool:
        """The app is running and not stopping."""
        return self.app.state == "running" and not self._stopping

    def _stats_for(self, method: str, path: str) -> RouteStats:
        stats = self._stats.get((method, path))
        if stats is None:
            stats = self._stats[(method, path)] = RouteStats(method, path)
        return stats

    # --- lifecycle hooks used by the server ----------------------------------
    def on_shutdown(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Await ``hook`` when the app begins to stop, after the ingress
        refuses new work (a server stops there); returns the undo."""
        self._shutdown_hooks.append(hook)
        return lambda: self._shutdown_hooks.remove(hook)

    async def _on_app_stop(self) -> None:
        # Refuse new work, then let servers finish the requests in flight:
        # handlers still run while on_stop hooks do, so replies still come.
        self._stopping = True
        for hook in list(self._shutdown_hooks):
            await hook()

    def serving(self) -> None:
        """A server starts serving this ingress: it takes work again."""
        self._stopping = False

    # --- ASGI ------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        root: str = scope.get("root_path", "")
        if root and scope["path"].startswith(root):
            # Mounted in a host app (Starlette's Mount keeps the whole path
            # and names the mount point in root_path): route what follows.
            scope = {**scope, "path": scope["path"][len(root) :] or "/"}
        start = self._now()
        bound = self._routes.get((scope["method"], scope["path"]))
        if bound is None:
            path: str = scope["path"]
            for prefix, mounted, admin in self._mounts:
                bare = path + "/" == prefix  # /_surge -> /_surge/
                if bare or (path.startswith(prefix) if prefix[-1] == "/" else path == prefix):
                    refusal = self._admin_refusal(scope) if admin else None
                    if refusal is not None or bare:
                        if refusal is not None:
                            status = await _refuse(send, refusal)
                        else:
                            status = await _redirect(send, scope, prefix)
                        self._stats_for(scope["method"], prefix).observe(
                            status, self._now() - start
                        )
                        return
                    await self._mounted(prefix, mounted, scope, receive, send, start)
                    return
            await self._builtin(scope, receive, send, start)
            return
        metrics = self.metrics
        if metrics.in_flight >= self._max_in_flight:
            # Refuse at once and drop the connection: a queue here would only
            # grow latency for everyone, and an open socket costs a descriptor.
            await _answer(send, 503, _BUSY, (_JSON, _RETRY, _CLOSE))
            bound.stats.observe(503, self._now() - start)
            return
        admission = bound.admission
        if admission is not None and not admission.admit():
            # The pipeline behind the route is behind: what it admitted now
            # would only wait in a queue. The connection stays open.
            await _answer(send, 503, _SHED, (_JSON, _RETRY))
            bound.stats.observe(503, self._now() - start)
            return
        metrics.in_flight += 1
        try:
            around = self._around
            if around is None:
                status = await self._handle(bound, scope, receive, send)
            else:

                async def handle(sc: Scope, rc: Receive, sd: Send) -> int:
                    return await self._handle(bound, sc, rc, sd)

                status = await around(handle, scope, receive, send)
        finally:
            metrics.in_flight -= 1
        bound.stats.observe(status, self._now() - start)

    async def _mounted(
        self, prefix: str, app: ASGIApp, scope: Scope, receive: Receive, send: Send, start: float
    ) -> None:
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, counted)
        finally:
            self._stats_for(scope["method"], prefix).observe(status, self._now() - start)

    async def _handle(self, bound: _Bound, scope: Scope, receive: Receive, send: Send) -> int:
        try:
            auth = bound.auth or self._auth
            headers = None
            if auth is not None:
                headers = {PRINCIPAL_HEADER: await _authenticate(auth, scope)}
            body = await self._read(scope, receive)
            reader = bound.reader
            given: str | None
            try:
                if reader is None:
                    event = bound.decoder.decode(body)
                    given = None
                    # inline, not a call: most requests carry no key, and a
                    # call per request cost ~1 us of ~18 (publish route, in process)
                    for name, _ in scope["headers"]:
                        if name == IDEMPOTENCY_HEADER:
                            given = self._idempotent_id(bound, scope, headers)
                            break
                else:
                    event, headers, given = reader(scope["headers"], body, headers)
            except msgspec.ValidationError as exc:
                message = str(exc)
                raise _Reject(422, message, field=field_of(message)) from None
            except msgspec.DecodeError as exc:
                raise _Reject(400, f"the body is not valid JSON: {exc}") from None
            except RecursionError:
                # msgspec gives up on nesting past its depth limit at once
                # (a JSON bomb costs well under a millisecond); say so.
                raise _Reject(400, "the body is nested too deeply") from None
            except InvalidCloudEvent as exc:
                status = 415 if exc.code == "unsupported-format" else 400
                if exc.attribute is None:
                    raise _Reject(status, str(exc), code=exc.code) from None
                raise _Reject(status, str(exc), code=exc.code, attribute=exc.attribute) from None
            if bound.reply is None:
                event_id = await self.app.publish(event, headers=headers, id=given)
                await _answer(send, 202, b'{"id":"%s"}' % event_id.encode(), (_JSON,))
                return 202
            if given is not None and (kept := self.answers.get(given)) is not None:
                await _answer(send, 200, kept, (_JSON,))
                return 200
            try:
                reply = await self.app.request(
                    event, expect=bound.reply, timeout=bound.timeout, headers=headers, id=given
                )
            except RequestTimeout:
                raise _Reject(
                    504, f"no {bound.reply.__topic__} reply within {bound.timeout}s"
                ) from None
            encoded = msgspec.json.encode(reply)
            if given is not None:
                self.answers.put(given, encoded)
            await _answer(send, 200, encoded, (_JSON,))
            return 200
        except _Reject as rej:
            answer = (_JSON, _CLOSE) if rej.close else (_JSON,)
            if rej.status == 401:
                answer = (*answer, _CHALLENGE)
            await _answer(send, rej.status, rej.body, answer)
            return rej.status
        except Closed:
            await _answer(send, 503, b'{"error":"the app is not running"}', (_JSON, _RETRY, _CLOSE))
            return 503
        except TransportError as exc:
            # The broker's trouble, past the transport's own wait (sqlite's
            # busy_timeout, a reconnect): not the client's fault, and the
            # same request may well succeed in a moment. Never a 500.
            self.metrics.transport_errors += 1
            log.warning(
                "%s %s: the transport failed, answered 503: %s", scope["method"], scope["path"], exc
            )
            await _answer(send, 503, _UNAVAILABLE, (_JSON, _RETRY))
            return 503
        except MessageTooLarge as exc:
            await _answer(send, 413, msgspec.json.encode({"error": str(exc)}), (_JSON,))
            return 413
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            await _answer(send, 500, b'{"error":"internal error"}', (_JSON, _CLOSE))
            return 500

    @staticmethod
    def _idempotent_id(bound: _Bound, scope: Scope, headers: dict[str, str] | None) -> str | None:
        """The event id an ``Idempotency-Key`` header asks for (see
        ``_idempotency``), or None."""
        try:
            principal = headers[PRINCIPAL_HEADER] if headers else ""
            return idempotent_id(scope["headers"], bound.key, principal)
        except ValueError as exc:
            raise _Reject(400, str(exc), header="Idempotency-Key") from None

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        limit = self._max_body
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise _Reject(400, "Content-Length is not a number", close=True) from None
                if declared > limit:
                    # Refuse before reading any of it; closing the connection
                    # is the only way not to read the rest.
                    raise _Reject(
                        413, f"the body is larger than {limit} bytes", close=True
                    ) from None
                break
        message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if message["type"] == "http.disconnect":
                raise _Reject(400, "the client went away", close=True)
            if len(body) > limit:
                raise _Reject(413, f"the body is larger than {limit} bytes", close=True)
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Reject(400, "the client went away", close=True)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Reject(413, f"the body is larger than {limit} bytes", close=True)
            chunks.append(chunk)
        if size > limit:
            raise _Reject(413, f"the body is larger than {limit} bytes", close=True)
        return b"".join(chunks)

    async def _builtin(self, scope: Scope, receive: Receive, send: Send, start: float) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        methods = self._paths.get(path)
        if methods is None:
            status = 404
            await _answer(send, 404, b'{"error":"no such route"}', (_JSON,))
            path = "(unmatched)"
        elif method not in methods and not (method == "HEAD" and "GET" in methods):
            status = 405
            allow = (b"allow", ", ".join(methods).encode())
            await _answer(send, 405, b'{"error":"method not allowed"}', (_JSON, allow))
        elif path == "/healthz":
            status = 200
            await _answer(send, 200, b'{"status":"ok"}', (_JSON,))
        elif path == "/readyz":
            why = await self._not_ready()
            if why is None:
                status = 200
                await _answer(send, 200, b'{"status":"ready"}', (_JSON,))
            else:
                status = 503
                if self._admin_refusal(scope) is not None:
                    # a broker's error names hosts and addresses: for operators only
                    why = why.partition(":")[0]
                body = msgspec.json.encode({"status": "not ready", "reason": why})
                await _answer(send, 503, body, (_JSON, _RETRY))
        elif (refusal := self._admin_refusal(scope)) is not None:
            status = await _refuse(send, refusal)
        else:
            for refresh in self._refreshers:
                await refresh()
            status = 200
            await _answer(send, 200, self.metrics.render(), (_PROMETHEUS,))
        self._stats_for(method if methods else "-", path).observe(status, self._now() - start)

    def _admin_refusal(self, scope: Scope) -> _Reject | None:
        """Why this request may not reach the operator surface, or None."""
        token = self._admin_token
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if token is not None:
            for name, value in headers:
                if name == b"authorization" and hmac.compare_digest(value, token):
                    return None
            return _Reject(401, "the admin surface needs 'Authorization: Bearer <admin token>'")
        if not scope.get(ADMIN_LISTENER):
            return _Reject(
                404, "not served on this listener: use the admin listener or set an admin token"
            )
        host = b""
        for name, value in headers:
            if name in _FORWARDED:
                return _Reject(403, "a forwarded request to the admin listener needs a token")
            if name == b"host":
                host = value
        if not _literal_host(host):
            return _Reject(403, "name the admin listener by address or localhost")
        return None

    async def _not_ready(self) -> str | None:
        """Why the app cannot take work now, or None when it can."""
        if self._stopping:
            return "stopping"
        state = self.app.state
        if state != "running":
            return str(state)
        groups = list(self.app.subscriptions)
        if groups:
            # A round trip to the transport (a broker, a file) proves it is
            # reachable; readiness probes are rare enough to afford one.
            try:
                async with asyncio.timeout(self.limits.graceful_timeout / 4):
                    await self.app.transport.stats(groups[0])
            except Exception as exc:
                return f"transport unreachable: {type(exc).__name__}: {exc}"
        return None

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return  # websockets: not served; the server closes the socket
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.app.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.app.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _authenticate(auth: Auth, scope: Scope) -> str:
    """The principal ``auth`` finds in the request's headers, or a refusal."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    try:
        found = auth(headers)
        principal = await found if inspect.isawaitable(found) else found
    except Unauthorized as exc:
        raise _Reject(401, str(exc) or "unauthorized") from None
    except Forbidden as exc:
        raise _Reject(403, str(exc) or "forbidden") from None
    if not isinstance(principal, str) or not principal:
        raise TypeError(f"an auth hook returned {principal!r}; return the principal (a str)")
    return principal


def _literal_host(host: bytes) -> bool:
    """``host`` (a Host header) is an IP address or localhost, not a DNS
    name that a page of another site could rebind to this machine."""
    name = host.decode("latin-1")
    if name.startswith("["):
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def _redirect(send: Send, scope: Scope, prefix: str) -> int:
    """308 to the mount's own path (a bookmark of ``/_surge`` works); the
    location is relative to where the ingress is mounted (``root_path``)."""
    location = scope.get("root_path", "") + prefix
    query: bytes = scope.get("query_string", b"")
    if query:
        location += "?" + query.decode("latin-1")
    await _answer(send, 308, b"", ((b"location", location.encode("latin-1")),))
    return 308


async def _refuse(send: Send, rej: _Reject) -> int:
    headers = (_JSON, _BEARER) if rej.status == 401 else (_JSON,)
    await _answer(send, rej.status, rej.body, headers)
    return rej.status


async def _answer(
    send: Send, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})
