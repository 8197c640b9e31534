"""In-process dispatch: surge's memory transport against bare baselines, in one run.

Usage: ``python -m benchmarks.inproc [--events N] [--repeat R] [--cpu C]``

Every scenario moves the same pre-built ``surge.Event`` instances (one per
event, made once before anything is timed, so construction costs nobody) to a
no-op handler:

``surge_async``          ``await app.publish(ev)`` per event, async handler
``surge_async_nowait``   ``app.publish_nowait(ev)``, ``await app.publish`` when Overloaded
``surge_inline``         ``await app.publish(ev)``, sync ``executor="inline"`` handler
``surge_inline_nowait``  ``publish_nowait`` to the inline handler
``surge_async_signed``   ``surge_async`` with ``App(signing_keys=...)``: each envelope
                         signed (HMAC-SHA256) at publish; memory:// deliveries are
                         not verified, so this is the publisher's share of the cost
``queue``                bare ``asyncio.Queue(maxsize=1024)`` producer and consumer
                         coroutines, the consumer awaiting a no-op coroutine per item
``pyee_async``           pyee ``AsyncIOEventEmitter.emit`` to an async handler
                         (a task per event), then ``wait_for_complete()``
``pyee_sync``            pyee ``EventEmitter.emit`` to a sync handler

A surge measurement runs from the first publish until ``app.drain()``
returns (every event handled and acknowledged). Each scenario gets a fresh
event loop per measurement and an untimed warm-up on that loop. Rounds are
interleaved: each round runs every (loop, scenario) once, in an order that
rotates from round to round, so drift on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import surge

__all__ = ("Tick", "machine_info", "main", "pin_cpu")

Extra = dict[str, Any]
Span = tuple[float, float]  # (wall seconds, CPU seconds of this process)
Scenario = Callable[[Sequence["Tick"], Sequence["Tick"]], Coroutine[Any, Any, tuple[Span, Extra]]]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]

RESULTS = Path(__file__).parent / "results"


def _now() -> Span:
    return time.perf_counter(), time.process_time()


def _since(t0: Span) -> Span:
    """Wall and CPU time since ``t0``. Pinned to one CPU, the CPU time leaves
    out the time other processes on that CPU took from us."""
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


class Tick(surge.Event):
    """The no-op event every scenario carries."""

    n: int


# --- surge ---------------------------------------------------------------------
async def _feed(app: surge.App, events: Sequence[Tick]) -> int:
    publish = app.publish
    for ev in events:
        await publish(ev)
    return 0


async def _feed_nowait(app: surge.App, events: Sequence[Tick]) -> int:
    """``publish_nowait`` as a producer uses it: fall back to waiting when full."""
    publish_nowait = app.publish_nowait
    fallbacks = 0
    for ev in events:
        try:
            publish_nowait(ev)
        except surge.Overloaded:
            fallbacks += 1
            await app.publish(ev)
    return fallbacks


def _handled(app: surge.App) -> int:
    return sum(s.succeeded for s in app.statistics().subscriptions.values())


async def _surge(
    events: Sequence[Tick],
    warm: Sequence[Tick],
    *,
    inline: bool,
    nowait: bool,
    signed: bool = False,
) -> tuple[Span, Extra]:
    keys: dict[str, str | bytes] | None = {"k1": "k" * 32} if signed else None
    app = surge.App("bench", signing_keys=keys)
    if inline:

        @app.on(Tick, executor="inline")
        def handle_sync(ev: Tick) -> None:
            return None

    else:

        @app.on(Tick)
        async def handle(ev: Tick) -> None:
            return None

    feed = _feed_nowait if nowait else _feed
    async with app:
        await feed(app, warm)
        await app.drain()
        gc.collect()
        t0 = _now()
        fallbacks = await feed(app, events)
        await app.drain()
        seconds = _since(t0)
        handled = _handled(app)
    expected = len(warm) + len(events)
    if handled != expected:
        raise RuntimeError(f"surge handled {handled} of {expected} events")
    return seconds, {"overloaded_fallbacks": fallbacks} if nowait else {}


async def surge_async(events: Sequence[Tick], warm: Sequence[Tick]) -> tuple[Span, Extra]:
    return await _surge(events, warm, inline=False, nowait=False)


async def surge_async_nowait(events: Sequence[Tick], warm: Sequence[Tick]) -> tuple[Span, Extra]:
    return await _surge(events, warm, inline=False, nowait=True)


async def surge_async_signed(events: Sequence[Tick], warm: Sequence[Tick]) -> tuple[Span, Extra]:
    return await _surge(events, warm, inline=False, nowait=False, signed=True)


async def surge_inline(events: Sequence[Tick], warm: Sequence[Tick]) -> tuple[Span, Extra]:
    return await _surge(events, warm, inline=True, nowait=False)


async def surge_inline_nowait(events: Sequence[Tick], warm: Sequence[Tick]) -> tuple[Span, Extra]:
    return await _surge(events, warm, inline=True, nowait=True)


# --- baselines -------------------------------------------------------------------
async def _noop(ev: Tick) -> None:
    return None


async def _queue_once(events: Sequence[Tick]) -> Span:
    q: asyncio.Queue[Tick] = asyncio.Queue(maxsize=1024)
    n = len(events)
    handler = _noop

    async def consumer() -> int:
        get = q.get
        done = 0
        for _ in range(n):
            ev = await get()
            await handler(ev)
            done += 1
        return done

    async def producer() -> None:
        put = q.put
        for ev in events:
            await put(ev)

    t0 = _now()
    task = asyncio.get_running_loop().create_task(consumer())
    await producer()
    done = await task
    seconds = _since(t0)
    if done != n:
        raise RuntimeError(f"queue consumer handled {done} of {n}")
    return seconds


async def queue(events: Sequence[Tick], warm: Sequence[Tick]) -> tuple[Span, Extra]:
    await _queue_once(warm)
    gc.collect()
    return await _queue_once(events), {}


async def pyee_async(events: Sequence[Tick], warm: Sequence[Tick]) -> tuple[Span, Extra]:
    from pyee.asyncio import AsyncIOEventEmitter

    ee = AsyncIOEventEmitter()
    ee.add_listener("Tick", _noop)

    async def once(evs: Sequence[Tick]) -> Span:
        emit = ee.emit
        t0 = _now()
        for ev in evs:
            emit("Tick", ev)
        await ee.wait_for_complete()
        return _since(t0)

    await once(warm)
    gc.collect()
    return await once(events), {}


async def pyee_sync(events: Sequence[Tick], warm: Sequence[Tick]) -> tuple[Span, Extra]:
    from pyee import EventEmitter

    ee = EventEmitter()

    def handler(ev: Tick) -> None:
        return None

    ee.add_listener("Tick", handler)

    def once(evs: Sequence[Tick]) -> Span:
        emit = ee.emit
        t0 = _now()
        for ev in evs:
            emit("Tick", ev)
        return _since(t0)

    once(warm)
    gc.collect()
    return once(events), {}


SCENARIOS: dict[str, Scenario] = {
    "surge_async": surge_async,
    "surge_async_nowait": surge_async_nowait,
    "surge_inline": surge_inline,
    "surge_inline_nowait": surge_inline_nowait,
    "surge_async_signed": surge_async_signed,
    "queue": queue,
    "pyee_async": pyee_async,
    "pyee_sync": pyee_sync,
}

# (numerator, denominator, what the ratio is held against)
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("surge_async", "queue", "bar 0.8 (issue 17), goal 1.0"),
    ("surge_async_nowait", "queue", "variant"),
    ("surge_async_signed", "surge_async", "signing cost"),
    ("surge_async", "pyee_async", ""),
    ("surge_inline", "pyee_sync", "goal 1.0"),
    ("surge_inline_nowait", "pyee_sync", "variant"),
    ("surge_inline", "queue", ""),
)


# --- machine and running -------------------------------------------------------
def loop_factories() -> dict[str, LoopFactory]:
    """The loops to measure on: the default asyncio loop, and uvloop if installed."""
    loops: dict[str, LoopFactory] = {"asyncio": asyncio.SelectorEventLoop}
    try:
        import uvloop
    except ImportError:
        return loops
    loops["uvloop"] = uvloop.new_event_loop
    return loops


def pin_cpu(cpu: int) -> list[int] | None:
    """Pin this process to ``cpu`` (negative: leave it); the CPUs it may use after."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    return sorted(os.sched_getaffinity(0))


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str | None:
    """The commit measured, with ``+dirty`` when src/ differs from it (None
    when the surge imported is not this checkout's)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not Path(surge.__file__).resolve().is_relative_to(root):
        return None  # surge imported from elsewhere (PYTHONPATH): no revision to tell
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None
    return f"{rev}+dirty" if rev and dirty else rev or None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "when_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "packages": {p: _version(p) for p in ("surge", "msgspec", "uvloop", "pyee")},
        "surge_revision": _git_revision(),
        "surge_path": str(Path(surge.__file__).parent),
    }


def _run_one(
    factory: LoopFactory, fn: Scenario, events: Sequence[Tick], warm: Sequence[Tick]
) -> tuple[Span, Extra]:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(fn(events, warm))


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(
    events: Sequence[Tick],
    warm: Sequence[Tick],
    repeat: int,
    loops: dict[str, LoopFactory],
    scenarios: dict[str, Scenario],
    progress: Callable[[str], None],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per loop and scenario: ``rates`` (events per wall second, one per round),
    ``cpu_rates`` (events per CPU second of this process), ``extra`` per round,
    and the median, min and max of each."""
    cells = [(lp, sc) for lp in loops for sc in scenarios]
    out: dict[str, dict[str, dict[str, Any]]] = {
        lp: {sc: {"rates": [], "cpu_rates": [], "extra": []} for sc in scenarios} for lp in loops
    }
    n = len(events)
    for r in range(repeat):
        shift = r % len(cells)
        for lp, sc in cells[shift:] + cells[:shift]:
            (wall, cpu), extra = _run_one(loops[lp], scenarios[sc], events, warm)
            cell = out[lp][sc]
            cell["rates"].append(n / wall)
            cell["cpu_rates"].append(n / max(cpu, 1e-9))
            cell["extra"].append(extra)
            progress(
                f"round {r + 1}/{repeat}  {lp:8} {sc:20} {n / wall:>12,.0f} events/s"
                f" (CPU-time {n / max(cpu, 1e-9):>12,.0f})"
            )
    for per_loop in out.values():
        for cell in per_loop.values():
            cell["wall"] = _summary(cell["rates"])
            cell["cpu"] = _summary(cell["cpu_rates"])
    return out


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """surge/baseline per loop: of the medians, and the median (and range) of
    the per-round ratios, for wall-clock and CPU-time rates."""
    rows = []
    for lp, per_loop in results.items():
        for num, den, against in RATIOS:
            if num not in per_loop or den not in per_loop:
                continue
            a, b = per_loop[num], per_loop[den]
            row: dict[str, Any] = {"loop": lp, "ratio": f"{num}/{den}", "against": against}
            for basis, key in (("wall", "rates"), ("cpu", "cpu_rates")):
                per_round = [x / y for x, y in zip(a[key], b[key], strict=True)]
                row[basis] = {
                    "of_medians": a[basis]["median"] / b[basis]["median"],
                    # best against best: what each reaches when the machine lets it
                    "of_best": a[basis]["max"] / b[basis]["max"],
                    "median_of_rounds": statistics.median(per_round),
                    "rounds_min": min(per_round),
                    "rounds_max": max(per_round),
                    "per_round": per_round,
                }
            rows.append(row)
    return rows


def _print_tables(
    results: dict[str, dict[str, dict[str, Any]]], rows: list[dict[str, Any]], title: str
) -> None:
    from rich.console import Console
    from rich.table import Table

    # Wide enough for the ratio names when printing to a file or pipe.
    console = Console(width=max(Console().width, 150))
    t = Table(title=title)
    cols = (
        "loop",
        "scenario",
        "events/s median",
        "min-max",
        "spread",
        "CPU-time median",
        "min-max",
    )
    for col in cols:
        t.add_column(col, justify="left" if col in ("loop", "scenario") else "right")
    for lp, per_loop in results.items():
        for sc, cell in per_loop.items():
            w, c = cell["wall"], cell["cpu"]
            t.add_row(
                lp,
                sc,
                f"{w['median']:,.0f}",
                f"{w['min']:,.0f}-{w['max']:,.0f}",
                f"{(w['max'] - w['min']) / w['median']:.0%}",
                f"{c['median']:,.0f}",
                f"{c['min']:,.0f}-{c['max']:,.0f}",
            )
    console.print(t)
    r = Table(title="surge / baseline: wall clock, then CPU time")
    rcols = (
        "loop",
        "ratio",
        "of medians",
        "median of rounds",
        "rounds min-max",
        "CPU: of medians",
        "CPU: median of rounds",
        "CPU: rounds min-max",
        "held against",
    )
    for col in rcols:
        left = col in ("loop", "ratio", "held against")
        r.add_column(col, justify="left" if left else "right", no_wrap=col == "ratio")
    for row in rows:
        w, c = row["wall"], row["cpu"]
        r.add_row(
            row["loop"],
            row["ratio"],
            f"{w['of_medians']:.2f}",
            f"{w['median_of_rounds']:.2f}",
            f"{w['rounds_min']:.2f}-{w['rounds_max']:.2f}",
            f"{c['of_medians']:.2f}",
            f"{c['median_of_rounds']:.2f}",
            f"{c['rounds_min']:.2f}-{c['rounds_max']:.2f}",
            row["against"],
        )
    console.print(r)


def markdown(results: dict[str, dict[str, dict[str, Any]]], rows: list[dict[str, Any]]) -> str:
    """The two tables as Markdown, for BENCHMARKS.md."""

    def k(x: float) -> str:
        return f"{x / 1000:,.0f} k"

    out = [
        "| loop | scenario | events/s median (min-max) | CPU-time events/s median (min-max) |",
        "|---|---|---|---|",
    ]
    for lp, per_loop in results.items():
        for sc, cell in per_loop.items():
            w, c = cell["wall"], cell["cpu"]
            out.append(
                f"| {lp} | {sc} | {k(w['median'])} ({k(w['min'])}-{k(w['max'])}) "
                f"| {k(c['median'])} ({k(c['min'])}-{k(c['max'])}) |"
            )
    out += [
        "",
        "| loop | ratio | wall: of medians | wall: median of rounds (min-max) "
        "| CPU: of medians | CPU: median of rounds (min-max) | held against |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        w, c = row["wall"], row["cpu"]
        out.append(
            f"| {row['loop']} | {row['ratio']} | {w['of_medians']:.2f} "
            f"| {w['median_of_rounds']:.2f} ({w['rounds_min']:.2f}-{w['rounds_max']:.2f}) "
            f"| {c['of_medians']:.2f} "
            f"| {c['median_of_rounds']:.2f} ({c['rounds_min']:.2f}-{c['rounds_max']:.2f}) "
            f"| {row['against']} |"
        )
    return "\n".join(out)


def _profile(
    name: str, factory: LoopFactory, fn: Scenario, events: Sequence[Tick], warm: Sequence[Tick]
) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    (wall, _), _ = _run_one(factory, fn, events, warm)
    prof.disable()
    print(f"--- {name}: {len(events) / wall:,.0f} events/s under the profiler")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inproc", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=200_000, help="events per measurement")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2_000, help="untimed events first")
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin to; -1 leaves affinity")
    parser.add_argument(
        "--loops", default="asyncio,uvloop", help="comma-separated: asyncio, uvloop"
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated subset to run"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument(
        "--profile",
        metavar="SCENARIO",
        help="run SCENARIO once per loop under cProfile and print where the time goes",
    )
    parser.add_argument("--show", type=Path, metavar="JSON", help="print a saved run's tables")
    parser.add_argument("--markdown", action="store_true", help="with --show: as Markdown")
    args = parser.parse_args(argv)
    if args.show:
        saved = json.loads(args.show.read_text())
        if args.markdown:
            print(markdown(saved["results"], saved["ratios"]))
        else:
            title = f"{args.show.name}: {saved['command']}"
            _print_tables(saved["results"], saved["ratios"], title)
        return 0
    if args.events < 1 or args.repeat < 1 or args.warmup < 1:
        parser.error("--events, --repeat and --warmup must be at least 1")

    available = loop_factories()
    loops = {}
    for name in args.loops.split(","):
        if name not in available:
            parser.error(f"loop {name!r} is not available (have: {', '.join(available)})")
        loops[name] = available[name]
    scenarios = {}
    for name in args.scenarios.split(","):
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r} (have: {', '.join(SCENARIOS)})")
        scenarios[name] = SCENARIOS[name]

    cpus = pin_cpu(args.cpu)
    events = [Tick(n=i) for i in range(args.events)]
    warm = events[: args.warmup]
    # The events live for the whole run: keep them out of every collection.
    gc.collect()
    gc.freeze()
    if args.profile:
        if args.profile not in SCENARIOS:
            parser.error(f"unknown scenario {args.profile!r} (have: {', '.join(SCENARIOS)})")
        for lp, factory in loops.items():
            _profile(lp, factory, SCENARIOS[args.profile], events, warm)
        return 0

    info = machine_info()
    started = time.perf_counter()
    results = measure(
        events,
        warm,
        args.repeat,
        loops,
        scenarios,
        lambda line: print(line, file=sys.stderr, flush=True),
    )
    rows = ratios(results)
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    record = {
        "benchmark": "inproc",
        "command": " ".join(["python -m benchmarks.inproc", *(argv or sys.argv[1:])]),
        "events": args.events,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "pinned_cpus": cpus,
        "loops": {lp: f"{f.__module__}.{getattr(f, '__qualname__', f)}" for lp, f in loops.items()},
        "machine": info,
        "wall_seconds": time.perf_counter() - started,
        "results": results,
        "ratios": rows,
    }
    out = args.out
    if out is None:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS / f"inproc-{stamp}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    pinned = f"pinned to CPU {cpus}" if cpus is not None else "not pinned"
    _print_tables(
        results,
        rows,
        f"{args.events:,} no-op events, median of {args.repeat} interleaved rounds, {pinned}",
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
