"""Clustered brokers, a node SIGKILLed under load: a three-node NATS
JetStream cluster (replicas=3) loses its stream leader, a Redis Cluster (3
masters, a replica each) the master of the prefix's slot. The conformance
suite runs on both too (tests/conformance, cases ``nats-cluster`` and
``redis-cluster``).

The clusters are the session's (tests/_servers.py), shared with the
conformance cases: started once (1-3 s each); a test that kills a node
starts it again before it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import nats
import nats.js
import nats.js.errors
import pytest
import redis.asyncio as aredis
from redis.crc import key_slot

import surge
from surge.transports._partitions import DEFAULT_PARTITIONS, partition_of
from surge.transports.nats import NatsTransport
from surge.transports.nats._connection import Election
from surge.transports.nats._layout import PeersOffline
from surge.transports.redis import RedisTransport
from surge.transports.redis._connection import _slot_ranges

from ._failover import FailoverResult, phase, run_failover
from ._jepsen import wait_for
from ._servers import (
    NatsCluster,
    NatsServer,
    RedisCluster,
    RedisServer,
    shared_nats_cluster,
    shared_nats_url,
    shared_redis_cluster,
)

pytestmark = pytest.mark.realtime


class Ping(surge.Event):
    n: int


@pytest.fixture
def nats_cluster() -> NatsCluster:
    return shared_nats_cluster()


async def _stream_leader(cluster: NatsCluster, stream: str) -> NatsServer:
    nc = await nats.connect(cluster.url.split(","))
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.cluster is not None
    assert info.cluster.leader is not None
    assert info.config.num_replicas == 3
    return cluster.server(info.cluster.leader)


async def _nats_failover(
    cluster: NatsCluster, tmp_path: Path, *, lease: float = 2.0, **load: int
) -> FailoverResult:
    stream = f"fo{uuid.uuid4().hex[:8]}"
    url = f"{cluster.url}?stream={stream}&replicas=3&lease={lease}"
    victims: list[NatsServer] = []

    async def kill() -> None:
        leader = await _stream_leader(cluster, stream)
        leader.kill()
        victims.append(leader)

    try:
        result = await run_failover(url, tmp_path, kill, **load)
    finally:
        for node in victims:  # back for the module's next test
            node.start()
    print(f"nats cluster, stream leader {victims[0].port if victims else '?'} killed: {result}")
    return result


@pytest.mark.timeout(90)
async def test_nats_stream_leader_killed_under_load(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """SIGKILL of the stream's leader node while keyed events flow and two
    workers handle them, replicas=3: nothing acknowledged is lost or left,
    handling resumes, per-key order holds: a partition taken over waits for
    the deliveries still out with the dead consumer leader's owner
    (docs/guarantees.md, "NATS JetStream cluster")."""
    result = await _nats_failover(nats_cluster, tmp_path, keys=8, per_key=60)
    # Handling must resume (run_failover waits 30 s for it); how soon is a
    # figure (4.9-12.4 s on a loaded 2-core machine; the goal is 5 s).
    result.check()


@pytest.mark.timeout(90)
async def test_nats_start_waits_out_a_cluster_without_quorum(
    nats_cluster: NatsCluster,
) -> None:
    """A process started while JetStream has no leader (here two of three
    nodes are down, as for a moment after a node died) waits for one instead
    of failing with 'setting up JetStream: TimeoutError' (CI: the drain's
    transport, opened right after the stream leader was killed), then works."""
    stream = f"q{uuid.uuid4().hex[:8]}"
    url = f"{nats_cluster.url}?stream={stream}&replicas=3"
    first = NatsTransport(url)  # the streams exist, as after any first run
    await first.start()
    await first.close()
    # The events stream's leader goes down with another node: a stream whose
    # leader is the node left answers reads without its quorum (for over a
    # minute here), so a start whose three streams all led there succeeded
    # at once (ci4 of stop 28: no wait logged within 30 s).
    leader = await _stream_leader(nats_cluster, stream)
    other = next(n for n in nats_cluster.nodes if n is not leader)
    down = [leader, other]
    for node in down:
        node.kill()
    asked = asyncio.Event()

    class Asked(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "did not answer while setting up JetStream" in record.getMessage():
                asked.set()

    handler = Asked(logging.INFO)
    logger = logging.getLogger("surge.nats")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    t = NatsTransport(url)
    try:
        starting = asyncio.get_running_loop().create_task(t.start())
        await asyncio.wait_for(asked.wait(), 30)
        assert not starting.done()
        for node in down:
            await asyncio.to_thread(node.start)
        down = []
        await asyncio.wait_for(starting, 60)
        app = surge.App("quorum", transport=t)
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        @app.on(Ping)
        async def on_ping(event: Ping) -> None:
            if not got.done():
                got.set_result(event.n)

        async with app:
            await app.publish(Ping(n=7))
            assert await asyncio.wait_for(got, 30) == 7
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for node in down:
            node.start()
        await t.close()


async def test_nats_new_stream_waits_for_peers_to_come_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """JetStream refuses a new replicated stream with 'no suitable peers for
    placement' while too few nodes are online (CI: right after a test brought
    back the node it killed, which takes a moment to rejoin): start waits
    and asks again, as for an election, instead of failing. Here the refusal
    is injected into a real server's answers twice."""
    refusals = 2
    add_stream = nats.js.JetStreamManager.add_stream

    async def refuse(self: Any, config: Any = None, **params: Any) -> Any:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise nats.js.errors.BadRequestError(
                code=400,
                err_code=10005,
                description="no suitable peers for placement, peer offline",
            )
        return await add_stream(self, config, **params)

    monkeypatch.setattr(nats.js.JetStreamManager, "add_stream", refuse)
    t = NatsTransport(shared_nats_url())
    try:
        await asyncio.wait_for(t.start(), 30)
        assert refusals == 0
    finally:
        await t.close()


async def test_nats_declare_waits_out_an_election(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating a group's consumer times out while a cluster elects its
    leader or settles after a node came back (CI: the quorum test's first
    declare once its nodes were back): declare asks again instead of failing.
    Here two timeouts are injected into a real server's answers."""
    timeouts = 2
    add_consumer = nats.js.JetStreamManager.add_consumer

    async def time_out(self: Any, stream: str, config: Any = None, **params: Any) -> Any:
        nonlocal timeouts
        if timeouts:
            timeouts -= 1
            raise nats.errors.TimeoutError
        return await add_consumer(self, stream, config, **params)

    t = NatsTransport(shared_nats_url())
    await t.start()
    try:
        monkeypatch.setattr(nats.js.JetStreamManager, "add_consumer", time_out)
        await asyncio.wait_for(t.declare("g", ["conf.item"]), 30)
        assert timeouts == 0
        assert await t.groups_for("conf.item") == ["g"]
    finally:
        await t.close()


async def test_nats_no_peers_for_good_is_a_clear_error() -> None:
    """Past the wait (30 s from the first refusal) the refusal is the error:
    one line naming the stream and JetStream's reason."""

    class Steps:  # a clock whose sleeps pass at once
        now = 0.0

        def monotonic(self) -> float:
            return self.now

        async def sleep(self, seconds: float) -> None:
            self.now += seconds

    clock = Steps()
    electing = Election(clock, "setting up JetStream")  # type: ignore[arg-type]
    refusal = PeersOffline("cannot create stream 's': no suitable peers for placement")

    async def ask_again() -> None:
        for _ in range(400):  # 0.1 s apart: past 30 s
            await electing.wait_out(refusal)

    with pytest.raises(PeersOffline, match="no suitable peers"):
        await ask_again()
    assert 30 < clock.now < 30.5


def test_replicas_option_is_checked() -> None:
    """``?replicas=`` is read from the URL, and JetStream's 1-5 is enforced."""
    assert NatsTransport("nats://a:4222,b:4222?replicas=3").options.replicas == 3
    with pytest.raises(surge.ConfigurationError, match="replicas"):
        NatsTransport("nats://a:4222?replicas=7")


# --- Redis Cluster -----------------------------------------------------------------------


@pytest.fixture
def redis_cluster() -> RedisCluster:
    return shared_redis_cluster()


async def _slot_master(cluster: RedisCluster, prefix: str, *, not_port: int = 0) -> RedisServer:
    """The node that is master of the prefix's slot, as a live node sees it."""
    slot = key_slot(f"{{{prefix}}}".encode())
    for node in cluster.nodes:
        if node.proc is None or node.port == not_port:
            continue
        r = aredis.Redis(host="127.0.0.1", port=node.port, protocol=2)
        try:
            ranges = _slot_ranges(await r.execute_command("CLUSTER SLOTS"))  # type: ignore[no-untyped-call]
        finally:
            await r.aclose()
        for (start, end), where in ranges:
            if start <= slot <= end:
                return cluster.node_at(where[0][1])
    raise AssertionError("no live node names a master of the slot")


async def _partition_master(cluster: RedisCluster, prefix: str, keys: int) -> RedisServer:
    """A master holding partitions of ``keys`` keyed events (``k0``...) of
    ``prefix``, not the prefix's own slot: the one holding most of them."""
    home = await _slot_master(cluster, prefix)
    held: dict[int, int] = {}
    for p in {partition_of(f"k{i}", DEFAULT_PARTITIONS) for i in range(keys)}:
        node = await _slot_master(cluster, f"{prefix}:{p}")
        if node is not home:
            held[node.port] = held.get(node.port, 0) + 1
    assert held, "every partition of these keys is in the prefix's master"
    return cluster.node_at(max(held, key=lambda port: held[port]))


async def _redis_failover(
    cluster: RedisCluster,
    tmp_path: Path,
    *,
    wait: int,
    partition_master: bool = False,
    **load: int,
) -> FailoverResult:
    prefix = f"fo{uuid.uuid4().hex[:8]}"
    url = f"{cluster.url}?prefix={prefix}&lease=2&wait={wait}"
    victims: list[RedisServer] = []
    back: list[asyncio.Task[None]] = []

    async def restart_after_failover(victim: RedisServer) -> None:
        # As an operator would: the dead node comes back once its replica
        # took over, and joins as that one's replica (with wait=1, writes
        # wait for it: the promoted master has no other replica).
        async def promoted() -> bool:
            masters = await _masters(cluster)
            return len(masters) == len(cluster.nodes) // 2 and victim not in masters

        await wait_for(promoted, timeout=30, interval=0.1, what="a replica promoted")
        phase("a replica promoted; restarting the dead master")
        await asyncio.to_thread(victim.start)
        # the next test may kill its master: a replica still syncing could
        # not take over
        await wait_for(
            lambda: _replica_synced(victim), timeout=30, interval=0.1, what="the replica synced"
        )
        phase("the dead master is back, a synced replica")

    async def kill() -> None:
        if partition_master:
            master = await _partition_master(cluster, prefix, load["keys"])
        else:
            master = await _slot_master(cluster, prefix)
        master.kill()
        victims.append(master)
        back.append(asyncio.get_running_loop().create_task(restart_after_failover(master)))

    try:
        result = await run_failover(url, tmp_path, kill, **load)
    finally:
        for task in back:
            await task
    which = "a master of partitions only" if partition_master else "slot master"
    print(f"redis cluster, {which} killed, wait={wait}: {result}")
    return result


@pytest.mark.timeout(90)
async def test_redis_slot_master_killed_under_load_with_wait(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """SIGKILL of the master holding the prefix's slot while keyed events
    flow and two workers handle them, with wait=1 (publish and ack return
    once a replica has them): nothing acknowledged is lost or left, handling
    resumes, per-key order holds."""
    result = await _redis_failover(redis_cluster, tmp_path, wait=1, keys=8, per_key=60)
    result.check()


@pytest.mark.timeout(90)
async def test_redis_partition_master_killed_under_load_with_wait(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """SIGKILL of a master that holds partitions of the group but not the
    prefix's own slot (its registry, leases, shared streams), with wait=1:
    the lanes and publishes of those partitions follow the promoted
    replica, nothing acknowledged is lost, per-key order holds."""
    result = await _redis_failover(
        redis_cluster, tmp_path, wait=1, partition_master=True, keys=8, per_key=60
    )
    result.check()


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(120)
async def test_redis_slot_master_killed_under_load_without_wait(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """The same without wait: Redis replicates asynchronously, so what the
    dead master acknowledged and had not sent on is lost; the figures go in
    docs/guarantees.md (nothing is asserted about loss)."""
    result = await _redis_failover(redis_cluster, tmp_path, wait=0, keys=8, per_key=60)
    assert result.crash.unexpected == 0, result


async def _publish_loss(
    cluster: RedisCluster, *, wait: int, total: int = 6000, kill_at: int = 2000
) -> tuple[int, int]:
    """Publish ``total`` numbered envelopes from 64 concurrent publishers,
    SIGKILL the slot's master once ``kill_at`` were acknowledged, restart it
    once its replica took over; (acknowledged, acknowledged and not found in
    the group afterwards)."""
    prefix = f"pl{uuid.uuid4().hex[:8]}"
    t = RedisTransport(f"{cluster.url}?prefix={prefix}&wait={wait}")
    await t.start()
    await t.declare("g", ["loss.n"])
    acked: set[int] = set()
    numbers = iter(range(total))
    killed = asyncio.Event()
    killing = False
    victim: list[RedisServer] = []

    async def publisher() -> None:
        for n in numbers:
            body = str(n).encode()
            await t.publish([surge.Envelope(surge.new_id(), "loss.n", body=body)])
            acked.add(n)
            nonlocal killing
            if len(acked) >= kill_at and not killing:
                killing = True
                master = await _slot_master(cluster, prefix)
                master.kill()
                victim.append(master)
                killed.set()

    async def restart() -> None:
        await killed.wait()

        async def promoted() -> bool:
            m = await _slot_master(cluster, prefix, not_port=victim[0].port)
            return m is not victim[0]

        await wait_for(promoted, timeout=30, interval=0.1, what="a replica promoted")
        await asyncio.to_thread(victim[0].start)

    try:
        await asyncio.gather(restart(), *(publisher() for _ in range(64)))
        found: set[int] = set()
        it = t.consume("g", prefetch=5000)
        while not acked <= found:
            try:
                async with asyncio.timeout(5):
                    batch = await anext(it)
            except TimeoutError:
                break  # nothing more comes: what is missing is lost
            found.update(int(d.envelope.body or b"-1") for d in batch)
            await t.ack(batch)
    finally:
        await t.close()
    return len(acked), len(acked - found)


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(120)
@pytest.mark.parametrize("wait", [0, 1])
async def test_redis_publishes_lost_in_a_failover(redis_cluster: RedisCluster, wait: int) -> None:
    """6,000 publishes from 64 concurrent publishers, the slot's master
    SIGKILLed after 2,000: with wait=1 none acknowledged is lost; without,
    the count is printed for docs/guarantees.md."""
    acked, lost = await _publish_loss(redis_cluster, wait=wait)
    print(f"redis cluster publish-only failover, wait={wait}: acked={acked} lost={lost}")
    if wait:
        assert lost == 0


async def _lagging_replica_loss(
    cluster: RedisCluster, *, wait: int, total: int = 3000, kill_at: int = 1500
) -> tuple[int, int]:
    """The slot master's replica is stopped (SIGSTOP: it reads nothing, as
    a replica on a slow link), 32 publishers send 10 kB envelopes; once
    ``kill_at`` are acknowledged (without wait) or a second passed (with
    wait, none can be), the master is SIGKILLed and the replica continued,
    to be promoted; the dead node is restarted once it is. (acknowledged,
    acknowledged and not found afterwards)."""
    prefix = f"lr{uuid.uuid4().hex[:8]}"
    t = RedisTransport(f"{cluster.url}?prefix={prefix}&wait={wait}&wait_timeout=0.2")
    await t.start()
    await t.declare("g", ["loss.n"])
    master = await _slot_master(cluster, prefix)
    replica = _replica_of(cluster, master)
    assert replica.proc is not None
    acked: set[int] = set()
    numbers = iter(range(total))
    pad = b"x" * 10_000
    killed = asyncio.Event()

    async def publisher() -> None:
        for n in numbers:
            body = b"%d:" % n + pad
            await t.publish([surge.Envelope(surge.new_id(), "loss.n", body=body)])
            acked.add(n)
            if len(acked) >= kill_at:
                killed.set()

    async def kill() -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0 if wait else 60.0):
                await killed.wait()
        master.kill()
        os.kill(replica.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]

        async def promoted() -> bool:
            return (await _slot_master(cluster, prefix, not_port=master.port)) is replica

        await wait_for(promoted, timeout=30, interval=0.1, what="the replica promoted")
        await asyncio.to_thread(master.start)

    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.gather(kill(), *(publisher() for _ in range(32)))
        found: set[int] = set()
        it = t.consume("g", prefetch=5000)
        while not acked <= found:
            try:
                async with asyncio.timeout(5):
                    batch = await anext(it)
            except TimeoutError:
                break  # nothing more comes: what is missing is lost
            found.update(int((d.envelope.body or b"-1:").split(b":")[0]) for d in batch)
            await t.ack(batch)
    finally:
        if replica.proc is not None:
            os.kill(replica.proc.pid, signal.SIGCONT)
        await t.close()
    return len(acked), len(acked - found)


def _replica_synced(node: RedisServer) -> bool:
    """``node`` is a replica whose link to its master is up (synced)."""
    out = subprocess.run(
        ["redis-cli", "-p", str(node.port), "INFO", "replication"],
        capture_output=True, timeout=10, check=False, text=True,
    ).stdout  # fmt: skip
    return "role:slave" in out and "master_link_status:up" in out


def _replica_of(cluster: RedisCluster, master: RedisServer) -> RedisServer:
    out = subprocess.run(
        ["redis-cli", "-p", str(master.port), "INFO", "replication"],
        capture_output=True, timeout=10, check=True, text=True,
    ).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("slave0:"))
    port = int(line.split("port=")[1].split(",")[0])
    return cluster.node_at(port)


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(180)
@pytest.mark.parametrize("wait", [0, 1])
async def test_redis_lagging_replica_failover(redis_cluster: RedisCluster, wait: int) -> None:
    """A replica that lags (stopped) when its master dies: without wait the
    master acknowledged what the replica never got, and it is lost; with
    wait=1 nothing was acknowledged that the replica lacks."""
    acked, lost = await _lagging_replica_loss(redis_cluster, wait=wait)
    print(f"redis cluster lagging replica, wait={wait}: acked={acked} lost={lost}")
    if wait:
        assert lost == 0


async def _masters(cluster: RedisCluster) -> list[RedisServer]:
    """The live nodes that are masters now."""
    out = []
    for node in cluster.nodes:
        if node.proc is None:
            continue
        r = aredis.Redis(host="127.0.0.1", port=node.port, protocol=2)
        try:
            role = await r.execute_command("ROLE")  # type: ignore[no-untyped-call]
        finally:
            await r.aclose()
        if role[0] in (b"master", "master"):
            out.append(node)
    return out


async def _entries_by_master(cluster: RedisCluster, prefix: str) -> dict[int, int]:
    """Stream entries of ``prefix``'s keys on each master (by port), from
    the masters themselves (a node's SCAN sees only its own slots)."""
    out: dict[int, int] = {}
    for node in await _masters(cluster):
        r = aredis.Redis(host="127.0.0.1", port=node.port, protocol=2)
        try:
            async for key in r.scan_iter(match=f"*{prefix}*", _type="STREAM"):
                out[node.port] = out.get(node.port, 0) + await r.xlen(key)
        finally:
            await r.aclose()
    return out


async def test_redis_group_partitions_spread_over_the_masters(redis_cluster: RedisCluster) -> None:
    """A group's keyed envelopes land on more than one master of the three
    (each partition in a slot of its own), and are each read back once."""
    prefix = f"sp{uuid.uuid4().hex[:8]}"
    t = RedisTransport(f"{redis_cluster.url}?prefix={prefix}&partitions=16")
    await t.start()
    try:
        await t.declare("g", ["spread.n"])
        total = 400
        await t.publish(
            [
                surge.Envelope(surge.new_id(), "spread.n", key=f"k{n}", body=b"%d" % n)
                for n in range(total)
            ]
        )
        placed = await _entries_by_master(redis_cluster, prefix)
        assert sum(placed.values()) == total
        assert len([n for n in placed.values() if n]) >= 2, placed
        seen: list[int] = []
        it = t.consume("g", prefetch=1000)
        async with asyncio.timeout(20):
            while len(seen) < total:
                batch = await anext(it)
                seen.extend(int(d.envelope.body or b"-1") for d in batch)
                await t.ack(batch)
        assert sorted(seen) == list(range(total))
        assert await t.stats("g") == surge.TransportStats(0, 0, 0, 0)
    finally:
        await t.close()


@pytest.mark.parametrize("copy", [None, b"999"], ids=["missing", "ahead"])
async def test_redis_publish_repairs_a_partition_slot_version_copy(
    redis_cluster: RedisCluster, copy: bytes | None
) -> None:
    """A partition slot's copy of the registry version (checked by the
    publish script there) that a declare cut short never raised, or that is
    ahead of the prefix's (its master lost its data), is set right by the
    next publish, which then goes through."""
    prefix = f"vc{uuid.uuid4().hex[:8]}"
    t = RedisTransport(f"{redis_cluster.url}?prefix={prefix}&partitions=4")
    r = aredis.RedisCluster.from_url(redis_cluster.url)
    await t.start()
    try:
        await t.declare("g", ["copy.n"])
        for p in range(4):
            key = f"{{{prefix}:{p}}}:groups:v"
            await (r.delete(key) if copy is None else r.set(key, copy))
        await t.publish(
            [surge.Envelope(surge.new_id(), "copy.n", key=f"k{n}", body=b"x") for n in range(20)]
        )
        assert (await t.stats("g")).backlog == 20
        version = await r.get(f"{{{prefix}}}:groups:v")
        assert {await r.get(f"{{{prefix}:{p}}}:groups:v") for p in range(4)} == {version}
    finally:
        await t.close()
        await r.aclose()


async def test_redis_cluster_refuses_a_prefix_of_the_one_slot_layout(
    redis_cluster: RedisCluster,
) -> None:
    """A prefix written by the layout that kept every key in one slot (it
    recorded no layout) is refused with the way out, not read as empty."""
    prefix = f"ol{uuid.uuid4().hex[:8]}"
    r = aredis.RedisCluster.from_url(redis_cluster.url)
    try:
        await r.set(f"{{{prefix}}}:partitions", 8)
        t = RedisTransport(f"{redis_cluster.url}?prefix={prefix}")
        with pytest.raises(surge.ConfigurationError, match=r"layout 1.*another prefix"):
            await t.start()
        assert t.closed
    finally:
        await r.delete(f"{{{prefix}}}:partitions")
        await r.aclose()


def test_wait_option_is_read_from_the_url() -> None:
    """``?wait=1&wait_timeout=0.5`` reach the options; a negative wait is refused."""
    t = RedisTransport("redis://127.0.0.1:1/0?wait=1&wait_timeout=0.5")
    assert (t._options.wait, t._options.wait_timeout) == (1, 0.5)
    with pytest.raises(surge.ConfigurationError, match="wait"):
        RedisTransport("redis://127.0.0.1:1/0?wait=-1")
