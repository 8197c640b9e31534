"""The RabbitMQ transport beyond the conformance suite: what only it does."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiormq
import pytest

import surge
from surge._clock import RealClock
from surge._transport import capabilities_of
from surge.transports import open_transport
from surge.transports.amqp import AmqpTransport
from surge.transports.amqp._link import LOST, Link

from ._servers import rabbit_server, shared_amqp_url, shared_rabbit
from .conformance._helpers import Item, Reader, env, number

pytestmark = pytest.mark.realtime


def _prefix(url: str) -> str:
    return url.split("prefix=", 1)[1]


async def test_bytes_published_straight_to_a_queue_are_dead_lettered() -> None:
    """A message that is not an envelope is dead-lettered on its first delivery, with why."""
    url = shared_amqp_url()
    app = surge.App("poison", transport=open_transport(url))
    seen: list[int] = []

    @app.on(Item)
    async def handle(ev: Item) -> None:
        seen.append(ev.n)

    async with app:
        conn = await aiormq.connect(url.split("?")[0])
        ch = await conn.channel(publisher_confirms=True)
        (group,) = app.subscriptions
        queue = f"{_prefix(url)}.g.{group}"
        await ch.basic_publish(b"\x00not an envelope", routing_key=queue)
        await conn.close()
        await app.publish(Item(n=1))
        await app.drain()
        dead = await app.dead_letters()
        assert len(dead) == 1
        assert dead[0].error_type == "DecodeError"
        assert dead[0].attempts == 1
        assert dead[0].body == b"\x00not an envelope"
    assert seen == [1]


async def test_deliveries_of_a_closed_consumer_go_to_the_next() -> None:
    """What a consumer held unsettled when its channel closed is delivered again, attempt 2."""
    url = shared_amqp_url()
    first = open_transport(url, close_timeout=0.1)
    await first.start()
    await first.declare("g", ["conf.item"])
    await first.publish([env(1), env(2)])
    r1 = Reader(first, "g")
    held = await r1.take(2)
    assert [d.attempt for d in held] == [1, 1]
    await first.close()  # as if the process died: nothing settled
    second = open_transport(url)
    await second.start()
    try:
        await second.declare("g", ["conf.item"])
        r2 = Reader(second, "g")
        again = await r2.take(2)
        assert sorted(number(d) for d in again) == [1, 2]
        assert [d.attempt for d in again] == [2, 2]
        await second.ack(again)
        assert await r2.quiet(0.5)
        await r2.aclose()
    finally:
        await second.close()


async def test_state_is_the_last_value_saved() -> None:
    """Trigger state: load gives the last saved value, to another transport too."""
    url = shared_amqp_url()
    a, b = open_transport(url), open_transport(url)
    await a.start()
    await b.start()
    try:
        assert await a.load_state("trigger:x") is None  # type: ignore[attr-defined]
        await a.save_state("trigger:x", b"1.0")  # type: ignore[attr-defined]
        await a.save_state("trigger:x", b"2.0")  # type: ignore[attr-defined]
        assert await b.load_state("trigger:x") == b"2.0"  # type: ignore[attr-defined]
        assert await b.load_state("trigger:x") == b"2.0"  # type: ignore[attr-defined]
    finally:
        await a.close()
        await b.close()


async def test_saves_racing_a_new_state_queue_are_not_refused() -> None:
    """Eight processes save one key's state at once, its quorum queue new:
    RabbitMQ nacks a publish to a quorum queue that another channel's
    declare created and that is not running yet (seen: 22-53 'trigger could
    not save its slot' a stop-soak run). Such a refusal is sent again, so
    every save lands and the value is one of them."""
    url = shared_amqp_url()
    ts = [open_transport(url) for _ in range(8)]
    await asyncio.gather(*(t.start() for t in ts))
    try:
        for round_ in range(15):
            key = f"trigger:race{round_}"
            await asyncio.gather(
                *(t.save_state(key, b"%d" % i) for i, t in enumerate(ts))  # type: ignore[attr-defined]
            )
            assert await ts[0].load_state(key) in {b"%d" % i for i in range(8)}  # type: ignore[attr-defined]
    finally:
        await asyncio.gather(*(t.close() for t in ts))


def test_bad_options_are_configuration_errors() -> None:
    """Options that cannot work are refused when the transport is made."""
    with pytest.raises(surge.ConfigurationError):
        open_transport("amqp://127.0.0.1/?partitions=x")
    with pytest.raises(surge.ConfigurationError):
        open_transport("amqp://127.0.0.1/?prefix=a b")


async def test_unreachable_broker_is_a_transport_error() -> None:
    """Starting against a port where nothing listens fails with TransportError."""
    from ._servers import free_port

    t = open_transport(f"amqp://guest:guest@127.0.0.1:{free_port()}/", connect_timeout=2.0)
    with pytest.raises(surge.TransportError):
        await t.start()


async def test_timeouts_in_the_url_are_the_transports() -> None:
    """``?publish_timeout=`` and ``?connect_timeout=`` in the URL bound a
    publish and a connection attempt (they were passed on to the client,
    which ignored them: the waits were the defaults, 60 s and 5 s)."""
    from .faults._proxy import Proxy

    loop = asyncio.get_running_loop()
    async with Proxy(shared_rabbit().port) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?{shared_amqp_url().split('?')[1]}"
        app = surge.App("timeouts", transport=open_transport(f"{url}&publish_timeout=0.5"))
        async with app:
            proxy.blackhole()  # nothing flows, and new connections are held
            start = loop.time()
            with pytest.raises(surge.TransportError):
                await app.publish(Num(n=1))
            published = loop.time() - start
            start = loop.time()
            with pytest.raises(surge.TransportError):
                await open_transport(f"{url}&connect_timeout=0.5").start()
            connected = loop.time() - start
            proxy.heal()
    assert 0.5 <= published < 2.0
    assert 0.5 <= connected < 2.0


async def test_a_stop_with_the_broker_silent_waits_one_close_bound_not_each() -> None:
    """Blackholed while a keyed consumer (a channel per partition it reads,
    the publisher's, the members') runs: the stop waits out one channel
    close, then skips the rest and cuts the connection's close short (each
    bound waited in turn took 5.3 s of a worker's exit)."""
    from .faults._proxy import Proxy

    loop = asyncio.get_running_loop()
    async with Proxy(shared_rabbit().port) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?{shared_amqp_url().split('?')[1]}"
        app = surge.App("silent-close", transport=url, shutdown_timeout=10.0)
        seen = asyncio.Event()

        @app.on(Num, key=lambda ev: str(ev.n))
        async def handle(ev: Num) -> None:
            seen.set()

        await app.start()
        try:
            await app.publish(Num(n=1))
            await asyncio.wait_for(seen.wait(), 30)
            proxy.blackhole()
            start = loop.time()
        finally:
            await app.stop()
        stopped = loop.time() - start
        proxy.heal()
    print(f"stopped in {stopped:.2f}s with the broker silent")
    assert stopped < 3.5, stopped


class _LogEvents(logging.Handler):
    """Sets an asyncio.Event when a surge.amqp log message containing a phrase arrives."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
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
def amqp_log() -> Iterator[_LogEvents]:
    handler = _LogEvents()
    logger = logging.getLogger("surge.amqp")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


class Num(surge.Event):
    __topic__ = "amqp.num"
    n: int


async def test_node_killed_under_load_loses_no_acked_event(
    tmp_path: Path, amqp_log: _LogEvents
) -> None:
    """A SIGKILLed node comes back with its quorum queues: publishes made during
    the outage wait and are confirmed, consuming resumes, nothing acked is lost."""
    with rabbit_server(tmp_path) as srv:
        transport = open_transport(f"{srv.url}?prefix=restart")
        app = surge.App("restart", transport=transport)
        handled: Counter[int] = Counter()
        marker = asyncio.Event()

        @app.on(Num)
        async def handle(ev: Num) -> None:
            handled[ev.n] += 1
            if ev.n == -1:
                marker.set()

        async with app:
            acked: list[int] = []

            async def load(start: int, stop: int) -> None:
                for n in range(start, stop):
                    await app.publish(Num(n=n))
                    acked.append(n)

            await load(0, 300)
            lost = amqp_log.expect("lost the connection")
            back = amqp_log.expect("reconnected")
            srv.kill()
            await asyncio.wait_for(lost.wait(), 10)
            assert not transport.healthy  # type: ignore[attr-defined]
            outage = asyncio.ensure_future(load(300, 400))  # waits for the node
            await asyncio.to_thread(srv.start)
            await asyncio.wait_for(back.wait(), 20)
            await app.publish(Num(n=-1))
            await asyncio.wait_for(marker.wait(), 20)
            await asyncio.wait_for(outage, 30)
            await app.drain()
            assert transport.healthy  # type: ignore[attr-defined]
        missing = sorted(set(acked) - set(handled))
        assert missing == [], f"lost: {missing[:10]}"


async def test_handler_longer_than_the_consumer_timeout_runs_once(
    tmp_path: Path, amqp_log: _LogEvents
) -> None:
    """The broker's consumer_timeout closes the channel of a long handler; the
    transport subscribes again and the delivery that comes back is not run twice."""
    with rabbit_server(tmp_path, consumer_timeout=1500) as srv:
        app = surge.App("long", transport=open_transport(f"{srv.url}?prefix=long"))
        runs: list[int] = []
        timed_out = amqp_log.expect("consumer_timeout closed the channel")
        came_back = amqp_log.expect("came back")

        @app.on(Num)
        async def slow(ev: Num) -> None:
            runs.append(ev.n)
            if ev.n == 1:
                await asyncio.wait_for(timed_out.wait(), 30)  # longer than the timeout
                await asyncio.wait_for(came_back.wait(), 30)  # and redelivered meanwhile

        async with app:
            await app.publish(Num(n=1))
            await app.publish(Num(n=2))
            await app.drain()
            assert await app.dead_letters() == []
            stats = await app.transport.stats(next(iter(app.subscriptions)))
            assert (stats.backlog, stats.pending) == (0, 0)
        assert sorted(runs) == [1, 2]


async def test_capabilities() -> None:
    """RabbitMQ routes keys (8 partitions), knows idleness and keeps state; it
    cannot hand deliveries back without counting an attempt, nor put directly."""
    t = AmqpTransport(shared_amqp_url())
    await t.start()
    try:
        caps = capabilities_of(t)
        assert caps.key_routing is t
        assert caps.partitions == 8
        assert caps.idle is t
        assert caps.state is t
        assert caps.hands_back is None
        assert caps.direct_put is None
    finally:
        await t.close()


class _ResettingProxy:
    """A TCP proxy to the node whose ``reset()`` aborts every connection
    through it (as a dropped network path does), and keeps listening."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def reset(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.reset()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_connection_reset_loses_no_acked_event(amqp_log: _LogEvents) -> None:
    """Connections reset under load (a proxy aborts them): the transport
    reconnects, publishes made meanwhile are confirmed, nothing acked is lost."""
    node = shared_amqp_url()
    base, query = node.split("?")
    port = int(base.rsplit(":", 1)[1].strip("/"))
    proxy = _ResettingProxy(port)
    await proxy.start()
    try:
        transport = open_transport(f"amqp://guest:guest@127.0.0.1:{proxy.port}/?{query}")
        app = surge.App("reset", transport=transport)
        handled: Counter[int] = Counter()

        @app.on(Num)
        async def handle(ev: Num) -> None:
            handled[ev.n] += 1

        async with app:
            acked: list[int] = []
            for round_ in range(3):
                back = amqp_log.expect("reconnected")
                for n in range(round_ * 100, round_ * 100 + 50):
                    await app.publish(Num(n=n))
                    acked.append(n)
                proxy.reset()
                for n in range(round_ * 100 + 50, round_ * 100 + 100):
                    await app.publish(Num(n=n))  # waits for the new connection
                    acked.append(n)
                await asyncio.wait_for(back.wait(), 20)
            await app.drain()
        missing = sorted(set(acked) - set(handled))
        assert missing == [], f"lost: {missing[:10]}"
    finally:
        await proxy.close()


def _first_step(coro: Coroutine[Any, Any, Any]) -> BaseException | str:
    """Run ``coro`` up to its first suspension, here and now (no other task
    runs meanwhile): the exception it raised, or what it did."""
    try:
        coro.send(None)
    except StopIteration:
        return "returned"
    except BaseException as exc:
        return exc
    coro.close()
    return "suspended"


async def test_a_dropped_connection_is_down_before_the_link_has_seen_it() -> None:
    """In the loop turns between a connection's drop and the link's watcher
    seeing it: the link is not connected and ``channel()`` raises a
    lost-connection error. (It raised aiormq's RuntimeError, which dropped
    publish_nowait's messages; once that was caught, a publisher that took
    the link for connected looped without yielding, and the watcher never
    ran.) Then ``wait_up()`` returns with the next connection."""
    link = Link(shared_rabbit().url, clock=RealClock())
    await link.open()
    try:
        conn = link._conn  # dropped from under the link below
        assert conn is not None
        first = link.generation
        seen: list[tuple[bool, BaseException | str]] = []
        # the watcher observes the drop the same way, and was first: this
        # callback runs after its observer's, before the watcher's task does
        conn.closing.add_done_callback(
            lambda _: seen.append((link.connected, _first_step(link.channel())))
        )
        await conn.close()
        await link.wait_up(timeout=20)
        [(connected, channel)] = seen
        assert not connected
        assert isinstance(channel, LOST), channel
        assert link.connected
        assert link.generation == first + 1
        ch = await link.channel()
        await ch.close()
    finally:
        await link.close()


@pytest.mark.parametrize("answers", [True, False])
async def test_a_stop_lets_a_partition_being_taken_finish(
    monkeypatch: pytest.MonkeyPatch, answers: bool
) -> None:
    """A stop while the balancer opens a partition's subscription lets that
    open finish rather than cancel it mid-call (aiormq then closed the
    channel with a warning, one or two a stop of 8 workers); a take that
    does not finish within the bound is cancelled."""
    from surge.transports.amqp import _partitions
    from surge.transports.amqp._partitions import Balancer

    monkeypatch.setattr(_partitions, "_TAKE_BOUND", 0.05, raising=False)
    entered = asyncio.Event()
    release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outcome: list[str] = []

    class Own:
        def plan(self, members: Any, me: str) -> tuple[list[int], list[int]]:
            return [0], []

    class FakeReader:
        name = "g"
        stopping = False
        own = Own()

        def give_up(self, part: int) -> None:
            raise AssertionError

        async def take(self, part: int) -> None:
            entered.set()
            try:
                await release
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise
            outcome.append("taken")

    class FakeMembers:
        me = "me"
        lease = 30.0

        async def join(self, name: str) -> None: ...

        async def leave(self, name: str) -> None:
            outcome.append("left")

        def changes(self) -> asyncio.Event:
            return asyncio.Event()

        def members(self, name: str) -> list[str]:
            return ["me"]

    reader = FakeReader()
    balancer = Balancer(reader, FakeMembers())  # type: ignore[arg-type]
    await balancer.start()
    await entered.wait()
    reader.stopping = True
    stopping = asyncio.ensure_future(balancer.stop())
    await asyncio.sleep(0)  # the stop is waiting now
    if answers and not release.done():
        release.set_result(None)
    await stopping
    assert outcome == (["taken", "left"] if answers else ["cancelled", "left"])


async def test_stats_ask_the_queues_at_once_and_read_the_dead_letters_once() -> None:
    """Admission asks every stage's stats ten times a second: the queues of
    a group (a shared one, one per partition) are asked on several channels
    at once, not one declare after another on one channel, and stats of
    several groups at once read the dead-letter queue once; a dead letter
    written here is counted at once."""
    t = AmqpTransport(shared_amqp_url(), partitions=8)
    await t.start()
    try:
        groups = ["a", "b", "c", "d"]
        for g in groups:
            await t.declare(g, [f"conf.{g}"])
        await t.publish([env(i, topic="conf.a") for i in range(3)])
        await t.flush()
        channel = t._link.channel
        in_flight = most = opened = 0

        async def counting(**kwargs: Any) -> aiormq.abc.AbstractChannel:
            nonlocal opened
            ch = await channel(**kwargs)
            opened += 1
            declare = ch.queue_declare

            async def timed(*args: Any, **kw: Any) -> Any:
                nonlocal in_flight, most
                in_flight += 1
                most = max(most, in_flight)
                try:
                    return await declare(*args, **kw)
                finally:
                    in_flight -= 1

            ch.queue_declare = timed  # type: ignore[method-assign]
            return ch

        t._link.channel = counting  # type: ignore[method-assign]
        reads = 0
        counts = t._dead.counts

        async def counted() -> dict[str, int]:
            nonlocal reads
            reads += 1
            return await counts()

        t._dead.counts = counted  # type: ignore[method-assign]
        found = await asyncio.gather(*(t.stats(g) for g in groups))
        assert [s.backlog for s in found] == [3, 0, 0, 0]
        assert 1 < most <= 8, most  # at once, on at most _PROBES channels
        assert reads == 1
        again = await asyncio.gather(*(t.stats(g) for g in groups))
        assert [s.dead for s in again] == [0, 0, 0, 0]
        assert reads == 1  # a second's worth of samples reads it once
        assert opened <= 8 + 1  # the probe channels are kept (and the read's)
        r = Reader(t, "a")
        (d, *rest) = await r.take(3)
        await t.ack(rest)
        record = surge.DeadLetter(
            id=d.envelope.id, group="a", topic=d.envelope.topic, key=None, headers=None,
            body=d.envelope.body or b"", error_type="ValueError", error="boom", traceback="",
            attempts=1, first_attempt_at=d.first_time, failed_at=0.0,
        )  # fmt: skip
        await t.dead_letter(d, record)
        assert (await t.stats("a")).dead == 1
        await r.aclose()
    finally:
        await t.close()
