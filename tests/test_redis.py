"""The Redis Streams transport against real redis-server processes.

Every test starts its own server (tests/_servers.py) on a free loopback
port; the conformance suite runs on redis too (tests/conformance). Run as
``python -m tests.test_redis URL FILE``, this module is the crash test's
worker: it handles ``crash.num`` events, appending each number to FILE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio
from redis.asyncio import Redis

import surge
from surge.transports.redis import RedisTransport
from surge.transports.redis._group import Group

from ._servers import free_port, redis_server, shared_redis_url
from .conformance._helpers import Reader

pytestmark = pytest.mark.realtime

ROOT = Path(__file__).resolve().parent.parent
LEASE = 1.0


class Num(surge.Event):
    __topic__ = "crash.num"
    n: int


# --- the crash test's worker -------------------------------------------------
def _worker(url: str, out: str) -> None:
    """Handle ``crash.num`` events: append each number to ``out``, and print
    how many were handled every 20 (so the test kills mid-stream)."""
    app = surge.App("crash", transport=RedisTransport(url, lease=LEASE), concurrency=20)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    count = 0

    @app.on(Num, prefetch=50)
    async def handle(ev: Num) -> None:
        nonlocal count
        os.write(fd, f"{ev.n}\n".encode())
        count += 1
        if count % 20 == 0:
            print(count, flush=True)

    app.run()


class _Records(logging.Handler):
    """Log records of ``surge.redis``, with an event per awaited message."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.waiters: list[tuple[str, asyncio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        msg = record.getMessage()
        for text, ev in self.waiters:
            if text in msg:
                ev.set()

    def expect(self, text: str) -> asyncio.Event:
        ev = asyncio.Event()
        self.waiters.append((text, ev))
        return ev


@contextlib.contextmanager
def _captured() -> Iterator[_Records]:
    handler = _Records()
    logger = logging.getLogger("surge.redis")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def _until(ev: asyncio.Event, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            await ev.wait()
    except TimeoutError:
        raise AssertionError(f"{what} did not happen within {timeout}s") from None


def _is_healthy(t: RedisTransport) -> bool:
    return t.healthy


def _counter(app: surge.App, n: int) -> tuple[list[int], asyncio.Event]:
    """A subscription of ``app`` recording Num events; the event fires at ``n``."""
    seen: list[int] = []
    done = asyncio.Event()

    @app.on(Num, name="count")
    async def count(ev: Num) -> None:
        seen.append(ev.n)
        if len(set(seen)) >= n:
            done.set()

    return seen, done


# --- tests -----------------------------------------------------------------
async def test_round_trip_and_acked_entries_are_deleted(tmp_path: Path) -> None:
    """Events published through an App are handled once and acked entries leave the stream."""
    with redis_server(tmp_path) as (url, _):
        app = surge.App("rt", transport=url)
        seen, done = _counter(app, 300)
        async with app:
            for i in range(0, 300, 30):
                await asyncio.gather(*(app.publish(Num(n=n)) for n in range(i, i + 30)))
            await _until(done, 10, "300 events handled")
            await app.drain()
            stats = await app.transport.stats("rt.count")
            assert (stats.backlog, stats.pending, stats.scheduled) == (0, 0, 0)
            transport = app.transport
            assert isinstance(transport, RedisTransport)
            r = redis.asyncio.Redis.from_url(url)
            try:
                assert await r.xlen(f"{transport.prefix}:s:rt.count") == 0
            finally:
                await r.aclose()
        assert sorted(seen) == list(range(300))


async def test_url_options_and_bad_url() -> None:
    """Transport options ride in the URL's query; bad ones raise ConfigurationError."""
    t = RedisTransport("redis://127.0.0.1:1/0?lease=2.5&prefix=x&heartbeat=0&db=0")
    assert (t.lease, t.prefix, t.heartbeat) == (2.5, "x", 0.0)
    with pytest.raises(surge.ConfigurationError):
        RedisTransport("redis://127.0.0.1/0?lease=soon")
    with pytest.raises(surge.ConfigurationError):
        RedisTransport("redis://127.0.0.1/0", prefix="a:b")
    with pytest.raises(surge.ConfigurationError):
        RedisTransport("nats://127.0.0.1/0")


async def test_unreachable_broker_raises_transport_error() -> None:
    """Starting against a port nobody listens on raises TransportError naming the broker."""
    port = free_port()
    t = RedisTransport(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(surge.TransportError, match=str(port)):
        await t.start()
    assert isinstance(surge.TransportError("x"), ConnectionError)


async def test_password_and_acl_user(tmp_path: Path) -> None:
    """A password or an ACL user in the URL authenticates; a wrong one is a TransportError."""
    extra = ("--requirepass", "s3cret", "--user", "alice", "on", ">wonder", "~*", "&*", "+@all")
    with redis_server(tmp_path, extra=extra) as (url, _):
        rest = url.removeprefix("redis://")
        for auth in (":s3cret@", "alice:wonder@"):
            app = surge.App("auth", transport=f"redis://{auth}{rest}")
            seen, done = _counter(app, 3)
            async with app:
                for n in range(3):
                    await app.publish(Num(n=n))
                await _until(done, 10, f"events handled with {auth}")
            assert sorted(seen) == [0, 1, 2]
        for auth in ("", ":wrong@", "alice:wrong@"):
            t = RedisTransport(f"redis://{auth}{rest}")
            with pytest.raises(surge.TransportError):
                await t.start()


async def test_tls(tmp_path: Path) -> None:
    """rediss:// connects over TLS to a server that speaks only TLS on that port."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(
        subprocess.run,
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls_port = free_port()
    extra = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert),
             "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
             "--tls-auth-clients", "no")  # fmt: skip
    try:
        server_cm = redis_server(tmp_path, extra=extra)
        server_cm.__enter__()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server was built without TLS: {exc}")
        raise
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        app = surge.App("tls", transport=RedisTransport(url, ssl_ca_certs=str(cert)))
        seen, done = _counter(app, 2)
        async with app:
            await app.publish(Num(n=1))
            await app.publish(Num(n=2))
            await _until(done, 10, "events handled over TLS")
        assert sorted(seen) == [1, 2]
        untrusted = RedisTransport(url)  # the self-signed certificate is not trusted
        with pytest.raises(surge.TransportError):
            await untrusted.start()
    finally:
        server_cm.__exit__(None, None, None)


@pytest.mark.parametrize("heartbeat", [None, 0.0], ids=["extended", "not-extended"])
async def test_long_handler_runs_once_thanks_to_lease_extension(
    tmp_path: Path, heartbeat: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler running for several leases is not taken over by a peer while its
    consumer extends the lease (and is, as the control shows, when it does not)."""
    with redis_server(tmp_path) as (url, _):
        runs: list[str] = []
        started = asyncio.Event()
        release = asyncio.Event()
        slow = surge.App("slow", transport=RedisTransport(url, lease=LEASE, heartbeat=heartbeat))
        peer_transport = RedisTransport(url, lease=LEASE)
        peer = surge.App("slow", transport=peer_transport)

        @slow.on(Num, name="work")
        async def work(ev: Num) -> None:
            runs.append("slow")
            started.set()
            await release.wait()

        @peer.on(Num, name="work")
        async def work_peer(ev: Num) -> None:
            runs.append("peer")

        # The peer scans for expired leases every lease / 2: after 6 scans the
        # slow delivery has been held for well over two leases.
        scans = 0
        scanned = asyncio.Event()
        orig = Group.reclaim

        async def counting(g: Group, r: Redis, room: int) -> list[surge.Delivery]:
            nonlocal scans
            out = await orig(g, r, room)
            if g.consumer == peer_transport.consumer and started.is_set() and g.name == "slow.work":
                scans += 1
                if scans >= 6:
                    scanned.set()
            return out

        monkeypatch.setattr(Group, "reclaim", counting)
        async with slow:
            await slow.publish(Num(n=1))
            await _until(started, 10, "the slow handler started")
            async with peer:
                await _until(scanned, 20, "six reclaim scans of the peer")
                release.set()
                await slow.drain()
        assert runs == (["slow"] if heartbeat is None else ["slow", "peer"])


def test_an_answer_to_a_request_sent_before_a_failure_restores_nothing() -> None:
    """A read's reply can arrive before the broker went away and be taken
    after another request failed: it must not mark the transport healthy
    again (CI: 'connection restored' right after the first failure, and the
    restart test found the transport healthy with the broker killed)."""
    conn = RedisTransport("redis://127.0.0.1:1")._conn
    conn.ok()
    sent = conn.epoch
    conn.failed(ConnectionError("reset"), "acknowledging")
    conn.ok(sent)
    assert not conn.healthy
    conn.ok(conn.epoch)  # a request sent after the failure was answered
    assert conn.healthy


async def test_a_probe_cancelled_closes_the_clients_it_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Following a cluster's failover, a probe makes a client per node it
    asks; a close cancels it midway, and those clients must still be closed
    (else sockets nobody closes, which the garbage collector met in a later
    test: CI3, 24 'unclosed transport' warnings)."""
    from surge.transports.redis._connection import Connection

    conn = RedisTransport("redis://127.0.0.1:1")._conn
    closed: list[object] = []
    asked = asyncio.Event()

    async def record(self: Connection, *clients: object) -> None:
        closed.extend(clients)

    async def hang(self: Connection, probe: object) -> object:
        asked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(Connection, "_close_clients", record)
    monkeypatch.setattr(Connection, "_slot_map", hang)
    probing = asyncio.ensure_future(conn._probe(("127.0.0.1", 1)))
    await asked.wait()
    probing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probing
    assert len(closed) == 1


async def test_broker_restart_with_aof_loses_nothing(tmp_path: Path) -> None:
    """After a SIGKILL of an AOF broker, the consumer says so, resumes within 5 s
    of the broker's return, and every acknowledged publish is handled."""
    with redis_server(tmp_path, appendonly=True) as (url, server), _captured() as logs:
        transport = RedisTransport(url, lease=2.0, reconnect_timeout=30)
        app = surge.App("restart", transport=transport)
        seen, _ = _counter(app, 0)
        marker = asyncio.Event()

        @app.on(Num, name="marker")
        async def on_marker(ev: Num) -> None:
            if ev.n == -1:
                marker.set()

        async with app:
            acked: list[int] = []
            for n in range(200):
                await app.publish(Num(n=n))
                acked.append(n)
            down = logs.expect("retrying")
            server.kill()
            await _until(down, 10, "a WARNING about the lost broker")
            assert not _is_healthy(transport)
            assert transport.last_error

            async def publish_during_outage() -> None:
                for n in range(200, 260):
                    await app.publish(Num(n=n))
                    acked.append(n)

            outage = asyncio.ensure_future(publish_during_outage())
            restored = logs.expect("connection restored")
            await asyncio.to_thread(server.start)
            back = time.monotonic()
            await app.publish(Num(n=-1))
            await _until(marker, 5, "handling within 5 s of the broker's return")
            assert time.monotonic() - back < 5
            await _until(restored, 5, "the 'connection restored' log")
            assert _is_healthy(transport)
            await outage
            await app.drain()
        assert set(acked) <= set(seen)
        assert all(r.levelno == logging.WARNING for r in logs.records)


async def test_a_server_busy_running_a_script_is_waited_out(tmp_path: Path) -> None:
    """A server stuck in another client's script answers BUSY (past
    ``busy-reply-threshold``): a publish and the consumer's reads wait it
    out as they wait out a lost connection, and nothing is raised to the
    caller (issue 21: a transient broker error is retried in the transport)."""
    with (
        redis_server(tmp_path, extra=("--busy-reply-threshold", "50")) as (url, _),
        _captured() as logs,
    ):
        app = surge.App("busy", transport=RedisTransport(url, reconnect_timeout=30))
        seen, done = _counter(app, 2)
        async with app:
            await app.publish(Num(n=1))
            other = Redis.from_url(url)
            busy = logs.expect("BUSY")
            stuck = asyncio.ensure_future(other.eval("while true do end", 0))
            await _until(busy, 10, "a WARNING about the busy server")
            told = logs.expect("publish: ResponseError: BUSY")
            publishing = asyncio.ensure_future(app.publish(Num(n=2)))
            await _until(told, 10, "the publish meeting the busy server")
            assert not publishing.done()
            killer = Redis.from_url(url)
            await killer.script_kill()
            with pytest.raises(redis.exceptions.ResponseError, match="killed"):
                await stuck
            await publishing
            await _until(done, 10, "both events handled")
            await app.drain()
            await other.aclose()
            await killer.aclose()
        assert sorted(set(seen)) == [1, 2]
        assert all(r.levelno == logging.WARNING for r in logs.records)


async def test_broker_restart_without_persistence_recreates_groups(tmp_path: Path) -> None:
    """A broker that comes back empty gets its groups declared again by their
    consumers, all of a process's at once, and new events flow to each
    within 5 s of its return. (CI: the event published once the first group
    was back never reached the second, declared again after it.)"""
    with redis_server(tmp_path) as (url, server), _captured() as logs:
        app = surge.App("amnesia", transport=RedisTransport(url, lease=2.0))
        seen, first = _counter(app, 1)
        second = asyncio.Event()

        @app.on(Num, name="second")
        async def on_second(ev: Num) -> None:
            if ev.n == 2:
                second.set()

        async with app:
            await app.publish(Num(n=1))
            await _until(first, 10, "the first event handled")
            recreated = logs.expect("was gone from the broker")
            server.kill()
            await asyncio.to_thread(server.start)
            back = time.monotonic()
            await _until(recreated, 5, "the group declared again")
            await app.publish(Num(n=2))
            await _until(second, 5, "the event published after the return handled")
            assert time.monotonic() - back < 5
            await app.drain()
        assert seen == [1, 2]


async def test_a_publisher_started_before_the_group_was_declared_still_routes() -> None:
    """A publish-only transport whose copy of the registry predates a group
    (the workers declared it after the publisher started) delivers to it:
    a publish that routes nowhere still checks the registry version."""
    url = shared_redis_url()
    publisher, worker = RedisTransport(url), RedisTransport(url)
    await publisher.start()
    await worker.start()
    try:
        await worker.declare("g", [Num.__topic__])
        env = surge.Envelope(surge.new_id(), Num.__topic__, None, 0.0, None, Num(n=1))
        await publisher.publish([env])
        assert (await worker.stats("g")).backlog == 1
    finally:
        await publisher.close()
        await worker.close()


async def test_publish_nowait_and_max_len(tmp_path: Path) -> None:
    """publish_nowait writes in the background (Overloaded past ``buffer``), and
    ``max_len`` caps a group's stream by dropping its oldest entries."""
    with redis_server(tmp_path, extra=("--stream-node-max-entries", "5")) as (url, _):
        t = RedisTransport(url, buffer=100, max_len=10, batch=7)
        await t.start()
        try:
            await t.declare("g", [Num.__topic__])
            envs = [surge.Envelope(surge.new_id(), Num.__topic__, None, 0.0, None, Num(n=i))
                    for i in range(101)]  # fmt: skip
            t.publish_nowait(envs[:100])
            with pytest.raises(surge.Overloaded):
                t.publish_nowait(envs[100:])
            await t.publish(envs[100:])  # waits for room, then is written after the rest
            stats = await t.stats("g")
            # MAXLEN ~ trims whole stream nodes (5 entries each here)
            assert 10 <= stats.backlog <= 15
        finally:
            await t.close()


async def test_crash_kill_worker_twenty_times(tmp_path: Path) -> None:
    """Jepsen-style: SIGKILL the only worker 20 times while it consumes; every
    acknowledged publish is handled, nothing unexpected, duplicates bounded."""
    kills, prefetch, total = 20, 50, 6000
    rng = random.Random(5)
    out = tmp_path / "handled.txt"
    with redis_server(tmp_path) as (url, _):
        t = RedisTransport(url, lease=LEASE)
        await t.start()
        await t.declare("crash.handle", ["crash.num"])
        producer = surge.App("producer", transport=url)
        acked: set[int] = set()
        attempted: set[int] = set()

        async def produce(start: int, stop: int) -> None:
            for n in range(start, stop):
                attempted.add(n)
                await producer.publish(Num(n=n))
                acked.add(n)

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.test_redis", url, str(out)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
            )

        async with producer:
            # Each round's worker gets a share of events published as it
            # starts (four publishers), so it has them to make progress on:
            # with the whole run published at once, workers on a loaded
            # machine could handle everything before the last rounds, whose
            # workers then had nothing to print (CI: 'no progress in 60 s'
            # with backlog, pending and scheduled all 0).
            share = total // kills
            rounds: list[asyncio.Future[list[None]]] = []
            for i in range(kills):
                first = i * share
                rounds.append(
                    asyncio.gather(
                        *(
                            produce(a, a + share // 4)
                            for a in range(first, first + share, share // 4)
                        )
                    )
                )
                proc = spawn()
                assert proc.stdout is not None
                for _ in range(rng.randint(1, 4)):
                    try:
                        async with asyncio.timeout(60):
                            line = await asyncio.to_thread(proc.stdout.readline)
                    except TimeoutError:
                        proc.kill()
                        stats = await t.stats("crash.handle")
                        raise AssertionError(
                            f"a worker made no progress in 60 s; {stats}"
                        ) from None
                    assert line, "the worker exited before it was killed"
                proc.kill()
                proc.wait()
                proc.stdout.close()
            await asyncio.gather(*rounds)
        final = spawn()
        try:
            async with asyncio.timeout(60):
                await t.wait_idle()
            stats = await t.stats("crash.handle")
        finally:
            final.terminate()
            final.wait(30)
            assert final.stdout is not None
            final.stdout.close()
        await t.close()
    handled = [int(x) for x in out.read_text().split()]
    lost = acked - set(handled)
    unexpected = set(handled) - attempted
    duplicates = len(handled) - len(set(handled))
    assert not lost, f"{len(lost)} acknowledged events never handled"
    assert not unexpected
    assert duplicates <= kills * prefetch
    assert (stats.backlog, stats.pending, stats.scheduled, stats.dead) == (0, 0, 0, 0)
    assert len(acked) == total


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])


async def test_reply_inboxes_of_killed_processes_are_swept(tmp_path: Path) -> None:
    """An ephemeral group whose process died (no close) is deleted by the next
    process to start once its liveness key expires; a live one is kept."""
    with redis_server(tmp_path) as (url, _):
        live = RedisTransport(url, lease=0.1)
        dead = RedisTransport(url, lease=0.1)
        for t, name in ((live, "inbox.live"), (dead, "inbox.dead")):
            await t.start()
            await t.declare(name, [name], ephemeral=True)
        live_reader = live.consume("inbox.live", prefetch=10)
        pending = asyncio.ensure_future(anext(live_reader))  # renews its liveness
        dead_reader = dead.consume("inbox.dead", prefetch=10)
        dead_next = asyncio.ensure_future(anext(dead_reader))
        r = redis.asyncio.Redis.from_url(url)
        assert set(await r.hkeys("surge:groups")) == {b"inbox.live", b"inbox.dead"}
        await r.config_set("notify-keyspace-events", "Ex")  # tell us when keys expire
        expired = r.pubsub()
        await expired.subscribe("__keyevent@0__:expired")
        # Die as SIGKILL would: no close, so nothing deletes the inbox.
        dead_next.cancel()
        await dead.abandon()
        async with asyncio.timeout(10):  # the key expires after alive_ms (1 s)
            while (msg := await expired.get_message(timeout=10)) is None or (
                msg["data"] != b"surge:a:inbox.dead"
            ):
                pass
        await expired.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8
        assert await r.exists("surge:a:inbox.live")
        late = RedisTransport(url, lease=0.1)
        await late.start()
        try:
            assert set(await r.hkeys("surge:groups")) == {b"inbox.live"}
            assert not await r.exists("surge:s:inbox.dead")
        finally:
            pending.cancel()
            await late.close()
            await live.close()
            await r.aclose()


async def test_what_a_cut_off_read_took_is_handed_back_at_close_uncounted() -> None:
    """Entries Redis gave this consumer in a read whose reply it never got (a
    stop's cancel cut the read off) are handed back at close as the attempt
    they had, unkeyed and keyed alike, not left for a takeover that counts
    the lost read as an attempt."""
    url = shared_redis_url()
    first = RedisTransport(url, lease=0.5)
    await first.start()
    await first.declare("g", [Num.__topic__])
    envs = [
        surge.Envelope(surge.new_id(), Num.__topic__, None, 0.0, None, Num(n=n)) for n in range(5)
    ]
    await first.publish(envs[:1])
    reader = Reader(first, "g", prefetch=10)
    await first.ack(await reader.take(1))  # this consumer now exists in the group
    await reader.aclose()
    envs[3].key = envs[4].key = "k"  # keyed: partition entries
    await first.publish(envs[1:])
    r = redis.asyncio.Redis.from_url(url.split("?")[0])
    try:
        shared = f"{first.prefix}:s:g"
        (consumer,) = [c["name"] for c in await r.xinfo_consumers(shared, "g")]
        streams = [shared, *(f"{first.prefix}:p{p}:g" for p in range(first.partitions))]
        # the read whose reply is lost: Redis counts it, this process never sees it
        got: Any = await r.xreadgroup("g", consumer, dict.fromkeys(streams, ">"))
        assert sum(len(entries) for _, entries in got) == 4
    finally:
        await r.aclose()
    await first.close()
    second = RedisTransport(url, lease=0.5)
    await second.start()
    try:
        await second.declare("g", [Num.__topic__])
        reader = Reader(second, "g", prefetch=10)
        back = await reader.take(4, timeout=10)
        await second.ack(back)
        await reader.aclose()
        attempts = {
            msgspec.msgpack.decode(d.envelope.body or b"", type=Num).n: d.attempt for d in back
        }
        assert attempts == {1: 1, 2: 1, 3: 1, 4: 1}
    finally:
        await second.close()
