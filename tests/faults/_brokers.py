"""Brokers behind a fault proxy, for the fault tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from surge.transports import Transport, open_transport

from .._servers import (
    drop_postgres_schema,
    nats_server,
    redis_server,
    shared_postgres,
    shared_rabbit,
)
from ._proxy import Proxy

__all__ = ("OPTIONS", "broker", "transport")

# Short leases and timeouts so that a run takes seconds; each figure in
# RELIABILITY.md names the options it ran with.
OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    # socket_timeout (redis-py's, default max(10, 3 * block)): how long a
    # command waits for a reply before the connection is given up
    "redis": ("?lease=2&socket_timeout=2&reconnect_timeout=30", {}),
    "nats": ("?stream=faults&lease=2", {"ack_timeout": 2.0}),
    "postgres": ("?lease=2", {}),
    # heartbeat (aiormq's, sent every heartbeat / 2; the connection is given
    # up after (heartbeat + 1) * 3 s of silence; RabbitMQ's after about two)
    "amqp": ("?lease=2&heartbeat=2", {"publish_timeout": 30.0}),
}


@contextlib.asynccontextmanager
async def broker(kind: str, tmp_path: Path, **query: Any) -> AsyncIterator[tuple[str, Proxy]]:
    """A broker of ``kind`` the test starts, and a proxy to it; yields the
    URL through the proxy (with ``OPTIONS``, then ``query``) and the proxy."""
    base, _ = OPTIONS[kind]
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    with contextlib.ExitStack() as stack:
        if kind == "postgres":
            # the session's cluster, a schema of its own (dropped after)
            pg = shared_postgres()
            schema = f"faults{uuid.uuid4().hex[:12]}"
            async with Proxy(pg.port) as proxy:
                url = f"postgresql://surge@127.0.0.1:{proxy.port}/postgres{base}{extra}"
                try:
                    yield f"{url}&schema={schema}", proxy
                finally:
                    proxy.heal()
                    drop_postgres_schema(f"x?schema={schema}")
            return
        if kind == "amqp":
            # the session's node, names under a prefix of their own
            prefix = f"faults{uuid.uuid4().hex[:12]}"
            async with Proxy(shared_rabbit().port) as proxy:
                url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{base}{extra}"
                try:
                    yield f"{url}&prefix={prefix}", proxy
                finally:
                    proxy.heal()
            return
        if kind == "redis":
            _, server = stack.enter_context(redis_server(tmp_path))
            port = server.port
        else:
            port = stack.enter_context(nats_server(tmp_path)).port
        db = "/0" if kind == "redis" else ""
        async with Proxy(port) as proxy:
            yield f"{kind}://127.0.0.1:{proxy.port}{db}{base}{extra}", proxy


def transport(kind: str, url: str, **options: Any) -> Transport:
    """A transport for ``url`` with ``OPTIONS``' keywords of ``kind``, then ``options``."""
    return open_transport(url, **{**OPTIONS[kind][1], **options})
