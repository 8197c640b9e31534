"""The code in the docs runs as written."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from ._servers import shared_redis_url

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_testing_guide_example_runs() -> None:
    """docs/testing.md's worked example passes, deterministically, twice."""
    text = (DOCS / "testing.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    outputs = []
    for _ in range(2):
        namespace: dict[str, object] = {"__name__": "docs_example"}
        exec(compile(block.group(1), "docs/testing.md", "exec"), namespace)
        test = namespace["test_charges_survive_a_flaky_world"]
        assert callable(test)
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            test()
        outputs.append(buf.getvalue())
    assert "faults injected" in outputs[0]
    assert outputs[0] == outputs[1]


def test_every_security_claim_names_a_test_that_exists() -> None:
    """Each test docs/security.md cites as a claim's proof is defined where it says."""
    text = (DOCS / "security.md").read_text()
    root = DOCS.parent
    cited = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(cited) > 20
    for path, name in cited:
        source = (root / path).read_text()
        if name:
            assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{path}::{name}"


def test_no_page_says_the_public_listener_serves_the_operator_surface() -> None:
    """Every paragraph of README.md and docs/ that puts `--http` beside `/_surge/` says
    where the operator surface is served (`--admin` or `SURGE_ADMIN_TOKEN`): the public
    listener of `surge run --http` alone serves none of it."""
    pages = [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]
    stale = [
        f"{page.name}: {para[:80]!r}"
        for page in pages
        for para in re.split(r"\n\s*\n", page.read_text())
        if "--http" in para
        and "/_surge" in para
        and "--admin" not in para
        and "SURGE_ADMIN_TOKEN" not in para
    ]
    assert stale == []


def test_ruff_security_rules_are_on_and_every_ignore_gives_its_reason() -> None:
    """pyproject selects ruff's S rules (CI's `ruff check .` runs them), and each S ignore,
    in pyproject or on a line of src/, carries a reason (on its line or the one above);
    none in src/ waives the rules against unpickling, marshal, eval or exec."""
    import tomllib

    root = DOCS.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "S" in config["select"]
    text = (root / "pyproject.toml").read_text()
    for line in text.splitlines():
        if re.match(r'\s*"S\d+",', line):
            assert "#" in line, line
    for path in sorted((root / "src").rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "noqa: S" in line:
                reason = re.search(r"noqa: S\d+(,\s*S\d+)*\s*-\s*\S", line)
                above = lines[i - 1].strip().startswith("#")
                assert reason or above, f"{path.relative_to(root)}:{i + 1}"
            # unpickling, marshal, eval and exec (S301/S302/S307/S102) are never waived
            assert not re.search(r"noqa:[^#]*\bS(30[127]|102)\b", line), path
    waived = [c for pattern, codes in config["per-file-ignores"].items()
              if pattern.startswith("src") for c in codes]  # fmt: skip
    assert not {"S301", "S302", "S307", "S102"} & {*waived, *config["ignore"]}


# --- the tutorial ---------------------------------------------------------------
_BLOCK = re.compile(r'^```(\w+)(?: title="([^"]+)")?\n(.*?)^```$', re.M | re.S)
_TUTORIAL_REDIS = "redis://localhost:6379"


class _Step(NamedTuple):
    """A command of the tutorial and the output it shows (None: none shown)."""

    command: str
    output: str | None


def _tutorial() -> tuple[dict[str, str], dict[str, list[_Step]]]:
    """docs/tutorial.md's files (title -> text) and each section's commands;
    fails on a block that is neither (so every block is run)."""
    files: dict[str, str] = {}
    sections: dict[str, list[_Step]] = {}
    text = (DOCS / "tutorial.md").read_text()
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        heading = part.split("\n", 1)[0]
        steps = sections[heading] = []
        for lang, title, body in _BLOCK.findall(part):
            if lang == "python" and title:
                assert title not in files, title
                files[title] = body
            elif lang == "sh" and not title:
                steps.append(_Step(body.strip(), None))
            elif lang == "text" and steps and steps[-1].output is None:
                steps[-1] = steps[-1]._replace(output=body)
            else:
                raise AssertionError(f"tutorial.md, {heading}: a {lang} block no test runs")
    assert len(_BLOCK.findall(text)) == len(files) + sum(
        len(s) + sum(x.output is not None for x in s) for s in sections.values()
    )
    return files, sections


def _argv(command: str, urls: dict[str, str]) -> list[str]:
    """The command as this environment runs it: its python, its surge."""
    argv = [urls.get(word, word) for word in shlex.split(command)]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    assert argv[0] == "surge", command
    return [sys.executable, "-m", "surge", *argv[1:]]


def _serve_until(argv: list[str], cwd: Path, env: dict[str, str], lines: int) -> list[str]:
    """Run a `surge run` command until it printed ``lines`` lines, then press
    Ctrl-C (SIGINT) and wait for its exit (code 0); its lines. stdout is
    a terminal, as the tutorial's reader has it, so each worker writes each
    of its lines whole (a pipe would hold them until exit)."""
    master, slave = os.openpty()
    log = cwd / "surge-run.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=slave, stderr=err, stdin=subprocess.DEVNULL
        )
    os.close(slave)
    got: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer has gone
                chunk = b""
            if not chunk:
                got.put(None)
                return
            buf += chunk
            *done, buf = buf.split(b"\n")
            for line in done:
                got.put(line.decode().rstrip("\r"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(out) < lines:
            line = got.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"surge run exited early: {out}\n{log.read_text()}"
            out.append(line)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        os.close(master)
    return out


@pytest.mark.parametrize("section", [1, 2, 3])
def test_the_tutorial_runs_as_written(tmp_path: Path, section: int) -> None:
    """Each section of docs/tutorial.md, in a fresh directory with its files:
    every command runs and prints what the page shows (the workers' lines in
    any order, each order charged before it is shipped), and `surge run`
    stops on Ctrl-C with exit code 0."""
    files, sections = _tutorial()
    assert [int(h.split(".", 1)[0]) for h in sections if h[0].isdigit()] == [1, 2, 3]
    [heading] = [h for h in sections if h.startswith(f"{section}.")]
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    urls = {}
    if any(_TUTORIAL_REDIS in s.command for s in sections[heading]):
        urls = {_TUTORIAL_REDIS: shared_redis_url()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SURGE_")}
    for step in sections[heading]:
        argv = _argv(step.command, urls)
        if step.command.startswith("surge run"):
            assert step.output is not None
            shown = step.output.splitlines()
            lines = _serve_until(argv, tmp_path, env, len(shown))
            assert sorted(lines) == sorted(shown)
            for order in {line.split()[1] for line in shown}:
                charged = lines.index(next(x for x in lines if x.startswith(f"charging {order} ")))
                assert charged < lines.index(f"shipping {order}")
            continue
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        if step.output is not None:
            assert done.stdout == step.output


def test_every_install_command_names_extras_that_exist() -> None:
    """Each `pip install '.[a,b]'` / `'surge[a]'` in README, docs, .ci/run and
    the error messages of src/ names extras pyproject defines; CI's install
    line is README's, and its test extra brings what the site build needs."""
    import tomllib

    root = DOCS.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    texts = [root / "README.md", root / ".ci" / "run", *DOCS.glob("*.md")]
    texts += sorted((root / "src").rglob("*.py"))
    named = 0
    for path in texts:
        for group in re.findall(r"(?:surge|\.)\[([\w,]+)\]", path.read_text()):
            for extra in group.split(","):
                assert extra in extras, f"{path.relative_to(root)}: [{extra}]"
                named += 1
    assert named > 20
    ci = re.search(r"^python3 -m venv .*$", (root / ".ci" / "run").read_text(), re.M)
    assert ci is not None
    assert ci.group(0) in (root / "README.md").read_text()
    assert "test" in re.findall(r"'\.\[([\w,]+)\]'", ci.group(0))[0].split(",")
    wanted = {re.split(r"[<>=\[]", r)[0] for r in extras["test"]}
    assert {"mkdocs-material", "mkdocstrings"} <= wanted


def test_the_operations_examples_match_the_cli_and_the_ingress() -> None:
    """docs/operations.md: each flag its table names is a flag of `surge run`,
    the Kubernetes and systemd commands parse with it, the probe paths answer
    200 on a running app (and /metrics is not served without a token), and the
    waits given (terminationGracePeriodSeconds, TimeoutStopSec, the probe's
    timeoutSeconds) cover what they wait for with surge's defaults."""
    import configparser
    import inspect

    import httpx
    import yaml

    import surge
    from surge.cli._commands import run
    from surge.cli._supervisor import Supervisor
    from surge.http import Limits

    text = (DOCS / "operations.md").read_text()
    flags = {opt for p in run.params for opt in p.opts}
    table = text.split("## What `surge run` does", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`-.*?) \|", table, re.M)
    assert len(rows) >= 6
    for row in rows:
        assert set(re.findall(r"`(-[-\w]+)", row)) <= flags, row

    [manifest] = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][:2] == ["surge", "run"]
    run.make_context("run", container["command"][2:])
    [ini] = re.findall(r"```ini\n(.*?)```", text, re.S)
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(ini)
    exec_start = shlex.split(unit["Service"]["ExecStart"])
    assert exec_start[0].endswith("/surge")
    assert exec_start[1] == "run"
    run.make_context("run", exec_start[2:])

    shutdown = surge.App("defaults").shutdown_timeout
    graceful = Limits().graceful_timeout
    grace = inspect.signature(Supervisor).parameters["grace"].default
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + graceful + shutdown
    assert float(unit["Service"]["TimeoutStopSec"]) >= shutdown + grace
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["timeoutSeconds"] > graceful / 4

    app = surge.App("ops")

    @app.on("orders")
    async def handle(event: surge.Event) -> None: ...

    async def probe() -> dict[str, int]:
        async with app:
            transport = httpx.ASGITransport(app=app.http)
            async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
                paths = (liveness["httpGet"]["path"], readiness["httpGet"]["path"], "/metrics")
                return {p: (await client.get(p)).status_code for p in paths}

    assert asyncio.run(probe()) == {"/healthz": 200, "/readyz": 200, "/metrics": 404}
