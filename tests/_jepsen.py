"""A Jepsen-style crash checker for transports shared by several processes.

The recipe (any transport several processes share: sqlite, redis, nats)::

    result = await run_crash(url, tmp_path, events=20_000, kills=20, rate=800)
    print(result)          # the figures
    result.check()         # lost == 0, unexpected == 0, duplicates bounded, nothing pending

The transport needs ``stats(group)``; ``wait_idle()`` is used when it has
one. Give ``url`` a short visibility timeout (sqlite ``?lease=2``) so a killed
worker's deliveries come back quickly. ``rate`` paces the producers so the
kills (about one a second: a worker restart takes ~0.5 s) land while events
still flow. The pieces are public too: :func:`produce`,
:func:`kill_workers`, :func:`drain`, :func:`check`, and
:func:`publish_process` for kill loops against a publishing process.

What happens:

- A :class:`surge.cli._supervisor.Supervisor` runs ``workers`` processes of
  :data:`app` (this module, :data:`APP_REF`). Its handler appends a line
  ``h,<n>,<pid>,<attempt>`` to a records file *before returning*, so the ack
  always comes after the record. One ``write(2)`` of a short line with
  ``O_APPEND`` is atomic and survives the process's SIGKILL (the page cache
  is the kernel's, not the process's), so no fsync is needed: these tests
  kill processes, not the machine.
- Producers (in the test process) publish events numbered ``0..events-1``
  and keep the numbers whose ``publish`` returned: the acknowledged ones.
- A killer SIGKILLs a random worker at random moments while it handles
  (after it has recorded at least one event since its start) and the
  supervisor restarts it.
- Then the transport is drained (its stats show nothing in the backlog,
  pending or scheduled) and :func:`check` compares the records with the
  acknowledged numbers.

A duplicate is a second handling of an event. Only deliveries in flight at a
kill can be handled twice, and a worker holds at most ``prefetch``
unsettled deliveries, so ``kills * prefetch`` bounds the duplicates.

Keyed mode (:func:`run_keyed_crash`) checks per-key order across processes
the same way: the workers run :data:`keyed_app`, whose subscription is
keyed, and one producer per key publishes that key's events one after
another, so ``seq`` 0, 1, 2... is the key's publish order. A handling
appends ``s,<key>,<seq>,<pid>,<attempt>`` when it starts and ``h,...`` when
it ends, a little time apart, and the killer appends ``k,,-1,<pid>,0`` right
after each kill; on top of the figures above, :func:`key_order` walks the
lines in file order and finds any two processes handling one key at once
(but a killed one's cut handling) and any event of a key started out of
publish order (but a killed process's delivery rerun by the next owner).

The worker app reads its knobs from the environment (see
:func:`worker_env`), since the supervisor starts it by reference.

Waiting on another process's state (the records file, the transport's
stats) has no event to wait on in this process: :func:`wait_for` polls at a
short interval with a hard deadline, and is the only place here that does.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import surge
from surge.cli._supervisor import Supervisor
from surge.transports import TransportStats, open_transport

__all__ = (
    "APP_REF",
    "GROUP",
    "KEYED_APP_REF",
    "KEYED_GROUP",
    "CrashResult",
    "KeyOrder",
    "Keyed",
    "KeyedRecord",
    "KeyedResult",
    "Numbered",
    "Record",
    "app",
    "check",
    "drain",
    "group_stats",
    "key_order",
    "keyed_app",
    "kill_workers",
    "produce",
    "produce_keyed",
    "publish_process",
    "read_acked",
    "read_keyed_records",
    "read_records",
    "run_crash",
    "run_keyed_crash",
    "tally",
    "wait_for",
    "worker_env",
)


class Numbered(surge.Event):
    """An event that carries its unique number."""

    # a topic of its own: other test modules declare events named Numbered
    __topic__ = "jepsen.numbered"

    n: int


# --- the worker app ---------------------------------------------------------------
def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


CONCURRENCY = int(_env_float("JEPSEN_CONCURRENCY", 8))
PREFETCH = int(_env_float("JEPSEN_PREFETCH", 16))
_RECORDS = os.environ.get("JEPSEN_RECORDS")
_HOLD_FIRST = _env_float("JEPSEN_HOLD_FIRST", 0.0)  # seconds, on attempt 1 only
_DELAY = _env_float("JEPSEN_DELAY", 0.0)  # seconds of awaiting per event
_SPIN = int(_env_float("JEPSEN_SPIN", 0))  # pure-Python loop iterations per event
_STARTS = os.environ.get("JEPSEN_STARTS") == "1"  # also record when handling starts
_HOLD_EVERY_KILL = os.environ.get("SURGE_HOLD_EVERY_KILL") == "1"  # see kill_workers

app = surge.App("jepsen", shutdown_timeout=_env_float("JEPSEN_SHUTDOWN", 10.0))
GROUP = "jepsen.handle"
APP_REF = f"{__name__}:app"
"""The reference a supervisor starts workers of this app by."""
_fd: int | None = None


def _write(line: str) -> None:
    global _fd
    if _RECORDS is None:
        return
    if _fd is None:
        _fd = os.open(_RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, f"{line}\n".encode())


def _record(kind: str, n: int, attempt: int) -> None:
    _write(f"{kind},{n},{os.getpid()},{attempt}")


def spin(iterations: int) -> int:
    """A fixed amount of pure-Python CPU work (holds the GIL throughout)."""
    x = 0
    for i in range(iterations):
        x = (x + i * i) % 1_000_003
    return x


@app.on(Numbered, concurrency=CONCURRENCY, prefetch=PREFETCH)
async def handle(event: Numbered, ctx: surge.Context) -> None:
    if _STARTS:
        _record("s", event.n, ctx.attempt)
    if _HOLD_FIRST and ctx.attempt == 1:
        await asyncio.sleep(_HOLD_FIRST)
    if _DELAY:
        await asyncio.sleep(_DELAY)
    if _SPIN:
        spin(_SPIN)
    _record("h", event.n, ctx.attempt)


@app.after_stop  # once the late acks were tried (on_stop runs before they settle)
async def _report_stale() -> None:
    # Settles refused because the lease had passed to another consumer; a
    # transport that counts them says so (sqlite: ``stale_settles``).
    stale = getattr(app.transport, "stale_settles", None)
    if isinstance(stale, int):
        _record("x", stale, 0)


class Keyed(surge.Event):
    """An event of one of a few keys; ``seq`` numbers the key's events in
    publish order (0, 1, 2...)."""

    __topic__ = "jepsen.keyed"

    key: str
    seq: int


keyed_app = surge.App("jepsen-keyed", shutdown_timeout=_env_float("JEPSEN_SHUTDOWN", 10.0))
"""The keyed mode's worker app: one subscription keyed by ``Keyed.key``."""
KEYED_GROUP = "jepsen-keyed.handle_keyed"
KEYED_APP_REF = f"{__name__}:keyed_app"


@keyed_app.on(Keyed, key="key", concurrency=CONCURRENCY, prefetch=PREFETCH)
async def handle_keyed(event: Keyed, ctx: surge.Context) -> None:
    line = f"{event.key},{event.seq},{os.getpid()},{ctx.attempt}"
    _write(f"s,{line}")
    if _RECORDS is not None and _asked_to_hold(_RECORDS):
        # the killer asked this process to stay inside a handling until its
        # SIGKILL: it said so (above), and waits for it (see kill_workers' ``hold``)
        await asyncio.Event().wait()
    if _DELAY:
        # stands for a real handler's I/O: a handling spans time, so two
        # processes handling one key at once would show as overlapping lines
        await asyncio.sleep(_DELAY)
    _write(f"h,{line}")


def hold_path(records: str | Path, pid: int) -> str:
    """The file that asks worker ``pid`` to hold its next keyed handling open."""
    return f"{records}.hold.{pid}"


def held_path(records: str | Path, pid: int) -> str:
    """The file worker ``pid`` writes once it holds a handling open."""
    return f"{records}.held.{pid}"


def _asked_to_hold(records: str) -> bool:
    """Whether the killer asked this process to hold a handling open; if so,
    it answers that it does (a local file's existence: microseconds)."""
    pid = os.getpid()
    if not os.path.exists(hold_path(records, pid)):
        return False
    _touch(held_path(records, pid))
    return True


def _touch(path: str) -> None:
    Path(path).touch()


def worker_env(
    records: Path,
    *,
    concurrency: int = 8,
    prefetch: int = 16,
    hold_first: float = 0.0,
    delay: float = 0.0,
    spin: int = 0,
    starts: bool = False,
    shutdown_timeout: float = 10.0,
) -> dict[str, str]:
    """The environment for workers of :data:`app` (for ``Supervisor(env=)``)."""
    env = dict(os.environ)
    env.update(
        JEPSEN_RECORDS=str(records),
        JEPSEN_CONCURRENCY=str(concurrency),
        JEPSEN_PREFETCH=str(prefetch),
        JEPSEN_HOLD_FIRST=str(hold_first),
        JEPSEN_DELAY=str(delay),
        JEPSEN_SPIN=str(spin),
        JEPSEN_STARTS="1" if starts else "0",
        JEPSEN_SHUTDOWN=str(shutdown_timeout),
    )
    return env


# --- records --------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One line of the records file: ``kind`` is ``h`` (handled), ``s``
    (started) or ``x`` (stale settles counted by the worker at its stop: ``n``)."""

    kind: str
    n: int
    pid: int
    attempt: int


def read_records(path: Path, kind: str | None = "h") -> list[Record]:
    """The records in ``path`` (of one ``kind``, or all when None)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        k, n, pid, attempt = line.split(",")
        if kind is None or k == kind:
            out.append(Record(k, int(n), int(pid), int(attempt)))
    return out


@dataclass(frozen=True)
class KeyedRecord:
    """One line of a keyed run's records file: ``s`` or ``h`` (``pid``
    started or ended handling event ``seq`` of ``key``, delivery
    ``attempt``), or ``k`` (the test SIGKILLed ``pid``, written right after
    the kill; ``key`` empty, ``seq`` -1)."""

    kind: str
    key: str
    seq: int
    pid: int
    attempt: int


def read_keyed_records(path: Path) -> list[KeyedRecord]:
    """The lines of a keyed run's records file, in file order."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        kind, key, seq, pid, attempt = line.split(",")
        out.append(KeyedRecord(kind, key, int(seq), int(pid), int(attempt)))
    return out


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def read_acked(path: Path) -> list[int]:
    """Numbers recorded (one per line) by a publisher after ``publish`` returned."""
    if not path.exists():
        return []
    # a SIGKILL can cut the last line short: only whole lines count
    text = path.read_text()
    lines = text.split("\n")
    return [int(x) for x in lines[:-1] if x]


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float,
    interval: float = 0.02,
    what: str = "condition",
) -> float:
    """Poll ``predicate`` until true; seconds taken. Raises TimeoutError."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        ok = predicate()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return loop.time() - start
        if loop.time() - start > timeout:
            raise TimeoutError(f"{what} did not hold within {timeout}s")
        await asyncio.sleep(interval)


async def stop_process(pid: int, sqlite_file: Path | None = None) -> None:
    """SIGSTOP ``pid``; with ``sqlite_file``, at a moment it holds no write
    lock on it. A process frozen inside a write transaction stalls every
    writer of the file until it resumes or dies (SQLite's lock cannot be
    taken from it: docs/guarantees.md), a fault other than a stalled
    worker's. While stopped it cannot take the lock, and the other writers
    hold it a transaction at a time: if it is not free within 0.5 s, the
    stopped one holds it; resume it and stop it again. (No notification
    exists for a flock being given back: a short bounded poll.)"""
    if sqlite_file is None:
        os.kill(pid, signal.SIGSTOP)
        return
    fd = os.open(f"{sqlite_file}-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(40):
            os.kill(pid, signal.SIGSTOP)
            for _ in range(50):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                    continue
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.05)
        raise AssertionError(f"process {pid} held {sqlite_file}'s write lock at every stop")
    finally:
        os.close(fd)


# --- producers, killer, drain -----------------------------------------------------
async def produce(
    url: str,
    numbers: Iterable[int],
    acked: list[int],
    *,
    concurrency: int = 8,
    rate: float | None = None,
    slow_when: Callable[[], bool] | None = None,
    trickle: float = 50.0,
) -> None:
    """Publish a :class:`Numbered` per number; append each to ``acked`` once
    its ``publish`` returned. ``rate`` (events/s) paces the whole run; while
    ``slow_when()`` holds, publishing slows to ``trickle`` events/s (so the
    workers keep handling something, but the events are not used up)."""
    queue = list(numbers)
    producer = surge.App("jepsen-producer", transport=url)
    loop = asyncio.get_running_loop()
    start = loop.time()
    it = iter(enumerate(queue))

    async def one() -> None:
        nonlocal start
        for i, n in it:
            if slow_when is not None and slow_when():
                await asyncio.sleep(concurrency / trickle)
                if rate is not None:
                    start = loop.time() - i / rate  # no burst to catch up afterwards
            elif rate is not None:
                ahead = start + i / rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await producer.publish(Numbered(n=n))
            acked.append(n)

    async with producer:
        await asyncio.gather(*(one() for _ in range(concurrency)))


async def produce_keyed(
    url: str,
    keys: Sequence[str],
    per_key: int,
    acked: list[tuple[str, int]],
    *,
    slow_when: Callable[[], bool] | None = None,
    trickle: float = 50.0,
) -> None:
    """Publish :class:`Keyed` events ``0..per_key-1`` of every key, all keys
    at once but each key's one after another (the next ``publish`` only
    after the last returned, so ``seq`` is the key's publish order); append
    ``(key, seq)`` to ``acked`` once its ``publish`` returned. While
    ``slow_when()`` holds, publishing slows to ``trickle`` events/s."""
    # this app subscribes to nothing, so it cannot fill the key: key= does
    producer = surge.App("jepsen-producer", transport=url)

    async def one(key: str) -> None:
        for seq in range(per_key):
            if slow_when is not None and slow_when():
                await asyncio.sleep(len(keys) / trickle)
            await producer.publish(Keyed(key=key, seq=seq), key=key)
            acked.append((key, seq))

    async with producer:
        await asyncio.gather(*(one(k) for k in keys))


async def kill_workers(
    sup: Supervisor,
    records: Path,
    *,
    kills: int,
    rng: random.Random,
    max_delay: float = 0.3,
    until: asyncio.Future[Any] | None = None,
    deadline: float = 120.0,
    on_kill: Callable[[int, int], object] | None = None,
    before_kill: Callable[[int], object] | None = None,
    hold: Path | None = None,
) -> int:
    """SIGKILL a random worker ``kills`` times, each at a random moment while
    it handles (it has recorded an event since it was picked); the count done.

    With ``hold`` (the records file of :data:`keyed_app`'s workers), the
    first kill lands inside a handling for sure: the victim is asked to hold
    its next handling open, and killed once it says it does (within 10 s,
    else killed all the same). A random moment alone can miss every
    handling: 2 ms handlings, 22 kills, none cut (CI, amqp, loaded machine).
    Only the first, unless ``SURGE_HOLD_EVERY_KILL=1`` is set (every kill
    held: 22-32 cuts a run, against 6-12; the nats keyed crash test broke
    per-key order so in 2 of 10 runs before the NATS takeover waited for
    the previous owner's pull and deliveries, 1 of 14 after, 1 of 8 once a
    given-back hold's open pull followed it, 0 of 61 once the AckWait rule
    waited for a pull that found nothing: see
    docs/guarantees.md, "NATS JetStream cluster").

    Stops early when ``until`` (the producers, say) is done or at ``deadline``.
    ``on_kill`` is called with the count and the pid right after each kill,
    ``before_kill`` with the pid right before it (a record of the kill must be
    written before it: the broker can hand the victim's work to another
    worker before the killer runs again).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    done = 0

    def over() -> bool:
        return loop.time() >= end or (until is not None and until.done())

    while done < kills and not over():
        await sup.wait_ready()
        pid = rng.choice(sup.ready_pids)
        handled = _handled_by(records, _size(records), pid)
        with contextlib.suppress(TimeoutError):
            await wait_for(
                _either(handled, over), timeout=end - loop.time(), what="worker handling"
            )
        if not handled():
            break
        await asyncio.sleep(rng.uniform(0, max_delay))
        if hold is not None and (done == 0 or _HOLD_EVERY_KILL):
            _touch(hold_path(hold, pid))
            held = held_path(hold, pid)
            with contextlib.suppress(TimeoutError):
                await wait_for(
                    lambda held=held: os.path.exists(held),  # type: ignore[misc]
                    timeout=10,
                    what="the victim holding a handling",
                )
        if before_kill is not None:
            before_kill(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # gone already: the supervisor restarts it all the same
        else:
            done += 1
            if on_kill is not None:
                on_kill(done, pid)
        await sup.wait_restarted(pid)
    return done


def _either(a: Callable[[], bool], b: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: a() or b()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _handled_by(path: Path, offset: int, pid: int) -> Callable[[], bool]:
    """Whether ``pid`` recorded a handled event past ``offset`` in ``path``."""
    mark = f",{pid},".encode()

    def seen() -> bool:
        if not path.exists():
            return False
        with path.open("rb") as f:
            f.seek(offset)
            return any(line.startswith(b"h,") and mark in line for line in f)

    return seen


async def group_stats(url: str, group: str = GROUP) -> TransportStats:
    """The transport's stats of ``group``, read through a fresh connection."""
    transport = open_transport(url)
    await transport.start()
    try:
        return await transport.stats(group)
    finally:
        await transport.close()


def _handled_numbers(records: Path) -> set[Hashable]:
    return {r.n for r in read_records(records)}


async def drain(
    url: str,
    records: Path,
    acked: Iterable[Hashable],
    *,
    group: str = GROUP,
    topics: Sequence[str] = (Numbered.__topic__,),
    handled: Callable[[Path], set[Hashable]] = _handled_numbers,
    timeout: float = 60.0,
) -> TransportStats:
    """Wait until ``group`` holds nothing (backlog, leases, retries) and every
    acked event is in ``handled(records)``; the group's stats at the end
    (also on timeout)."""
    want = set(acked)
    transport = open_transport(url)
    await transport.start()
    try:
        wait_idle = getattr(transport, "wait_idle", None)
        if wait_idle is not None:
            # the transport's own wait (sqlite: it watches the file for us)
            await transport.declare(group, tuple(topics))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await wait_idle()

        async def settled() -> bool:
            st = await transport.stats(group)
            if st.backlog or st.pending or st.scheduled:
                return False
            return want <= handled(records)

        with contextlib.suppress(TimeoutError):
            await wait_for(settled, timeout=timeout, interval=0.05, what="drain")
        return await transport.stats(group)
    finally:
        await transport.close()


# --- the verdict ----------------------------------------------------------------------
@dataclass(frozen=True)
class CrashResult:
    """The figures of one crash run. :meth:`check` asserts the promises."""

    published: int
    acked: int
    handled: int
    deliveries: int
    lost: int
    unexpected: int
    duplicates: int
    kills: int
    duplicate_bound: int
    left: int
    seconds: float = 0.0
    lost_sample: list[Any] = field(default_factory=list)

    def check(self) -> None:
        assert self.lost == 0, f"lost acknowledged events: {self.lost_sample} ({self})"
        assert self.unexpected == 0, f"handled events never published ({self})"
        assert self.duplicates <= self.duplicate_bound, f"too many duplicates ({self})"
        assert self.left == 0, f"deliveries left on the transport ({self})"

    def __str__(self) -> str:
        return (
            f"published={self.published} acked={self.acked} handled={self.handled} "
            f"deliveries={self.deliveries} lost={self.lost} unexpected={self.unexpected} "
            f"duplicates={self.duplicates} (bound {self.duplicate_bound}) kills={self.kills} "
            f"left={self.left} seconds={self.seconds:.1f}"
        )


def check(
    published: Iterable[int],
    acked: Iterable[int],
    records: Sequence[Record],
    *,
    kills: int,
    bound_per_kill: int,
    left: int,
    seconds: float = 0.0,
) -> CrashResult:
    """Compare handled ``records`` with what was published and acknowledged."""
    return tally(
        published,
        acked,
        [r.n for r in records],
        kills=kills,
        bound_per_kill=bound_per_kill,
        left=left,
        seconds=seconds,
    )


_Id = TypeVar("_Id", int, tuple[str, int])


def tally(
    published: Iterable[_Id],
    acked: Iterable[_Id],
    handled_ids: Sequence[_Id],
    *,
    kills: int,
    bound_per_kill: int,
    left: int,
    seconds: float = 0.0,
) -> CrashResult:
    """:func:`check` on event ids: one per handling in ``handled_ids``."""
    pub = set(published)
    ack = set(acked)
    counts = Counter(handled_ids)
    handled = set(counts)
    lost = sorted(ack - handled)
    return CrashResult(
        published=len(pub),
        acked=len(ack),
        handled=len(handled),
        deliveries=len(handled_ids),
        lost=len(lost),
        unexpected=len(handled - pub),
        duplicates=sum(c - 1 for c in counts.values()),
        kills=kills,
        duplicate_bound=kills * bound_per_kill,
        left=left,
        seconds=seconds,
        lost_sample=lost[:10],
    )


def _shares(killed: int, kills: int) -> int:
    """Shares of the events (one per kill) published at full speed after
    ``killed`` kills: one more per kill, the last only after the last kill."""
    return min(killed + 1, kills - 1)


async def run_crash(
    url: str,
    tmp: Path,
    *,
    events: int = 20_000,
    kills: int = 20,
    workers: int = 2,
    seed: int = 0,
    concurrency: int = 8,
    prefetch: int = 16,
    rate: float | None = None,
    producers: int = 8,
    max_delay: float = 0.3,
    drain_timeout: float = 60.0,
) -> CrashResult:
    """Publish ``events`` numbered events while killing workers ``kills``
    times; drain; the figures. See the module docstring."""
    rng = random.Random(seed)
    records = tmp / "records.txt"
    sup = Supervisor(
        APP_REF,
        url,
        workers,
        shutdown_timeout=5.0,
        backoff=0.05,
        backoff_cap=0.5,
        stable_after=0.5,
        env=worker_env(records, concurrency=concurrency, prefetch=prefetch),
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    running = loop.create_task(sup.run())
    acked: list[int] = []
    killed = [0]

    def ahead() -> bool:
        # publish one share of the events per kill, then only a trickle until
        # the next kill, so the kills find events flowing however slow they are;
        # the last share waits for the last kill (were it published at full
        # speed, production could end, and the killer with it, one kill short)
        return killed[0] < kills and len(acked) * kills >= _shares(killed[0], kills) * events

    def count(n: int, _pid: int) -> None:
        killed[0] = n

    try:
        await sup.wait_ready()
        producing = loop.create_task(
            produce(url, range(events), acked, concurrency=producers, rate=rate, slow_when=ahead)
        )
        done = await kill_workers(
            sup,
            records,
            kills=kills,
            rng=rng,
            max_delay=max_delay,
            until=producing,
            on_kill=count,
        )
        killed[0] = kills  # whatever happened, stop slowing the producers
        await producing
        stats = await drain(url, records, acked, timeout=drain_timeout)
    finally:
        sup.request_stop()
        await running
    left = stats.backlog + stats.pending + stats.scheduled
    return check(
        range(events),
        acked,
        read_records(records),
        kills=done,
        bound_per_kill=prefetch,
        left=left,
        seconds=loop.time() - start,
    )


# --- keyed mode: per-key order across processes ------------------------------------------
@dataclass
class _KeyState:
    high: int = -1  # the highest seq started so far
    last: int = -1  # the seq of the key's latest start
    last_pid: int = 0  # and its pid
    open: KeyedRecord | None = None  # a handling started and not ended
    started_by: dict[int, int] = field(default_factory=dict)  # seq -> pid of its latest start
    cut: set[tuple[int, int]] = field(default_factory=set)  # (pid, seq) cut by a kill


@dataclass(frozen=True)
class KeyOrder:
    """What :func:`key_order` saw: ``handovers`` (a key's start by another
    pid than its previous start), ``reruns`` (starts of a seq started
    before), ``cut`` (handlings a kill ended mid-way) and the violations."""

    keys: int
    handovers: int
    reruns: int
    cut: int
    violations: list[str]


def key_order(records: Sequence[KeyedRecord]) -> KeyOrder:
    """Check per-key order and exclusion in a keyed run's ``records``.

    File order is real-time order: each line is one ``O_APPEND`` write, and
    a kill's ``k`` line is written right before the kill (written after it,
    a broker that redelivers at once, as RabbitMQ does on a closed
    connection, let another worker restart the victim's event before the
    line, a false violation: CI, amqp). Walking the lines in that order,
    ``dead`` holds the pids whose ``k`` line came before (dead, or to be
    killed any moment), and for each key:

    - Exclusion: a start while another handling of the key is open (started,
      not ended) is a violation unless the open handling's pid is dead; that
      handling is then cut, and its end showing up later is a violation (its
      process was alive after all). A handling still open at the end must be
      by a dead pid.
    - Order: with ``high`` the highest seq of the key started so far, a start
      of ``s`` is a first handling when ``s == high + 1``: first handlings
      come in publish order 0, 1, 2... (``s > high + 1`` is a violation).
      ``s <= high`` is a rerun, allowed only when the latest earlier start of
      ``s`` was by a dead pid (a killed process's delivery, redelivered), and,
      when it goes back (``s`` at or below the key's previous start), only
      when that previous start was by a dead pid: the take-over after a kill
      is the only thing that starts a key over at an older event.
    """
    dead: set[int] = set()
    keys: dict[str, _KeyState] = {}
    problems: list[str] = []
    handovers = reruns = cut = 0
    for r in records:
        if r.kind == "k":
            dead.add(r.pid)
            continue
        st = keys.setdefault(r.key, _KeyState())
        at = f"{r.key}: pid {r.pid}"
        if r.kind == "h":
            if st.open is not None and (st.open.pid, st.open.seq) == (r.pid, r.seq):
                st.open = None
            elif (r.pid, r.seq) in st.cut:
                problems.append(f"{at} ended {r.seq} after another process started the key")
            else:
                problems.append(f"{at} ended {r.seq} without starting it")
            continue
        if st.open is not None:
            if st.open.pid not in dead:
                problems.append(
                    f"{at} started {r.seq} while pid {st.open.pid} handled {st.open.seq}"
                )
            st.cut.add((st.open.pid, st.open.seq))
            cut += 1
        s = r.seq
        if s > st.high + 1:
            problems.append(f"{at} started {s} before {st.high + 1} was ever started")
        elif s <= st.high:
            before = st.started_by.get(s)
            if before is None:
                problems.append(f"{at} started {s} after {st.high} (its first handling)")
            elif before not in dead:
                problems.append(f"{at} reran {s}, started before by pid {before}, not killed")
            elif s <= st.last and st.last_pid not in dead:
                problems.append(f"{at} went back from {st.last} to {s} with no kill")
            else:
                reruns += 1
        if st.last_pid and st.last_pid != r.pid:
            handovers += 1
        st.high = max(st.high, s)
        st.last, st.last_pid = s, r.pid
        st.started_by[s] = r.pid
        st.open = r
    for key, st in keys.items():
        if st.open is not None:
            if st.open.pid in dead:
                cut += 1
            else:
                problems.append(f"{key}: pid {st.open.pid} never ended {st.open.seq}")
    return KeyOrder(len(keys), handovers, reruns, cut, problems)


def overlaps(
    records: Sequence[KeyedRecord], exempt: Iterable[tuple[int, str, int]] = ()
) -> list[str]:
    """Starts of a key's handling while another process's handling of that
    key was open (started, not ended), in file order; the first start of
    each of ``exempt`` ((pid, key, seq): handlings a process was stalled in
    the middle of, which no fence can stop) does not count as open."""
    skip = set(exempt)
    open_: dict[str, dict[int, int]] = {}  # key -> pid -> seq being handled
    found = []
    for r in records:
        held = open_.setdefault(r.key, {})
        if r.kind == "s":
            others = {pid: seq for pid, seq in held.items() if pid != r.pid}
            if others:
                found.append(f"{r.key}: pid {r.pid} started {r.seq} while {others} handled")
            if (r.pid, r.key, r.seq) in skip:
                skip.discard((r.pid, r.key, r.seq))  # its first start only
            else:
                held[r.pid] = r.seq
        elif r.kind == "h" and held.get(r.pid) == r.seq:
            del held[r.pid]
    return found


@dataclass(frozen=True)
class KeyedResult:
    """The figures of a keyed crash run: the unkeyed ones and the order."""

    crash: CrashResult
    order: KeyOrder

    def check(self) -> None:
        self.crash.check()
        assert not self.order.violations, (
            f"{len(self.order.violations)} order violations, first "
            f"{self.order.violations[:10]} ({self})"
        )

    def __str__(self) -> str:
        o = self.order
        return (
            f"{self.crash} keys={o.keys} handovers={o.handovers} reruns={o.reruns} "
            f"cut_by_kills={o.cut} order_violations={len(o.violations)}"
        )


def _handled_pairs(records: Path) -> set[Hashable]:
    return {(r.key, r.seq) for r in read_keyed_records(records) if r.kind == "h"}


async def run_keyed_crash(
    url: str,
    tmp: Path,
    *,
    keys: int = 24,
    per_key: int = 400,
    kills: int = 20,
    workers: int = 2,
    seed: int = 0,
    concurrency: int = 8,
    prefetch: int = 16,
    delay: float = 0.002,
    max_delay: float = 0.3,
    drain_timeout: float = 60.0,
) -> KeyedResult:
    """:func:`run_crash` for per-key order: ``workers`` processes of
    :data:`keyed_app` handle ``keys * per_key`` :class:`Keyed` events (each
    key's published in order by one producer, see :func:`produce_keyed`)
    while SIGKILLs hit them; each handling records its start and its end
    (``delay`` seconds apart), each kill a ``k`` line; :func:`key_order`
    judges the lines, :func:`tally` the handled events."""
    rng = random.Random(seed)
    records = tmp / "keyed.txt"
    names = [f"k{i}" for i in range(keys)]
    events = keys * per_key
    sup = Supervisor(
        KEYED_APP_REF,
        url,
        workers,
        shutdown_timeout=5.0,
        backoff=0.05,
        backoff_cap=0.5,
        stable_after=0.5,
        env=worker_env(records, concurrency=concurrency, prefetch=prefetch, delay=delay),
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    running = loop.create_task(sup.run())
    acked: list[tuple[str, int]] = []
    killed = [0]

    def ahead() -> bool:  # as in run_crash: one share of the events per kill
        return killed[0] < kills and len(acked) * kills >= _shares(killed[0], kills) * events

    def mark(pid: int) -> None:
        _append(records, f"k,,-1,{pid},0")

    def count(n: int, pid: int) -> None:
        killed[0] = n

    try:
        await sup.wait_ready()
        producing = loop.create_task(produce_keyed(url, names, per_key, acked, slow_when=ahead))
        done = await kill_workers(
            sup,
            records,
            kills=kills,
            rng=rng,
            max_delay=max_delay,
            until=producing,
            on_kill=count,
            before_kill=mark,
            hold=records,
        )
        killed[0] = kills
        await producing
        stats = await drain(
            url,
            records,
            acked,
            group=KEYED_GROUP,
            topics=(Keyed.__topic__,),
            handled=_handled_pairs,
            timeout=drain_timeout,
        )
    finally:
        sup.request_stop()
        await running
    lines = read_keyed_records(records)
    crash = tally(
        [(k, seq) for k in names for seq in range(per_key)],
        acked,
        [(r.key, r.seq) for r in lines if r.kind == "h"],
        kills=done,
        bound_per_kill=prefetch,
        left=stats.backlog + stats.pending + stats.scheduled,
        seconds=loop.time() - start,
    )
    return KeyedResult(crash, key_order(lines))


# --- a publisher process, for kill loops against the committing process ------------------
def publish_process(url: str, start: int, acked_path: str, notify_path: str) -> None:
    """Publish numbered events from ``start`` on, forever, from several tasks
    at once (so commits are shared); after each ``publish`` returns, append
    its number to ``acked_path`` and write a byte to the FIFO ``notify_path``.

    The target of a process the test kills at a moment of its choosing.
    """
    notify = os.open(notify_path, os.O_WRONLY)  # waits for the reader
    asyncio.run(_publish_forever(url, start, acked_path, notify))


async def _publish_forever(url: str, start: int, acked_path: str, notify: int) -> None:
    fd = os.open(acked_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    producer = surge.App("jepsen-publisher", transport=url)
    numbers = iter(range(start, sys.maxsize))

    async def one() -> None:
        for n in numbers:
            await producer.publish(Numbered(n=n))
            os.write(fd, f"{n}\n".encode())
            os.write(notify, b"a")

    async with producer:
        await asyncio.gather(*(one() for _ in range(4)))
