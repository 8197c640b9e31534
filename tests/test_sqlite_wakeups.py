"""Wake-ups between processes on one SQLite file: a commit wakes the other
transports' consumers through a Unix datagram socket each, so they claim at
once instead of after their nap (surge/transports/sqlite/_wakeups.py). Real
time: real sockets and the transports' threads."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest

import surge
from surge._clock import RealClock
from surge._transport import Delivery
from surge.transports.sqlite import SqliteTransport
from surge.transports.sqlite import _transport as sqlite_transport
from surge.transports.sqlite import _wakeups as wakeups
from surge.transports.sqlite._leases import Consumer
from surge.transports.sqlite._wakeups import Wakeups

from .conformance._helpers import env, number

Batches = AsyncGenerator[list[Delivery], None]


def _gone(path: str) -> bool:
    return not os.path.exists(path)


@asynccontextmanager
async def started(path: Path, **options: Any) -> AsyncIterator[SqliteTransport]:
    t = SqliteTransport(f"sqlite:///{path}", clock=RealClock(), **options)
    await t.start()
    try:
        yield t
    finally:
        await t.close()


@pytest.mark.realtime
async def test_a_commit_wakes_the_consumer_of_another_transport_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two transports on one file, as two processes are: one consumes and
    naps 30 s between looks, the other publishes. The consumer claims the
    event as soon as the commit's wake-up comes (it would sleep out its nap
    without one: the test then times out), and its socket and directory are
    gone after both close."""
    monkeypatch.setattr(sqlite_transport, "_FIRST_POLL", 30.0)
    napping = asyncio.Event()
    nap = Consumer.nap

    async def noting(self: Consumer, timeout: float | None) -> bool:
        if timeout is None or timeout >= 29:
            napping.set()
        return await nap(self, timeout)

    monkeypatch.setattr(Consumer, "nap", noting)
    db = tmp_path / "d.db"
    async with started(db, poll=30) as reader, started(db, poll=30) as writer:
        await reader.declare("g", ["conf.item"])
        batches = cast(Batches, reader.consume("g", prefetch=10))
        first = asyncio.ensure_future(anext(batches))
        own = reader.ownership("g")
        assert own is not None
        async with asyncio.timeout(10):
            # taking the partitions wakes the consumer once: the nap to
            # publish in is the one after
            while len(own.owned) < own.partitions or own.releasing:
                await own.changed()
            napping.clear()
            await napping.wait()
        await writer.publish([env(7)])
        async with asyncio.timeout(5):
            batch = await first
        assert [number(d) for d in batch] == [7]
        assert reader._wakeups.received >= 1
        assert writer._wakeups.sent >= 1
        await reader.ack(batch)
        await batches.aclose()
        wake_dir = reader._wakeups.dir
        assert os.listdir(wake_dir)
    assert _gone(wake_dir)


@pytest.mark.realtime
async def test_a_socket_left_by_a_killed_process_is_removed(tmp_path: Path) -> None:
    """A socket whose process died (SIGKILL leaves its file) refuses the
    wake-up; the sender removes it and still wakes the live one."""
    db = str(tmp_path / "d.db")
    sender = Wakeups(db)
    os.makedirs(sender.dir, mode=0o700, exist_ok=True)
    dead = os.path.join(sender.dir, "1-deadbeef")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(dead)  # bound, then closed without unlinking: what a kill leaves
    woken = asyncio.Event()
    live = Wakeups(db)
    live.listen(asyncio.get_running_loop(), woken.set)
    try:
        assert live.listening
        sender.notify()
        assert _gone(dead)
        assert sender.sent == 1
        async with asyncio.timeout(5):
            await woken.wait()
        assert live.received == 1
    finally:
        live.close()
        sender.close()
    assert _gone(sender.dir)


@pytest.mark.realtime
async def test_wakeups_can_be_turned_off(tmp_path: Path) -> None:
    """wakeups=false: the transport binds no socket (its consumers only
    poll); a value that is not a boolean is refused."""
    async with started(tmp_path / "d.db", wakeups="false") as t:
        await t.declare("g", ["conf.item"])
        batches = cast(Batches, t.consume("g", prefetch=10))
        await t.publish([env(1)])
        async with asyncio.timeout(5):
            batch = await anext(batches)
        assert [number(d) for d in batch] == [1]
        assert not t._wakeups.listening
        await t.ack(batch)
        await batches.aclose()
    with pytest.raises(surge.ConfigurationError, match="wakeups"):
        SqliteTransport(f"sqlite:///{tmp_path / 'e.db'}?wakeups=maybe")


@pytest.mark.realtime
async def test_commits_within_the_spacing_are_told_in_one_round_at_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transport wakes the others at most once a SPACING: three commits in
    a row send one round at once and one at the spacing's end, not three
    (a worker woken at every commit of a fast publisher claimed a few events
    a time)."""
    monkeypatch.setattr(wakeups, "SPACING", 0.5)  # wide enough for a loaded machine
    db = str(tmp_path / "d.db")
    woken = asyncio.Event()
    live = Wakeups(db)
    live.listen(asyncio.get_running_loop(), woken.set)
    sender = Wakeups(db)
    try:
        for _ in range(3):
            sender.notify()
        assert sender.sent == 1
        async with asyncio.timeout(5):
            while sender.sent < 2:
                await woken.wait()
                woken.clear()
        assert sender.sent == 2
    finally:
        live.close()
        sender.close()


def _plant(tmp_path: Path, wake_dir: str) -> Path:
    """Someone else's doing: the predictable directory is a link to a
    directory of files."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    os.symlink(target, wake_dir)
    return target / "notes.txt"


@pytest.mark.realtime
async def test_a_directory_that_is_not_only_ours_is_left_alone(tmp_path: Path) -> None:
    """The directory's name is predictable: one that is a link, or that
    others may write, is not used (no socket bound, nothing in it sent to
    or removed); consumers then only poll."""
    db = str(tmp_path / "d.db")
    w = Wakeups(db)
    notes = _plant(tmp_path, w.dir)
    try:
        w.listen(asyncio.get_running_loop(), lambda: None)
        assert not w.listening
        w.notify()
        assert w.sent == 0
        assert notes.read_text() == "keep"
    finally:
        w.close()
        os.unlink(w.dir)
    os.mkdir(w.dir)
    try:
        os.chmod(w.dir, 0o777)  # noqa: S103 - the case under test: others may write
        shared = Wakeups(db)
        shared.listen(asyncio.get_running_loop(), lambda: None)
        assert not shared.listening
        shared.close()
    finally:
        os.rmdir(w.dir)


@pytest.mark.realtime
async def test_a_consume_that_resumes_after_close_binds_nothing(tmp_path: Path) -> None:
    """A closed transport's wake-ups do not listen again (a consume that was
    looking its group up when close ran bound a socket nobody closed)."""
    async with started(tmp_path / "d.db") as t:
        await t.declare("g", ["conf.item"])
    t._wakeups.listen(asyncio.get_running_loop(), lambda: None)
    assert not t._wakeups.listening
