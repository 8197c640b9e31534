"""The PostgreSQL transport against a real server: the session's cluster
(tests/_servers.py: initdb + pg_ctl on a free port), a fresh schema per
test, dropped after. The conformance suite runs on it too
(tests/conformance); the crash tests are in tests/test_crash_postgres.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import surge
from surge._clock import Clock, RealClock
from surge.transports import open_transport
from surge.transports.postgres import PostgresTransport
from surge.transports.postgres._db import Database

from ._servers import PostgresServer, drop_postgres_schema, shared_postgres, shared_postgres_url
from .conformance._helpers import Reader, env, number

pytestmark = pytest.mark.realtime


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


def _tables(pg: PostgresServer, schema: str) -> list[str]:
    out = pg.psql(
        f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{schema}' "
        "ORDER BY 1"
    )
    return out.split() if out else []


def test_both_schemes_open_the_transport() -> None:
    """postgresql:// and postgres:// open PostgresTransport, options from the query."""
    for scheme in ("postgresql", "postgres"):
        t = open_transport(f"{scheme}://u@127.0.0.1:1/db?schema=shop&lease=5&sslmode=disable")
        assert isinstance(t, PostgresTransport)
        assert (t.schema.name, t.lease, t.heartbeat) == ("shop", 5.0, 5.0 / 3)
        assert "sslmode=disable" in t.options.dsn
        assert "schema" not in t.options.dsn


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://u@127.0.0.1:5432", "names no database"),
        ("postgresql://u@127.0.0.1:5432/", "names no database"),
        ("postgresql://u@h/db?schema=Bad-Name", "lowercase name"),
        ("postgresql://u@h/db?lease=soon", "not a number"),
        ("postgresql://u@h/db?lease=1&heartbeat=2", "shorter than lease"),
    ],
)
def test_bad_urls_are_refused(url: str, problem: str) -> None:
    """A URL without a database or with bad options raises ConfigurationError."""
    with pytest.raises(surge.ConfigurationError, match=problem):
        open_transport(url)


async def test_unknown_option_is_refused() -> None:
    """A keyword option the transport does not know raises ConfigurationError."""
    with pytest.raises(surge.ConfigurationError, match="unknown postgres options"):
        PostgresTransport("postgresql://u@h/db", leese=3)


async def test_a_missing_database_is_named(pg: PostgresServer) -> None:
    """A database that does not exist: ConfigurationError naming the fix."""
    t = PostgresTransport(pg.dsn(f"nope{uuid.uuid4().hex[:8]}"))
    with pytest.raises(surge.ConfigurationError, match="create the database"):
        await t.start()
    await t.close()


async def test_an_unreachable_server_is_a_transport_error() -> None:
    """Nobody listening: TransportError (a ConnectionError), not the driver's."""
    from ._servers import free_port

    t = PostgresTransport(f"postgresql://u@127.0.0.1:{free_port()}/db")
    with pytest.raises(surge.TransportError):
        await t.start()
    await t.close()


async def test_a_backend_terminated_while_starting_is_tried_again(url: str) -> None:
    """The server answered, then the start's connection was terminated (a
    pg_terminate_backend, a restart): the start tries again, as a statement
    would, rather than fail (it failed CI's terminate-backend test when the
    first termination landed in its producer's start)."""
    t = PostgresTransport(url)
    prepare = t.schema.prepare
    calls = 0

    async def first_terminated(conn: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return await prepare(conn)

    t.schema.prepare = first_terminated  # type: ignore[method-assign]
    try:
        await t.start()
        assert calls == 2
        await t.publish([env(1)])
    finally:
        await t.close()


async def test_a_role_without_create_rights_is_told_what_to_grant(pg: PostgresServer) -> None:
    """A role that may not create the schema: ConfigurationError naming the
    GRANT, and nothing half-created."""
    role = f"r{uuid.uuid4().hex[:8]}"
    schema = f"s{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE ROLE {role} LOGIN")
    try:
        t = PostgresTransport(f"postgresql://{role}@127.0.0.1:{pg.port}/postgres?schema={schema}")
        with pytest.raises(surge.ConfigurationError, match="GRANT CREATE ON DATABASE") as info:
            await t.start()
        await t.close()
        assert role in str(info.value)
        assert pg.psql(f"SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'") == "0"
        # A schema made for it, without CREATE on it: the same, nothing made there.
        pg.psql(f"CREATE SCHEMA {schema}; GRANT USAGE ON SCHEMA {schema} TO {role}")
        t = PostgresTransport(f"postgresql://{role}@127.0.0.1:{pg.port}/postgres?schema={schema}")
        with pytest.raises(surge.ConfigurationError, match="CREATE ON SCHEMA"):
            await t.start()
        await t.close()
        assert _tables(pg, schema) == []
    finally:
        pg.psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE; DROP ROLE {role}")


async def test_another_applications_schema_is_refused(pg: PostgresServer, url: str) -> None:
    """A schema holding tables that are not surge's: ConfigurationError, untouched."""
    schema = _schema(url)
    pg.psql(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.orders (id int)")
    t = PostgresTransport(url)
    with pytest.raises(surge.ConfigurationError, match=r"not surge's.*orders"):
        await t.start()
    await t.close()
    assert _tables(pg, schema) == ["orders"]


async def test_an_empty_schema_made_by_someone_else_is_used(pg: PostgresServer, url: str) -> None:
    """An existing empty schema (made by a DBA) gets surge's tables."""
    pg.psql(f"CREATE SCHEMA {_schema(url)}")
    t = PostgresTransport(url)
    await t.start()
    await t.close()
    assert "deliveries" in _tables(pg, _schema(url))


async def test_a_newer_schema_version_is_refused(pg: PostgresServer, url: str) -> None:
    """A schema written by a newer surge: ConfigurationError saying to upgrade."""
    t = PostgresTransport(url)
    await t.start()
    await t.close()
    pg.psql(f"UPDATE {_schema(url)}.meta SET value = '99' WHERE key = 'version'")
    t = PostgresTransport(url)
    with pytest.raises(surge.ConfigurationError, match=r"version 99.*upgrade surge"):
        await t.start()
    await t.close()


async def test_a_version_1_schema_is_migrated(pg: PostgresServer, url: str) -> None:
    """A schema of surge's first version (no ``settled`` table) gets the
    table and version 2 at start, keeping what it held; settles count from
    then on."""
    t = PostgresTransport(url)
    await t.start()
    await t.declare("g", ["conf.item"])
    await t.publish([env(1)])
    await t.close()
    schema = _schema(url)
    pg.psql(
        f"DROP TABLE {schema}.settled; UPDATE {schema}.meta SET value = '1' WHERE key = 'version'"
    )
    t = PostgresTransport(url)
    await t.start()
    try:
        assert pg.psql(f"SELECT value FROM {schema}.meta WHERE key = 'version'") == "2"
        r = Reader(t, "g")
        (d,) = await r.take(1)
        await t.ack([d])
        assert (await t.stats("g")).settled == 1
        await r.aclose()
    finally:
        await t.close()


async def test_the_partition_count_is_kept(url: str) -> None:
    """A schema keeps its first partition count; another count is refused."""
    t = PostgresTransport(url, partitions=4)
    await t.start()
    await t.close()
    t = PostgresTransport(url, partitions=8)
    with pytest.raises(surge.ConfigurationError, match=r"4 partitions.*partitions=8"):
        await t.start()
    await t.close()


async def test_an_idle_consumer_is_woken_by_notify(url: str) -> None:
    """With polling all but off (poll=3600 s), an idle consumer gets an
    event another transport published: the NOTIFY woke it."""
    async with contextlib_started(url, poll=3600) as a, contextlib_started(url) as b:
        await a.declare("g", ["conf.item"])
        r = Reader(a, "g")
        assert await r.quiet(0.3)  # claimed nothing, now napping
        await b.publish([env(1)])
        (d,) = await r.take(1, timeout=10)
        assert number(d) == 1
        await a.ack([d])
        await r.aclose()


async def test_a_claim_cut_off_by_a_stop_is_handed_back_unseen(url: str) -> None:
    """A claim under way when its consumer is cancelled (the app stopping)
    and that completes only once close began: what it took was never seen by
    a handler, so close hands it back with its attempt not counted (CI: the
    conformance stop test saw such an event come back as attempt 2)."""
    t = PostgresTransport(url)
    await t.start()
    await t.declare("g", ["conf.item"])
    await t.publish([env(1)])
    entered, gate = asyncio.Event(), asyncio.Event()
    claim = t._queue.claim

    async def slow_claim(*args: Any) -> Any:
        entered.set()
        await gate.wait()
        return await claim(*args)

    t._queue.claim = slow_claim  # type: ignore[method-assign,assignment]
    batches = t.consume("g", prefetch=10)

    async def first_batch() -> list[surge.Delivery]:
        return await anext(batches)

    consuming = asyncio.get_running_loop().create_task(first_batch())
    await asyncio.wait_for(entered.wait(), 10)
    consuming.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consuming
    closing = asyncio.get_running_loop().create_task(t.close())
    await asyncio.sleep(0)  # close began: the transport is closed
    gate.set()
    await asyncio.wait_for(closing, 10)
    async with contextlib_started(url) as again:
        r = Reader(again, "g")
        (d,) = await r.take(1, timeout=10)
        assert (number(d), d.attempt) == (1, 1)
        await again.ack([d])
        await r.aclose()


async def test_the_listener_reconnects(pg: PostgresServer, url: str) -> None:
    """The LISTEN connection killed by pg_terminate_backend comes back, and
    the idle consumer is woken again by notifications."""
    async with contextlib_started(url, poll=3600) as a, contextlib_started(url) as b:
        await a.declare("g", ["conf.item"])
        r = Reader(a, "g")
        assert await r.quiet(0.3)
        pg.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE query LIKE 'LISTEN %surge_{_schema(url)}%'"
        )
        async with asyncio.timeout(10):
            await a.listener.wait_reconnects(1)
        assert await r.quiet(0.3)
        await b.publish([env(2)])
        (d,) = await r.take(1, timeout=10)
        assert number(d) == 2
        await a.ack([d])
        await r.aclose()


async def test_settled_events_are_compacted(pg: PostgresServer, url: str) -> None:
    """With retention=0, an event every group settled is deleted by compact;
    one still held is kept."""
    async with contextlib_started(url, retention=0, maintenance=3600) as t:
        await t.declare("g", ["conf.item"])
        await t.publish([env(1), env(2)])
        r = Reader(t, "g")
        got = await r.take(2)
        await t.ack([d for d in got if number(d) == 1])
        assert await t.compact() == 1
        left = pg.psql(f"SELECT count(*) FROM {_schema(url)}.messages")
        assert left == "1"
        await t.ack([d for d in got if number(d) == 2])
        assert await t.compact() == 1
        await r.aclose()


async def test_state_is_shared(url: str) -> None:
    """save_state in one transport is load_state in another."""
    async with contextlib_started(url) as a, contextlib_started(url) as b:
        assert await a.load_state("k") is None
        await a.save_state("k", b"one")
        await a.save_state("k", b"two")
        assert await b.load_state("k") == b"two"


async def test_reply_inboxes_go_at_close(pg: PostgresServer, url: str) -> None:
    """An ephemeral group is dropped with what it holds when its transport closes."""
    async with contextlib_started(url) as t:
        await t.declare("inbox-1", ["inbox-1"], ephemeral=True)
        await t.declare("g", ["conf.item"])
        await t.publish([env(1, topic="inbox-1")])
    names = pg.psql(f"SELECT name FROM {_schema(url)}.groups ORDER BY 1")
    assert names.split() == ["g"]
    assert pg.psql(f"SELECT count(*) FROM {_schema(url)}.deliveries") == "0"


def contextlib_started(url: str, **options: object) -> _Started:
    return _Started(PostgresTransport(url, **options))  # type: ignore[arg-type]


class _Started:
    """A started transport, closed on exit."""

    def __init__(self, t: PostgresTransport) -> None:
        self.t = t

    async def __aenter__(self) -> PostgresTransport:
        await self.t.start()
        return self.t

    async def __aexit__(self, *exc: object) -> None:
        await self.t.close()


class _SteppedClock(RealClock):
    """The real clock, its monotonic time moved on by hand."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return super().monotonic() + self.ahead


def _database(pg: PostgresServer, *, size: int, clock: Clock | None = None) -> Database:
    return Database(
        pg.dsn(), size=size, clock=clock or RealClock(), reconnect_timeout=5, label="test"
    )


async def _pid(db: Database) -> int:
    pid: int = await db.fetchval("SELECT pg_backend_pid()")
    return pid


async def test_the_pool_reuses_a_connection_unless_it_broke(pg: PostgresServer) -> None:
    """The connection released last is used next, also after the server
    refused a statement on it; one whose backend was ended is dropped and
    the next statement (tried again as every call is) gets a new one."""
    db = _database(pg, size=4)
    await db.open()
    try:
        first = await _pid(db)
        assert await _pid(db) == first
        with pytest.raises(surge.TransportError, match="division by zero"):
            await db.fetchval("SELECT 1 / 0")
        assert await _pid(db) == first
        pg.psql(f"SELECT pg_terminate_backend({first})")
        again = await db.retry(lambda: _pid(db), "test")
        assert again != first
        assert await _pid(db) == again
    finally:
        await db.close()


async def test_the_pool_holds_at_most_size_connections(pg: PostgresServer) -> None:
    """With every connection in use, a statement waits for one to be
    released and then runs on it; none beyond ``size`` is opened."""
    db = _database(pg, size=2)
    await db.open()
    gate, both = asyncio.Event(), asyncio.Event()
    pids: list[int] = []

    async def held(conn: Any) -> None:
        pids.append(await conn.fetchval("SELECT pg_backend_pid()"))
        if len(pids) == 2:
            both.set()
        await gate.wait()

    try:
        holders = [asyncio.create_task(db.call(held)) for _ in range(2)]
        await both.wait()
        third = asyncio.create_task(_pid(db))
        await asyncio.sleep(0)  # the third asks for a connection while both are held
        gate.set()
        await asyncio.gather(*holders)
        assert await third in pids
        assert len(set(pids)) == 2
    finally:
        await db.close()


async def test_the_pool_closes_connections_idle_for_a_minute(pg: PostgresServer) -> None:
    """prune() closes the connections released more than a minute ago (as
    asyncpg's pool did), not the ones released since."""
    clock = _SteppedClock()
    db = _database(pg, size=4, clock=clock)
    await db.open()
    gate = asyncio.Event()

    async def held(conn: Any) -> int:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        await gate.wait()
        return pid

    try:
        old = asyncio.gather(*(db.call(held) for _ in range(2)))
        gate.set()
        old_pids = await old
        clock.ahead = 61.0
        kept = await _pid(db)  # released now
        db.prune()
        assert kept in old_pids
        alive = pg.psql(
            "SELECT string_agg(pid::text, ',') FROM pg_stat_activity "
            f"WHERE pid IN ({old_pids[0]}, {old_pids[1]})"
        )
        assert alive == str(kept)
    finally:
        await db.close()


async def test_closing_the_pool_does_not_wait_for_a_statement_out(pg: PostgresServer) -> None:
    """close() ends a connection still in use at once (the transport closes
    its pools after its own statements ended); the statement fails."""
    db = _database(pg, size=2)
    await db.open()
    started = asyncio.Event()

    async def stuck(conn: Any) -> None:
        started.set()
        await conn.execute("SELECT pg_sleep(30)")

    out = asyncio.create_task(db.call(stuck))
    await started.wait()
    async with asyncio.timeout(2):
        await db.close()
        with pytest.raises(surge.TransportError):
            await out
