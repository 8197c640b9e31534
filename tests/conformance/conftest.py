"""The transports the conformance suite runs against.

To add a transport, write a ``Case`` and add it to ``CASES`` (see those
below): ``url`` gives the URL of a fresh, empty store for one test (it gets
pytest's ``tmp_path`` and may call ``pytest.skip`` when, say, no server
listens), ``options`` go to every ``open_transport`` call, and the flags say
which optional promises the transport makes, so tests of the others skip::

    CASES.append(Case("redis", url=_redis_url, realtime=True, leases=True,
                      lease_options={"lease": 0.5}, shared=True))

Every test gets ``transport_factory``: a ``Factory`` whose ``open(**options)``
opens a transport on the test's store with the test's clock, ``started()``
one that is closed on exit, and ``app()`` an App on a new transport.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import surge
from surge.transports import open_transport, register

from .._servers import (
    drop_postgres_schema,
    shared_amqp_url,
    shared_nats_cluster_url,
    shared_nats_url,
    shared_postgres_url,
    shared_redis_cluster_url,
    shared_redis_url,
)


@dataclass(frozen=True)
class Case:
    """One transport under test, and which optional promises it makes."""

    id: str
    url: Callable[[Path], str]
    options: dict[str, Any] = field(default_factory=dict)
    realtime: bool = False
    """Runs on a real loop and clock (sockets, servers), not the virtual one."""
    shared: bool = False
    """Two transports opened on one URL see the same groups and events."""
    leases: bool = False
    """A delivery its consumer never settles comes back (visibility timeout)."""
    lease_options: dict[str, Any] = field(default_factory=dict)
    """Options that make a lease short and never extended, for that test."""
    bounded: bool = False
    """``publish_nowait`` raises Overloaded past ``bounded_options``' capacity."""
    bounded_options: dict[str, Any] = field(default_factory=dict)
    bounded_capacity: int = 0
    partitioned: bool = False
    """Keeps one key in order across consumers (partitions with owners)."""
    counts_settled: bool = False
    """``stats`` counts every process's settled attempts and its consumers
    (``TransportStats.settled`` and ``consumers``; None elsewhere)."""
    order_options: dict[str, Any] = field(default_factory=dict)
    """Options for the cross-consumer order test: short leases, so that
    ownership moves quickly when a consumer joins or leaves."""
    cleanup: Callable[[str], None] | None = None
    """Removes the store of ``url``'s result after the test (a server's)."""
    transaction: Callable[[str, bool], AbstractAsyncContextManager[Any]] | None = None
    """For a transport with an outbox (``surge.Outbox``): ``transaction(url,
    commit)`` gives a driver connection to the store of ``url`` inside an
    open transaction, committed (``commit``) or rolled back on exit."""
    quick: frozenset[str] | None = None
    """When set, only these tests run by default; the case's others are
    ``slow`` and ``soak`` (run them with ``-m soak``): the clustered cases
    repeat the single-node ones at several times the cost, and CI's time
    goes to what a cluster can break (replication, node lists, slots)."""


# The transport written only from docs/transports.md: the core protocol, no
# capability (tests/conformance/_minimal.py).
register("minimal", "tests.conformance._minimal", "MinimalTransport")

CASES: list[Case] = [
    Case("minimal", url=lambda _: "minimal://"),
    Case(
        "memory",
        url=lambda _: "memory://",
        bounded=True,
        bounded_options={"capacity": 2},
        bounded_capacity=2,
    ),
    Case(
        "sqlite",
        url=lambda tmp: f"sqlite:///{tmp / 'conformance.db'}",
        options={"synchronous": "normal"},
        shared=True,
        leases=True,
        lease_options={"lease": 2.0, "heartbeat": 0},
        partitioned=True,
        order_options={"lease": 1.0},
        counts_settled=True,
    ),
]

# NATS JetStream: one nats-server for the whole session, started on first use
# by tests/_servers.py, and a fresh stream (named in the URL) per test.
CASES.append(
    Case(
        "nats",
        url=shared_nats_url,
        realtime=True,
        shared=True,
        leases=True,
        lease_options={"lease": 1.0, "extend_leases": False},
        partitioned=True,
        order_options={"lease": 2.0},
    )
)

# The conformance tests a cluster runs by default (names, or names with
# their parameters after the case's id): one or two for each thing a
# cluster changes, each writing replicated state or crossing nodes: an app
# end to end (publish, consume, ack); partitions and per-key order across
# consumers (partition consumers or streams, leases in a replicated bucket
# or a slot); leases (a dead consumer's deliveries come back), fences and
# hand-backs; dedup; the state bucket; retries (a delayed NAK or the
# delayed set); dead letters (their own stream, replay and purge); request
# and reply (an ephemeral inbox group). 55 s on both clusters on a loaded
# 2-core machine (load average 5-10: 43 s NATS, of which 15 s the order
# test; 12 s Redis), where the four tests before took about 12 s. The whole
# suite: -m soak -k cluster (138 s on the NATS cluster, 32 s on the Redis
# one, same load).
CLUSTER_QUICK = frozenset(
    {
        "test_publish_and_handle_each_once[bare]",
        "test_partitions_and_filled_keys",
        "test_key_order_across_consumers",
        "test_unsettled_delivery_returns_when_consumer_is_gone",
        "test_release_keeps_attempt_and_place",
        "test_a_delivery_held_past_its_fence_is_fenced",
        "test_dedup_drops_repeated_derived_ids",
        "test_state_round_trip",
        "test_nack_redelivers_after_delay",
        "test_dead_letter_replay_purge",
        "test_request_reply[bare]",
    }
)

# A three-node NATS cluster (routes, JetStream, streams and buckets with
# replicas=3), one for the session, a fresh stream per test.
CASES.append(
    Case(
        "nats-cluster",
        url=shared_nats_cluster_url,
        realtime=True,
        shared=True,
        leases=True,
        lease_options={"lease": 1.0, "extend_leases": False},
        partitioned=True,
        order_options={"lease": 2.0},
        quick=CLUSTER_QUICK,
    )
)

# Redis Streams: one redis-server for the whole session, started on first use
# by tests/_servers.py, and a fresh key prefix (named in the URL) per test.
CASES.append(
    Case(
        "redis",
        url=shared_redis_url,
        realtime=True,
        shared=True,
        leases=True,
        lease_options={"lease": 0.5, "heartbeat": 0},
        partitioned=True,
        order_options={"lease": 1.0},
    )
)

# A Redis Cluster (3 masters with a replica each), one for the session, a
# fresh prefix per test (its keys in a slot of its own and one per partition).
CASES.append(
    Case(
        "redis-cluster",
        url=shared_redis_cluster_url,
        realtime=True,
        shared=True,
        leases=True,
        lease_options={"lease": 0.5, "heartbeat": 0},
        partitioned=True,
        order_options={"lease": 1.0},
        quick=CLUSTER_QUICK,
    )
)


# PostgreSQL: one cluster for the whole session (initdb + pg_ctl, started on
# first use by tests/_servers.py), and a fresh schema (named in the URL) per
# test, dropped after it.
@asynccontextmanager
async def _pg_transaction(url: str, commit: bool) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(url.split("?", 1)[0])
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            yield conn
        finally:
            if commit:
                await tx.commit()
            else:
                await tx.rollback()
    finally:
        await conn.close()


CASES.append(
    Case(
        "postgres",
        url=shared_postgres_url,
        realtime=True,
        shared=True,
        leases=True,
        lease_options={"lease": 1.0, "heartbeat": 0},
        partitioned=True,
        order_options={"lease": 1.0},
        counts_settled=True,
        cleanup=drop_postgres_schema,
        transaction=_pg_transaction,
    )
)
# RabbitMQ: one node for the whole session, started on first use by
# tests/_servers.py, and a fresh name prefix (in the URL) per test. No
# leases: RabbitMQ keeps a delivery with its consumer until that consumer's
# channel closes (a dead process's come back at once; see test_amqp.py).
# Partitions: single-active-consumer queues, shared out by gossip (lease =
# how long a silent member counts as alive).
CASES.append(
    Case(
        "amqp",
        url=shared_amqp_url,
        realtime=True,
        shared=True,
        partitioned=True,
        order_options={"lease": 1.0},
    )
)


class Factory:
    """Opens transports on one test's store, with the test's clock."""

    def __init__(self, case: Case, url: str, clock: surge.Clock) -> None:
        self.case = case
        self.url = url
        self.clock = clock
        self.opened: list[surge.Transport] = []

    def open(self, **options: Any) -> surge.Transport:
        """A new transport (not started) on this test's store."""
        t = open_transport(self.url, clock=self.clock, **{**self.case.options, **options})
        self.opened.append(t)
        return t

    @asynccontextmanager
    async def started(self, **options: Any) -> AsyncIterator[surge.Transport]:
        """A started transport, closed on exit."""
        t = self.open(**options)
        await t.start()
        try:
            yield t
        finally:
            await t.close()

    def app(self, name: str = "conf", **options: Any) -> surge.App:
        """An App on a new transport of this store (with the app's ``codec``, if given)."""
        codec = {"codec": options["codec"]} if "codec" in options else {}
        return surge.App(name, transport=self.open(**codec), clock=self.clock, **options)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run a test on the loop of the clock its transports were given, even
    when the test itself does not ask for ``clock``."""
    factory = pyfuncitem.funcargs.get("transport_factory")
    fn = pyfuncitem.obj
    if not isinstance(factory, Factory) or not inspect.iscoroutinefunction(fn):
        return None
    if not isinstance(factory.clock, surge.VirtualClock):
        return None  # realtime: the root conftest runs it on a plain loop
    names = pyfuncitem._fixtureinfo.argnames
    factory.clock.run(fn(**{name: pyfuncitem.funcargs[name] for name in names}))
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A case's tests outside its ``quick`` set are slow and soak (before
    ``-m 'not soak'`` deselects)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec is not None else None
        if not isinstance(case, Case) or case.quick is None:
            continue
        name: str = item.originalname  # type: ignore[attr-defined]
        rest = item.name[len(name) :].replace(f"[{case.id}-", "[").replace(f"[{case.id}]", "")
        if name not in case.quick and name + rest not in case.quick:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.soak)


def _param(case: Case) -> Any:
    return pytest.param(case, id=case.id, marks=[pytest.mark.realtime] if case.realtime else [])


@pytest.fixture(params=[_param(c) for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    c: Case = request.param
    return c


@pytest.fixture
def clock(case: Case) -> surge.Clock:
    """The virtual clock the test's loop runs on, or the real one."""
    return surge.RealClock() if case.realtime else surge.VirtualClock()


@pytest.fixture
def transport_factory(case: Case, clock: surge.Clock, tmp_path: Path) -> Iterator[Factory]:
    url = case.url(tmp_path)
    yield Factory(case, url, clock)
    if case.cleanup is not None:
        case.cleanup(url)
