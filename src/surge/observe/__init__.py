"""Observability: metrics, a JSON stats view, a dashboard, logs and tracing.

``surge.observe.instrument(app)`` adds handler duration and latency
histograms; ``surge.observe.mount(app.http)`` adds them, with the app's
counters, to the ingress's ``/metrics`` (Prometheus) and serves
``/_surge/stats`` (JSON) and ``/_surge/`` (the dashboard). ``surge run
--http`` mounts it. The ingress knows nothing of this package: it is
surge.observe that registers its routes and collectors into the ingress.
"""

from __future__ import annotations

from typing import Any

from ._endpoints import ADMIN_TOKEN_ENV, mount, set_admin_token
from ._export import StatsView, SubscriptionView, refresh_backlogs
from ._logs import EVENT_FIELDS, JsonFormatter, log_json
from ._metrics import (
    BUCKETS,
    METRICS_DIR_ENV,
    HandlerTimings,
    Instruments,
    Snapshot,
    SubscriptionSnapshot,
    current,
    instrument,
    merge,
    quantile,
    read_directory,
    snapshot,
)

__all__ = (
    "ADMIN_TOKEN_ENV",
    "BUCKETS",
    "EVENT_FIELDS",
    "METRICS_DIR_ENV",
    "HandlerTimings",
    "Instruments",
    "JsonFormatter",
    "Snapshot",
    "StatsView",
    "SubscriptionSnapshot",
    "SubscriptionView",
    "TracingMiddleware",
    "current",
    "instrument",
    "log_json",
    "merge",
    "mount",
    "quantile",
    "read_directory",
    "refresh_backlogs",
    "set_admin_token",
    "snapshot",
    "trace",
)


def __getattr__(name: str) -> Any:
    # tracing needs the otel extra: imported on first use only
    if name in ("trace", "TracingMiddleware"):
        from . import _tracing

        return getattr(_tracing, name)
    raise AttributeError(f"module 'surge.observe' has no attribute {name!r}")
