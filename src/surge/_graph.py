"""The event graph an app declares: which subscriptions an event reaches.

A subscription names the events it publishes in its handler's return
annotation (an event type, a union of them, a sequence of them, or
``None``) and in ``app.on(publishes=...)`` (what the handler publishes
through ``ctx.publish``); following those from a topic gives the pipeline
behind it. Events a handler publishes with ``ctx.publish`` and does not
declare are unknown here, so the graph stops there.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._event import Event
from ._transport import topic_matches

if TYPE_CHECKING:
    from ._app import Subscription

__all__ = ("downstream", "published_types", "returned_types")


def returned_types(handler: Any) -> list[type[Event]]:
    """The event types ``handler`` says it returns: its return annotation,
    unpacked through unions, ``Optional`` and sequences."""
    try:
        hints = typing.get_type_hints(handler)
    except Exception:  # an annotation that does not resolve describes nothing
        return []
    found: list[type[Event]] = []

    def walk(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, Event):
            if tp not in found:
                found.append(tp)
            return
        origin = typing.get_origin(tp)
        container = isinstance(origin, type) and issubclass(
            origin, collections.abc.Iterable | collections.abc.Awaitable
        )
        if origin in (typing.Union, types.UnionType) or container:
            for arg in typing.get_args(tp):
                walk(arg)

    walk(hints.get("return"))
    return found


def published_types(sub: Subscription) -> list[type[Event]]:
    """The event types ``sub`` publishes, as far as it says: those its
    handler's return annotation names, then those of ``publishes=``."""
    found = returned_types(sub.handler)
    found += [tp for tp in sub.publishes if tp not in found]
    return found


def downstream(subscriptions: Iterable[Subscription], *topics: str) -> list[Subscription]:
    """The subscriptions events of ``topics`` reach: those consuming them,
    then those consuming what their handlers return, and so on (each once,
    in the order they are reached)."""
    subs = list(subscriptions)
    reached: list[Subscription] = []
    names: set[str] = set()
    seen_topics: set[str] = set()
    todo = list(topics)
    while todo:
        t = todo.pop(0)
        if t in seen_topics:
            continue
        seen_topics.add(t)
        for sub in subs:
            if sub.name in names or not any(topic_matches(p, t) for p in sub.topics):
                continue
            names.add(sub.name)
            reached.append(sub)
            todo.extend(tp.__topic__ for tp in published_types(sub))
    return reached
