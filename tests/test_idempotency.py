"""Idempotency-Key at the HTTP ingress, over a real socket: a retried POST
makes one handled event and gets the same answer, on memory and on durable
transports shared by two ingresses (as two worker processes would be)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

import surge
from surge.http import Server, api_keys
from surge.http._idempotency import Answers
from surge.tools import fetch

from ._servers import shared_redis_url

pytestmark = pytest.mark.realtime


class Order(surge.Event):
    order_id: str
    amount: float


class Quote(surge.Event):
    order_id: str
    total: float


class Handled:
    """Handled (order id, event id) pairs, and a wake-up per event."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.more = asyncio.Event()

    def add(self, order_id: str, event_id: str) -> None:
        self.items.append((order_id, event_id))
        self.more.set()

    async def wait_for(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len(self.items) < n:
                self.more.clear()
                await self.more.wait()


def make_app(transport: str, handled: Handled) -> surge.App:
    app = surge.App("idem", transport=transport)

    @app.on(Order)
    async def take(event: Order, ctx: surge.Context) -> Quote:
        handled.add(event.order_id, ctx.id)
        return Quote(order_id=event.order_id, total=event.amount * 2)

    app.http.post("/orders", publish=Order)
    app.http.post("/quotes", publish=Order, reply=Quote, timeout=5)
    return app


@asynccontextmanager
async def ingresses(transport: str, n: int) -> AsyncIterator[tuple[list[str], Handled]]:
    """``n`` apps on one transport URL, each serving its ingress on a port of
    its own: the URLs, and what their handlers handled (drained at the end,
    so a late copy would show)."""
    handled = Handled()
    async with AsyncExitStack() as stack:
        urls, apps = [], []
        for _ in range(n):
            app = make_app(transport, handled)
            await stack.enter_async_context(app)
            server = await stack.enter_async_context(Server(app, port=0))
            urls.append(server.url)
            apps.append(app)
        yield urls, handled
        for app in apps:
            await app.drain()


async def post(url: str, key: str | None, order_id: str = "o-1") -> tuple[int, object]:
    headers = {} if key is None else {"Idempotency-Key": key}
    r = await fetch(url, "POST", json={"order_id": order_id, "amount": 2.5}, headers=headers)
    return r.status, r.json()


async def test_a_retried_post_makes_one_event_with_one_answer() -> None:
    """On memory: the same key answers the same id and is handled once; a new
    key, or none, makes a new event."""
    async with ingresses("memory://", 1) as ([url], handled):
        first = await post(url + "/orders", "k-1")
        again = await post(url + "/orders", "k-1")
        quoted = await post(url + "/orders", '"k-1"')  # the IETF draft's quoted form
        other = await post(url + "/orders", "k-2")
        plain = [await post(url + "/orders", None) for _ in range(2)]
        await handled.wait_for(4)
    assert len(handled.items) == 4
    assert first == again == quoted
    assert first[0] == 202
    assert other[0] == 202
    assert other != first
    assert plain[0] != plain[1]
    ids = [event_id for _, event_id in handled.items]
    assert sorted(ids) == sorted(
        {first[1]["id"], other[1]["id"], plain[0][1]["id"], plain[1][1]["id"]}  # type: ignore[index]
    )


@pytest.mark.parametrize("durable", ["sqlite", "redis"])
async def test_a_retry_to_another_worker_is_dropped(durable: str, tmp_path: Path) -> None:
    """On a durable transport two ingresses share the dedup: a retry sent to
    the other one publishes nothing new, and its answer names the same id."""
    url = f"sqlite:///{tmp_path}/events.db" if durable == "sqlite" else shared_redis_url()
    async with ingresses(url, 2) as ([a, b], handled):
        first = await post(a + "/orders", "retry-me")
        again = await post(b + "/orders", "retry-me")
        fresh = await post(b + "/orders", "next", order_id="o-2")
        await handled.wait_for(2)
    assert first == again
    assert fresh[0] == 202
    assert fresh != first
    orders = sorted(order_id for order_id, _ in handled.items)
    assert orders == ["o-1", "o-2"], handled.items


async def test_a_retried_request_gets_the_same_reply_and_runs_once() -> None:
    """A reply route retried with one key, at once and later, answers the same
    reply each time while its handler ran once."""
    async with ingresses("memory://", 1) as ([url], handled):
        together = await asyncio.gather(*(post(url + "/quotes", "q-1") for _ in range(3)))
        later = await post(url + "/quotes", "q-1")
        other = await post(url + "/quotes", "q-2")
    assert together == [(200, {"order_id": "o-1", "total": 5.0})] * 3
    assert later == together[0]
    assert other[0] == 200
    assert len(handled.items) == 2


async def test_keys_are_scoped_by_caller_and_checked() -> None:
    """Two callers using one key make two events; a key that is empty, too
    long or not printable ASCII is a 400 naming the header."""
    handled = Handled()
    app = make_app("memory://", handled)
    app.http.set_auth(api_keys({"a" * 16: "alice", "b" * 16: "bob"}))
    async with app, Server(app, port=0) as server:
        answers = [
            await fetch(
                server.url + "/orders",
                "POST",
                json={"order_id": "o", "amount": 1},
                headers={"x-api-key": who * 16, "idempotency-key": "shared"},
            )
            for who in ("a", "b", "a")
        ]
        bad = [
            await fetch(
                server.url + "/orders",
                "POST",
                json={"order_id": "o", "amount": 1},
                headers={"x-api-key": "a" * 16, "idempotency-key": key},
            )
            for key in ('""', "k" * 256, "caf\u00e9")
        ]
        await handled.wait_for(2)
        await app.drain()
    ids = [r.json()["id"] for r in answers]
    assert ids[0] == ids[2] != ids[1]
    assert len(handled.items) == 2
    assert [r.status for r in bad] == [400, 400, 400]
    assert all(r.json()["header"] == "Idempotency-Key" for r in bad)


async def test_publish_takes_only_event_ids() -> None:
    """publish(id=...) wants 32 lowercase hex digits, and keeps them."""
    app = surge.App("ids")
    async with app:
        with pytest.raises(ValueError, match="32 lowercase hex"):
            await app.publish(Order(order_id="x", amount=1), id="order-1")
        given = surge.id_for("order-1")
        assert await app.publish(Order(order_id="x", amount=1), id=given) == given
        assert surge.is_derived(given)
        assert surge.id_for("order-1") == given != surge.id_for("order-2")


def test_answers_expire_and_stay_bounded() -> None:
    """Kept answers go after their time to live, and the oldest go past the size."""
    now = [0.0]
    answers = Answers(lambda: now[0], ttl=10, size=2)
    answers.put("a", b"1")
    now[0] = 5
    answers.put("b", b"2")
    assert answers.get("a") == b"1"
    now[0] = 11
    assert answers.get("a") is None
    assert answers.get("b") == b"2"
    answers.put("c", b"3")
    answers.put("d", b"4")
    assert len(answers) == 2
    assert answers.get("b") is None
    assert (answers.get("c"), answers.get("d")) == (b"3", b"4")
