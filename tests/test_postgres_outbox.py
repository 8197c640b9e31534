"""The transactional outbox on ``postgresql://``: ``app.publish(event,
connection=conn)`` writes through the caller's connection, inside its
transaction, so the event exists exactly when the business write does.

Run as ``python -m tests.test_postgres_outbox URL DSN N``, this module is a
publishing process that commits ``N`` outbox transactions (and rolls back
one after each) and SIGKILLs itself right after the last commit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

import surge

from ._servers import PostgresServer, drop_postgres_schema, shared_postgres, shared_postgres_url

pytestmark = pytest.mark.realtime

ROOT = Path(__file__).resolve().parent.parent


class Order(surge.Event):
    __topic__ = "outbox.order"
    n: int


@pytest.fixture
def pg() -> PostgresServer:
    return shared_postgres()


@pytest.fixture
def url(pg: PostgresServer) -> Iterator[str]:
    u = shared_postgres_url()
    yield u
    drop_postgres_schema(u)


def _schema(url: str) -> str:
    return url.rsplit("schema=", 1)[1]


def _app(url: str, seen: list[int]) -> surge.App:
    app = surge.App("outbox", transport=url)

    @app.on(Order)
    async def handle(ev: Order) -> None:
        seen.append(ev.n)

    return app


async def test_committed_half_is_delivered_rolled_back_half_never(
    pg: PostgresServer, url: str
) -> None:
    """1,000 transactions, each a business row and its event, every other
    one rolled back: exactly the committed events are delivered, once."""
    schema = _schema(url)
    seen: list[int] = []
    app = _app(url, seen)
    async with app:
        conn = await asyncpg.connect(pg.dsn())
        try:
            await conn.execute(f"CREATE TABLE {schema}.orders (n int PRIMARY KEY)")
            for i in range(1000):
                tx = conn.transaction()
                await tx.start()
                await conn.execute(f"INSERT INTO {schema}.orders VALUES ($1)", i)
                await app.publish(Order(n=i), connection=conn)
                if i % 2:
                    await tx.rollback()
                else:
                    await tx.commit()
            rows = sorted(r[0] for r in await conn.fetch(f"SELECT n FROM {schema}.orders"))
        finally:
            await conn.close()
        await app.drain()
    assert rows == list(range(0, 1000, 2))
    assert sorted(seen) == rows


async def test_psycopg_connections_work_too(pg: PostgresServer, url: str) -> None:
    """A psycopg AsyncConnection is accepted: committed delivered, rolled back not."""
    seen: list[int] = []
    app = _app(url, seen)
    async with app:
        async with await psycopg.AsyncConnection.connect(pg.dsn()) as conn:
            for i in range(20):
                async with conn.transaction(force_rollback=bool(i % 2)):
                    await app.publish(Order(n=i), connection=conn, key=f"k{i % 3}")
        await app.drain()
    assert sorted(seen) == list(range(0, 20, 2))


async def test_an_uncommitted_event_is_not_delivered_yet(pg: PostgresServer, url: str) -> None:
    """Until its transaction commits, nobody sees the event; at the commit,
    the NOTIFY wakes the consumer."""
    seen: list[int] = []
    got = asyncio.Event()
    app = surge.App("outbox", transport=url + "&poll=3600")

    @app.on(Order)
    async def handle(ev: Order) -> None:
        seen.append(ev.n)
        got.set()

    async with app:
        conn = await asyncpg.connect(pg.dsn())
        try:
            tx = conn.transaction()
            await tx.start()
            await app.publish(Order(n=7), connection=conn)
            done, _ = await asyncio.wait([asyncio.ensure_future(got.wait())], timeout=0.5)
            assert not done
            assert seen == []
            await tx.commit()
            async with asyncio.timeout(10):
                await got.wait()
        finally:
            await conn.close()
    assert seen == [7]


async def test_a_connection_to_another_database_is_refused(pg: PostgresServer, url: str) -> None:
    """A connection that does not reach the transport's schema: ConfigurationError."""
    other = pg.new_database()
    try:
        app = _app(url, [])
        async with app:
            conn = await asyncpg.connect(pg.dsn(other))
            try:
                with pytest.raises(surge.ConfigurationError, match="does not reach"):
                    await app.publish(Order(n=1), connection=conn)
                with pytest.raises(surge.ConfigurationError, match="asyncpg Connection"):
                    await app.publish(Order(n=1), connection=object())
            finally:
                await conn.close()
    finally:
        pg.drop_database(other)


async def test_a_transport_without_an_outbox_refuses_connection() -> None:
    """publish(connection=) on memory:// raises ConfigurationError, publishes nothing."""
    app = surge.App("outbox")
    seen: list[Order] = []
    app.on(Order)(seen.append)
    async with app:
        with pytest.raises(surge.ConfigurationError, match="transactional outbox"):
            await app.publish(Order(n=1), connection=object())
        await app.drain()
    assert seen == []


@pytest.mark.timeout(120)
async def test_a_publisher_killed_right_after_commit_loses_nothing(
    pg: PostgresServer, url: str
) -> None:
    """The publishing process SIGKILLs itself right after its last commit:
    every committed event is delivered, no rolled-back one."""
    n = 50
    seen: list[int] = []
    app = _app(url, seen)
    async with app:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.test_postgres_outbox",
            url,
            pg.dsn(),
            str(n),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        await app.drain()
    assert sorted(seen) == [2 * i for i in range(n)]


async def _publish_then_die(url: str, dsn: str, n: int) -> None:
    app = surge.App("outbox-publisher", transport=url)  # publishes only
    async with app:
        conn = await asyncpg.connect(dsn)
        for i in range(n):
            tx = conn.transaction()
            await tx.start()
            await app.publish(Order(n=2 * i + 1), connection=conn)
            await tx.rollback()
            async with conn.transaction():
                await app.publish(Order(n=2 * i), connection=conn)
        # right after the last commit: nothing else runs in this process
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(_publish_then_die(sys.argv[1], sys.argv[2], int(sys.argv[3])))
