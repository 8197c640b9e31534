"""The operator surface (/metrics, /_surge/*) is off on public listeners and trusts no address."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

import surge
from surge.cli import main
from surge.http import Server
from surge.observe import mount

from ._surge_run import get, surge_run

pytestmark = pytest.mark.realtime

DLQ_ROUTES = (
    ("GET", "/_surge/dlq", b""),
    ("GET", "/_surge/stats", b""),
    ("GET", "/metrics", b""),
    ("POST", "/_surge/dlq/replay", b'{"subscription":"charge"}'),
    ("POST", "/_surge/dlq/purge", b'{"subscription":"charge"}'),
)


class Order(surge.Event):
    n: int
    card: str = "4111-1111-1111-1111"


def make_app(*, redact: bool = False) -> surge.App:
    app = surge.App("shop")
    mount(app.http, redact=redact)
    app.http.post("/orders", publish=Order)

    @app.on(Order, retry=surge.Retry(attempts=1))
    async def charge(event: Order) -> None:
        raise ValueError("declined")

    return app


@asynccontextmanager
async def serving(app: surge.App) -> AsyncIterator[tuple[Server, Server]]:
    """The app with a public listener and an admin one, one dead letter in store."""
    async with (
        app,
        Server(app, port=0) as public,
        Server(app, port=0, admin=True) as admin,
    ):
        await app.publish(Order(n=1))
        await app.drain()
        assert len(await app.dead_letters()) == 1
        yield public, admin


async def raw(
    server: Server, method: str, path: str, body: bytes = b"", *headers: str
) -> tuple[int, bytes]:
    """One request with exactly these header lines (a Host header among them when given)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        if not any(h.lower().startswith("host:") for h in headers):
            headers = (f"host: 127.0.0.1:{server.port}", *headers)
        lines = [f"{method} {path} HTTP/1.1", *headers, "connection: close"]
        if body:
            lines += ["content-type: application/json", f"content-length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, "surge")


async def test_public_listener_serves_no_operator_route_without_a_token() -> None:
    """Without a token, a public listener answers 404 to dead-letter reads and writes,
    stats and metrics, though the client is on loopback; the dead letter stays."""
    app = make_app()
    async with serving(app) as (public, _):
        for method, path, body in DLQ_ROUTES:
            status, answer = await raw(public, method, path, body)
            assert status == 404, (method, path)
            assert b"4111" not in answer
        status, _ = await raw(public, "POST", "/orders", b'{"n":2}')
        assert status == 202
        await app.drain()
        assert len(await app.dead_letters()) == 2


async def test_public_listener_with_a_token_serves_only_its_bearer() -> None:
    """With an admin token, dead-letter reads and writes on the public listener answer 401
    without it or with a wrong one, and work with it."""
    app = make_app()
    app.http.set_admin_token("t0ken-of-the-operator")
    async with serving(app) as (public, admin):
        for server in (public, admin):
            for method, path, body in DLQ_ROUTES:
                for header in ((), ("authorization: Bearer wrong",)):
                    status, _ = await raw(server, method, path, body, *header)
                    assert status == 401, (server.admin, method, path, header)
        assert len(await app.dead_letters()) == 1
        good = "authorization: Bearer t0ken-of-the-operator"
        status, body = await raw(public, "GET", "/_surge/dlq", b"", good)
        assert status == 200
        assert b"4111-1111" in body
        status, body = await raw(public, "POST", "/_surge/dlq/purge", DLQ_ROUTES[-1][2], good)
        assert (status, msgspec.json.decode(body)) == (200, {"count": 1})
        assert await app.dead_letters() == []


async def test_a_proxy_on_loopback_gets_nothing_from_the_admin_listener() -> None:
    """A reverse proxy on the same host (its requests come from 127.0.0.1 with forwarding
    headers, or name the site's host) cannot read or change dead letters on the admin
    listener; a direct request by address can."""
    app = make_app()
    async with serving(app) as (_, admin):
        proxied = (
            ("x-forwarded-for: 203.0.113.9",),
            ("forwarded: for=203.0.113.9;proto=https",),
            ("x-real-ip: 203.0.113.9",),
            ("host: shop.example.com",),  # a DNS name, as a proxy or a rebinding page sends
        )
        for headers in proxied:
            for method, path, body in DLQ_ROUTES:
                status, _ = await raw(admin, method, path, body, *headers)
                assert status == 403, (headers, method, path)
        assert len(await app.dead_letters()) == 1
        status, body = await raw(admin, "GET", "/_surge/dlq")
        assert status == 200
        assert b"4111-1111" in body
        status, _ = await raw(admin, "GET", "/_surge/dlq", b"", "host: localhost")
        assert status == 200


async def test_redacted_dead_letters_show_no_body() -> None:
    """mount(redact=True) serves dead letters without their event bodies."""
    app = make_app(redact=True)
    async with serving(app) as (_, admin):
        status, body = await raw(admin, "GET", "/_surge/dlq")
    assert status == 200
    letter = msgspec.json.decode(body)["dead_letters"][0]
    assert letter["body"] == "(redacted)"
    assert b"4111" not in body


async def test_admin_token_belongs_to_one_app() -> None:
    """A token set on one app's ingress guards that app only; a new app starts without one."""
    first = make_app()
    first.http.set_admin_token("first-token")
    second = make_app()
    assert first.http.admin_protected
    assert not second.http.admin_protected
    with pytest.raises(surge.ConfigurationError):
        second.http.set_admin_token("  ")


def test_cli_refuses_an_admin_listener_off_loopback_without_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`surge run --admin 0.0.0.0:9000` needs SURGE_ADMIN_TOKEN; --admin alone needs --http."""
    monkeypatch.delenv("SURGE_ADMIN_TOKEN", raising=False)
    runner = CliRunner()
    result = runner.invoke(
        main, ["run", "tests.test_admin_surface:APP", "--http", "0:0", "--admin", "0.0.0.0:9"]
    )
    assert result.exit_code == 2
    assert "needs SURGE_ADMIN_TOKEN" in result.output
    result = runner.invoke(main, ["run", "tests.test_admin_surface:APP", "--admin", "9"])
    assert result.exit_code == 2
    assert "give both" in result.output


async def test_the_dashboard_path_without_its_slash_redirects_where_it_is_served() -> None:
    """`/_surge` answers 308 to `/_surge/` on the admin listener, 404 on the public one."""
    app = make_app()
    async with serving(app) as (public, admin):
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        writer.write(f"GET /_surge HTTP/1.1\r\nhost: 127.0.0.1:{admin.port}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()
        assert head.split()[1] == b"308"
        assert b"\r\nlocation: /_surge/\r\n" in head.lower()
        status, _ = await raw(admin, "GET", "/_surge/")
        assert status == 200
        status, _ = await raw(public, "GET", "/_surge")
        assert status == 404


def test_surge_run_serves_the_operator_surface_on_the_admin_listener_only(
    tmp_path: Path,
) -> None:
    """`surge run module:app --http A --admin B` (one process): /metrics and /_surge/*
    answer 404 on A and 200 on B; the public routes answer on A."""
    pytest.importorskip("uvicorn")
    with surge_run(
        "surge.examples.shop:app",
        "--http",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        log=tmp_path / "stderr.log",
        admin=True,
    ) as at:
        assert at.admin is not None
        assert at.admin != at.public
        assert get(f"{at.public}/healthz")[0] == 200
        for path in ("/metrics", "/_surge/", "/_surge/stats", "/_surge/dlq"):
            assert get(at.public + path)[0] == 404, path
            assert get(at.admin + path)[0] == 200, path
        assert b"surge_" in get(f"{at.admin}/metrics")[1]
