"""Publishes that no declared group receives: counted, warned once per
topic, and refused with ``Unroutable`` when mandatory; on a durable
transport "declared" counts the groups of every process sharing the store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

import surge
from surge.observe import mount
from surge.transports import MemoryTransport

from ._servers import shared_nats_url, shared_redis_url
from .test_metrics import asgi_get, metric


class Ordered(surge.Event):
    __topic__ = "shop.ordered"
    n: int


class Shipped(surge.Event):
    __topic__ = "shop.shipped"
    n: int


class Nobody(surge.Event):
    __topic__ = "shop.nobody"
    n: int


class Elsewhere(surge.Event):
    __topic__ = "other.topic"
    n: int


def _shop(transport: str, seen: list[int], **options: object) -> surge.App:
    app = surge.App("shop", transport=transport, **options)  # type: ignore[arg-type]

    @app.on("shop.*")
    async def audit(ev: surge.Event) -> None:
        seen.append(getattr(ev, "n", -1))

    return app


async def test_unroutable_publish_is_counted_warned_once_and_refused_when_mandatory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unsubscribed topic is counted per publish and warned once; with
    mandatory=True it raises Unroutable (typed, with the topic) and nothing
    is published; a subscribed topic publishes either way."""
    seen: list[int] = []
    app = surge.App("shop")

    @app.on(Ordered)
    async def take(ev: Ordered) -> None:
        seen.append(ev.n)

    async with app:
        with caplog.at_level(logging.WARNING, logger="surge"):
            await app.publish(Nobody(n=1))
            await app.publish(Nobody(n=2))
            app.publish_nowait(Nobody(n=3))
            await app.publish(Ordered(n=1), mandatory=True)
            with pytest.raises(surge.Unroutable, match=r"shop\.nobody") as raised:
                await app.publish(Nobody(n=4), mandatory=True)
            assert raised.value.topic == "shop.nobody"
            assert isinstance(raised.value, LookupError)
            await app.drain()
        assert app.statistics().unroutable == {"shop.nobody": 3}
    warnings = [r for r in caplog.records if "shop.nobody" in r.getMessage()]
    assert len(warnings) == 1
    assert seen == [1]


class _CountingLookups(MemoryTransport):
    """memory://, counting the route lookups it answers, each taking a turn of the
    loop as a broker's round trip would."""

    lookups = 0

    async def groups_for(self, topic: str) -> list[str]:
        self.lookups += 1
        await asyncio.sleep(0)
        return await super().groups_for(topic)


async def test_a_burst_before_the_loop_runs_looks_each_topic_up_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A topic the app subscribes to is known routed from the start (no lookup); a
    burst of unroutable publishes made before the loop runs is looked up once
    per topic and counted in full."""
    transport = _CountingLookups()
    app = surge.App("shop", transport=transport)
    seen: list[int] = []

    @app.on(Ordered)
    async def take(ev: Ordered) -> None:
        seen.append(ev.n)

    async with app:
        with caplog.at_level(logging.CRITICAL, logger="surge"):
            for i in range(100):
                await app.publish(Ordered(n=i))
                await app.publish(Nobody(n=i))
                app.publish_nowait(Nobody(n=i))
            await app.drain()
        assert app.statistics().unroutable == {"shop.nobody": 200}
    assert seen == list(range(100))
    assert transport.lookups == 1


async def test_app_wide_mandatory_fails_the_handler_whose_output_nobody_receives() -> None:
    """App(mandatory=True): a handler returning an event of a topic no group
    receives fails its attempt with Unroutable, so the source event is
    dead-lettered rather than its output dropped."""
    app = surge.App("shop", mandatory=True, retry=surge.Retry(attempts=1))

    @app.on(Ordered)
    async def ship(ev: Ordered) -> Nobody:
        return Nobody(n=ev.n)

    async with app:
        with pytest.raises(surge.Unroutable):
            await app.publish(Nobody(n=0))
        await app.publish(Ordered(n=7))
        await app.drain()
        [dead] = await app.dead_letters()
    assert dead.error_type.endswith("Unroutable")
    assert "shop.nobody" in dead.error


async def test_unroutable_is_exported_as_a_metric() -> None:
    """surge_unroutable_total{app, topic} counts them on /metrics."""
    app = surge.App("shop")
    mount(app.http)
    async with app:
        await app.publish(Nobody(n=1))
        await app.publish(Nobody(n=2))
    # counted in the background; the stop waits for the lookups
    status, body = await asgi_get(app, "/metrics")
    assert status == 200
    assert metric(body.decode(), "surge_unroutable_total", app="shop", topic="shop.nobody") == 2


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shop.db'}"


URLS: dict[str, Callable[[Path], str]] = {
    "sqlite": _sqlite,
    "redis": lambda _: shared_redis_url(),
    "nats": lambda _: shared_nats_url(),
}


@pytest.mark.realtime
@pytest.mark.parametrize("kind", sorted(URLS))
async def test_groups_of_other_processes_count_as_receivers(kind: str, tmp_path: Path) -> None:
    """A publisher with no subscriptions of its own: a mandatory publish to
    a topic that a worker's group (declared, no worker running) receives
    succeeds and is kept; one to a topic no group receives raises; a group
    declared after a refusal is seen at the next publish."""
    url = URLS[kind](tmp_path)
    publisher = surge.App("front", transport=url)
    async with publisher:
        with pytest.raises(surge.Unroutable):
            await publisher.publish(Ordered(n=0), mandatory=True)
        seen: list[int] = []
        declarer = _shop(url, seen)  # a deploy step declaring "shop.*"
        await declarer.start(consume=False)
        await declarer.stop()
        await publisher.publish(Ordered(n=1), mandatory=True)
        await publisher.publish(Shipped(n=2), mandatory=True)
        await publisher.publish(Elsewhere(n=3))  # nobody receives it: counted
    assert publisher.statistics().unroutable == {"other.topic": 1}
    async with _shop(url, seen) as worker:
        await worker.drain()
    assert sorted(seen) == [1, 2]


async def test_a_reply_that_only_its_requester_receives_is_not_unroutable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler answering a request with an event no group receives: the
    requester gets it, and it is neither counted nor warned as dropped, nor
    refused under mandatory=True (http_bench's reply route warned that its
    replies were dropped while every request got its answer). Its output of
    another topic nobody receives still is."""
    for mandatory in (False, True):
        caplog.clear()
        app = surge.App("shop", mandatory=mandatory, retry=surge.Retry(attempts=1))

        @app.on(Ordered)
        async def ship(ev: Ordered) -> Shipped:
            return Shipped(n=ev.n)

        async with app:
            with caplog.at_level(logging.WARNING, logger="surge"):
                reply = await app.request(Ordered(n=5), expect=Shipped, timeout=5)
                await app.drain()
            assert reply == Shipped(n=5)
            assert app.statistics().unroutable == {}
            assert await app.dead_letters() == []
        assert not [r for r in caplog.records if "shop.shipped" in r.getMessage()]
        if not mandatory:
            # the same output without a request waiting for it is dropped
            async with app:
                with caplog.at_level(logging.WARNING, logger="surge"):
                    await app.publish(Ordered(n=6))
                    await app.drain()
            assert app.statistics().unroutable == {"shop.shipped": 1}
