"""OpenTelemetry tracing: one trace from an HTTP request to every handler.

``surge.observe.trace(app)`` (extra ``surge[otel]``) adds a
:class:`TracingMiddleware`; an ingress that surge.observe is mounted on
opens a server span per request (its parent: the request's
``traceparent``, if any). Publishing
writes the current span into the envelope's ``traceparent`` (and
``tracestate``) headers; handling opens a consumer span whose parent is
that header, and keeps it current while the handler's own events are
published, so each stage is the child of the one before. Without
``trace(app)`` nothing of this runs: no middleware, no span, no header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import ConfigurationError
from .._middleware import Middleware
from ._state import state_of

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"surge.observe tracing needs the otel extra ({exc.name} is missing): "
        "pip install 'surge[otel]'"
    ) from exc

if TYPE_CHECKING:
    from .._app import App
    from .._context import Context
    from .._event import Envelope
    from ..http import Receive, RequestHandler, Scope, Send

__all__ = ("TracingMiddleware", "trace")

_propagator = TraceContextTextMapPropagator()


class TracingMiddleware(Middleware):
    """Trace context in envelope headers; a span per handling."""

    def __init__(self, tracer_provider: Any = None) -> None:
        self.tracer = otel_trace.get_tracer("surge", tracer_provider=tracer_provider)
        self._spans: dict[Context, Any] = {}

    # --- publishing ----------------------------------------------------------
    def before_publish(self, envelope: Envelope) -> None:
        current = otel_context.get_current()
        if not otel_trace.get_current_span(current).get_span_context().is_valid:
            return
        carrier = dict(envelope.headers or {})
        # replaces a traceparent inherited from the parent event: the span
        # current now (the handler's) is this event's parent
        _propagator.inject(carrier, context=current)
        envelope.headers = carrier

    # --- handling -------------------------------------------------------------
    def before_handle(self, ctx: Context) -> None:
        env = ctx.envelope
        parent = _propagator.extract(env.headers or {})
        span = self.tracer.start_span(
            f"handle {ctx.subscription}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "surge",
                "messaging.message.id": env.id,
                "messaging.destination.name": env.topic,
                "messaging.consumer.group.name": ctx.subscription,
                "surge.attempt": ctx.attempt,
            },
        )
        self._spans[ctx] = span
        # Left attached after the span ends, so the events the handler
        # returns (published after after_handle, in this task) carry it; the
        # worker's next handling attaches its own.
        otel_context.attach(otel_trace.set_span_in_context(span))

    def after_handle(self, ctx: Context, result: Any) -> None:
        span = self._spans.pop(ctx, None)
        if span is not None:
            span.end()

    def on_error(self, ctx: Context, exc: BaseException) -> None:
        span = self._spans.pop(ctx, None)
        if span is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()

    # --- the ingress ------------------------------------------------------------
    async def traced_request(
        self, handle: RequestHandler, scope: Scope, receive: Receive, send: Send
    ) -> int:
        """Run the ingress's ``handle`` for one request inside a server span
        (``Ingress.around_requests``)."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        span = self.tracer.start_span(
            f"{scope['method']} {scope['path']}",
            context=_propagator.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
        )
        token = otel_context.attach(otel_trace.set_span_in_context(span))
        try:
            status = await handle(scope, receive, send)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return status
        finally:
            span.end()
            otel_context.detach(token)


def trace(app: App, *, tracer_provider: Any = None) -> TracingMiddleware:
    """Trace ``app`` with OpenTelemetry (idempotent); call before it starts.

    ``tracer_provider`` defaults to the global one
    (``opentelemetry.trace.set_tracer_provider``).
    """
    state = state_of(app)
    if state.tracing is not None:
        return state.tracing
    if app.state != "new":
        raise ConfigurationError("trace the app before it starts")
    mw = state.tracing = TracingMiddleware(tracer_provider)
    app.add_middleware(mw)
    if state.ingress is not None:  # mounted already (surge.observe.mount)
        state.ingress.around_requests(mw.traced_request)
    return mw
