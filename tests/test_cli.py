"""The ``surge`` command: run, worker checks, dead letters, optional commands."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import re
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import msgspec
import pytest
from click.testing import CliRunner

import surge
from surge.cli import _commands as _cli
from surge.cli import main

_names = itertools.count()

TINY = """
import surge

class Hello(surge.Event):
    text: str

app = surge.App("tiny")

@app.on(Hello)
async def hello(ev: Hello) -> None:
    print(f"handled {ev.text} on {app.transport.url}", flush=True)
    app.request_stop()

@app.on_start
async def kick() -> None:
    await app.publish(Hello(text="hi"))
"""

FAILING = """
import surge

class Order(surge.Event):
    n: int

app = surge.App("shopdl", retry=surge.Retry(attempts=1))

@app.on(Order)
async def charge(ev: Order) -> None:
    if ev.n % 2:
        raise ValueError(f"bad order {ev.n}")

@app.on(Order)
async def audit(ev: Order) -> None:
    pass
"""


@pytest.fixture
def write_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Writes an app module into a fresh directory made the CWD; its name."""
    written: list[str] = []
    monkeypatch.chdir(tmp_path)

    def write(source: str) -> str:
        name = f"surge_cli_app_{next(_names)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_run_imports_app_overrides_transport_and_stops_on_request(
    write_app: Callable[[str], str], tmp_path: Path
) -> None:
    """`python -m surge run mod:app --transport URL` runs the app on that URL."""
    name = write_app(TINY)
    proc = subprocess.run(
        [sys.executable, "-m", "surge", "run", f"{name}:app", "--transport", "memory://other"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "handled hi on memory://other" in proc.stdout


def test_workers_refused_on_memory_transport(write_app: Callable[[str], str]) -> None:
    """--workers 2 on memory:// fails with a message naming a shared transport."""
    name = write_app(TINY)
    result = CliRunner().invoke(main, ["run", f"{name}:app", "--workers", "2"])
    assert result.exit_code == 1
    assert "--workers 2 needs a transport that processes share" in result.output
    assert "memory://" in result.output
    assert "sqlite:///" in result.output


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_module_xyz:app", "no module named 'no_such_module_xyz'"),
        ("{name}:nope", "has no attribute 'nope'"),
        ("{name}:Hello", "not a surge.App"),
        ("{name}", "write it as 'module:attribute'"),
    ],
)
def test_run_explains_a_bad_app_reference(
    write_app: Callable[[str], str], ref: str, message: str
) -> None:
    """A reference that names no App exits 1 with the reason."""
    name = write_app(TINY)
    result = CliRunner().invoke(main, ["run", ref.format(name=name)])
    assert result.exit_code == 1
    assert message in result.output


def test_http_option_needs_host_and_port(write_app: Callable[[str], str]) -> None:
    """--http without a port is a usage error."""
    name = write_app(TINY)
    result = CliRunner().invoke(main, ["run", f"{name}:app", "--http", "localhost"])
    assert result.exit_code == 2
    assert "HOST:PORT" in result.output


def test_version_and_help_list_the_commands() -> None:
    """`surge --help` lists run, demo and dlq; --version prints the version."""
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for cmd in ("run", "demo", "dlq"):
        assert f"  {cmd} " in result.output
    version = runner.invoke(main, ["--version"])
    assert surge.__version__ in version.output


# --- dead letters -----------------------------------------------------------------
def _transports() -> list[str]:
    kinds = ["memory"]
    try:
        importlib.import_module("surge.transports.sqlite")
    except ImportError:
        pass  # not written yet on this branch: memory alone then
    else:
        kinds.append("sqlite")
    return kinds


@pytest.fixture(params=_transports())
def dead_app(
    request: pytest.FixtureRequest, write_app: Callable[[str], str], tmp_path: Path
) -> tuple[str, list[str], surge.App]:
    """An app whose `charge` dead-lettered orders 1 and 3; (ref, extra args, app)."""
    name = write_app(FAILING)
    ref = f"{name}:app"
    app = _cli.load_app(ref)
    extra: list[str] = []
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'dl.db'}"
        app.use_transport(url)
        extra = ["--transport", url]
    order = sys.modules[name].Order

    async def fail_some() -> None:
        async with app:
            for n in range(4):
                await app.publish(order(n=n))
            await app.drain()

    asyncio.run(fail_some())
    return ref, extra, app


def _ids(app: surge.App, extra: list[str]) -> list[str]:
    """The ids of the app's dead letters, read as a separate process would."""
    if extra:
        app.use_transport(extra[1])  # a new connection: a closed one stays closed

    async def go() -> list[str]:
        await app.transport.start()
        try:
            return [d.id for d in await app.dead_letters()]
        finally:
            await app.transport.close()

    return asyncio.run(go())


def test_dlq_list_shows_each_dead_letter(dead_app: tuple[str, list[str], surge.App]) -> None:
    """`surge dlq list` prints id, subscription (as metrics name it), topic, error type
    and attempts."""
    ref, extra, app = dead_app
    ids = _ids(app, extra)
    assert len(ids) == 2
    result = CliRunner().invoke(main, ["dlq", "list", ref, *extra])
    assert result.exit_code == 0, result.output
    for i in ids:
        assert i in result.output
    assert f"{app.name}.charge" in result.output  # the name metrics and the dashboard use
    assert "Order" in result.output
    assert "ValueError" in result.output
    assert "2 dead letters" in result.output


def test_dlq_show_prints_traceback_and_decoded_body(
    dead_app: tuple[str, list[str], surge.App],
) -> None:
    """`surge dlq show --id` prints the error, its traceback and the body as JSON."""
    ref, extra, app = dead_app
    first = _ids(app, extra)[0]
    result = CliRunner().invoke(main, ["dlq", "show", ref, "--id", first, *extra])
    assert result.exit_code == 0, result.output
    assert first in result.output
    assert "ValueError: bad order 1" in result.output
    assert "Traceback (most recent call last)" in result.output
    assert '"n": 1' in result.output


def test_dlq_replay_and_purge_by_id(dead_app: tuple[str, list[str], surge.App]) -> None:
    """Replay and purge act on the given ids only and say how many."""
    ref, extra, app = dead_app
    first, second = _ids(app, extra)
    runner = CliRunner()
    replayed = runner.invoke(main, ["dlq", "replay", ref, "--id", first, *extra])
    assert replayed.exit_code == 0, replayed.output
    assert "1 dead letter replayed" in replayed.output
    assert _ids(app, extra) == [second]
    purged = runner.invoke(main, ["dlq", "purge", ref, "-s", "charge", "--all", *extra])
    assert purged.exit_code == 0, purged.output
    assert "1 dead letter purged" in purged.output
    assert _ids(app, extra) == []
    empty = runner.invoke(main, ["dlq", "list", ref, *extra])
    assert "no dead letters" in empty.output


def test_dlq_purge_needs_ids_or_all(dead_app: tuple[str, list[str], surge.App]) -> None:
    """Purging without --id or --all is refused and deletes nothing."""
    ref, extra, app = dead_app
    result = CliRunner().invoke(main, ["dlq", "purge", ref, *extra])
    assert result.exit_code == 2
    assert "--all" in result.output
    assert len(_ids(app, extra)) == 2


def test_dlq_unknown_id_and_subscription_are_errors(
    dead_app: tuple[str, list[str], surge.App],
) -> None:
    """An id that is not dead-lettered, or a subscription that does not exist, exit 1."""
    ref, extra, _ = dead_app
    runner = CliRunner()
    missing = runner.invoke(main, ["dlq", "replay", ref, "--id", "nope", *extra])
    assert missing.exit_code == 1
    assert "no dead letter with id nope" in missing.output
    bad = runner.invoke(main, ["dlq", "list", ref, "-s", "nosuch", *extra])
    assert bad.exit_code == 1
    assert "no subscription 'nosuch'" in bad.output


BOOM = """
import surge
from surge.observe import mount

class Order(surge.Event):
    n: int

app = surge.App("failing")
mount(app.http)

@app.on(Order, retry=surge.Retry(attempts=1))
async def boom(event: Order) -> None:
    raise ValueError(f"boom {event.n}")
"""


def test_a_failing_subscription_has_one_name_everywhere(
    write_app: Callable[[str], str], tmp_path: Path
) -> None:
    """One failing subscription is named alike (app.handler: failing.boom) in `surge dlq
    list`, the /metrics label, the dashboard's dead letters and its dead-letter log record."""
    from .test_metrics import asgi_get

    name = write_app(BOOM)
    ref = f"{name}:app"
    url = f"sqlite:///{tmp_path / 'boom.db'}"
    app = _cli.load_app(ref)
    app.use_transport(url)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    async def fail_one() -> tuple[str, bytes, bytes]:
        async with app:
            event_id = await app.publish(sys.modules[name].Order(n=1))
            await app.drain()
            status, metrics = await asgi_get(app, "/metrics")
            assert status == 200
            status, letters = await asgi_get(app, "/_surge/dlq")
            assert status == 200
        return event_id, metrics, letters

    keep = Keep(logging.ERROR)
    surge_log = logging.getLogger("surge")
    surge_log.addHandler(keep)
    try:
        event_id, metrics, letters = asyncio.run(fail_one())
    finally:
        surge_log.removeHandler(keep)
    [label] = re.findall(
        r'surge_subscription_dead_lettered_total\{app="failing",subscription="([^"]+)"\} 1\.0',
        metrics.decode(),
    )
    [dashboard] = [d["subscription"] for d in msgspec.json.decode(letters)["dead_letters"]]
    [logged] = [
        r.__dict__["subscription"]
        for r in records
        if "dead-lettered" in r.getMessage() and r.__dict__.get("event_id") == event_id
    ]
    listed = CliRunner().invoke(main, ["dlq", "list", ref, "--transport", url])
    assert listed.exit_code == 0, listed.output
    [row] = [line.split() for line in listed.output.splitlines() if event_id in line]
    assert row[0] == event_id
    assert (row[1], label, dashboard, logged) == ("failing.boom",) * 4


# --- optional commands ------------------------------------------------------------
def test_optional_commands_load_lazily_and_never_break_the_cli(
    write_app: Callable[[str], str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A present module adds its command; a broken one reports; a missing one is absent."""
    good = write_app(
        """
        import click

        @click.command()
        def hello() -> None:
            click.echo("hello from an optional command")
        """
    )
    broken = write_app("import surge_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        _cli,
        "_LAZY",
        {
            "hello": (good, "hello", "Say hello."),
            "broken": (broken, "broken", "Needs an extra."),
            "absent": ("surge_no_such_module_xyz", "absent", "Not installed."),
        },
    )
    runner = CliRunner()
    listing = runner.invoke(main, ["--help"])
    assert "hello" in listing.output
    assert "absent" not in listing.output
    assert runner.invoke(main, ["hello"]).output == "hello from an optional command\n"
    failed = runner.invoke(main, ["broken"])
    assert failed.exit_code == 1
    assert "surge broken is unavailable" in failed.output
    assert "surge_missing_dependency_xyz" in failed.output
    assert runner.invoke(main, ["absent"]).exit_code == 2
    assert isinstance(main, click.Group)


def test_run_with_http_serves_until_sigterm(
    write_app: Callable[[str], str], tmp_path: Path
) -> None:
    """`surge run --http HOST:0` says where it listens, answers, and exits 0 on SIGTERM."""
    pytest.importorskip("uvicorn")
    name = write_app("import surge\napp = surge.App('webby')\n")
    log = tmp_path / "stderr.log"
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            [sys.executable, "-m", "surge", "run", f"{name}:app", "--http", "127.0.0.1:0"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # blocks until the server listens
            assert line.startswith("serving HTTP on http://127.0.0.1:"), log.read_text()
            url = line.split()[-1]
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as resp:
                assert resp.status == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_workers_hand_app_transport_and_http_to_the_supervisor(
    write_app: Callable[[str], str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--workers N on a shared transport calls run_workers and exits with its code."""
    supervisor = pytest.importorskip("surge.cli._supervisor")
    calls: list[tuple[object, ...]] = []

    def fake_run_workers(
        app_ref: str,
        url: str,
        workers: int,
        *,
        http: tuple[str, int] | None = None,
        admin: tuple[str, int] | None = None,
        redact: bool = False,
        consume: bool = True,
    ) -> int:
        calls.append((app_ref, url, workers, http, admin, redact, consume))
        return 3

    monkeypatch.setattr(supervisor, "run_workers", fake_run_workers)
    name = write_app(TINY)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    result = CliRunner().invoke(
        main,
        [
            *("run", f"{name}:app", "-t", url, "-w", "3", "--no-consume"),
            *("--http", "0.0.0.0:8080", "--admin", "9090"),
        ],
    )
    assert calls == [(f"{name}:app", url, 3, ("0.0.0.0", 8080), ("127.0.0.1", 9090), False, False)]
    assert result.exit_code == 3
