"""Clustered brokers: a three-node NATS JetStream cluster (replicas=3) whose
stream leader is SIGKILLed under load. The conformance suite runs on the
cluster too (tests/conformance, case ``nats-cluster``).

The cluster is started once for the module (about a second); a test that
kills a node starts it again before it ends.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

import surge
from surge.transports.nats import NatsTransport

from ._failover import FailoverResult, run_failover
from ._servers import NatsCluster, NatsServer

pytestmark = pytest.mark.realtime


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[NatsCluster]:
    root = Path(tempfile.mkdtemp(prefix="surge-nats-cluster-"))
    cluster = NatsCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


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
    handling resumes. Per-key order is reported, not asserted: deliveries in
    flight from a dead consumer leader come back only after the lease, behind
    later events of their key (docs/guarantees.md, "Clusters")."""
    result = await _nats_failover(nats_cluster, tmp_path, keys=8, per_key=100)
    result.check(order=False)
    assert result.resumed < 10.0, result


def test_replicas_option_is_checked() -> None:
    """``?replicas=`` is read from the URL, and JetStream's 1-5 is enforced."""
    assert NatsTransport("nats://a:4222,b:4222?replicas=3").options.replicas == 3
    with pytest.raises(surge.ConfigurationError, match="replicas"):
        NatsTransport("nats://a:4222?replicas=7")
