"""The limits an HTTP ingress and its server enforce."""

from __future__ import annotations

import msgspec

from .._errors import ConfigurationError

__all__ = ("Limits",)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """What one server process admits before it refuses.

    ``max_in_flight``   requests on routes being handled at once; past it the
                        ingress answers 503 with ``Retry-After`` at once
    ``max_body``        request body bytes; past it 413 (read no further)
    ``max_header``      bytes of request line and headers; past it 431
    ``header_timeout``  seconds a client gets to send a whole request (line,
                        headers and body) once it starts one or connects;
                        slower connections are closed (slowloris)
    ``keep_alive``      seconds an idle keep-alive connection is kept
    ``max_requests_per_connection``
                        requests served on one connection before it is closed
    ``graceful_timeout`` seconds requests in flight get to finish on shutdown
    ``backlog``         the listening socket's accept queue
    ``max_connections`` open connections; past it a new one is answered 503
                        and closed at once, so a flood cannot exhaust file
                        descriptors (default: the descriptor limit less 128)
    ``target_latency``  seconds an admitted event may queue in the pipeline
                        behind its route (the subscriptions it reaches);
                        while the estimate is over it, the route admits
                        less and answers the rest 503 with ``Retry-After``
                        (docs/http.md, "Admission"); a route's own
                        ``target_latency=`` overrides it; None: admit by
                        ``max_in_flight`` alone
    ``admission_interval``
                        seconds between two samples of those pipelines
    """

    max_in_flight: int = 1000
    max_body: int = 1 << 20
    max_header: int = 16 * 1024
    header_timeout: float = 10.0
    keep_alive: float = 5.0
    max_requests_per_connection: int = 10_000
    graceful_timeout: float = 10.0
    backlog: int = 4096
    max_connections: int | None = None
    target_latency: float | None = 0.25
    admission_interval: float = 0.1

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_body", "max_header", "max_requests_per_connection"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"Limits.{name} must be at least 1")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigurationError("Limits.max_connections must be at least 1")
        if self.target_latency is not None and not self.target_latency > 0:
            raise ConfigurationError("Limits.target_latency must be positive (or None)")
        for name in ("header_timeout", "keep_alive", "graceful_timeout", "admission_interval"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"Limits.{name} must be positive")

    def connection_cap(self) -> int:
        """``max_connections``, or what the process's descriptor limit allows."""
        if self.max_connections is not None:
            return self.max_connections
        try:
            import resource
        except ImportError:  # pragma: no cover - not on Windows
            return 10_000
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 1_000_000
        return max(16, soft - 128)
