"""``surge top``: one refresh against a served app, and against a transport."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

import surge
from surge.cli import main
from surge.http import Server
from surge.observe import instrument, mount
from surge.transports import open_transport

from ._metrics_app import GROUP, Job, expected

pytestmark = pytest.mark.realtime


@contextmanager
def served(app: surge.App) -> Iterator[str]:
    """Run ``app`` and its ingress on a loop in another thread; its URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    url: list[str] = []
    failure: list[BaseException] = []

    async def run() -> None:
        async with app, Server(app, port=0, admin=True) as server:
            url.append(server.url)
            ready.set()
            await stop.wait()

    def thread_main() -> None:
        try:
            loop.run_until_complete(run())
        except BaseException as exc:
            failure.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=thread_main)
    thread.start()
    try:
        assert ready.wait(30), "the app did not start"
        assert not failure, failure
        yield url[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
    assert not failure, failure


def test_top_once_shows_each_subscription_from_a_url(caplog: pytest.LogCaptureFixture) -> None:
    """surge top URL --once prints the subscription's handled, failed, retried and dead counts."""
    caplog.set_level(logging.CRITICAL, "surge")
    app = surge.App("metered")
    instrument(app, sample=1)
    mount(app.http)
    count = 20

    @app.on(Job, retry=surge.Retry(attempts=2, backoff=0.001, jitter=0.0))
    async def work(event: Job, ctx: surge.Context) -> None:
        if event.n % 5 == 0 or (event.n % 4 == 0 and ctx.attempt == 1):
            raise RuntimeError("no")

    async def load() -> None:
        for n in range(count):
            await app.publish(Job(n=n))
        await app.drain()

    with served(app) as url:
        future = asyncio.run_coroutine_threadsafe(load(), _loop_of(app))
        future.result(30)
        result = CliRunner().invoke(main, ["top", url, "--once"], terminal_width=200)
    assert result.exit_code == 0, result.output
    want = expected(count)
    row = next(line for line in result.output.splitlines() if GROUP in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[0] == GROUP
    # handled, failed, retried, dead letters: the last four columns
    assert cells[-4:] == [
        str(want["succeeded"]),
        str(want["failed"]),
        str(want["retried"]),
        str(want["dead_lettered"]),
    ]
    assert "surge top: metered" in result.output


def _loop_of(app: surge.App) -> asyncio.AbstractEventLoop:
    # the loop the served app's runner tasks live on
    for runner in app._runners.values():
        assert runner._consumer is not None
        return runner._consumer.get_loop()
    raise AssertionError("the app has no runner")


def test_top_once_reads_a_transport_backlog(tmp_path: Path) -> None:
    """surge top MODULE:APP --transport URL shows the backlog waiting in the transport."""
    url = f"sqlite:///{tmp_path / 't.db'}"

    async def fill() -> None:
        transport = open_transport(url)
        await transport.start()
        await transport.declare(GROUP, (Job.__topic__,))
        app = surge.App("metered", transport=transport)
        await transport.publish([app._envelope(Job(n=n), None, None) for n in range(7)])
        await transport.close()

    asyncio.run(fill())
    result = CliRunner().invoke(
        main, ["top", "tests._metrics_app:app", "--transport", url, "--once"], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if GROUP in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[4] == "7"  # backlog
    assert re.search(r"surge top: metered", result.output)


def test_top_reports_an_unreachable_url() -> None:
    """A URL nobody listens on is a clear error, not a traceback."""
    result = CliRunner().invoke(main, ["top", "http://127.0.0.1:9/", "--once"])
    assert result.exit_code == 1
    assert "cannot reach http://127.0.0.1:9/" in result.output
