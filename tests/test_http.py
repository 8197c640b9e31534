"""The HTTP ingress over a real socket: every status it answers."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import surge
from surge.http import (
    Limits,
    Receive,
    RequestHandler,
    RequestWrapper,
    Scope,
    Send,
    Server,
    bind_socket,
    serve,
)
from surge.observe import mount
from surge.tools import fetch
from surge.tools._client import Connection, build_request
from surge.transports import MemoryTransport

pytestmark = pytest.mark.realtime


class Order(surge.Event):
    order_id: str
    amount: float


class Paid(surge.Event):
    order_id: str


class Slow(surge.Event):
    order_id: str


class Held:
    """Requests parked in the ``slow`` handler until ``gate`` opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = 0
        self.all_in = asyncio.Event()
        self.expect = 1

    async def wait_for(self, n: int) -> None:
        self.expect = n
        if self.entered >= n:
            return
        self.all_in.clear()
        await asyncio.wait_for(self.all_in.wait(), 10)


def make_app(*, before: Any = None, **options: Any) -> tuple[surge.App, list[Order], Held]:
    app = surge.App("shop", **options)
    if before is not None:
        app.on_stop(before)
    seen: list[Order] = []
    held = Held()

    @app.on(Order)
    async def charge(event: Order) -> Paid | None:
        seen.append(event)
        return None if event.order_id == "silent" else Paid(order_id=event.order_id)

    @app.on(Slow)
    async def slow(event: Slow) -> Paid:
        held.entered += 1
        if held.entered >= held.expect:
            held.all_in.set()
        await held.gate.wait()
        return Paid(order_id=event.order_id)

    app.http.post("/orders", publish=Order)
    app.http.post("/pay", publish=Order, reply=Paid, timeout=0.3)
    app.http.post("/slow", publish=Slow, reply=Paid, timeout=20)
    return app, seen, held


@asynccontextmanager
async def serving(app: surge.App, *, admin: bool = False, **limits: Any) -> AsyncIterator[Server]:
    given = Limits(**limits) if limits else None
    async with app, Server(app, port=0, limits=given, admin=admin) as server:
        yield server


async def test_publish_route_answers_202_with_the_event_id() -> None:
    """POST on a publish route answers 202 {"id"} and the handler gets the decoded event."""
    app, seen, _ = make_app()
    async with serving(app) as server:
        r = await fetch(server.url + "/orders", "POST", json={"order_id": "a1", "amount": 9.5})
        await app.drain()
    assert r.status == 202
    assert r.headers["content-type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", r.json()["id"])
    assert seen == [Order(order_id="a1", amount=9.5)]


async def test_reply_route_answers_200_with_the_reply_event() -> None:
    """A route with reply= waits for the reply event and answers it as JSON."""
    app, _, _ = make_app()
    async with serving(app) as server:
        r = await fetch(server.url + "/pay", "POST", json={"order_id": "b2", "amount": 1})
    assert (r.status, r.json()) == (200, {"order_id": "b2"})


async def test_reply_that_never_comes_answers_504() -> None:
    """No reply within the route's timeout answers 504."""
    app, _, _ = make_app()
    async with serving(app) as server:
        r = await fetch(server.url + "/pay", "POST", json={"order_id": "silent", "amount": 1})
    assert r.status == 504
    assert "Paid" in r.json()["error"]


async def test_body_that_does_not_fit_answers_422_with_the_field() -> None:
    """A JSON body of the wrong shape answers 422 naming the field and the reason."""
    app, seen, _ = make_app()
    async with serving(app) as server:
        url = server.url + "/orders"
        bad_type = await fetch(url, "POST", json={"order_id": "x", "amount": "no"})
        missing = await fetch(server.url + "/orders", "POST", json={"amount": 1})
    assert bad_type.status == 422
    assert bad_type.json()["field"] == "$.amount"
    assert "Expected `float`, got `str`" in bad_type.json()["error"]
    assert missing.status == 422
    assert missing.json()["field"] == "$.order_id"
    assert "missing required field `order_id`" in missing.json()["error"]
    assert seen == []


async def test_body_that_is_not_json_answers_400() -> None:
    """A body that is not JSON at all answers 400 and publishes nothing."""
    app, seen, _ = make_app()
    async with serving(app) as server:
        r = await fetch(server.url + "/orders", "POST", body=b"order=1&amount=2")
        empty = await fetch(server.url + "/orders", "POST", body=b"")
    assert (r.status, empty.status) == (400, 400)
    assert "not valid JSON" in r.json()["error"]
    assert seen == []


async def test_past_max_in_flight_answers_503_at_once_with_retry_after() -> None:
    """With max_in_flight requests held, the next one gets 503 + Retry-After, not a queue."""
    app, _, held = make_app()
    async with serving(app, max_in_flight=2) as server:
        parked = [
            asyncio.create_task(fetch(server.url + "/slow", "POST", json={"order_id": str(i)}))
            for i in range(2)
        ]
        await held.wait_for(2)
        assert app.http.statistics().in_flight == 2
        refused = await fetch(server.url + "/slow", "POST", json={"order_id": "late"})
        assert refused.status == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        held.gate.set()
        answers = await asyncio.gather(*parked)
    assert [a.status for a in answers] == [200, 200]


async def test_declared_body_over_max_body_answers_413_before_reading_it() -> None:
    """A Content-Length over max_body answers 413 and closes without waiting for the body."""
    app, seen, _ = make_app()
    async with serving(app, max_body=1024) as server:
        conn = await Connection.open("127.0.0.1", server.port)
        head = b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 2097152\r\n\r\n"
        r = await asyncio.wait_for(conn.send(head), 5)
        assert r.status == 413
        assert r.headers["connection"] == "close"
    assert seen == []


async def test_client_still_sending_a_refused_body_reads_the_413() -> None:
    """A client that streams on after its 413 reads the answer and an orderly end, not a
    reset, and the server does not wait for the whole body."""
    app, seen, _ = make_app()
    async with serving(app, max_body=1024) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 4194304\r\n\r\n")
        for _ in range(64):
            writer.write(b"a" * 16384)
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert answer.endswith(b'{"error":"the body is larger than 1024 bytes"}')
    assert seen == []


async def test_streamed_body_over_max_body_answers_413() -> None:
    """A chunked body that grows past max_body answers 413 even with no Content-Length."""
    app, seen, _ = make_app()
    async with serving(app, max_body=1024) as server:
        conn = await Connection.open("127.0.0.1", server.port)
        head = b"POST /orders HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        chunk = b"200\r\n" + b" " * 512 + b"\r\n"
        r = await asyncio.wait_for(conn.send(head + chunk * 4 + b"0\r\n\r\n"), 5)
    assert r.status == 413
    assert seen == []


async def test_body_of_exactly_max_body_is_accepted() -> None:
    """The body limit is inclusive: max_body bytes are read and decoded."""
    app, _, _ = make_app()
    body = msgspec.json.encode({"order_id": "x", "amount": 1})
    async with serving(app, max_body=len(body)) as server:
        r = await fetch(server.url + "/orders", "POST", body=body)
    assert r.status == 202


@pytest.mark.parametrize(("size", "pieces"), [(8000, 1), (8000, 8), (500_000, 50)])
async def test_headers_over_max_header_answer_431(size: int, pieces: int) -> None:
    """Request headers past max_header answer 431, in one piece or many; a client still
    sending when refused reads the 431 and an orderly end, not a reset."""
    app, seen, _ = make_app()
    async with serving(app, max_header=4096) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * size + b"\r\n\r\n"
        step = len(head) // pieces + 1
        for i in range(0, len(head), step):
            writer.write(head[i : i + step])
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert answer.endswith(b'{"error":"request headers too large"}')
    assert seen == []


async def test_headers_under_max_header_are_served() -> None:
    """Headers just under max_header are served normally."""
    app, _, _ = make_app()
    async with serving(app, max_header=4096) as server:
        r = await fetch(server.url + "/healthz", headers={"x-big": "a" * 3000})
    assert r.status == 200


async def test_health_endpoints_report_liveness_and_readiness() -> None:
    """/healthz is 200 whenever served; /readyz is 503 until the app runs, then 200."""
    app, _, _ = make_app()
    async with Server(app, port=0) as server:
        live = await fetch(server.url + "/healthz")
        not_ready = await fetch(server.url + "/readyz")
        async with app:
            ready = await fetch(server.url + "/readyz")
    assert (live.status, live.json()) == (200, {"status": "ok"})
    assert not_ready.status == 503
    assert not_ready.json()["reason"] == "new"
    assert (ready.status, ready.json()) == (200, {"status": "ready"})


async def test_readyz_is_503_when_the_transport_cannot_be_reached() -> None:
    """/readyz asks the transport: a broker that fails answers 503 with the reason, whose
    details (the broker's error, naming hosts) only the admin surface sees."""

    class Unreachable(MemoryTransport):
        async def stats(self, group: str) -> Any:
            raise surge.TransportError("connection refused to 10.0.0.5:6379")

    app, _, _ = make_app(transport=Unreachable())
    async with app, Server(app, port=0) as public, Server(app, port=0, admin=True) as admin:
        r = await fetch(public.url + "/readyz")
        detailed = await fetch(admin.url + "/readyz")
    assert r.status == 503
    assert r.json()["reason"] == "transport unreachable"
    assert detailed.status == 503
    assert detailed.json()["reason"] == (
        "transport unreachable: TransportError: connection refused to 10.0.0.5:6379"
    )


async def test_metrics_count_requests_by_status_and_export_subscriptions() -> None:
    """/metrics is Prometheus text with per-route counts, latency and, once surge.observe
    is mounted, subscription counters."""
    app, _, _ = make_app()
    mount(app.http)
    async with serving(app, admin=True) as server:
        for _ in range(3):
            await fetch(server.url + "/orders", "POST", json={"order_id": "m", "amount": 1})
        await fetch(server.url + "/orders", "POST", body=b"{")
        await app.drain()
        text = (await fetch(server.url + "/metrics")).body.decode()
    assert 'surge_http_requests_total{method="POST",route="/orders",status="202"} 3.0' in text
    assert 'surge_http_requests_total{method="POST",route="/orders",status="400"} 1.0' in text
    assert 'surge_http_request_duration_seconds_count{method="POST",route="/orders"} 4.0' in text
    assert 'surge_subscription_received_total{app="shop",subscription="shop.charge"} 3.0' in text
    assert "surge_http_in_flight 0.0" in text


async def test_metrics_hold_only_http_families_until_observe_is_mounted() -> None:
    """A plain ingress exports its own counters; reading app.http times no handler."""
    app, _, _ = make_app()
    assert app.timings is None
    async with serving(app, admin=True) as server:
        text = (await fetch(server.url + "/metrics")).body.decode()
        stats = await fetch(server.url + "/_surge/stats")
    assert "surge_http_in_flight 0.0" in text
    assert "surge_subscription_" not in text
    assert stats.status == 404


class _Counting(Collector):
    def __init__(self) -> None:
        self.refreshed = 0

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("extension_refreshed", "Refreshes seen", value=self.refreshed)

    async def refresh(self) -> None:
        self.refreshed += 1


async def test_extensions_mount_collect_and_wrap_requests() -> None:
    """An ASGI app mounted under a prefix (counted there), a collector refreshed before
    each scrape, and wrappers around each routed request, later ones inside."""
    app, _, _ = make_app()
    calls: list[str] = []

    async def extra(scope: Scope, receive: Receive, send: Send) -> None:
        body = scope["path"].encode()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": body})

    def wrapper(name: str) -> RequestWrapper:
        async def wrap(handle: RequestHandler, scope: Scope, receive: Receive, send: Send) -> int:
            calls.append(f"{name} in")
            status = await handle(scope, receive, send)
            calls.append(f"{name} {status}")
            return status

        return wrap

    collector = _Counting()
    app.http.mount("/extra/", extra)
    app.http.add_collector(collector, refresh=collector.refresh)
    app.http.around_requests(wrapper("outer"))
    app.http.around_requests(wrapper("inner"))
    with pytest.raises(surge.ConfigurationError):
        app.http.mount("/extra/", extra)
    with pytest.raises(surge.ConfigurationError):
        app.http.mount("no-leading-slash/", extra)
    with pytest.raises(surge.ConfigurationError):
        app.http.mount("/healthz", extra)  # the ingress's own
    async with serving(app, admin=True) as server:
        mounted = await fetch(server.url + "/extra/a/b")
        await fetch(server.url + "/orders", "POST", json={"order_id": "w", "amount": 1})
        await fetch(server.url + "/metrics")
        text = (await fetch(server.url + "/metrics")).body.decode()
        await app.drain()
    assert (mounted.status, mounted.body) == (201, b"/extra/a/b")
    assert app.http.statistics().requests["GET /extra/"] == {201: 1}
    assert calls == ["outer in", "inner in", "inner 202", "outer 202"]
    assert "extension_refreshed 2.0" in text


async def test_unknown_path_answers_404_and_wrong_method_405() -> None:
    """A path with no route answers 404; a known path with another method 405 with Allow."""
    app, _, _ = make_app()
    async with serving(app) as server:
        missing = await fetch(server.url + "/nope")
        wrong = await fetch(server.url + "/orders")
    assert missing.status == 404
    assert (wrong.status, wrong.headers["allow"]) == (405, "POST")


async def test_connection_closes_after_max_requests_per_connection() -> None:
    """The last request a connection may carry is answered with connection: close."""
    app, _, _ = make_app()
    async with serving(app, max_requests_per_connection=3) as server:
        conn = await Connection.open("127.0.0.1", server.port)
        request = build_request("GET", "127.0.0.1", server.port, "/healthz")
        answers = [await conn.send(request) for _ in range(3)]
        assert [a.status for a in answers] == [200, 200, 200]
        assert "connection" not in answers[1].headers
        assert answers[2].headers["connection"] == "close"
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(conn.send(request), 5)


async def test_idle_keep_alive_connection_is_closed_after_keep_alive() -> None:
    """A connection left idle after its answer is closed once keep_alive seconds pass."""
    app, _, _ = make_app()
    loop = asyncio.get_running_loop()
    async with serving(app, keep_alive=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = await reader.readuntil(b'{"status":"ok"}')
        idle_since = loop.time()
        rest = await asyncio.wait_for(reader.read(), 5)
        idle = loop.time() - idle_since
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert rest == b""
    assert 0.25 <= idle < 3


async def test_serve_starts_the_app_and_stops_it_on_request_stop() -> None:
    """serve() starts a stopped app, serves it, and stops both when asked."""
    app, _, _ = make_app()
    listening: asyncio.Future[Server] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(app, "127.0.0.1", 0, ready=listening.set_result))
    server = await asyncio.wait_for(listening, 5)
    r = await fetch(server.url + "/pay", "POST", json={"order_id": "s", "amount": 1})
    assert r.status == 200
    app.request_stop()
    await asyncio.wait_for(task, 10)
    assert repr(app).startswith("<App 'shop' stopped")
    with pytest.raises(ConnectionRefusedError):
        await fetch(server.url + "/healthz", timeout=2)


async def test_app_stop_lets_requests_in_flight_finish() -> None:
    """Stopping the app closes the server gracefully: a request waiting for its reply gets it."""
    readiness: list[bool] = []

    async def stop_began() -> None:
        # Runs just before the ingress's own stop hook: open the gate once
        # the server has begun to shut down.
        def release() -> None:
            readiness.append(app.http.ready)
            held.gate.set()

        asyncio.get_running_loop().call_soon(release)

    app, _, held = make_app(before=stop_began)
    await app.start()
    server = Server(app, port=0)
    await server.start()
    pending = asyncio.create_task(fetch(server.url + "/slow", "POST", json={"order_id": "g"}))
    await held.wait_for(1)
    await asyncio.wait_for(app.stop(), 10)
    r = await asyncio.wait_for(pending, 10)
    assert readiness == [False]
    assert (r.status, r.json()) == (200, {"order_id": "g"})


async def test_lifespan_starts_and_stops_the_app_under_another_server() -> None:
    """Mounted under any ASGI server, the lifespan protocol starts and stops the app."""
    app, _, _ = make_app()
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: list[str] = []
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        inbox.put_nowait({"type": kind})

    async def receive() -> dict[str, Any]:
        message = await inbox.get()
        if message["type"] == "lifespan.shutdown":
            outbox.append("ready" if app.http.ready else "not ready")
        return message

    async def send(message: Any) -> None:
        outbox.append(message["type"])

    await app.http({"type": "lifespan"}, receive, send)
    assert outbox == ["lifespan.startup.complete", "ready", "lifespan.shutdown.complete"]
    assert repr(app).startswith("<App 'shop' stopped")


def test_limits_reject_impossible_values() -> None:
    """Limits that cannot work raise ConfigurationError."""
    with pytest.raises(surge.ConfigurationError):
        Limits(max_in_flight=0)
    with pytest.raises(surge.ConfigurationError):
        Limits(header_timeout=0)


def test_routes_reject_bad_declarations() -> None:
    """Reserved paths, duplicate routes and non-event types are refused at declaration."""
    app, _, _ = make_app()
    with pytest.raises(surge.ConfigurationError):
        app.http.post("/healthz", publish=Order)
    with pytest.raises(surge.ConfigurationError):
        app.http.post("/orders", publish=Order)
    with pytest.raises(surge.ConfigurationError):
        app.http.post("/x", publish=dict)  # type: ignore[arg-type]
    with pytest.raises(surge.ConfigurationError):
        app.http.post("relative", publish=Order)


_WORKER = """
import asyncio, sys
import surge
from surge._app import run_loop
from surge.http import serve

app = surge.App("worker")

@app.on_stop
async def bye() -> None:
    print("stopping", flush=True)

def ready(server):
    print(server.port, flush=True)

run_loop(serve(app, "127.0.0.1", 0, ready=ready))
print("stopped", flush=True)
"""


async def test_serve_in_a_process_stops_gracefully_on_sigterm() -> None:
    """serve() run bare (as a worker process does) turns SIGTERM into a graceful stop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
    r = await fetch(f"http://127.0.0.1:{port}/readyz")
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert r.status == 200
    assert proc.returncode == 0
    assert out.decode().split() == ["stopping", "stopped"]


async def test_servers_share_a_port_with_so_reuseport() -> None:
    """Two servers (as two workers would) bind the same port with SO_REUSEPORT; a plain
    bind of a taken port fails."""
    first_app, _, _ = make_app()
    second_app = surge.App("other")
    async with serving(first_app) as first:
        async with second_app, Server(second_app, port=first.port) as second:
            assert second.port == first.port
            r = await fetch(second.url + "/healthz")
        with pytest.raises(OSError, match="in use"):
            bind_socket("127.0.0.1", first.port, reuse_port=False)
    assert r.status == 200
