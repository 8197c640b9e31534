"""Garbage written straight into a transport's storage, by something that is
not surge: random bytes on the redis stream (and entries with foreign
fields), on a NATS subject, in an SQLite or PostgreSQL row (body, headers),
on a RabbitMQ group queue (with foreign headers).

Each is dead-lettered on its first delivery with the reason (a
``DecodeError``), and the consumer keeps going: an event published after
the garbage is handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiormq
import asyncpg
import nats
import pytest
import redis.asyncio as aredis

import surge

from .._jepsen import wait_for
from .._servers import (
    drop_postgres_schema,
    shared_amqp_url,
    shared_nats_url,
    shared_postgres_url,
    shared_redis_url,
)

pytestmark = pytest.mark.realtime

TOPIC = "faults.garbage"
GROUP = "faults-garbage.take"
GARBAGE = 5


class Good(surge.Event):
    """A well-formed event of the garbage tests."""

    __topic__ = TOPIC

    n: int


def _junk(i: int) -> bytes:
    # seeded: a failure names bytes that can be written again
    return bytes((i * 37 + k * 101) % 256 for k in range(17 + i * 13))


async def _redis_payloads(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    prefix = dict(urllib.parse.parse_qsl(parts.query))["prefix"]
    r = aredis.Redis(host=parts.hostname or "", port=parts.port or 6379)
    try:
        stream = f"{prefix}:s:{GROUP}"
        for i in range(GARBAGE):
            if i % 2:
                await r.xadd(stream, {"e": _junk(i)})
            else:  # fields surge never writes
                await r.xadd(stream, {"x": _junk(i), "a": b"not a number", "f": b"nan?"})
    finally:
        await r.aclose()


async def _nats_payloads(url: str) -> None:
    base, _, query = url.partition("?")
    stream = dict(urllib.parse.parse_qsl(query))["stream"]
    nc = await nats.connect(base)
    try:
        js = nc.jetstream()
        for i in range(GARBAGE):
            headers = {"Nats-Msg-Id": f"junk-{i}"} if i % 2 else None
            await js.publish(f"{stream}.{TOPIC}", _junk(i), headers=headers)
    finally:
        await nc.close()


def _sqlite_rows(path: Path) -> Callable[[str], Awaitable[None]]:
    async def write(_url: str) -> None:
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            gid = conn.execute("SELECT id FROM groups WHERE name = ?", (GROUP,)).fetchone()[0]
            for i in range(GARBAGE):
                seq = conn.execute(
                    "UPDATE meta SET value = value + 1 WHERE key = 'seq' RETURNING value"
                ).fetchone()[0]
                headers = _junk(i + 100) if i % 2 else None
                conn.execute(
                    "INSERT INTO messages VALUES (?, ?, ?, NULL, 0, ?, ?, NULL)",
                    (seq, f"junk-{i}", TOPIC, headers, _junk(i)),
                )
                conn.execute(
                    "INSERT INTO deliveries (grp, msg, visible_at) VALUES (?, ?, 0)", (gid, seq)
                )

    return write


async def _postgres_rows(url: str) -> None:
    base, _, query = url.partition("?")
    schema = dict(urllib.parse.parse_qsl(query))["schema"]
    conn = await asyncpg.connect(base)
    try:
        gid = await conn.fetchval(f"SELECT id FROM {schema}.groups WHERE name = $1", GROUP)
        for i in range(GARBAGE):
            headers = _junk(i + 100) if i % 2 else None
            seq = await conn.fetchval(
                f"INSERT INTO {schema}.messages (id, topic, key, time, headers, body) "
                "VALUES ($1, $2, NULL, 0, $3, $4) RETURNING seq",
                f"junk-{i}",
                TOPIC,
                headers,
                _junk(i),
            )
            await conn.execute(
                f"INSERT INTO {schema}.deliveries (grp, msg, visible_at) VALUES ($1, $2, 0)",
                gid,
                seq,
            )
        await conn.execute("SELECT pg_notify($1, $2)", f"surge_{schema}", str(gid))
    finally:
        await conn.close()


async def _amqp_messages(url: str) -> None:
    base, _, query = url.partition("?")
    prefix = dict(urllib.parse.parse_qsl(query))["prefix"]
    conn = await aiormq.connect(base)
    try:
        channel = await conn.channel()
        for i in range(GARBAGE):
            props = aiormq.spec.Basic.Properties(headers={"x-foreign": str(i)} if i % 2 else None)
            await channel.basic_publish(
                _junk(i), routing_key=f"{prefix}.g.{GROUP}", properties=props
            )
    finally:
        await conn.close()


async def _run(url: str, inject: Callable[[str], Awaitable[None]]) -> list[surge.DeadLetter]:
    app = surge.App("faults-garbage", transport=url)
    handled: list[int] = []
    after = asyncio.Event()

    @app.on(Good, name="take")
    async def take(event: Good) -> None:
        handled.append(event.n)
        if event.n == 1:
            after.set()

    async with app:
        await app.publish(Good(n=0))
        await wait_for(lambda: 0 in handled, timeout=10, what="the first event handled")
        await inject(url)
        await app.publish(Good(n=1))
        await asyncio.wait_for(after.wait(), 20)

        async def all_dead() -> bool:
            return len(await app.dead_letters()) >= GARBAGE

        await wait_for(all_dead, timeout=20, what="the garbage dead-lettered")
        dead = await app.dead_letters()
    assert handled == [0, 1]
    return dead


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["redis", "nats", "sqlite", "postgres", "amqp"])
async def test_garbage_in_storage_is_dead_lettered_on_first_delivery(
    tmp_path: Path, kind: str
) -> None:
    """Five payloads no surge wrote are dead-lettered on their first delivery
    with a DecodeError naming why, and the consumer goes on to the next event."""
    inject: Callable[[str], Awaitable[None]]
    if kind == "redis":
        url, inject = shared_redis_url(), _redis_payloads
    elif kind == "nats":
        url, inject = shared_nats_url(), _nats_payloads
    elif kind == "postgres":
        url, inject = shared_postgres_url(), _postgres_rows
    elif kind == "amqp":
        url, inject = shared_amqp_url(), _amqp_messages
    else:
        path = tmp_path / "garbage.db"
        url, inject = f"sqlite:///{path}", _sqlite_rows(path)
    try:
        dead = await _run(url, inject)
    finally:
        if kind == "postgres":
            drop_postgres_schema(url)
    print(
        f"\nFIGURE garbage[{kind}] dead-lettered={len(dead)}: {dead[0].error_type}: {dead[0].error}"
    )
    assert len(dead) == GARBAGE
    assert {d.error_type for d in dead} == {"DecodeError"}
    assert all(d.error for d in dead)
    assert {d.attempts for d in dead} == {1}
