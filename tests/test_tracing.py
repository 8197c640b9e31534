"""Tracing: an HTTP request and three handler stages form one OpenTelemetry trace."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import surge
from surge.http import Server
from surge.observe import mount, trace
from surge.tools import fetch

pytestmark = pytest.mark.realtime


class Placed(surge.Event):
    order_id: str


class Charged(surge.Event):
    order_id: str


class Shipped(surge.Event):
    order_id: str


def make_app(provider: TracerProvider) -> tuple[surge.App, list[dict[str, str] | None]]:
    app = surge.App("traced")
    trace(app, tracer_provider=provider)
    mount(app.http)
    app.http.post("/orders", publish=Placed)
    seen: list[dict[str, str] | None] = []

    @app.on(Placed)
    async def charge(event: Placed) -> Charged:
        return Charged(order_id=event.order_id)

    @app.on(Charged)
    async def ship(event: Charged) -> Shipped:
        return Shipped(order_id=event.order_id)

    @app.on(Shipped, retry=surge.Retry(attempts=1))
    async def notify(event: Shipped, ctx: surge.Context) -> None:
        seen.append(ctx.envelope.headers)
        if event.order_id == "bad":
            raise ValueError("no address")

    return app, seen


def setup() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.mark.parametrize("client_traceparent", [True, False])
async def test_http_request_and_three_stages_form_one_trace(client_traceparent: bool) -> None:
    """Server span, then charge, ship and notify spans, each the child of the one before."""
    provider, exporter = setup()
    app, seen = make_app(provider)
    headers: dict[str, str] = {}
    root: Any = None
    if client_traceparent:
        root = provider.get_tracer("client").start_span("client")
        from opentelemetry import trace as otel_trace

        TraceContextTextMapPropagator().inject(
            headers, context=otel_trace.set_span_in_context(root)
        )
    async with app, Server(app, port=0) as server:
        r = await fetch(server.url + "/orders", "POST", json={"order_id": "a1"}, headers=headers)
        assert r.status == 202
        await app.drain()
    if root is not None:
        root.end()
    spans = {s.name: s for s in exporter.get_finished_spans() if s.name != "client"}
    assert set(spans) == {
        "POST /orders",
        "handle traced.charge",
        "handle traced.ship",
        "handle traced.notify",
    }
    chain = [
        spans[n]
        for n in ("POST /orders", *(f"handle traced.{s}" for s in ("charge", "ship", "notify")))
    ]
    trace_ids = {s.context.trace_id for s in chain}
    assert len(trace_ids) == 1
    if root is not None:
        assert trace_ids == {root.get_span_context().trace_id}
        assert chain[0].parent is not None
        assert chain[0].parent.span_id == root.get_span_context().span_id
    else:
        assert chain[0].parent is None
    for parent, child in itertools.pairwise(chain):
        assert child.parent is not None
        assert child.parent.span_id == parent.context.span_id
    assert chain[0].kind == SpanKind.SERVER
    assert {s.kind for s in chain[1:]} == {SpanKind.CONSUMER}
    assert chain[0].attributes is not None
    assert chain[0].attributes["http.response.status_code"] == 202
    assert seen[0] is not None
    assert seen[0]["traceparent"].split("-")[2] == f"{chain[2].context.span_id:016x}"


async def test_a_failing_handler_span_records_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler that raises ends its span with status ERROR and the exception as an event."""
    caplog.set_level(logging.CRITICAL, "surge")
    provider, exporter = setup()
    app, _ = make_app(provider)
    async with app:
        await app.publish(Shipped(order_id="bad"))
        await app.drain()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "handle traced.notify"]
    assert span.status.status_code == StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    assert span.parent is None  # published outside any span: a trace of its own


async def test_without_trace_no_header_is_added() -> None:
    """An app that is not traced publishes no traceparent and has no middleware."""
    app = surge.App("plain")
    headers: list[dict[str, str] | None] = []

    @app.on(Placed)
    async def charge(event: Placed, ctx: surge.Context) -> None:
        headers.append(ctx.envelope.headers)

    async with app:
        await app.publish(Placed(order_id="x"))
        await app.drain()
    assert headers == [None]
    assert app._middleware == ()
