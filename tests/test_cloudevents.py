"""CloudEvents 1.0 at the HTTP ingress: the official SDK's binary and
structured requests over a real socket, malformed ones refused with a typed
400, and surge events written as CloudEvents."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1 import conversion as legacy
from cloudevents.v1.http import CloudEvent as LegacyCloudEvent

import surge
from surge.http import Server, from_cloudevent, to_cloudevent

pytestmark = pytest.mark.realtime


class OrderPlaced(surge.Event):
    __topic__ = "orders.placed"
    order_id: str
    amount: float


class Refund(surge.Event):
    order_id: str


class Seen:
    """What the handlers got: (event, id, headers), and a wake-up per event."""

    def __init__(self) -> None:
        self.items: list[tuple[surge.Event, str, dict[str, str]]] = []
        self.more = asyncio.Event()

    def add(self, event: surge.Event, ctx: surge.Context) -> None:
        self.items.append((event, ctx.id, dict(ctx.headers)))
        self.more.set()

    async def wait_for(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len(self.items) < n:
                self.more.clear()
                await self.more.wait()


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[surge.App, httpx.AsyncClient, Seen]]:
    app = surge.App("ce")
    seen = Seen()

    @app.on(OrderPlaced)
    async def placed(event: OrderPlaced, ctx: surge.Context) -> None:
        seen.add(event, ctx)

    @app.on(Refund)
    async def refund(event: Refund, ctx: surge.Context) -> None:
        seen.add(event, ctx)

    app.http.cloudevents("/events", OrderPlaced, {"com.example.refund.v1": Refund})
    async with (
        app,
        Server(app, port=0) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        yield app, client, seen


def sdk_event(**attributes: Any) -> CloudEvent:
    return CloudEvent(
        attributes={
            "type": "orders.placed",
            "source": "/shop/web",
            "subject": "order-1",
            "time": datetime(2026, 12, 2, 9, 30, 0, 123456, tzinfo=UTC),
            "partition": "eu",  # an extension
            **attributes,
        },
        data={"order_id": "o-1", "amount": 9.5},
    )


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("api", ["core", "v1"])
async def test_sdk_cloudevents_are_handled_in_both_modes(api: str, mode: str) -> None:
    """The official SDK's to_binary / to_structured request (its current API
    and the 1.x one kept as cloudevents.v1) is handled as the class its type
    names, under an id derived from source + id, with every attribute at
    hand as a ce-* header."""
    ce = sdk_event(id="evt-1")
    if api == "core":
        to = ce_http.to_binary if mode == "binary" else ce_http.to_structured
        message = to(ce, JSONFormat())
        headers, body = message.headers, message.body
    else:
        attributes = {**ce.get_attributes()}
        attributes["time"] = attributes["time"].isoformat()  # 1.x takes strings only
        old = LegacyCloudEvent(attributes, ce.get_data())
        headers, body = (legacy.to_binary if mode == "binary" else legacy.to_structured)(old)
    async with serving() as (app, client, seen):
        r = await client.post("/events", headers=headers, content=body)
        assert r.status_code == 202, r.text
        await seen.wait_for(1)
        await app.drain()
    event, event_id, headers = seen.items[0]
    assert event == OrderPlaced(order_id="o-1", amount=9.5)
    assert event_id == r.json()["id"]
    assert surge.is_derived(event_id)
    assert headers["ce-id"] == "evt-1"
    assert headers["ce-source"] == "/shop/web"
    assert headers["ce-type"] == "orders.placed"
    assert headers["ce-subject"] == "order-1"
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-partition"] == "eu"
    assert datetime.fromisoformat(headers["ce-time"]) == ce.get_attributes()["time"]


async def test_a_mapped_type_and_a_redelivered_event() -> None:
    """A foreign type maps to its class; the same source + id delivered again
    (in either mode) is handled once and answered with the same id."""
    ce = CloudEvent(
        attributes={"type": "com.example.refund.v1", "source": "urn:billing", "id": "r-9"},
        data={"order_id": "o-7"},
    )
    binary = ce_http.to_binary(ce, JSONFormat())
    structured = ce_http.to_structured(ce, JSONFormat())
    other = ce_http.to_binary(sdk_event(id="r-9", source="urn:elsewhere"), JSONFormat())
    async with serving() as (app, client, seen):
        first = await client.post("/events", headers=binary.headers, content=binary.body)
        again = await client.post("/events", headers=structured.headers, content=structured.body)
        third = await client.post("/events", headers=other.headers, content=other.body)
        await seen.wait_for(2)
        await app.drain()
    assert [first.status_code, again.status_code, third.status_code] == [202, 202, 202]
    assert first.json() == again.json() != third.json()
    assert [type(e) for e, _, _ in seen.items].count(Refund) == 1
    assert len(seen.items) == 2


MALFORMED: list[tuple[str, dict[str, str], bytes, int, str, str | None]] = [
    (
        "plain JSON",
        {"content-type": "application/json"},
        b'{"order_id": "x", "amount": 1}',
        400,
        "not-a-cloudevent",
        None,
    ),
    (
        "binary without id",
        {"ce-specversion": "1.0", "ce-type": "orders.placed", "ce-source": "/s"},
        b'{"order_id": "x", "amount": 1}',
        400,
        "missing-attribute",
        "id",
    ),
    (
        "version 0.3",
        {"ce-specversion": "0.3", "ce-type": "orders.placed", "ce-source": "/s", "ce-id": "1"},
        b'{"order_id": "x", "amount": 1}',
        400,
        "unsupported-specversion",
        "specversion",
    ),
    (
        "unknown type",
        {"ce-specversion": "1.0", "ce-type": "orders.lost", "ce-source": "/s", "ce-id": "1"},
        b'{"order_id": "x", "amount": 1}',
        400,
        "unknown-type",
        "type",
    ),
    (
        "bad time",
        {
            "ce-specversion": "1.0",
            "ce-type": "orders.placed",
            "ce-source": "/s",
            "ce-id": "1",
            "ce-time": "yesterday",
        },
        b'{"order_id": "x", "amount": 1}',
        400,
        "invalid-attribute",
        "time",
    ),
    (
        "binary data not JSON",
        {
            "ce-specversion": "1.0",
            "ce-type": "orders.placed",
            "ce-source": "/s",
            "ce-id": "1",
            "content-type": "application/json",
        },
        b"order=1",
        400,
        "invalid-json",
        "data",
    ),
    (
        "structured not JSON",
        {"content-type": "application/cloudevents+json"},
        b"{nope",
        400,
        "invalid-json",
        None,
    ),
    (
        "structured without source",
        {"content-type": "application/cloudevents+json; charset=utf-8"},
        b'{"specversion": "1.0", "type": "orders.placed", "id": "1", "data": {}}',
        400,
        "missing-attribute",
        "source",
    ),
    (
        "structured nested attribute",
        {"content-type": "application/cloudevents+json"},
        b'{"specversion": "1.0", "type": "orders.placed", "id": "1", "source": "/s",'
        b' "extra": {"a": 1}, "data": {}}',
        400,
        "invalid-attribute",
        "extra",
    ),
    (
        "batch",
        {"content-type": "application/cloudevents-batch+json"},
        b"[]",
        415,
        "unsupported-format",
        None,
    ),
    (
        "XML data",
        {
            "ce-specversion": "1.0",
            "ce-type": "orders.placed",
            "ce-source": "/s",
            "ce-id": "1",
            "content-type": "application/xml",
        },
        b"<order/>",
        415,
        "unsupported-format",
        "datacontenttype",
    ),
]


async def test_malformed_cloudevents_get_a_typed_400_and_publish_nothing() -> None:
    """Each malformed request is refused with its status, a stable code and
    the attribute at fault; data that does not fit its class is a 422 with
    the field, as on any route; nothing is published."""
    async with serving() as (app, client, seen):
        answers = [
            await client.post("/events", headers=headers, content=body)
            for _, headers, body, _, _, _ in MALFORMED
        ]
        misfit = await client.post(
            "/events",
            headers={
                "content-type": "application/cloudevents+json",
            },
            content=b'{"specversion": "1.0", "type": "orders.placed", "id": "1", "source": "/s",'
            b' "data": {"order_id": "x", "amount": "lots"}}',
        )
        await app.drain()
    for (name, _, _, status, code, attribute), r in zip(MALFORMED, answers, strict=True):
        body = r.json()
        assert (r.status_code, body["code"], body.get("attribute")) == (status, code, attribute), (
            name,
            body,
        )
        assert body["error"]
    assert misfit.status_code == 422
    assert misfit.json()["field"] == "$.amount"
    assert seen.items == []


async def test_surge_events_written_as_cloudevents_read_back() -> None:
    """to_cloudevent's binary and structured requests parse with the SDK and
    are taken by a surge CloudEvents route."""
    event = OrderPlaced(order_id="o-5", amount=3.0)
    when = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    written = [
        to_cloudevent(
            event, id=surge.new_id(), source="/shop", time=when, extensions={"tenant": "t1"}
        ),
        to_cloudevent(
            event, id=surge.new_id(), source="/shop", time=when.timestamp(), structured=True
        ),
    ]
    for headers, body in written:
        parsed = ce_http.from_http_event(ce_http.HTTPMessage(headers=headers, body=body))
        assert parsed.get_type() == "orders.placed"
        assert parsed.get_source() == "/shop"
        assert parsed.get_time() == when
        assert parsed.get_data() == {"order_id": "o-5", "amount": 3.0}
    async with serving() as (app, client, seen):
        for headers, body in written:
            r = await client.post("/events", headers=headers, content=body)
            assert r.status_code == 202, r.text
        await seen.wait_for(2)
        await app.drain()
    assert [e for e, _, _ in seen.items] == [event, event]
    assert seen.items[0][2]["ce-tenant"] == "t1"


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_from_cloudevent_round_trips_with_the_sdk(mode: str) -> None:
    """An SDK CloudEvent (either mode) read with from_cloudevent is the surge event of its
    type, its attributes as ce-* headers and an id derived from source + id (the one a
    route gives it); written back with to_cloudevent it parses with the SDK into the same
    attributes and data."""
    ce = sdk_event(id="evt-7")
    to = ce_http.to_binary if mode == "binary" else ce_http.to_structured
    message = to(ce, JSONFormat())
    # header names as a client or proxy may spell them
    given = {name.title(): value for name, value in message.headers.items()}
    event, headers, event_id = from_cloudevent(given, message.body, OrderPlaced, Refund)
    assert event == OrderPlaced(order_id="o-1", amount=9.5)
    assert surge.is_derived(event_id)
    assert (
        event_id
        == from_cloudevent(
            dict(ce_http.to_binary(ce, JSONFormat()).headers),
            ce_http.to_binary(ce, JSONFormat()).body,
            OrderPlaced,
        )[2]
    )
    assert headers["ce-source"] == "/shop/web"
    assert headers["ce-partition"] == "eu"
    standard = {"id", "source", "type", "specversion", "subject", "time"}
    back_headers, back_body = to_cloudevent(
        event,
        id=headers["ce-id"],
        source=headers["ce-source"],
        type=headers["ce-type"],
        subject=headers["ce-subject"],
        time=datetime.fromisoformat(headers["ce-time"]),
        extensions={
            k[3:]: v for k, v in headers.items() if k.startswith("ce-") and k[3:] not in standard
        },
        structured=mode == "structured",
    )
    back = ce_http.from_http_event(ce_http.HTTPMessage(headers=back_headers, body=back_body))
    original = ce.get_attributes()
    assert {k: v for k, v in back.get_attributes().items() if k != "datacontenttype"} == {
        k: v for k, v in original.items() if k != "datacontenttype"
    }
    assert back.get_data() == ce.get_data()


def test_from_cloudevent_refuses_what_a_route_refuses() -> None:
    """No CloudEvent, an unknown type, non-JSON data and data that does not fit its class
    raise InvalidCloudEvent or DecodeError (with the field), as the ingress answers them."""
    with pytest.raises(surge.InvalidCloudEvent) as not_ce:
        from_cloudevent({"content-type": "application/json"}, b"{}", OrderPlaced)
    assert not_ce.value.code == "not-a-cloudevent"
    refund = ce_http.to_binary(
        CloudEvent(
            attributes={"type": "com.example.refund.v1", "source": "urn:b", "id": "1"},
            data={"order_id": "o-7"},
        ),
        JSONFormat(),
    )
    with pytest.raises(surge.InvalidCloudEvent) as unknown:
        from_cloudevent(refund.headers, refund.body, OrderPlaced)
    assert (unknown.value.code, unknown.value.attribute) == ("unknown-type", "type")
    event, _, _ = from_cloudevent(
        refund.headers, refund.body.decode(), {"com.example.refund.v1": Refund}
    )
    assert event == Refund(order_id="o-7")
    bad = ce_http.to_structured(
        CloudEvent(
            attributes={"type": "orders.placed", "source": "/s", "id": "3"},
            data={"order_id": "o-1", "amount": "nine"},
        ),
        JSONFormat(),
    )
    with pytest.raises(surge.DecodeError) as wrong:
        from_cloudevent(bad.headers, bad.body, OrderPlaced)
    assert not isinstance(wrong.value, surge.InvalidCloudEvent)
    assert wrong.value.field == "$.amount"
    missing = ce_http.to_binary(
        CloudEvent(
            attributes={"type": "orders.placed", "source": "/s", "id": "4"},
            data={"order_id": "o-1"},
        ),
        JSONFormat(),
    )
    with pytest.raises(surge.DecodeError) as absent:
        from_cloudevent(missing.headers, missing.body, OrderPlaced)
    assert absent.value.field == "$.amount"
    with pytest.raises(surge.InvalidCloudEvent) as garbled:
        from_cloudevent(refund.headers, b"{", {"com.example.refund.v1": Refund})
    assert garbled.value.code == "invalid-json"


def test_routes_refuse_what_cannot_work() -> None:
    """A type naming two classes, an empty route and a non-event are refused."""
    app = surge.App("ce-config")
    with pytest.raises(surge.ConfigurationError, match="two event classes"):
        app.http.cloudevents("/a", OrderPlaced, {"orders.placed": Refund})
    with pytest.raises(surge.ConfigurationError, match="at least one"):
        app.http.cloudevents("/b")
    with pytest.raises(surge.ConfigurationError, match="Event subclasses"):
        app.http.cloudevents("/c", {"x": dict})  # type: ignore[dict-item]
    route = app.http.cloudevents("/d", OrderPlaced)
    assert app.http.cloudevent_routes == [route]
    assert app.http.routes == []
    assert issubclass(surge.InvalidCloudEvent, surge.DecodeError)
