"""What surge.observe keeps for one app, on the app itself.

Kept in ``app.extensions["surge.observe"]``: it lives and dies with the app,
so a new app never inherits an old one's settings or numbers (a module
dict keyed by ``id(app)`` would hand them on once the id is reused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._app import App
    from ..http import Ingress
    from ._metrics import DirectoryWriter, Instruments
    from ._tracing import TracingMiddleware

__all__ = ("ObserveState", "state_of")

_KEY = "surge.observe"


class ObserveState:
    """One app's instruments, metrics writer, backlog cache, redaction,
    tracing, and the ingress its routes are mounted on."""

    def __init__(self) -> None:
        self.instruments: Instruments | None = None
        self.writer: DirectoryWriter | None = None
        self.backlogs: dict[str, tuple[int, int]] = {}
        """Subscription -> (backlog, dead letters), as last asked."""
        self.redact = False
        """Dead letters are served without their bodies."""
        self.tracing: TracingMiddleware | None = None
        self.ingress: Ingress | None = None


def state_of(app: App) -> ObserveState:
    """``app``'s :class:`ObserveState`, made on first use."""
    found = app.extensions.get(_KEY)
    if found is None:
        found = app.extensions[_KEY] = ObserveState()
    assert isinstance(found, ObserveState)
    return found
