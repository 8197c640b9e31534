"""Middleware: small hooks around publishing and handling.

Subclass :class:`Middleware` and override what you need; every hook is a
no-op by default. ``before_*`` hooks run in the order the middleware was
given, ``after_*`` and ``on_error`` in reverse, so each one wraps the next.
Hooks are synchronous and run on the event loop: keep them cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._context import Context
    from ._event import Envelope

__all__ = ("Middleware",)


class Middleware:
    """Hooks the runtime calls around every publish and every handling."""

    def before_publish(self, envelope: Envelope) -> None:
        """Before ``envelope`` goes to the transport (headers may be added)."""

    def after_publish(self, envelope: Envelope) -> None:
        """After the transport accepted ``envelope``."""

    def before_handle(self, ctx: Context) -> None:
        """Before the handler runs for ``ctx.envelope``."""

    def after_handle(self, ctx: Context, result: Any) -> None:
        """After the handler returned ``result`` (before its events publish)."""

    def on_error(self, ctx: Context, exc: BaseException) -> None:
        """After the handler raised ``exc`` (before retry or dead letter)."""
