"""The broker SIGKILLed under load and restarted with its persistence on.

Redis with ``appendonly yes`` and ``appendfsync always`` (each write on
disk before the reply) or ``everysec`` (written to the file before the
reply, fsynced once a second); NATS with JetStream file storage. A SIGKILL
ends the broker process, not the machine: what it wrote to its files is in
the kernel's page cache and survives, so on every one of them nothing
acknowledged may be lost. (The window ``everysec`` leaves open, and NATS's
``sync_interval``, is a host crash or power loss: up to a second of
acknowledged writes on redis; this test does not cut the power.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from surge.transports import open_transport

from .._servers import NatsServer, RedisServer, nats_server, redis_server
from ._load import run_fault

pytestmark = pytest.mark.realtime


@contextlib.contextmanager
def persistent(kind: str, tmp_path: Path) -> Iterator[tuple[str, RedisServer | NatsServer]]:
    if kind == "nats-file":
        with nats_server(tmp_path) as srv:
            yield f"{srv.url}?stream=faults&lease=2", srv
    else:
        fsync = kind.split("-", 1)[1]
        with redis_server(tmp_path, appendonly=True, extra=("--appendfsync", fsync)) as (
            url,
            server,
        ):
            yield f"{url}?lease=2&reconnect_timeout=30", server


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["redis-always", "redis-everysec", "nats-file"])
async def test_broker_sigkilled_under_load_and_restarted_loses_nothing_acked(
    tmp_path: Path, kind: str
) -> None:
    """400 events/s; the broker is SIGKILLed 1 s in and restarted on its
    files 1 s later: no acknowledged event is lost, and publishing and
    handling are back within 10 s of the restart."""
    with persistent(kind, tmp_path) as (url, server):
        options = {"ack_timeout": 2.0} if kind == "nats-file" else {}

        async def kill() -> None:
            server.kill()

        async def restart() -> None:
            await asyncio.to_thread(server.start)

        figure = await run_fault(
            lambda: open_transport(url, **options),
            test=f"restart[{kind}]",
            fault="SIGKILL, restart 1s later",
            start_fault=kill,
            heal=restart,
            outage=1.0,
        )
    print(f"\n{figure}")
    assert figure.lost == 0, figure
    assert figure.acked > 0
    assert figure.recover < 10.0, figure
