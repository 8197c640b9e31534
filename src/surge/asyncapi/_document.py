"""The AsyncAPI 3.0 document of an app, built from what the app declares.

- a **channel** per topic (its address is the topic), with the message of the
  event type that topic decodes into;
- a **receive** operation per subscription and topic it consumes;
- a **send** operation per subscription and event type it publishes: those
  its handler's return annotation names (an event type, a union of them, a
  sequence of them, or ``None``) and those declared with
  ``app.on(publishes=...)`` (published through ``ctx.publish``);
- an HTTP channel and a receive operation per ingress route (with the reply,
  when the route waits for one), on a server of protocol ``http``; a
  CloudEvents route's channel carries a message per event class it takes;
- a **server** from the transport URL (credentials left out).

Message payloads are msgspec's JSON Schema of the event types, shared in
``components.schemas``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from .._event import Event
from .._graph import published_types

if TYPE_CHECKING:
    from .._app import App

__all__ = ("document",)

ASYNCAPI_VERSION = "3.0.0"
_HTTP_SERVER = "http"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def _id(text: str) -> str:
    """A key usable in a JSON pointer (``#/channels/<id>``) and readable."""
    return _UNSAFE.sub("_", text)


def _server(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    server: dict[str, Any] = {"host": host, "protocol": parts.scheme or "memory"}
    if parts.path not in ("", "/"):
        server["pathname"] = parts.path
    server["description"] = f"the app's transport ({parts.scheme}://)"
    return server


def document(app: App, *, title: str | None = None, version: str = "1.0.0") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``app`` as a JSON-ready dict."""
    topics: dict[str, type[Event] | None] = {}
    receive: list[tuple[str, str]] = []  # (operation id, topic)
    send: list[tuple[str, str]] = []
    subs = app.subscriptions
    for sub in subs.values():
        for topic in sub.topics:
            topics.setdefault(topic, sub.types.get(topic))
            op = sub.name if len(sub.topics) == 1 else f"{sub.name}.{topic}"
            receive.append((op, topic))
        for tp in published_types(sub):
            topics.setdefault(tp.__topic__, tp)
            if topics[tp.__topic__] is None:
                topics[tp.__topic__] = tp
            send.append((f"{sub.name}.publish.{tp.__topic__}", tp.__topic__))
    try:
        routes = app.http.routes
        ce_routes = app.http.cloudevent_routes
    except ImportError:  # no http extra: no ingress, no routes
        routes, ce_routes = [], []
    for route in routes:
        for declared in (route.publish, route.reply):
            if declared is not None and topics.get(declared.__topic__) is None:
                topics[declared.__topic__] = declared
    for ce_route in ce_routes:
        for declared in ce_route.types.values():
            if topics.get(declared.__topic__) is None:
                topics[declared.__topic__] = declared

    event_types = sorted({tp for tp in topics.values() if tp is not None}, key=_type_key)
    payloads, schemas = msgspec.json.schema_components(
        event_types, ref_template="#/components/schemas/{name}"
    )
    messages: dict[str, Any] = {}
    message_of: dict[type[Event], str] = {}
    for tp, payload in zip(event_types, payloads, strict=True):
        name = _id(tp.__topic__)
        message_of[tp] = name
        messages[name] = {
            "name": tp.__topic__,
            "title": tp.__name__,
            "contentType": "application/json",
            "payload": payload,
        }
        doc = (tp.__doc__ or "").strip()
        if doc:
            messages[name]["summary"] = doc.splitlines()[0]

    channels: dict[str, Any] = {}
    for topic, decoded in sorted(topics.items()):
        channel: dict[str, Any] = {"address": topic, "servers": [{"$ref": "#/servers/transport"}]}
        if decoded is not None:
            name = message_of[decoded]
            channel["messages"] = {name: {"$ref": f"#/components/messages/{name}"}}
        else:
            channel["description"] = "a topic pattern: events of any matching topic"
        channels[_id(topic)] = channel

    operations: dict[str, Any] = {}
    for op, topic in receive:
        operations[_id(op)] = _operation("receive", topic, topics[topic], message_of)
        operations[_id(op)]["summary"] = f"subscription {op.rsplit('.' + topic, 1)[0]}"
    for op, topic in send:
        operations[_id(op)] = _operation("send", topic, topics[topic], message_of)

    servers: dict[str, Any] = {"transport": _server(app.transport.url)}
    for route in routes:
        servers.setdefault(
            _HTTP_SERVER,
            {"host": "localhost:8000", "protocol": "http", "description": "the HTTP ingress"},
        )
        key = _id(f"http {route.method} {route.path}")
        channel = {
            "address": route.path,
            "servers": [{"$ref": f"#/servers/{_HTTP_SERVER}"}],
            "messages": {
                message_of[route.publish]: {
                    "$ref": f"#/components/messages/{message_of[route.publish]}"
                }
            },
        }
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": f"{route.method} {route.path}: publishes {route.publish.__topic__}",
            "bindings": {"http": {"method": route.method}},
            "messages": [{"$ref": f"#/channels/{key}/messages/{message_of[route.publish]}"}],
        }
        if route.reply is not None:
            reply_name = message_of[route.reply]
            channel["messages"][reply_name] = {"$ref": f"#/components/messages/{reply_name}"}
            operation["reply"] = {
                "channel": {"$ref": f"#/channels/{key}"},
                "messages": [{"$ref": f"#/channels/{key}/messages/{reply_name}"}],
            }
            operation["summary"] += f", answers {route.reply.__topic__}"
        channels[key] = channel
        operations[_id(f"http.{route.method}.{route.path}")] = operation
    for ce_route in ce_routes:
        servers.setdefault(
            _HTTP_SERVER,
            {"host": "localhost:8000", "protocol": "http", "description": "the HTTP ingress"},
        )
        key = _id(f"http {ce_route.method} {ce_route.path}")
        names = sorted({message_of[tp] for tp in ce_route.types.values()})
        mapping = ", ".join(f"{kind} -> {tp.__topic__}" for kind, tp in ce_route.types.items())
        channels[key] = {
            "address": ce_route.path,
            "servers": [{"$ref": f"#/servers/{_HTTP_SERVER}"}],
            "description": (
                "CloudEvents 1.0 in binary mode (ce-* headers) or structured mode "
                "(application/cloudevents+json); the payload is the event's data. "
                f"CloudEvents type -> topic: {mapping}."
            ),
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in names},
        }
        operations[_id(f"http.{ce_route.method}.{ce_route.path}")] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": f"{ce_route.method} {ce_route.path}: CloudEvents, published by type",
            "bindings": {"http": {"method": ce_route.method}},
            "messages": [{"$ref": f"#/channels/{key}/messages/{name}"} for name in names],
        }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title or app.name,
            "version": version,
            "description": f"The events of the surge app {app.name!r}.",
        },
        "defaultContentType": "application/json",
        "servers": servers,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def _operation(
    action: str, topic: str, tp: type[Event] | None, message_of: dict[type[Event], str]
) -> dict[str, Any]:
    key = _id(topic)
    operation: dict[str, Any] = {"action": action, "channel": {"$ref": f"#/channels/{key}"}}
    if tp is not None:
        operation["messages"] = [{"$ref": f"#/channels/{key}/messages/{message_of[tp]}"}]
    return operation


def _type_key(tp: type[Event]) -> str:
    return f"{tp.__topic__}\0{tp.__module__}.{tp.__qualname__}"
