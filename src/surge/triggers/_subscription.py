"""How a trigger becomes an ordinary subscription: its name and its handler.

A trigger's handler is subscribed with ``App.on`` to a topic of the
trigger's own, so it gets retries, timeouts, a context and publishes what it
returns, as any handler does.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from functools import wraps
from typing import Any

from .._event import Event

__all__ = ("adapt", "trigger_name")


def trigger_name(fn: Callable[..., Any], name: str | None) -> str:
    """``name``, or the function's qualified name, reduced to what every
    broker accepts in a subject."""
    raw = name or fn.__qualname__
    # Topic tokens must survive every broker's subject rules (NATS treats
    # '>' and '*' as wildcards), so keep only plain characters.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw).strip(".") or "trigger"


def adapt(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A handler for ``App.on``: functions of no argument get a shim."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params) or any(
        p.kind in positional and p.default is inspect.Parameter.empty for p in params
    ):
        return fn
    if inspect.iscoroutinefunction(fn):

        @wraps(fn)
        async def shim_async(_event: Event) -> Any:
            return await fn()

        return shim_async

    @wraps(fn)
    def shim(_event: Event) -> Any:
        return fn()

    return shim
