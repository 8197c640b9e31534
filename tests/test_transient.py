"""A transport's trouble after a handler succeeded is not the handler's failure.

Publishing a handler's outputs or acknowledging its delivery may hit a
``TransportError`` (a lock held past its bound, a broker restarting): the
runner retries those in place, so the handler runs once, its ``Retry``
budget is untouched and nothing is dead-lettered (docs/guarantees.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

import surge
from surge._event import Envelope
from surge._transport import Delivery
from surge.http import Server
from surge.tools import fetch
from surge.transports.memory import MemoryTransport


class Order(surge.Event):
    n: int


class Packed(surge.Event):
    n: int


class Troubled(MemoryTransport):
    """Memory, failing the next ``publish_failures`` publishes of ``topic``
    and the next ``ack_failures`` acks of group ``t.pack`` with
    TransportError, at known times."""

    def __init__(self, clock: surge.VirtualClock, topic: str) -> None:
        super().__init__(clock=clock)
        self.topic = topic
        self.publish_failures = 0
        self.ack_failures = 0
        self.failed_at: list[float] = []
        self.acks: list[float] = []

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if self.publish_failures and any(e.topic == self.topic for e in envelopes):
            self.publish_failures -= 1
            self.failed_at.append(self.clock.time())
            raise surge.TransportError("the broker is restarting")
        await super().publish(envelopes)

    def put_one(self, envelope: Envelope) -> bool:
        # the app's fast path: declined while failing, so publish() is called
        if self.publish_failures and envelope.topic == self.topic:
            return False
        return super().put_one(envelope)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if self.ack_failures and any(d.group == "t.pack" for d in deliveries):
            self.ack_failures -= 1
            self.failed_at.append(self.clock.time())
            raise surge.TransportError("the broker is restarting")
        if any(d.group == "t.pack" for d in deliveries):
            self.acks.append(self.clock.time())
        await super().ack(deliveries)


def _shop(transport: Troubled, clock: surge.VirtualClock) -> tuple[surge.App, list[int], list[int]]:
    app = surge.App("t", clock=clock, transport=transport)
    packs: list[int] = []
    packed: list[int] = []

    @app.on(Order, retry=surge.Retry(attempts=2, backoff=0.5))
    async def pack(ev: Order) -> Packed:
        packs.append(ev.n)
        return Packed(n=ev.n)

    @app.on(Packed)
    async def ship(ev: Packed) -> None:
        packed.append(ev.n)

    return app, packs, packed


async def test_outputs_that_cannot_be_published_are_published_again_in_place(
    clock: surge.VirtualClock,
) -> None:
    """Three failed publishes of a handler's output: the handler ran once, the
    output arrives once, after waits of 50, 100 and 200 ms, no attempt counted."""
    transport = Troubled(clock, Packed.__topic__)
    app, packs, packed = _shop(transport, clock)
    async with app:
        transport.publish_failures = 3
        start = clock.time()
        await app.publish(Order(n=1))
        await app.drain()
        stats = app.statistics().subscriptions
    assert packs == [1]
    assert packed == [1]
    assert [round(t - start, 3) for t in transport.failed_at] == [0.0, 0.05, 0.15]
    pack = stats["t.pack"]
    assert (pack.succeeded, pack.failed, pack.retried, pack.dead_lettered) == (1, 0, 0, 0)
    assert await transport.dead_letters() == []


async def test_a_failed_ack_is_retried_in_place_not_redelivered(
    clock: surge.VirtualClock,
) -> None:
    """Two failed acks: the same batch is acknowledged again 50 and 150 ms
    later; the handler is not run a second time."""
    transport = Troubled(clock, Packed.__topic__)
    app, packs, packed = _shop(transport, clock)
    async with app:
        transport.ack_failures = 2
        await app.publish(Order(n=7))
        await app.drain()
        stats = app.statistics().subscriptions
    assert packs == [7]
    assert packed == [7]
    first = transport.failed_at[0]
    assert [round(t - first, 3) for t in [*transport.failed_at, transport.acks[0]]] == [
        0.0,
        0.05,
        0.15,
    ]
    assert stats["t.pack"].failed == 0


async def test_a_handlers_own_failure_still_spends_its_budget(clock: surge.VirtualClock) -> None:
    """Only the transport's trouble is exempt: a TransportError the handler
    raises itself is its failure, retried and counted by its Retry."""
    transport = MemoryTransport(clock=clock)
    app = surge.App("t", clock=clock, transport=transport)
    calls: list[int] = []

    @app.on(Order, retry=surge.Retry(attempts=2, backoff=0.5, on=(surge.TransportError,)))
    async def call_out(ev: Order, ctx: surge.Context) -> None:
        calls.append(ctx.attempt)
        raise surge.TransportError("its own client failed")

    async with app:
        await app.publish(Order(n=1))
        await app.drain()
        stats = app.statistics().subscriptions["t.call_out"]
    assert calls == [1, 2]
    assert (stats.failed, stats.retried, stats.dead_lettered) == (2, 1, 1)


@pytest.mark.parametrize("failures", [0, 1])
async def test_the_shop_order_count_is_exact(clock: surge.VirtualClock, failures: int) -> None:
    """With or without trouble, 50 orders make 50 packs and 50 shipments."""
    transport = Troubled(clock, Packed.__topic__)
    app, packs, packed = _shop(transport, clock)
    async with app:
        transport.publish_failures = failures
        transport.ack_failures = failures
        for n in range(50):
            await app.publish(Order(n=n))
        await app.drain()
    assert sorted(packs) == list(range(50))
    assert sorted(packed) == list(range(50))


@pytest.mark.realtime
async def test_the_ingress_answers_503_with_retry_after_for_transport_trouble() -> None:
    """A publish failing with TransportError is a 503 with Retry-After (never
    a 500), counted in surge_http_transport_errors; the same request then
    succeeds."""
    transport = Troubled(surge.VirtualClock(), Order.__topic__)
    app = surge.App("t", transport=transport)
    app.http.post("/orders", publish=Order)
    async with app, Server(app, port=0) as server:
        transport.publish_failures = 1
        first = await fetch(f"{server.url}/orders", "POST", json={"n": 1})
        second = await fetch(f"{server.url}/orders", "POST", json={"n": 1})
        metrics = app.http.metrics.render().decode()
    assert first.status == 503
    assert first.headers["retry-after"] == "1"
    assert "unavailable" in first.json()["error"]
    assert second.status == 202
    assert "surge_http_transport_errors_total 1.0" in metrics
    assert 'surge_http_requests_total{method="POST",route="/orders",status="503"} 1.0' in metrics
