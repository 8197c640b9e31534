"""Operator mistakes at the ``surge`` command: the real CLI in a subprocess
answers each with one line saying what is wrong and what to do, a non-zero
exit code, and no Python traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

APP = """
import surge

class Hello(surge.Event):
    text: str

app = surge.App("tiny")

@app.on(Hello)
async def hello(ev: Hello) -> None:
    app.request_stop()
"""

BROKEN_APP = """
import surge
import no_such_dependency_xyz  # the app's own missing import

app = surge.App("broken")
"""


@dataclass(frozen=True)
class Case:
    """One mistake: the arguments (``{port}``, ``{dir}`` filled in), and
    what the one error line must say."""

    args: tuple[str, ...]
    says: tuple[str, ...]
    block: str | None = None  # a module made unimportable, as if its extra were missing
    exit_code: int = 1
    alone: bool = True
    """The error line is all the command prints (no log lines or warnings before it)."""


CASES: dict[str, Case] = {
    "unknown module": Case(
        ("run", "no_such_module_xyz:app"), ("no module named 'no_such_module_xyz'",)
    ),
    "unknown attribute": Case(("run", "tinyapp:nope"), ("has no attribute 'nope'",)),
    "reference without attribute": Case(("run", "tinyapp"), ("'module:attribute'",)),
    "app imports a missing package": Case(
        ("run", "brokenapp:app"), ("no_such_dependency_xyz", "brokenapp.py:3", "install it")
    ),
    "missing extra": Case(
        ("run", "tinyapp:app", "-t", "redis://127.0.0.1:{port}"),
        ("pip install 'surge[redis]'",),
        block="redis",
    ),
    "missing extra in dlq": Case(
        ("dlq", "list", "tinyapp:app", "-t", "redis://127.0.0.1:{port}"),
        ("pip install 'surge[redis]'",),
        block="redis",
    ),
    "missing http extra": Case(
        ("run", "tinyapp:app", "--http", "127.0.0.1:0"),
        ("pip install 'surge[http]'",),
        block="uvicorn",
    ),
    "unknown URL scheme": Case(
        ("run", "tinyapp:app", "-t", "bogus://x"), ("unknown transport URL 'bogus://x'",)
    ),
    "unreachable redis": Case(
        ("run", "tinyapp:app", "-t", "redis://127.0.0.1:{port}"),
        ("cannot connect", "127.0.0.1:{port}"),
    ),
    "unreachable redis in dlq": Case(
        ("dlq", "list", "tinyapp:app", "-t", "redis://127.0.0.1:{port}"),
        ("cannot connect",),
    ),
    "unreachable nats": Case(
        ("run", "tinyapp:app", "-t", "nats://127.0.0.1:{port}"),
        ("TransportError: cannot connect to NATS", "127.0.0.1:{port}", "Connection refused"),
    ),
    "unreachable nats in dlq": Case(
        ("dlq", "list", "tinyapp:app", "-t", "nats://127.0.0.1:{port}"),
        ("cannot connect to NATS", "Connection refused"),
    ),
    "unreachable postgres": Case(
        ("run", "tinyapp:app", "-t", "postgresql://u:pw@127.0.0.1:{port}/shop"),
        ("TransportError: cannot connect to PostgreSQL at 127.0.0.1:{port}/shop", "refused"),
    ),
    "unreachable postgres in dlq": Case(
        ("dlq", "list", "tinyapp:app", "-t", "postgresql://u:pw@127.0.0.1:{port}/shop"),
        ("cannot connect to PostgreSQL at 127.0.0.1:{port}/shop",),
    ),
    "unreachable amqp": Case(
        ("run", "tinyapp:app", "-t", "amqp://guest:pw@127.0.0.1:{port}/"),
        ("TransportError: cannot connect to RabbitMQ", "127.0.0.1:{port}", "refused"),
    ),
    "unreachable amqp in dlq": Case(
        ("dlq", "list", "tinyapp:app", "-t", "amqp://guest:pw@127.0.0.1:{port}/"),
        ("cannot connect to RabbitMQ", "127.0.0.1:{port}"),
    ),
    "sqlite relative path in a missing directory": Case(
        ("run", "tinyapp:app", "-t", "sqlite:///nodir/x.db"),
        ("{dir}/nodir/x.db", "does not exist", "sqlite:////tmp/x.db"),
    ),
    "sqlite absolute path in a missing directory": Case(
        ("run", "tinyapp:app", "-t", "sqlite:////{dir}/nodir/x.db"),
        ("{dir}/nodir/x.db", "does not exist"),
    ),
    "port in use": Case(
        ("run", "tinyapp:app", "--http", "127.0.0.1:{busy}"),
        ("127.0.0.1:{busy}", "in use", "another port"),
        alone=False,  # the app started before the bind failed: its INFO stop line
    ),
    "missing TLS file": Case(
        ("run", "tinyapp:app", "--http", "127.0.0.1:0", "--tls-cert", "no.pem", "--tls-key", "no"),
        ("no.pem", "does not exist"),
        exit_code=2,
    ),
    "unknown dead-letter id": Case(
        ("dlq", "show", "tinyapp:app", "--id", "nosuchid", "-t", "sqlite:///dl.db"),
        ("no dead letter with id nosuchid", "surge dlq list"),
    ),
    "unknown dead-letter id in list": Case(
        ("dlq", "list", "tinyapp:app", "--id", "nosuchid", "-t", "sqlite:///dl.db"),
        ("no dead letter with id nosuchid",),
    ),
    "unknown subscription": Case(
        ("dlq", "list", "tinyapp:app", "-s", "nosuch", "-t", "sqlite:///dl.db"),
        ("no subscription 'nosuch'", "tiny.hello"),
    ),
    "load at a URL that is no URL": Case(
        ("load", "notaurl", "-n", "1"), ("http://host[:port]/path",), exit_code=2
    ),
    "load at a server that is down": Case(
        ("load", "http://127.0.0.1:{port}/", "-n", "2", "-c", "1"),
        ("no request to http://127.0.0.1:{port}/ was answered", "is the server up?"),
        alone=False,  # the progress bar and the table of errors come first
    ),
    "top at a server that is down": Case(
        ("top", "http://127.0.0.1:{port}"), ("cannot reach http://127.0.0.1:{port}",)
    ),
}


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on (without SO_REUSEPORT, as most do)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def surge_cli(tmp_path: Path) -> Callable[[Case, dict[str, object]], tuple[int, str]]:
    """Runs ``python -m surge`` in ``tmp_path`` (which holds the apps);
    exit code and everything printed."""
    (tmp_path / "tinyapp.py").write_text(textwrap.dedent(APP))
    (tmp_path / "brokenapp.py").write_text(textwrap.dedent(BROKEN_APP))

    def run(case: Case, values: dict[str, object]) -> tuple[int, str]:
        env = {}
        if case.block is not None:
            blocked = tmp_path / "blocked"
            blocked.mkdir(exist_ok=True)
            (blocked / f"{case.block}.py").write_text(
                f"raise ImportError('No module named {case.block}', name={case.block!r})\n"
            )
            env["PYTHONPATH"] = str(blocked)
        proc = subprocess.run(
            [sys.executable, "-m", "surge", *(a.format(**values) for a in case.args)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "200", **env},
        )
        return proc.returncode, proc.stdout + proc.stderr

    return run


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_operator_mistake_gets_one_line_and_no_traceback(
    name: str,
    surge_cli: Callable[[Case, dict[str, object]], tuple[int, str]],
    busy_port: int,
    tmp_path: Path,
) -> None:
    """Each mistake exits non-zero with one `Error:` line naming the fix."""
    case = CASES[name]
    values: dict[str, object] = {"port": _closed_port(), "busy": busy_port, "dir": tmp_path}
    code, output = surge_cli(case, values)
    assert "Traceback" not in output, output
    assert code == case.exit_code, output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, output
    if case.alone and case.exit_code != 2:  # click prints a usage error's usage above it
        assert output.strip() == errors[0], output
    assert ":pw@" not in output  # a password in a URL is never printed
    # click puts a usage error's reason on the line after "Usage:"; others are one line
    said = output if case.exit_code == 2 else errors[0]
    for text in case.says:
        assert text.format(**values) in said, output
    assert "no dead letters" not in output


def test_workers_that_cannot_start_stop_the_run_with_one_line_each(tmp_path: Path) -> None:
    """``--workers 2`` on a file that cannot be opened: each worker says why
    in one line, the supervisor stops instead of restarting them, exit 1,
    no traceback (it used to restart them forever, a traceback each time)."""
    (tmp_path / "tinyapp.py").write_text(textwrap.dedent(APP))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "surge",
            "run",
            "tinyapp:app",
            "--transport",
            f"sqlite:///{tmp_path}/no-such-dir/x.db",
            "--workers",
            "2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output, output
    assert "restarting" not in output, output
    said = [line for line in output.splitlines() if "TransportError: cannot open" in line]
    assert 1 <= len(said) <= 2, output
    assert all("no-such-dir does not exist" in line for line in said), output
    assert "could not start the app" in output, output
