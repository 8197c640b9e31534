"""surge inside a FastAPI app: the ingress mounted as an ASGI sub-app, the
app started and drained by the host's lifespan, the host's middleware (not
its dependencies) or surge's auth= guarding the mount, over httpx's ASGI
transport and over a real uvicorn socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response

import surge
from surge.http import PRINCIPAL_HEADER, api_keys

pytestmark = pytest.mark.realtime

TOKEN = "let-me-in"


class Order(surge.Event):
    order_id: str
    amount: float


class Priced(surge.Event):
    order_id: str
    total: float


def make(lifespan: str = "direct") -> tuple[FastAPI, surge.App, list[str]]:
    """A FastAPI app holding a surge app at /events, guarded by its own
    middleware; the handled order ids."""
    app = surge.App("store")
    handled: list[str] = []

    @app.on(Order)
    async def price(ev: Order) -> Priced:
        handled.append(ev.order_id)
        return Priced(order_id=ev.order_id, total=ev.amount * 1.2)

    app.http.post("/orders", publish=Order)
    app.http.post("/quotes", publish=Order, reply=Priced)

    if lifespan == "direct":
        api = FastAPI(lifespan=app.lifespan)
    else:
        opened: list[str] = []

        @asynccontextmanager
        async def mine(host: FastAPI) -> AsyncIterator[None]:
            opened.append("db")  # the user's own resource, around surge's life
            async with app.lifespan(host):
                yield
            opened.remove("db")

        api = FastAPI(lifespan=mine)
        api.state.opened = opened

    @api.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path.startswith("/events/") and (
            request.headers.get("authorization") != f"Bearer {TOKEN}"
        ):
            return Response(status_code=401)
        return await call_next(request)

    @api.post("/checkout/{order_id}")
    async def checkout(order_id: str) -> dict[str, str]:
        event_id = await app.publish(Order(order_id=order_id, amount=10.0))
        return {"id": event_id}

    api.mount("/events", app.http)
    return api, app, handled


def state(app: surge.App) -> str:
    """The app's state, read afresh (past mypy's narrowing of the earlier read)."""
    return app.state


AUTH = {"authorization": f"Bearer {TOKEN}"}


async def exercise(client: httpx.AsyncClient, app: surge.App, handled: list[str]) -> None:
    """Routes of surge under /events, a FastAPI route publishing, the host's guard."""
    r = await client.post("/events/orders", json={"order_id": "a", "amount": 5}, headers=AUTH)
    assert r.status_code == 202, r.text
    r = await client.post("/events/quotes", json={"order_id": "b", "amount": 10}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"order_id": "b", "total": 12.0}
    r = await client.post("/events/orders", json={"order_id": "x", "amount": 1})
    assert r.status_code == 401  # the host's middleware guards the mounted routes
    r = await client.post("/checkout/c")
    assert r.status_code == 200
    r = await client.post("/events/orders", json={"order_id": "d"}, headers=AUTH)
    assert r.status_code == 422  # surge's own validation, under the mount
    r = await client.get("/events/healthz", headers=AUTH)
    assert r.status_code == 200
    await app.drain()
    assert sorted(handled) == ["a", "b", "c"]


@pytest.mark.parametrize("lifespan", ["direct", "composed"])
async def test_mounted_over_httpx_asgi_transport(lifespan: str) -> None:
    """FastAPI(lifespan=app.lifespan) (or composed with the user's own) starts surge;
    the mounted ingress serves its routes; leaving the lifespan stops surge."""
    api, app, handled = make(lifespan)
    async with api.router.lifespan_context(api):
        assert app.state == "running"
        if lifespan == "composed":
            assert api.state.opened == ["db"]
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await exercise(client, app, handled)
    assert state(app) == "stopped"
    if lifespan == "composed":
        assert api.state.opened == []


async def test_mounted_over_a_real_uvicorn_socket() -> None:
    """Under uvicorn on a real socket, the host's lifespan runs surge and a stop drains it."""
    api, app, handled = make()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    config = uvicorn.Config(api, lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    # The socket listens already: requests wait in its backlog until uvicorn
    # has run the lifespan and accepts.
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await exercise(client, app, handled)
            assert app.state == "running"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)
        sock.close()
    assert state(app) == "stopped"
    report: Any = app.stop_report
    assert report is not None


async def test_fastapi_dependencies_do_not_reach_the_mount_but_auth_does() -> None:
    """An app-wide FastAPI dependency guards FastAPI's own routes and never runs for the
    mounted surge routes (FastAPI resolves dependencies per route, and the mount is no
    route of its); surge's auth= on the ingress does guard them, over a real socket."""
    app = surge.App("deps")
    handled: list[str] = []
    calls: list[str] = []

    @app.on(Order)
    async def take(ev: Order, ctx: surge.Context) -> None:
        handled.append(f"{ev.order_id} by {ctx.headers.get(PRINCIPAL_HEADER)}")

    app.http.post("/open", publish=Order)
    app.http.post("/guarded", publish=Order, auth=api_keys({"k-0123456789abcdef": "ops"}))

    async def require_token(request: Request) -> None:
        calls.append(request.url.path)
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            raise HTTPException(status_code=401)

    api = FastAPI(lifespan=app.lifespan, dependencies=[Depends(require_token)])

    @api.get("/mine")
    async def mine() -> dict[str, str]:
        return {"ok": "yes"}

    api.mount("/events", app.http)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, lifespan="on", log_level="warning"))
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/mine")).status_code == 401
            assert (await client.get("/mine", headers=AUTH)).status_code == 200
            order = {"order_id": "o", "amount": 1.0}
            # the dependency does not run: the mounted route is not guarded by it
            assert (await client.post("/events/open", json=order)).status_code == 202
            assert calls == ["/mine", "/mine"]
            guarded = "/events/guarded"
            assert (await client.post(guarded, json=order)).status_code == 401
            assert (await client.post(guarded, json=order, headers=AUTH)).status_code == 401
            r = await client.post(guarded, json=order, headers={"x-api-key": "k-0123456789abcdef"})
            assert r.status_code == 202
            await app.drain()
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)
        sock.close()
    assert sorted(handled) == ["o by None", "o by ops"]
