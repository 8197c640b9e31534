"""Request/reply over HTTP under concurrency: every answer is its own."""

from __future__ import annotations

import pytest

import surge
from surge.http import Server
from surge.tools import Response, run_load

pytestmark = pytest.mark.realtime


class Ping(surge.Event):
    id: int


class Pong(surge.Event):
    id: int


@pytest.mark.timeout(90)
async def test_ten_thousand_requests_at_concurrency_1000_each_get_their_own_reply() -> None:
    """10,000 request/reply calls from 1,000 connections: every response echoes its request."""
    app = surge.App("echo")

    @app.on(Ping, concurrency=1000)
    async def echo(event: Ping) -> Pong:
        return Pong(id=event.id)

    app.http.post("/echo", publish=Ping, reply=Pong, timeout=30)
    wrong: list[tuple[int, int, bytes]] = []
    matched = 0

    def check(i: int, response: Response) -> None:
        nonlocal matched
        if response.status == 200 and response.json() == {"id": i}:
            matched += 1
        else:
            wrong.append((i, response.status, response.body))

    async with app, Server(app, port=0) as server:
        report = await run_load(
            f"{server.url}/echo",
            10_000,
            1_000,
            body_factory=lambda i: b'{"id": %d}' % i,
            on_response=check,
            timeout=30,
        )
    assert report.errors == {}
    assert wrong == []
    assert matched == 10_000
    assert report.statuses == {200: 10_000}
    assert app.pending_requests == 0
