"""A publish-only process (``App.start(consume=False)``) declares its
subscriptions' groups, so what it publishes before any worker ever ran is
kept and handled once workers start."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

import surge
from surge.cli import main

from ._servers import shared_nats_url, shared_redis_url


class Ordered(surge.Event):
    __topic__ = "front.ordered"
    __key__ = "customer"
    n: int
    customer: str = ""


def _app(url: str, seen: list[int]) -> surge.App:
    app = surge.App("shop", transport=url)

    @app.on(Ordered)
    async def fulfil(ev: Ordered) -> None:
        seen.append(ev.n)

    @app.on(Ordered, key=None, name="audit")
    async def audit(ev: Ordered) -> None:
        seen.append(-1 - ev.n)

    return app


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shop.db'}"


URLS: dict[str, Callable[[Path], str]] = {
    "sqlite": _sqlite,
    "redis": lambda _: shared_redis_url(),
    "nats": lambda _: shared_nats_url(),
}


@pytest.mark.realtime
@pytest.mark.parametrize("kind", sorted(URLS))
async def test_events_published_before_any_worker_are_handled(kind: str, tmp_path: Path) -> None:
    """Published (keyed and unkeyed) by a front started with consume=False,
    before any worker ran: each is handled exactly once by each of its
    subscriptions when the worker starts."""
    url = URLS[kind](tmp_path)
    front_seen: list[int] = []
    front = _app(url, front_seen)
    await front.start(consume=False)
    for n in range(20):
        await front.publish(Ordered(n=n, customer=f"c{n % 3}" if n % 2 else ""))
    with pytest.raises(surge.ConfigurationError, match="consume=False"):
        await front.drain()
    await front.stop()
    assert front_seen == []  # the front handled nothing
    seen: list[int] = []
    async with _app(url, seen) as worker:
        await worker.drain()
    assert sorted(seen) == sorted([*range(20), *(-1 - n for n in range(20))])


FRONT = """
import surge

class Ordered(surge.Event):
    __topic__ = "front.ordered"
    n: int

app = surge.App("shop")

@app.on(Ordered)
async def fulfil(ev: Ordered) -> None:
    print(f"front handled {ev.n}", flush=True)

@app.on_start
async def take_orders() -> None:
    for n in range(5):
        await app.publish(Ordered(n=n))
    app.request_stop()
"""


def _worker_handles(url: str) -> list[int]:
    seen: list[int] = []

    async def work() -> None:
        async with _app(url, seen) as worker:
            await worker.drain()

    surge.VirtualClock().run(work())
    return sorted(n for n in seen if n >= 0)


def test_surge_run_no_consume_publishes_and_handles_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`surge run --no-consume`: the process publishes, handles nothing, and
    what it published waits for the workers."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "front_app.py").write_text(FRONT)
    url = _sqlite(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "surge", "run", "front_app:app", "--no-consume", "-t", url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "front handled" not in proc.stdout
    assert _worker_handles(url) == list(range(5))


def test_surge_declare_lets_a_process_without_subscriptions_publish_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`surge declare mod:app` as a deploy step: a publisher that declares
    nothing itself, run before any worker, loses nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "declared_app.py").write_text(
        "from tests.test_publish_only import _app\napp = _app('memory://', [])\n"
    )
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))
    url = _sqlite(tmp_path)
    result = CliRunner().invoke(main, ["declare", "declared_app:app", "-t", url])
    sys.modules.pop("declared_app", None)
    assert result.exit_code == 0, result.output
    assert "shop.fulfil: front.ordered" in result.output

    async def publish() -> None:
        async with surge.App("publisher", transport=url) as publisher:
            for n in range(5):
                await publisher.publish(Ordered(n=n))

    surge.VirtualClock().run(publish())
    assert _worker_handles(url) == list(range(5))
