"""CloudEvents 1.0 over HTTP: reading both content modes, and writing them.

A CloudEvents route (``app.http.cloudevents("/events", OrderPlaced, ...)``)
takes a request in either content mode of the HTTP binding:

- **binary**: the attributes are ``ce-*`` headers (percent-encoded), the
  body is the event's data and ``Content-Type`` its ``datacontenttype``;
- **structured**: ``Content-Type: application/cloudevents+json``, the body
  one JSON object holding the attributes and ``data`` (or ``data_base64``).

and maps it onto a surge event:

- ``type`` picks the event class (by default each class's topic; a mapping
  names foreign types), and the data is decoded into it (422 with the field
  when it does not fit, as on any route);
- ``source`` + ``id`` (and the caller's principal, when the route has
  ``auth=``) make the surge event id, a derived one (``surge.id_for``): a
  CloudEvent delivered again, as routers do at least once, is dropped by the
  transport within its dedup window;
- every attribute travels as a ``ce-<name>`` header of the envelope
  (``ctx.headers["ce-source"]``), extensions included.

A request that is no valid CloudEvent raises :class:`surge.InvalidCloudEvent`
here, which the ingress answers 400 (415 for a format it cannot read) with
the fault's ``code`` and ``attribute``; nothing is published.

:func:`to_cloudevent` goes the other way: a surge event as the headers and
body of an HTTP request in either mode, for a handler that forwards events
to a CloudEvents consumer. :func:`from_cloudevent` reads such headers and
body outside a route (a CloudEvent received by other means: a queue, a
webhook framework, a file) exactly as a route would.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

import msgspec

from .._codec import field_of
from .._errors import ConfigurationError, DecodeError, InvalidCloudEvent
from .._event import Event, id_for
from ._auth import PRINCIPAL_HEADER, Auth

__all__ = (
    "STRUCTURED_CONTENT_TYPE",
    "CloudEventsReader",
    "CloudEventsRoute",
    "cloudevent_types",
    "from_cloudevent",
    "to_cloudevent",
)

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
_BATCH = "application/cloudevents-batch+json"
_REQUIRED = ("id", "source", "specversion", "type")
_NAME = re.compile(r"[a-z0-9]+")
_FRACTION = re.compile(r"(\.\d{6})\d+")
# printable ASCII less space, '"' and '%' go into a header as they are (the
# HTTP binding, 3.1.3.2); everything else is percent-encoded
_SAFE = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in ' "%')


class CloudEventsRoute(msgspec.Struct, frozen=True, kw_only=True):
    """A path that takes CloudEvents of ``types`` (CloudEvents ``type`` ->
    event class), in either content mode, and publishes them (202)."""

    path: str
    types: dict[str, type[Event]]
    auth: Auth | None = None
    method: str = "POST"


def cloudevent_types(
    types: tuple[type[Event] | Mapping[str, type[Event]], ...],
) -> dict[str, type[Event]]:
    """The ``type`` -> class table of a route: a class stands for its own
    topic; a mapping names other types (``{"com.example.order.placed":
    OrderPlaced}``)."""
    table: dict[str, type[Event]] = {}
    for item in types:
        pairs = [(item.__topic__, item)] if isinstance(item, type) else list(dict(item).items())
        for name, cls in pairs:
            if not (isinstance(cls, type) and issubclass(cls, Event)):
                raise ConfigurationError(f"cloudevents() takes Event subclasses, not {cls!r}")
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"a CloudEvents type is a non-empty string, not {name!r}")
            if name in table and table[name] is not cls:
                raise ConfigurationError(f"CloudEvents type {name!r} names two event classes")
            table[name] = cls
    if not table:
        raise ConfigurationError("cloudevents() needs at least one event class")
    return table


class CloudEventsReader:
    """Reads one route's requests: the event, its headers and its id."""

    __slots__ = ("_decoders", "_types")

    def __init__(self, types: dict[str, type[Event]]) -> None:
        self._types = types
        self._decoders = {name: msgspec.json.Decoder(cls) for name, cls in types.items()}

    def __call__(
        self,
        raw: list[tuple[bytes, bytes]],
        body: bytes,
        headers: dict[str, str] | None,
    ) -> tuple[Event, dict[str, str], str]:
        """``(event, envelope headers, event id)`` of a request with headers
        ``raw`` and ``body``; ``headers`` are the ones the ingress adds (the
        principal). Raises :class:`InvalidCloudEvent`, or msgspec's
        ``ValidationError`` when the data does not fit the type."""
        content_type = ""
        attributes: dict[str, str] = {}
        for name, value in raw:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name[:3] == b"ce-":
                attributes[name[3:].decode("latin-1")] = unquote(value.decode("latin-1"))
        media = content_type.partition(";")[0].strip().lower()
        if media == STRUCTURED_CONTENT_TYPE:
            attributes, data = _structured(body)
        elif media == _BATCH:
            raise InvalidCloudEvent(
                "batched CloudEvents are not taken: send each event alone",
                code="unsupported-format",
            )
        elif media.startswith("application/cloudevents"):
            raise InvalidCloudEvent(
                f"CloudEvents format {media!r} is not read here: use {STRUCTURED_CONTENT_TYPE} "
                "or binary mode",
                code="unsupported-format",
            )
        elif attributes:
            data = body
            if media:
                attributes["datacontenttype"] = content_type
        else:
            raise InvalidCloudEvent(
                "not a CloudEvent: send ce-* headers (binary mode) or Content-Type "
                f"{STRUCTURED_CONTENT_TYPE} (structured mode)",
                code="not-a-cloudevent",
            )
        _check(attributes)
        kind = attributes["type"]
        decoder = self._decoders.get(kind)
        if decoder is None:
            known = ", ".join(sorted(self._types))
            raise InvalidCloudEvent(
                f"CloudEvents type {kind!r} is not taken by this route (it takes: {known})",
                code="unknown-type",
                attribute="type",
            )
        _check_json(attributes.get("datacontenttype"))
        if isinstance(data, bytes):
            try:
                event: Event = decoder.decode(data)
            except msgspec.ValidationError:
                raise
            except (msgspec.DecodeError, RecursionError):
                raise InvalidCloudEvent(
                    "the event's data is not valid JSON", code="invalid-json", attribute="data"
                ) from None
        else:
            event = msgspec.convert(data, self._types[kind])
        out = dict(headers) if headers else {}
        for attribute, text in attributes.items():
            if attribute != "datacontenttype":
                out[f"ce-{attribute}"] = text
        principal = out.get(PRINCIPAL_HEADER, "")
        # source + id name one event (the spec lets consumers treat a repeat
        # as a duplicate); the principal keeps one caller from claiming the
        # ids of another's source
        event_id = id_for(f"cloudevents\0{principal}\0{attributes['source']}\0{attributes['id']}")
        return event, out, event_id


def _structured(body: bytes) -> tuple[dict[str, str], bytes | object]:
    """The attributes (as header strings) and the data of a structured event."""
    try:
        doc = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        raise InvalidCloudEvent(
            "the body is not valid JSON (structured mode)", code="invalid-json"
        ) from None
    if not isinstance(doc, dict):
        raise InvalidCloudEvent(
            "a structured CloudEvent is a JSON object", code="invalid-json"
        ) from None
    data: bytes | object = None
    attributes: dict[str, str] = {}
    for name, value in doc.items():
        if name == "data":
            data = value
        elif name == "data_base64":
            if not isinstance(value, str):
                raise InvalidCloudEvent(
                    "data_base64 is a string", code="invalid-attribute", attribute="data_base64"
                )
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidCloudEvent(
                    "data_base64 is not valid base64",
                    code="invalid-attribute",
                    attribute="data_base64",
                ) from None
        elif isinstance(value, bool):
            attributes[name] = "true" if value else "false"
        elif isinstance(value, str | int):
            attributes[name] = str(value)
        elif value is not None:
            raise InvalidCloudEvent(
                f"attribute {name!r} is a {type(value).__name__}: CloudEvents attributes are "
                "strings, integers or booleans",
                code="invalid-attribute",
                attribute=name,
            )
    if "data" in doc and "data_base64" in doc:
        raise InvalidCloudEvent(
            "give data or data_base64, not both", code="invalid-attribute", attribute="data"
        )
    if data is None:
        data = b"null"  # no data: decoded as JSON null, which no event type takes
    return attributes, data


def _check(attributes: dict[str, str]) -> None:
    for name in _REQUIRED:
        if not attributes.get(name):
            raise InvalidCloudEvent(
                f"the required attribute {name!r} is missing or empty",
                code="missing-attribute",
                attribute=name,
            )
    if attributes["specversion"] != "1.0":
        raise InvalidCloudEvent(
            f"specversion {attributes['specversion']!r} is not taken: only 1.0",
            code="unsupported-specversion",
            attribute="specversion",
        )
    for name in attributes:
        if _NAME.fullmatch(name) is None:
            raise InvalidCloudEvent(
                f"attribute name {name!r}: CloudEvents names are lower-case letters and digits",
                code="invalid-attribute",
                attribute=name,
            )
    when = attributes.get("time")
    if when is not None:
        try:
            parsed = datetime.fromisoformat(_FRACTION.sub(r"\1", when))
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise InvalidCloudEvent(
                f"time {when!r} is not an RFC 3339 timestamp",
                code="invalid-attribute",
                attribute="time",
            )


def _check_json(content_type: str | None) -> None:
    if content_type is None:
        return
    media = content_type.partition(";")[0].strip().lower()
    if media in ("application/json", "text/json") or media.endswith("+json"):
        return
    raise InvalidCloudEvent(
        f"datacontenttype {media!r}: only JSON data is decoded into an event type",
        code="unsupported-format",
        attribute="datacontenttype",
    )


def to_cloudevent(
    event: Event,
    *,
    id: str,
    source: str,
    type: str | None = None,
    time: datetime | float | None = None,
    subject: str | None = None,
    extensions: Mapping[str, str | int | bool] | None = None,
    structured: bool = False,
) -> tuple[dict[str, str], bytes]:
    """``event`` as a CloudEvent 1.0: the headers and body of an HTTP request.

    Binary mode by default (``ce-*`` headers, the event's JSON as body);
    ``structured=True`` for one ``application/cloudevents+json`` document.
    ``type`` defaults to the event's topic (what a surge CloudEvents route
    maps back to its class); ``time`` is a datetime or epoch seconds. In a
    handler, ``id=ctx.id`` keeps the surge id, so a retried forward is
    recognisably the same event.
    """
    attributes: dict[str, str | int | bool] = {
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": type or event.__topic__,
    }
    if time is not None:
        when = time if isinstance(time, datetime) else datetime.fromtimestamp(time, UTC)
        attributes["time"] = when.isoformat().replace("+00:00", "Z")
    if subject is not None:
        attributes["subject"] = subject
    for name, value in (extensions or {}).items():
        if _NAME.fullmatch(name) is None or name in attributes or name.startswith("data"):
            raise ConfigurationError(f"{name!r} is not a CloudEvents extension name")
        attributes[name] = value
    if structured:
        doc: dict[str, Any] = {**attributes, "datacontenttype": "application/json"}
        doc["data"] = event
        return {"content-type": STRUCTURED_CONTENT_TYPE}, msgspec.json.encode(doc)
    headers = {"content-type": "application/json"}
    for name, value in attributes.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        headers[f"ce-{name}"] = quote(text, safe=_SAFE)
    return headers, msgspec.json.encode(event)


def from_cloudevent(
    headers: Mapping[str, str],
    body: bytes | str,
    *types: type[Event] | Mapping[str, type[Event]],
) -> tuple[Event, dict[str, str], str]:
    """A CloudEvent 1.0 given as the headers and body of an HTTP message, in
    either content mode, as a surge event: ``(event, headers, id)``.

    ``types`` are those of ``app.http.cloudevents``: event classes (each
    takes its topic as CloudEvents ``type``) or mappings of foreign types to
    classes. ``headers`` holds every attribute as a ``ce-<name>`` header
    (``ce-source``, extensions too), ``id`` is derived from ``source`` and
    ``id`` as on a route without ``auth=``, so
    ``await app.publish(event, headers=headers, id=id)`` publishes a
    redelivered CloudEvent once within the dedup window. Header names may
    be in any case. Raises :class:`~surge.InvalidCloudEvent` for what is no
    valid CloudEvent of these types, and :class:`~surge.DecodeError` (with
    the ``field``) for data that does not fit the class.
    """
    reader = CloudEventsReader(cloudevent_types(types))
    raw: list[tuple[bytes, bytes]] = []
    for name, value in headers.items():
        lower = name.lower()
        try:
            raw.append((lower.encode("latin-1"), value.encode("latin-1")))
        except UnicodeEncodeError:
            attribute = lower[3:] if lower.startswith("ce-") else None
            raise InvalidCloudEvent(
                f"header {name!r} is not ISO-8859-1 text: percent-encode it (the HTTP binding)",
                code="invalid-attribute",
                attribute=attribute,
            ) from None
    data = body.encode() if isinstance(body, str) else body
    try:
        return reader(raw, data, None)
    except msgspec.ValidationError as exc:
        raise DecodeError(
            f"the CloudEvent's data does not fit its event class: {exc}",
            field=field_of(str(exc)),
        ) from None
