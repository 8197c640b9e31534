"""The broker SIGKILLed under load and restarted with its persistence on.

Redis with ``appendonly yes`` and ``appendfsync always`` (each write on
disk before the reply) or ``everysec`` (written to the file before the
reply, fsynced once a second); NATS with JetStream file storage; PostgreSQL
with ``fsync`` on, stopped in ``immediate`` mode (every server process ends
at once, WAL recovery at the next start); RabbitMQ's quorum queues, the
whole node SIGKILLed. A SIGKILL ends the broker process, not the machine:
what it wrote to its files is in the kernel's page cache and survives, so
on every one of them nothing acknowledged may be lost. (The window
``everysec`` leaves open, and NATS's ``sync_interval``, is a host crash or
power loss: up to a second of acknowledged writes on redis; this test does
not cut the power.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from surge.transports import open_transport

from .._servers import nats_server, postgres_server, rabbit_server, redis_server
from ._load import run_fault

pytestmark = pytest.mark.realtime


@dataclass(frozen=True)
class Persistent:
    """A broker the test started with its persistence on: its URL, the
    transport's keywords, and how to crash it and start it on its files."""

    url: str
    options: dict[str, Any]
    crash: Callable[[], None]
    start: Callable[[], None]


@contextlib.contextmanager
def persistent(kind: str, tmp_path: Path) -> Iterator[Persistent]:
    if kind == "nats-file":
        with nats_server(tmp_path) as srv:
            yield Persistent(
                f"{srv.url}?stream=faults&lease=2", {"ack_timeout": 2.0}, srv.kill, srv.start
            )
    elif kind == "postgres-fsync":
        # a cluster of its own with fsync on; stopped in 'immediate' mode:
        # every process ends at once, no checkpoint, WAL recovery at the
        # next start (what a crash leaves)
        with postgres_server(tmp_path, fsync=True) as pg:
            yield Persistent(
                f"{pg.dsn()}?lease=2&schema=faults",
                {},
                lambda: pg.stop("immediate"),
                pg.start,
            )
    elif kind == "amqp-quorum":
        # a node of its own: its quorum queues confirm a message once it is
        # in the Raft log on disk
        with rabbit_server(tmp_path) as node:
            yield Persistent(f"{node.url}?lease=2", {}, node.kill, node.start)
    else:
        fsync = kind.split("-", 1)[1]
        with redis_server(tmp_path, appendonly=True, extra=("--appendfsync", fsync)) as (
            url,
            server,
        ):
            yield Persistent(f"{url}?lease=2&reconnect_timeout=30", {}, server.kill, server.start)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "kind",
    [
        "redis-always",
        "redis-everysec",
        "nats-file",
        # a cluster or a node of their own to start: 10 and 27 s, past what
        # CI's 20 minutes have left (postgres restarts are in CI in
        # tests/test_crash_postgres.py, amqp's node kill in tests/test_amqp.py)
        pytest.param("postgres-fsync", marks=(pytest.mark.slow, pytest.mark.soak)),
        pytest.param("amqp-quorum", marks=(pytest.mark.slow, pytest.mark.soak)),
    ],
)
async def test_broker_sigkilled_under_load_and_restarted_loses_nothing_acked(
    tmp_path: Path, kind: str
) -> None:
    """400 events/s; the broker is SIGKILLed 1 s in (postgres: stopped in
    'immediate' mode) and restarted on its files 1 s later: no acknowledged
    event is lost, and publishing and handling are back within 10 s of the
    restart."""
    with persistent(kind, tmp_path) as broker:

        async def kill() -> None:
            await asyncio.to_thread(broker.crash)

        loop = asyncio.get_running_loop()
        started: list[float] = []  # how long the broker took to start again

        async def restart() -> None:
            t0 = loop.time()
            await asyncio.to_thread(broker.start)
            started.append(loop.time() - t0)

        figure = await run_fault(
            lambda: open_transport(broker.url, **broker.options),
            test=f"restart[{kind}]",
            fault=f"{'immediate stop' if kind.startswith('postgres') else 'SIGKILL'}, "
            "restart 1s later",
            start_fault=kill,
            heal=restart,
            outage=1.0,
        )
    print(f"\n{figure} (the restart took {started[0]:.2f}s)")
    assert figure.lost == 0, figure
    assert figure.acked > 0
    assert figure.recover < 10.0, figure
