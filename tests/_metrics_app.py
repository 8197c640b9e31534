"""An instrumented app for the multi-worker metrics test (workers import it).

Event ``n`` fails for good when ``n % 5 == 0`` (dead-lettered after two
attempts), fails once when ``n % 4 == 0``, and succeeds otherwise.
"""

from __future__ import annotations

import surge
from surge.observe import instrument


class Job(surge.Event):
    n: int


app = surge.App("metered")
instrument(app, sample=1)
GROUP = "metered.work"
APP_REF = f"{__name__}:app"


@app.on(Job, concurrency=4, retry=surge.Retry(attempts=2, backoff=0.01, jitter=0.0))
async def work(event: Job, ctx: surge.Context) -> None:
    await app.clock.sleep(0.02)
    if event.n % 5 == 0 or (event.n % 4 == 0 and ctx.attempt == 1):
        raise RuntimeError(f"job {event.n} failed on attempt {ctx.attempt}")


def expected(count: int) -> dict[str, int]:
    """The counters a run of jobs ``range(count)`` ends with."""
    dead = sum(1 for n in range(count) if n % 5 == 0)
    once = sum(1 for n in range(count) if n % 5 and n % 4 == 0)
    return {
        "received": count + dead + once,
        "succeeded": count - dead,
        "failed": 2 * dead + once,
        "retried": dead + once,
        "dead_lettered": dead,
    }
