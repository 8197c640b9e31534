"""HTTP for surge apps: the ingress and its server.

Routes turn requests into events::

    app.http.post("/orders", publish=OrderPlaced)            # 202 {"id": ...}
    app.http.post("/pay", publish=OrderPlaced, reply=OrderPaid, timeout=2)
                                                             # 200 reply, 504 on timeout

A body that is not JSON answers 400, one that does not fit the event type
422 (with the field); ``GET /healthz``, ``/readyz`` and ``/metrics``
(Prometheus, on the admin surface) come with every ingress. :func:`serve` (async) or :func:`run`
(blocking) serve ``app.http`` with uvicorn in the app's own process and
loop, under :class:`Limits` (requests in flight, body and header sizes,
header deadline, keep-alive); :class:`Server` is the same as an ``async
with`` block. The load generator behind ``surge load`` lives in
:mod:`surge.tools`.

Other packages extend an ingress through :meth:`Ingress.mount` (an ASGI
app under a path prefix), :meth:`Ingress.add_collector` (more families at
``/metrics``) and :meth:`Ingress.around_requests` (a wrapper per request):
``surge.observe.mount(app.http)`` adds the ``/_surge/`` dashboard, the
subscriptions' metrics and tracing spans that way, so this package never
imports surge.observe.

``app.http.cloudevents(path, *types)`` takes CloudEvents 1.0 (binary and
structured mode) and publishes each as the class its ``type`` names;
:func:`to_cloudevent` writes a surge event as one, and
:func:`from_cloudevent` reads one received by other means. A POST with an
``Idempotency-Key`` header publishes under an id derived from the key, so a
client's retry makes one event (docs/http.md says where that holds).

Who may call a route is an ``auth=`` hook's decision, per route or for
every route (:meth:`Ingress.set_auth`); :func:`api_keys` and
:func:`jwt_bearer` are ready ones, and the principal they return travels
with the event as the ``surge-principal`` header.

The operator surface (``/metrics`` and admin mounts such as ``/_surge/``)
is not served on a public listener unless the app's admin token is set
(:meth:`Ingress.set_admin_token`); ``serve(..., admin=(host, port))`` adds
an admin listener for it. See docs/security.md.

Needs the ``http`` extra: ``pip install 'surge[http]'``.
"""

try:
    import httptools  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"surge.http needs the http extra ({exc.name} is missing): pip install 'surge[http]'"
    ) from exc

from ._admission import AdmissionStats
from ._auth import PRINCIPAL_HEADER, Auth, api_keys, jwt_bearer
from ._cloudevents import CloudEventsRoute, from_cloudevent, to_cloudevent
from ._config import Limits
from ._ingress import (
    ADMIN_LISTENER,
    ASGIApp,
    HttpStats,
    Ingress,
    Receive,
    RequestHandler,
    RequestWrapper,
    Route,
    Scope,
    Send,
)
from ._server import Server, bind_socket, run, serve

__all__ = (
    "ADMIN_LISTENER",
    "PRINCIPAL_HEADER",
    "ASGIApp",
    "AdmissionStats",
    "Auth",
    "CloudEventsRoute",
    "HttpStats",
    "Ingress",
    "Limits",
    "Receive",
    "RequestHandler",
    "RequestWrapper",
    "Route",
    "Scope",
    "Send",
    "Server",
    "api_keys",
    "bind_socket",
    "from_cloudevent",
    "jwt_bearer",
    "run",
    "serve",
    "to_cloudevent",
)
