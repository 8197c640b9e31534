"""Trigger state survives a restart on a durable transport."""

from __future__ import annotations

from pathlib import Path

import pytest

import surge
from surge import VirtualClock

NEW_YEAR = 1_767_225_600.0  # VirtualClock's default start: 2026-01-01T00:00Z


async def _run(url: str, clock: VirtualClock, seconds: float, fired: list[float]) -> None:
    app = surge.App("w", clock=clock, transport=url)

    @app.every(seconds=10, name="ten", misfire="catch_up")
    async def ten(t: surge.Tick) -> None:
        fired.append(t.scheduled - NEW_YEAR)

    async with app:
        await clock.sleep(seconds)


async def test_catch_up_state_survives_a_new_transport_on_the_same_file(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A new process (new transport object, same file) catches up from the last
    slot the previous one fired, so the state lived in the file."""
    url = f"sqlite:///{tmp_path / 'triggers.db'}"
    fired: list[float] = []
    await _run(url, clock, 25, fired)
    assert fired == [10, 20]
    await clock.sleep(60)  # nobody runs from t=25 to t=85
    await _run(url, clock, 20, fired)
    assert fired == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


async def test_state_round_trips_through_sqlite(tmp_path: Path) -> None:
    """load_state returns what save_state wrote, across transport objects."""
    from surge.transports import open_transport

    url = f"sqlite:///{tmp_path / 's.db'}"
    t1 = open_transport(url)
    await t1.start()
    assert await t1.load_state("k") is None  # type: ignore[attr-defined]
    await t1.save_state("k", b"one")  # type: ignore[attr-defined]
    await t1.save_state("k", b"two")  # type: ignore[attr-defined]
    await t1.close()
    t2 = open_transport(url)
    await t2.start()
    assert await t2.load_state("k") == b"two"  # type: ignore[attr-defined]
    await t2.close()


@pytest.mark.realtime
async def test_state_round_trips_through_nats(tmp_path: Path) -> None:
    """NATS keeps trigger state in a JetStream key-value bucket, across transports."""
    from surge.transports.nats import NatsTransport

    from ._servers import nats_server

    with nats_server(tmp_path) as srv:
        t1 = NatsTransport(srv.url)
        await t1.start()
        assert await t1.load_state("trigger:w.ten") is None
        await t1.save_state("trigger:w.ten", b"1767225700.0")
        await t1.close()
        t2 = NatsTransport(srv.url)
        await t2.start()
        assert await t2.load_state("trigger:w.ten") == b"1767225700.0"
        await t2.close()


@pytest.mark.realtime
async def test_state_round_trips_through_redis(tmp_path: Path) -> None:
    """Redis keeps trigger state under the transport's prefix, across transports."""
    from surge.transports.redis import RedisTransport

    from ._servers import redis_server

    with redis_server(tmp_path) as (url, _server):
        t1 = RedisTransport(url)
        await t1.start()
        assert await t1.load_state("trigger:w.ten") is None
        await t1.save_state("trigger:w.ten", b"1767225700.0")
        await t1.close()
        t2 = RedisTransport(url)
        await t2.start()
        assert await t2.load_state("trigger:w.ten") == b"1767225700.0"
        await t2.close()
