"""The Jepsen checker shared by every transport (tests/_jepsen.py), on the brokers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._jepsen import run_crash
from ._servers import nats_server, redis_server

pytestmark = pytest.mark.realtime


@contextlib.contextmanager
def _broker(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "nats":
        with nats_server(tmp_path) as srv:
            yield f"{srv.url}?stream=jepsen&lease=2"
    else:
        with redis_server(tmp_path) as (url, _server):
            yield f"{url}?lease=2"


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_two_workers_sigkilled_with_the_shared_checker(tmp_path: Path, kind: str) -> None:
    """20,000 acked events, two supervised workers SIGKILLed 20+ times: nothing
    lost or invented, duplicates within in-flight, nothing pending."""
    with _broker(kind, tmp_path) as url:
        result = await run_crash(
            url,
            tmp_path,
            events=20_000,
            kills=22,  # the last share can run out before the last kill or two
            workers=2,
            seed=5,
            rate=2000,
        )
    print(f"\n{kind} crash test (shared checker): {result}")
    assert result.acked == 20_000
    assert result.kills >= 20
    result.check()
