"""A publish-only process (``App.start(consume=False)``) declares its
subscriptions' groups, so what it publishes before any worker ever ran is
kept and handled once workers start."""

from __future__ import annotations

from pathlib import Path

import pytest

import surge


class Ordered(surge.Event):
    __topic__ = "front.ordered"
    n: int


def _app(url: str, seen: list[int]) -> surge.App:
    app = surge.App("shop", transport=url)

    @app.on(Ordered)
    async def fulfil(ev: Ordered) -> None:
        seen.append(ev.n)

    return app


async def test_sqlite_events_published_before_any_worker_are_handled(tmp_path: Path) -> None:
    """Published by a front started with consume=False, before any worker
    ran: each is handled exactly once when the worker starts."""
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    front_seen: list[int] = []
    front = _app(url, front_seen)
    await front.start(consume=False)
    for n in range(20):
        await front.publish(Ordered(n=n))
    with pytest.raises(surge.ConfigurationError, match="consume=False"):
        await front.drain()
    await front.stop()
    assert front_seen == []  # the front handled nothing
    seen: list[int] = []
    async with _app(url, seen) as worker:
        await worker.drain()
    assert sorted(seen) == list(range(20))
