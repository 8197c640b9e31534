"""``app.publish_many`` against a loop of ``await app.publish``, per transport.

Usage: ``python -m benchmarks.publish_many [--events N] [--transports memory,sqlite,...]``

Each transport publishes ``N`` small events to one subscribed group (not
consumed: the app starts with ``consume=False``), first one ``await
app.publish`` at a time, then in one ``publish_many``, on a fresh store each.
Servers come from ``tests/_servers.py`` (started on first use, stopped at
exit), so run it from the repository root. Prints events/s of each and the
ratio; ``publish_many`` is as fast as the transport's batched write (one
SQLite transaction, one Redis Lua call, pipelined NATS acks, one PostgreSQL
statement, RabbitMQ confirms awaited together), a loop pays a round trip
(or a commit) per event.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import surge


class Small(surge.Event):
    __topic__ = "bench.small"
    n: int


async def _rate(url: str, events: int, many: bool) -> float:
    app = surge.App("pm", transport=url)

    @app.on(Small)
    async def handle(ev: Small) -> None:
        return None

    await app.start(consume=False)
    try:
        batch = [Small(n=i) for i in range(events)]
        t0 = time.perf_counter()
        if many:
            await app.publish_many(batch)
        else:
            for ev in batch:
                await app.publish(ev)
        return events / (time.perf_counter() - t0)
    finally:
        await app.stop()


def _urls(tmp: Path) -> dict[str, Callable[[], str]]:
    from tests import _servers

    counter = iter(range(1_000_000))
    return {
        "memory": lambda: "memory://",
        "sqlite": lambda: f"sqlite:///{tmp / f'pm{next(counter)}.db'}",
        "redis": lambda: _servers.shared_redis_url(),
        "nats": lambda: _servers.shared_nats_url(),
        "postgres": lambda: _servers.shared_postgres_url(),
        "amqp": lambda: _servers.shared_amqp_url(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--transports", default="memory,sqlite,redis,nats,postgres,amqp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = _urls(Path(tmp))
        for name in args.transports.split(","):
            loop = asyncio.run(_rate(urls[name](), args.events, many=False))
            many = asyncio.run(_rate(urls[name](), args.events, many=True))
            print(
                f"{name:9s} await publish {loop:10,.0f}/s   publish_many {many:10,.0f}/s"
                f"   {many / loop:6.1f}x"
            )


if __name__ == "__main__":
    main()
