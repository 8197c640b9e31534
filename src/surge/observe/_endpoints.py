"""The ``/_surge/`` routes (stats JSON, dashboard, dead letters), and
:func:`mount`, which adds them and the app's metrics to an ingress.

- ``GET /_surge/`` the dashboard page (self-contained: no CDN).
- ``GET /_surge/stats`` JSON: counters, gauges, rates, duration quantiles,
  backlog and dead letters per subscription.
- ``GET /_surge/dlq`` JSON: dead letters (``?subscription=`` for one).
- ``POST /_surge/dlq/replay`` and ``/_surge/dlq/purge`` with a JSON body
  ``{"subscription": ..., "ids": [...]}`` (ids optional: all of them).

Who may reach them at all is the ingress's decision, the same for reads
and writes (``Ingress.set_admin_token``): on an admin listener, or with
the admin token; never because the client's address is loopback. The two
POSTs change data, so they also need ``content-type: application/json``
and, when the browser sends an ``Origin``, one naming this host: a page of
another site cannot make a browser send such a request without a CORS
preflight, which is never granted here. ``mount(..., redact=True)`` keeps
event bodies out of ``/_surge/dlq``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from .._errors import ConfigurationError
from ._dashboard import PAGE
from ._export import AppCollector, StatsHistory
from ._metrics import instrument
from ._state import state_of

if TYPE_CHECKING:
    from .._app import App
    from ..http import Ingress, Receive, Scope, Send

__all__ = ("ADMIN_TOKEN_ENV", "PREFIX", "Endpoints", "mount", "set_admin_token")

ADMIN_TOKEN_ENV = "SURGE_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a token
"""The environment variable ``surge run`` reads the admin token from."""
_JSON = (b"content-type", b"application/json")
_HTML = (b"content-type", b"text/html; charset=utf-8")
_NOCACHE = (b"cache-control", b"no-store")
_MAX_BODY = 1 << 20
PREFIX = "/_surge/"


def mount(ingress: Ingress, *, redact: bool = False) -> Ingress:
    """Add surge.observe to ``ingress`` (``app.http``): the ``/_surge/``
    routes, the app's subscription metrics at ``/metrics``, a span per
    request once the app is traced, and (while the app is new) handler
    histograms (:func:`instrument`). Idempotent; ``surge run --http`` calls
    it. With ``redact`` the dead letters' bodies are not served. Returns
    ``ingress``.

    The routes are an admin mount: a public listener serves them only with
    the app's admin token (:meth:`surge.http.Ingress.set_admin_token`)."""
    app = ingress.app
    state = state_of(app)
    state.redact = redact
    if state.ingress is ingress:
        return ingress
    if state.ingress is not None:
        raise ConfigurationError(f"surge.observe is mounted on another ingress of {app.name}")
    if app.state == "new":
        instrument(app)
    collector = AppCollector(app)
    ingress.add_collector(collector, refresh=collector.refresh)
    ingress.mount(PREFIX, Endpoints(app))
    if state.tracing is not None:
        ingress.around_requests(state.tracing.traced_request)
    state.ingress = ingress
    return ingress


def set_admin_token(app: App, token: str | None) -> None:
    """Require ``token`` (a bearer token) for ``app``'s operator surface:
    ``app.http.set_admin_token(token)``."""
    app.http.set_admin_token(token)


class _Action(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    subscription: str
    ids: list[str] | None = None


def _letter(d: Any, redact: bool) -> dict[str, Any]:
    return {
        "id": d.id,
        "subscription": d.group,
        "topic": d.topic,
        "key": d.key,
        "error_type": d.error_type,
        "error": d.error,
        "traceback": d.traceback[-4000:],
        "attempts": d.attempts,
        "first_attempt_at": d.first_attempt_at,
        "failed_at": d.failed_at,
        "body": "(redacted)" if redact else _readable(d.body),
    }


def _readable(body: bytes) -> str:
    """An event body as JSON text when it decodes (msgpack or JSON)."""
    for decode in (msgspec.msgpack.decode, msgspec.json.decode):
        try:
            return msgspec.json.encode(decode(body)).decode()[:4000]
        except (msgspec.DecodeError, TypeError, ValueError):
            continue
    return body[:2000].decode("utf-8", "replace")


class Endpoints:
    """The ASGI application of one app's ``/_surge/`` paths."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.history = StatsHistory(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        path: str = scope["path"]
        method: str = scope["method"]
        if method in ("GET", "HEAD"):
            if path in ("/_surge/", "/_surge/index.html"):
                await _answer(send, 200, PAGE, (_HTML, _NOCACHE))
                return
            if path == "/_surge/stats":
                view = await self.history.view()
                await _answer(send, 200, msgspec.json.encode(view), (_JSON, _NOCACHE))
                return
            if path == "/_surge/dlq":
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                sub = query.get("subscription", [None])[0]
                try:
                    letters = await app.dead_letters(sub)
                except ConfigurationError as exc:
                    await _error(send, 404, str(exc))
                    return
                redact = state_of(app).redact
                body = msgspec.json.encode({"dead_letters": [_letter(d, redact) for d in letters]})
                await _answer(send, 200, body, (_JSON, _NOCACHE))
                return
        elif method == "POST" and path in ("/_surge/dlq/replay", "/_surge/dlq/purge"):
            await self._act(path, scope, receive, send)
            return
        await _error(send, 404, "no such route")

    async def _act(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        why = _refusal(scope)
        if why is not None:
            await _error(send, 403, why)
            return
        raw = await _read(receive)
        if raw is None:
            await _error(send, 413, f"the body is larger than {_MAX_BODY} bytes")
            return
        try:
            action = msgspec.json.decode(raw, type=_Action)
        except msgspec.DecodeError as exc:
            await _error(send, 400, f"expected {{subscription, ids?}}: {exc}")
            return
        try:
            if path.endswith("replay"):
                n = await app.replay(action.subscription, action.ids)
            else:
                n = await app.purge(action.subscription, action.ids)
        except ConfigurationError as exc:
            await _error(send, 404, str(exc))
            return
        await _answer(send, 200, msgspec.json.encode({"count": n}), (_JSON,))


def _refusal(scope: Scope) -> str | None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    if headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return "send the action as content-type: application/json"
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != headers.get("host"):
        return "cross-origin requests are refused"
    return None


async def _read(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _error(send: Send, status: int, error: str) -> None:
    await _answer(send, status, msgspec.json.encode({"error": error}), (_JSON,))


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
