"""`surge run ... --http` in a child process, for tests of what the CLI serves."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Listening:
    """The URLs the child printed: its public listener, and its admin one if asked for."""

    public: str
    admin: str | None


@contextlib.contextmanager
def surge_run(*args: str, log: Path, admin: bool = False) -> Iterator[Listening]:
    """Run ``surge run *args`` until the block ends, then SIGTERM it and check that it
    exits 0. Yields once the listeners are bound (the child prints a line per listener
    as it binds, so this waits on its output, never on a port)."""
    env = {k: v for k, v in os.environ.items() if k != "SURGE_ADMIN_TOKEN"}
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            [sys.executable, "-m", "surge", "run", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            urls: dict[str, str] = {}
            while "public" not in urls or (admin and "admin" not in urls):
                line = proc.stdout.readline()
                assert line, f"surge run exited: {log.read_text()}"
                if line.startswith("serving HTTP on "):
                    urls["public"] = line.split()[-1]
                elif line.startswith("serving the admin surface on "):
                    urls["admin"] = line.split()[-1]
            yield Listening(urls["public"], urls.get("admin"))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def get(url: str) -> tuple[int, bytes]:
    """GET ``url``: its status and body, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
