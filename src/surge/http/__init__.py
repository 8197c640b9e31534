"""HTTP for surge apps: the ingress, its server, and a load generator.

``app.http.post("/orders", publish=OrderPlaced)`` turns requests into
events; :func:`serve` runs the ingress with uvicorn in the app's process;
:func:`run_load` (``surge load``) floods any HTTP endpoint and reports.
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

from ._client import Response, fetch
from ._config import Limits
from ._ingress import HttpStats, Ingress, Route
from ._load import LoadReport, run_load
from ._server import Server, bind_socket, run, serve

__all__ = (
    "HttpStats",
    "Ingress",
    "Limits",
    "LoadReport",
    "Response",
    "Route",
    "Server",
    "bind_socket",
    "fetch",
    "run",
    "run_load",
    "serve",
)
