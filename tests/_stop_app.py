"""The app the stop stress test (tests/test_stops.py) runs in worker processes.

Keyed and unkeyed subscriptions with handlers that take a few milliseconds,
and a one-second timer, so a SIGTERM finds handlers in flight, acks to
settle, partitions to hand over and a trigger to stop. At exit each worker
appends one JSON line to ``$STOPS_REPORTS``: its pid, the monotonic time it
exited (the system-wide clock, comparable with the test's), and the app's
stop report.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import time

import msgspec

import surge

__all__ = ("APP_REF", "Job", "Loose", "Row", "app", "read_rows")

APP_REF = f"{__name__}:app"

app = surge.App("stops")


class Job(surge.Event):
    """Keyed: read through partitions where the transport has them."""

    __key__ = "key"
    key: str
    n: int


class Loose(surge.Event):
    """Unkeyed: read from the group's shared queue by any worker."""

    n: int


@app.on(Job, concurrency=16)
async def keyed(job: Job) -> None:
    await asyncio.sleep(0.005)


@app.on(Loose, concurrency=16)
async def loose(ev: Loose) -> None:
    await asyncio.sleep(0.005)


@app.every(seconds=1, name="beat")
async def beat(t: surge.Tick) -> None:
    pass


class Row(msgspec.Struct, frozen=True):
    """What one worker wrote at exit."""

    pid: int
    exited: float
    report: surge.StopReport | None


def _write_row() -> None:
    path = os.environ.get("STOPS_REPORTS")
    if path is None:
        return
    row = Row(pid=os.getpid(), exited=time.monotonic(), report=app.stop_report)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, msgspec.json.encode(row) + b"\n")
    finally:
        os.close(fd)


atexit.register(_write_row)


def read_rows(path: str) -> list[Row]:
    """The rows the workers wrote to ``path``."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [msgspec.json.decode(line, type=Row) for line in f if line.strip()]
