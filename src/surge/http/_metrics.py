"""Counters the ingress keeps per route, exported as Prometheus metrics.

The hot path only bumps plain integers; prometheus-client's own metric
objects take a lock per update, so they are built at scrape time instead,
by a collector registered in a registry owned by one ingress.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

__all__ = ("BUCKETS", "Metrics", "RouteStats")

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RouteStats:
    """Requests by status and a latency histogram for one method and path."""

    __slots__ = ("buckets", "method", "path", "statuses", "total")

    def __init__(self, method: str, path: str) -> None:
        self.method = method
        self.path = path
        self.statuses: dict[int, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, status: int, seconds: float) -> None:
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class Metrics(Collector):
    """The ingress's registry: its HTTP counters, and the collectors others
    add (``Ingress.add_collector``: surge.observe's subscription metrics)."""

    def __init__(self, routes: dict[tuple[str, str], RouteStats]) -> None:
        self._routes = routes
        self.in_flight = 0
        self.transport_errors = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "surge_http_requests", "HTTP requests answered", labels=("method", "route", "status")
        )
        latency = HistogramMetricFamily(
            "surge_http_request_duration_seconds",
            "Time from request start to the last byte of the answer",
            labels=("method", "route"),
        )
        for stats in list(self._routes.values()):
            for status, n in sorted(stats.statuses.items()):
                requests.add_metric((stats.method, stats.path, str(status)), n)
            count = sum(stats.buckets)
            if not count:
                continue
            cumulative, acc = [], 0
            for bound, n in zip((*map(str, BUCKETS), "+Inf"), stats.buckets, strict=True):
                acc += n
                cumulative.append((bound, float(acc)))
            latency.add_metric((stats.method, stats.path), cumulative, stats.total)
        yield requests
        yield latency
        yield CounterMetricFamily(
            "surge_http_transport_errors",
            "Requests answered 503 because the transport failed (the client may retry)",
            value=self.transport_errors,
        )
        yield GaugeMetricFamily(
            "surge_http_in_flight", "Requests on routes being handled now", value=self.in_flight
        )
