"""Conditions over event streams: count, sequence, absence, each checked
against a brute-force reference over random streams."""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import surge
from surge import VirtualClock
from surge._event import Envelope
from surge.triggers._conditions import _Hit

from ._servers import shared_nats_url, shared_redis_url

T0 = 1_767_225_600.0


class A(surge.Event):
    user: int


class B(surge.Event):
    user: int


@dataclass(frozen=True)
class Ev:
    """One event of a stream, in arrival order."""

    seq: int
    role: int  # 0: A, 1: B
    key: str
    time: float
    id: str


Fired = tuple[str | None, float, tuple[str, ...]]


# --- brute-force references: no eviction, no cleverness ----------------------
def ref_count(stream: list[Ev], at_least: int, within: float) -> list[Fired]:
    out: list[Fired] = []
    since: dict[str, list[Ev]] = {}
    mark: dict[str, float] = {}
    for e in stream:
        if e.role != 0:
            continue
        wm = mark.get(e.key, -math.inf)
        if e.time <= wm - within:
            continue
        mark[e.key] = wm = max(wm, e.time)
        since.setdefault(e.key, []).append(e)
        window = sorted((x for x in since[e.key] if x.time > wm - within), key=_order)
        if len(window) >= at_least:
            out.append((e.key, e.time, tuple(x.id for x in window)))
            since[e.key] = []
    return out


def ref_sequence(stream: list[Ev], within: float) -> list[Fired]:
    out: list[Fired] = []
    pending: dict[str, list[Ev]] = {}
    mark: dict[str, float] = {}
    for e in stream:
        wm = mark.get(e.key, -math.inf)
        if e.time <= wm - within:
            continue
        mark[e.key] = wm = max(wm, e.time)
        if e.role == 0:
            pending.setdefault(e.key, []).append(e)
            continue
        cands = [a for a in pending.get(e.key, []) if wm - within < a.time <= e.time]
        if cands:
            first = min(cands, key=_order)
            out.append((e.key, e.time, (first.id, e.id)))
            pending[e.key] = []
    return out


def ref_absence(stream: list[Ev], within: float) -> list[Fired]:
    """For in-order streams: each A whose deadline passes with no later B of
    its key in ``[a.time, a.time + within)``."""
    out: list[Fired] = []
    for a in stream:
        if a.role != 0:
            continue
        answered = any(
            b.role == 1 and b.key == a.key and b.seq > a.seq and a.time <= b.time < a.time + within
            for b in stream
        )
        if not answered:
            out.append((a.key, a.time + within, (a.id,)))
    return out


def _order(e: Ev) -> tuple[float, int]:
    return (e.time, e.seq)


# --- the engines alone, with out-of-order event times ------------------------
def _feed(cond: surge.Condition, stream: list[Ev]) -> list[Fired]:
    engine = cond.engine()
    hits: list[_Hit | None] = [engine.feed(e.role, e.key, e.time, e.id) for e in stream]
    return [(h.key, h.time, h.ids) for h in hits if h is not None]


events = st.lists(
    st.tuples(st.integers(0, 1), st.sampled_from("xyz"), st.integers(0, 40)),
    max_size=40,
)


def _stream(raw: list[tuple[int, str, int]], roles: int = 2) -> list[Ev]:
    return [Ev(i, r % roles, k, float(t), f"e{i}") for i, (r, k, t) in enumerate(raw)]


@settings(max_examples=200, deadline=None)
@given(raw=events, at_least=st.integers(1, 4), within=st.integers(1, 15))
def test_count_engine_matches_reference(
    raw: list[tuple[int, str, int]], at_least: int, within: int
) -> None:
    """count() fires exactly when the reference does, out-of-order times included."""
    stream = _stream(raw, roles=1)
    cond = surge.count(A, by="user", at_least=at_least, within=within)
    assert _feed(cond, stream) == ref_count(stream, at_least, within)


@settings(max_examples=200, deadline=None)
@given(raw=events, within=st.integers(1, 15))
def test_sequence_engine_matches_reference(raw: list[tuple[int, str, int]], within: int) -> None:
    """sequence() fires exactly when the reference does, out-of-order times included."""
    stream = _stream(raw)
    cond = surge.sequence(A, B, by="user", within=within)
    assert _feed(cond, stream) == ref_sequence(stream, within)


# --- through an App on the virtual clock -------------------------------------
async def _run(
    cond: surge.Condition, plan: list[tuple[int, int, int]]
) -> tuple[list[Ev], list[Fired], list[float]]:
    """Publish ``plan`` (gap, role, user) on the virtual clock; what fired."""
    clock = _running_clock
    app = surge.App("c", clock=clock)
    got: list[Fired] = []
    at: list[float] = []

    @app.when(cond, name="cond")
    async def met(m: surge.ConditionMet) -> None:
        assert m.condition == "cond"
        got.append((m.key, m.time, m.ids))
        at.append(clock.time())

    stream: list[Ev] = []
    async with app:
        for i, (gap, role, user) in enumerate(plan):
            await clock.sleep(gap)
            ev = (A, B)[role](user=user)
            eid = await app.publish(ev)
            stream.append(Ev(i, role, str(user), clock.time(), eid))
        await app.drain()
    return stream, got, at


_running_clock = VirtualClock()

plans = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 2)),
    max_size=30,
)


def _on_clock(
    cond: surge.Condition, plan: list[tuple[int, int, int]]
) -> tuple[list[Ev], list[Fired], list[float]]:
    global _running_clock
    _running_clock = VirtualClock(start=T0)
    return _running_clock.run(_run(cond, plan))


@settings(max_examples=50, deadline=None)
@given(plan=plans, at_least=st.integers(1, 4), within=st.integers(1, 8))
def test_count_in_an_app_matches_reference(
    plan: list[tuple[int, int, int]], at_least: int, within: int
) -> None:
    """Through an App, count() emits one ConditionMet per reference firing."""
    cond = surge.count(A, by="user", at_least=at_least, within=within)
    stream, got, _ = _on_clock(cond, plan)
    assert got == ref_count(stream, at_least, within)


@settings(max_examples=50, deadline=None)
@given(plan=plans, within=st.integers(1, 8))
def test_sequence_in_an_app_matches_reference(
    plan: list[tuple[int, int, int]], within: int
) -> None:
    """Through an App, sequence() emits one ConditionMet per reference firing."""
    cond = surge.sequence(A, B, by="user", within=within)
    stream, got, _ = _on_clock(cond, plan)
    assert got == ref_sequence(stream, within)


@settings(max_examples=50, deadline=None)
@given(plan=plans, within=st.integers(1, 8))
def test_absence_in_an_app_matches_reference(plan: list[tuple[int, int, int]], within: int) -> None:
    """Through an App, absence() fires at A's time + within, exactly for the
    A's no B of their key answered in time."""
    cond = surge.absence(A, B, by="user", within=within)
    stream, got, at = _on_clock(cond, plan)
    expected = ref_absence(stream, within)
    assert sorted(got) == sorted(expected)
    assert at == pytest.approx(sorted(t for _, t, _ in expected), abs=1e-6)


async def test_absence_fires_at_the_deadline(clock: VirtualClock) -> None:
    """An order with no payment fires exactly `within` after it; a paid one never."""
    app = surge.App("shop", clock=clock)
    fired: list[tuple[str | None, float]] = []

    @app.when(surge.absence(A, B, by="user", within=60))
    async def unpaid(m: surge.ConditionMet) -> None:
        fired.append((m.key, clock.time() - T0))

    t0 = clock.time() - T0
    async with app:
        await app.publish(A(user=1))
        await app.publish(A(user=2))
        await clock.sleep(59)
        await app.publish(B(user=2))
        await clock.sleep(10)
    assert [key for key, _ in fired] == ["1"]
    assert fired[0][1] == pytest.approx(t0 + 60, abs=1e-6)


async def test_count_without_key_counts_every_event(clock: VirtualClock) -> None:
    """by=None puts every event in one window; the derived event has key None."""
    app = surge.App("c", clock=clock)
    fired: list[surge.ConditionMet] = []

    @app.when(surge.count(A, at_least=2, within=10))
    def burst(m: surge.ConditionMet) -> None:
        fired.append(m)

    async with app:
        first = await app.publish(A(user=1))
        second = await app.publish(A(user=2))
        await app.drain()
    assert [(m.key, m.ids) for m in fired] == [(None, (first, second))]


class FailOnce(surge.Middleware):
    """Fails the first publish of a ConditionMet, as a lost connection would."""

    def __init__(self) -> None:
        self.failed = False

    def before_publish(self, envelope: Envelope) -> None:
        if envelope.topic.startswith("_surge.when.") and not self.failed:
            self.failed = True
            raise ConnectionError("transport went away")


async def test_a_redelivered_event_is_not_counted_twice(clock: VirtualClock) -> None:
    """When publishing the derived event fails, the redelivered source event
    republishes it instead of being counted again."""
    app = surge.App(
        "c", clock=clock, middleware=[FailOnce()], retry=surge.Retry(attempts=3, backoff=0.1)
    )
    fired: list[tuple[str, ...]] = []

    @app.when(surge.count(A, by="user", at_least=2, within=100))
    async def twice(m: surge.ConditionMet) -> None:
        fired.append(m.ids)

    async with app:
        ids = [await app.publish(A(user=1)) for _ in range(3)]
        await app.drain()
    assert fired == [(ids[0], ids[1])]


@pytest.mark.realtime
async def test_a_redelivery_republishes_the_firing_kept_in_the_store(tmp_path: Path) -> None:
    """On a partitioned transport the firing an event made is saved with the
    key's state: retried after the save, the event republishes it instead
    of being counted again."""
    app = surge.App(
        "c",
        transport=f"sqlite:///{tmp_path / 'r.db'}",
        middleware=[FailOnce()],
        retry=surge.Retry(attempts=3, backoff=0.01),
    )
    fired: list[tuple[str, ...]] = []

    @app.when(surge.count(A, by="user", at_least=2, within=100))
    async def twice(m: surge.ConditionMet) -> None:
        fired.append(m.ids)

    async with app:
        ids = [await app.publish(A(user=1)) for _ in range(3)]
        await asyncio.wait_for(app.drain(), 10)
    assert fired == [(ids[0], ids[1])]


def test_absence_answers_are_half_open_in_event_time() -> None:
    """Only a B with a.time <= b.time < a.time + within answers an A: one at
    the deadline or older than the A does not."""
    engine = surge.absence(A, B, by="user", within=10).engine()
    for a_id, key in (("late", "k1"), ("early", "k2"), ("ok", "k3")):
        engine.feed(0, key, 100.0, a_id)
    engine.feed(1, "k1", 110.0, "b1")  # at the deadline: too late
    engine.feed(1, "k2", 99.0, "b2")  # before the A
    engine.feed(1, "k3", 109.5, "b3")
    assert engine.check("k1", "late", 110.0) == _Hit("k1", 110.0, ("late",))
    assert engine.check("k2", "early", 110.0) == _Hit("k2", 110.0, ("early",))
    assert engine.check("k3", "ok", 110.0) is None
    assert engine.check("k1", "late", 110.0) is None  # a second check: already fired


def test_state_is_bounded_by_an_lru_over_keys() -> None:
    """Past max_keys, the least recently seen key's window is forgotten."""
    engine = surge.count(A, by="user", at_least=2, within=100, max_keys=2).engine()
    assert engine.feed(0, "k1", 1.0, "a") is None
    assert engine.feed(0, "k2", 2.0, "b") is None
    assert engine.feed(0, "k3", 3.0, "c") is None  # evicts k1
    assert engine.feed(0, "k1", 4.0, "d") is None  # k1 starts over (evicts k2)
    assert engine.feed(0, "k3", 5.0, "e") == _Hit("k3", 5.0, ("c", "e"))
    assert engine.evicted_keys == 2
    assert len(engine.keys) == 2


def test_pending_events_per_key_are_bounded() -> None:
    """Past max_events pending A's of one key, the oldest is dropped."""
    engine = surge.sequence(A, B, by="user", within=100, max_events=2).engine()
    for i, t in enumerate((1.0, 2.0, 3.0)):
        engine.feed(0, "k", t, f"a{i}")
    assert engine.dropped_events == 1
    assert engine.feed(1, "k", 4.0, "b") == _Hit("k", 4.0, ("a1", "b"))


def test_bad_conditions_are_refused() -> None:
    """Conditions check their arguments, and app.when wants a condition."""
    with pytest.raises(surge.ConfigurationError, match="at_least"):
        surge.count(A, at_least=0, within=1)
    with pytest.raises(surge.ConfigurationError, match="within"):
        surge.sequence(A, B, within=0)
    with pytest.raises(surge.ConfigurationError, match="different"):
        surge.absence(A, A, within=1)
    with pytest.raises(surge.ConfigurationError, match="A has no order"):
        surge.sequence(A, B, by="order", within=1)
    with pytest.raises(surge.ConfigurationError, match="Event subclass"):
        surge.count(int, at_least=1, within=1)  # type: ignore[arg-type]
    with pytest.raises(surge.ConfigurationError, match=r"surge\.count"):
        surge.App("c").when("A then B")  # type: ignore[arg-type]
    with pytest.raises(surge.ConfigurationError, match="keyed by 'order'"):
        surge.count(Ordered, by="user", at_least=2, within=1)


class Ordered(surge.Event):
    """Routed by its order across processes, so not countable by user."""

    __key__ = "order"
    order: int
    user: int


@pytest.mark.realtime
async def test_a_keys_state_follows_it_from_process_to_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a partitioned transport a key's window is in the state store: an
    app that starts afresh (another process) completes what one before it
    began, and an event routed by another key than the condition's is
    warned about."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    fired: list[tuple[str | None, int]] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def make() -> surge.App:
        app = surge.App("k", transport=url)

        @app.when(surge.count(A, by="user", at_least=3, within=60), name="three")
        async def three(m: surge.ConditionMet) -> None:
            fired.append((m.key, len(m.ids)))
            done.set_result(None)

        return app

    first = make()
    async with first:
        await first.publish(A(user=7))
        await first.publish(A(user=7))
        await asyncio.wait_for(first.drain(), 10)
    assert fired == []
    second = make()
    async with second:
        await second.publish(A(user=7), key="elsewhere")
        await asyncio.wait_for(done, 10)
    assert fired == [("7", 3)]
    assert "routed by key 'elsewhere'" in caplog.text


def _durable_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'c.db'}"
    return shared_redis_url() if kind == "redis" else shared_nats_url()


@pytest.mark.realtime
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_conditions_on_durable_transports(tmp_path: Path, kind: str) -> None:
    """On encoding transports, events, the absence check (a delayed publish)
    and ConditionMet all travel as bytes: the unpaid order fires, the paid
    one does not."""
    app = surge.App("d", transport=_durable_url(kind, tmp_path))
    fired: list[str | None] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @app.when(surge.absence(A, B, by="user", within=0.3))
    async def unpaid(m: surge.ConditionMet) -> None:
        fired.append(m.key)
        if m.key == "1" and not done.done():
            done.set_result(None)

    async with app:
        # One call stamps the three times together: B(user=2) must come
        # within 0.3 s of A(user=2) by its time, and an awaited publish of A
        # took 0.43 s once at load 15 (the app's first publish), which made
        # B late and the absence rightly fire for user 2.
        await app.publish_many([A(user=2), B(user=2), A(user=1)])  # A(user=1)'s deadline last
        await asyncio.wait_for(done, 10)
    assert fired == ["1"]


async def test_sources_published_with_and_without_envelope_keys(clock: VirtualClock) -> None:
    """Source events may carry envelope keys or not; the condition sees them all."""
    app = surge.App("c", clock=clock)
    fired: list[str | None] = []

    @app.when(surge.count(A, by="user", at_least=3, within=10))
    async def three(m: surge.ConditionMet) -> None:
        fired.append(m.key)

    async with app:
        await app.publish(A(user=1), key="1")
        await app.publish(A(user=1))
        await app.publish(A(user=1), key="1")
        await asyncio.wait_for(app.drain(), 60)
    assert fired == ["1"]


@pytest.mark.realtime
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_stalled_owners_state_save_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """An app stalls (its loop blocked) between loading a key's state and
    saving it; meanwhile another takes the partition over and takes the
    key's events in. The stalled save is refused (FencedState), so the key
    keeps the other's window: the third event fires with all three."""
    # Not postgres: there a loop blocked inside its partition round's
    # transaction holds the group's rows, and the other app cannot take the
    # partition over until it resumes (postgres's fenced save is in the
    # conformance suite, on one transport).
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'f.db'}?lease=1"
    else:
        url = _durable_url(kind, tmp_path) + "&lease=1"
    fired: list[tuple[str, ...]] = []
    three = threading.Event()
    went_on = threading.Event()

    def make() -> surge.App:
        app = surge.App("f", transport=url)

        @app.when(surge.count(A, by="user", at_least=3, within=60), name="three")
        async def on_three(m: surge.ConditionMet) -> None:
            fired.append(m.ids)
            three.set()

        return app

    def other() -> None:
        """The other process: takes the partition over once the lease ran out."""

        async def run() -> None:
            app = make()
            saves = 0
            held = surge.capabilities_of(app.transport).fenced_state
            assert held is not None
            save = held.save_state_held

            async def counted(key: str, value: bytes, d: surge.Delivery) -> bool:
                nonlocal saves
                ok: bool = await save(key, value, d)
                saves += ok
                if saves == 2:
                    went_on.set()
                return ok

            monkeypatch.setattr(app.transport, "save_state_held", counted)
            async with app:
                await asyncio.get_running_loop().run_in_executor(None, three.wait, 30)

        asyncio.run(run())

    stalled = make()
    thread = threading.Thread(target=other)
    held = surge.capabilities_of(stalled.transport).fenced_state
    assert held is not None
    first = held.save_state_held
    refused: list[bool] = []

    async def stall_once(key: str, value: bytes, d: surge.Delivery) -> bool:
        if thread.ident is None:
            thread.start()
            # The loop blocked: no lease renewed until the other went on.
            assert went_on.wait(30), "the other app did not take the key's events"
            ok: bool = await first(key, value, d)
            refused.append(not ok)
            return ok
        ok = await first(key, value, d)
        return ok

    monkeypatch.setattr(stalled.transport, "save_state_held", stall_once)
    async with stalled:
        # One write: both are stored before the stalled app takes the first.
        ids = await stalled.publish_many([A(user=7), A(user=7)])
        await asyncio.get_running_loop().run_in_executor(None, went_on.wait, 30)
        ids.append(await stalled.publish(A(user=7)))
        await asyncio.get_running_loop().run_in_executor(None, three.wait, 30)
    await asyncio.get_running_loop().run_in_executor(None, thread.join, 30)
    assert fired == [tuple(ids)]
    assert refused == [True]
