"""Frozen snapshots of the runtime's counters."""

from __future__ import annotations

import msgspec

__all__ = ("AppStats", "SubscriptionStats")


class SubscriptionStats(msgspec.Struct, frozen=True, kw_only=True):
    """One subscription's counters since the app started."""

    received: int = 0
    succeeded: int = 0
    failed: int = 0
    """Failed attempts (each retry's failure counts)."""
    retried: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    """Handlers running now."""
    queued: int = 0
    """Deliveries fetched and waiting for a worker."""
    stuck_threads: int = 0
    """Threads still running a handler that timed out."""


class AppStats(msgspec.Struct, frozen=True, kw_only=True):
    subscriptions: dict[str, SubscriptionStats]
    unroutable: dict[str, int] = msgspec.field(default_factory=dict)
    """Publishes that no group declared on the transport received (dropped),
    by topic, since the app was made."""
    pending_requests: int = 0
    rejected_replies: int = 0
    """Replies to this app's requests refused for a missing, unknown or
    wrong signature (logged; the request waits on for the genuine one)."""
    loop_lag: float = 0.0
    """How late the event loop ran at the last look (seconds; see ``surge._lag``)."""
    loop_lag_max: float = 0.0
    """The longest the event loop was held since the app started (seconds)."""
    resident_memory: int | None = None
    """The process's resident memory now (bytes; every app of the process
    shares it), read when asked; None where the platform does not tell
    (see ``surge._memory``)."""
