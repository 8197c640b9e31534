"""The outbox relay (``surge relay``): events written inside PostgreSQL
transactions reach a Redis or NATS bus when, and only when, their
transaction commits; a key's events in commit order."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import asyncpg
import pytest

import surge
from surge._event import Envelope
from surge.transports.memory import MemoryTransport
from surge.transports.postgres import Relay

from ._servers import (
    PostgresServer,
    drop_postgres_schema,
    shared_nats_url,
    shared_postgres,
    shared_postgres_url,
    shared_redis_url,
)

pytestmark = pytest.mark.realtime

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"redis": shared_redis_url, "nats": shared_nats_url}


class Order(surge.Event):
    __topic__ = "relay.order"
    n: int


@pytest.fixture
def pg() -> PostgresServer:
    return shared_postgres()


@pytest.fixture
def url(pg: PostgresServer) -> Iterator[str]:
    u = shared_postgres_url()
    yield u
    drop_postgres_schema(u)


def _consumer(
    target: str, seen: list[tuple[str, int]], want: int
) -> tuple[surge.App, asyncio.Event]:
    """An app on the bus that records (key, n) and says when it saw ``want``."""
    app = surge.App("shop", transport=target)
    enough = asyncio.Event()

    @app.on(Order)
    async def handle(ev: Order, ctx: surge.Context) -> None:
        seen.append((ctx.key or "", ev.n))
        if len(seen) >= want:
            enough.set()

    return app, enough


async def _write(outbox: surge.App, dsn: str, n: int) -> list[int]:
    """``n`` transactions, each publishing Order(i) keyed k0..k2; every odd
    one rolled back. The numbers committed."""
    conn = await asyncpg.connect(dsn)
    try:
        for i in range(n):
            tx = conn.transaction()
            await tx.start()
            await outbox.publish(Order(n=i), key=f"k{i % 3}", connection=conn)
            if i % 2:
                await tx.rollback()
            else:
                await tx.commit()
    finally:
        await conn.close()
    return list(range(0, n, 2))


def _in_key_order(seen: list[tuple[str, int]]) -> bool:
    last: dict[str, int] = {}
    for key, n in seen:
        if last.get(key, -1) >= n:
            return False
        last[key] = n
    return True


@pytest.mark.parametrize("bus", sorted(TARGETS))
async def test_committed_events_reach_the_bus_rolled_back_never(
    bus: str, pg: PostgresServer, url: str
) -> None:
    """60 outbox transactions, every other rolled back: the bus's worker
    gets exactly the committed events, once each, a key's in commit order."""
    target = TARGETS[bus]()
    seen: list[tuple[str, int]] = []
    consumer, enough = _consumer(target, seen, 30)
    outbox = surge.App("shop-outbox", transport=url)  # publishes only
    async with Relay(url, target) as relay, consumer, outbox:
        running = asyncio.create_task(relay.run())
        committed = await _write(outbox, pg.dsn(), 60)
        async with asyncio.timeout(30):
            await enough.wait()
            await relay.source.wait_idle()  # nothing left in the outbox
            await consumer.drain()
        relay.stop()
        await running
    assert sorted(n for _, n in seen) == committed
    assert _in_key_order(seen)
    assert relay.relayed == 30


class _Refusing(MemoryTransport):
    """A bus that refuses for good any batch holding an event keyed "big"."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[Envelope] = []

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if any(e.key == "big" for e in envelopes):
            raise surge.MessageTooLarge("too large for this bus")
        self.taken.extend(envelopes)


async def test_an_event_the_bus_refuses_for_good_is_dead_lettered(
    pg: PostgresServer, url: str
) -> None:
    """The others pass; the refused one waits in the relay group's dead letters."""
    bus = _Refusing()
    outbox = surge.App("shop-outbox", transport=url)
    async with Relay(url, bus) as relay, outbox:
        running = asyncio.create_task(relay.run())
        conn = await asyncpg.connect(pg.dsn())
        try:
            async with conn.transaction():
                for i in range(5):
                    await outbox.publish(Order(n=i), key="big" if i == 3 else None, connection=conn)
        finally:
            await conn.close()
        async with asyncio.timeout(30):
            await relay.source.wait_idle()
        relay.stop()
        await running
        letters = await relay.source.dead_letters(relay.group)
    assert sorted(e.key or "" for e in bus.taken) == [""] * 4
    assert [(d.key, d.error_type) for d in letters] == [("big", "MessageTooLarge")]
    assert (relay.relayed, relay.dead) == (4, 1)


async def test_surge_relay_command_keeps_what_was_written_before_it_ran(
    pg: PostgresServer, url: str
) -> None:
    """``surge relay --declare-only`` declares the group; what is committed
    while no relay runs is kept, and ``surge relay`` relays it, then exits
    0 on SIGTERM saying how many it relayed."""
    target = shared_redis_url()
    declare = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "surge", "relay", url, target, "--declare-only",
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(declare.communicate(), 60)
    assert declare.returncode == 0, err.decode()
    assert out.decode().strip() == "surge.relay: >"
    outbox = surge.App("shop-outbox", transport=url)
    async with outbox:
        committed = await _write(outbox, pg.dsn(), 10)
    seen: list[tuple[str, int]] = []
    consumer, enough = _consumer(target, seen, len(committed))
    async with consumer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "surge", "relay", url, target,
            cwd=ROOT, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(30):
                await enough.wait()
                proc.terminate()
                rest = await proc.stderr.read()
                assert await proc.wait() == 0, rest.decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert sorted(n for _, n in seen) == committed
    assert b"relayed 5 events" in rest
