"""Small frozen configuration values."""

from __future__ import annotations

import random

import msgspec

__all__ = ("Retry",)


class Retry(msgspec.Struct, frozen=True, kw_only=True):
    """How a subscription retries a failed delivery.

    ``attempts`` counts every delivery, the first included (``attempts=1``
    never retries). The n-th retry waits ``backoff * 2**(n-1)`` seconds,
    capped at ``max_backoff``, then spread by ``±jitter`` (a fraction).
    Only exceptions that are instances of ``on`` are retried; others, and
    payloads that fail to decode, go to the dead letters at once.
    """

    attempts: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: float = 0.1
    on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("Retry backoff must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError("Retry.jitter is a fraction between 0 and 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (from 1)."""
        base: float = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        if self.jitter and base:
            r: float = (rng or random).uniform(-self.jitter, self.jitter)
            base *= 1 + r
        return base

    def retries(self, exc: BaseException) -> bool:
        return isinstance(exc, self.on)


NO_RETRY = Retry(attempts=1)
