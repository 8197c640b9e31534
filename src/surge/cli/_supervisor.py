"""Several worker processes on one machine: start them, restart, drain.

``surge run app:app --transport sqlite:///app.db --workers N`` calls
:func:`run_workers`. The supervisor starts N processes running
``python -m surge.cli._supervisor worker``; each imports the app by its
``module:attr`` reference, switches it to the shared transport and runs it.
Workers compete for deliveries on that transport, so the transport must be
one that several processes share (sqlite, redis, nats; never memory).

- A worker that dies is started again at once, or, when it keeps dying
  within ``stable_after`` seconds of its start, after a delay that doubles
  from ``backoff`` up to ``backoff_cap``.
- SIGTERM or SIGINT asks every worker (with SIGTERM) to drain: stop taking,
  let handlers in flight finish within the app's ``shutdown_timeout``, ack,
  exit. Workers still alive ``grace`` seconds after that deadline are
  killed. A second signal kills them at once.
- A worker whose app cannot be loaded or configured exits with
  :data:`EX_CONFIG`; restarting cannot fix that, so the supervisor stops the
  others and returns that code.
- A worker whose app cannot start (a surge error before it was ready: a
  file it cannot open, a broker it cannot reach) logs one line and exits
  with :data:`EX_START`. Before any worker was ever ready that is a bad
  deploy, not a crash: the supervisor stops the others and returns 1, as
  ``surge run`` does in one process. Once workers have run, it is an
  outage: the worker is restarted with the backoff above, until it is back.
- A worker notices its supervisor's death (its stdin pipe closes) and drains.

The worker learns its settings from the ``SURGE_WORKER`` environment
variable (JSON), never from argv, so a broker password stays out of ``ps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .._clock import Clock, RealClock
from .._errors import ConfigurationError, SurgeError, one_line

if TYPE_CHECKING:
    from .._app import App

__all__ = (
    "EX_CONFIG",
    "EX_START",
    "Supervisor",
    "WorkerSpec",
    "check_workers",
    "load_app",
    "run_workers",
)

log = logging.getLogger("surge.supervisor")

EX_CONFIG = 78
"""Exit code of a worker (and the supervisor) whose app cannot work as given."""

EX_START = 69
"""Exit code of a worker whose app raised a surge error before it was ready
(EX_UNAVAILABLE: a file it cannot open, a broker it cannot reach)."""

_ENV = "SURGE_WORKER"
_METRICS_ENV = "SURGE_METRICS_DIR"


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What one worker process runs; passed as JSON in ``SURGE_WORKER``."""

    app: str
    transport: str
    http: tuple[str, int] | None = None
    admin: tuple[str, int] | None = None
    redact: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    shutdown_timeout: float | None = None
    ready_fd: int | None = None
    watch_parent: bool = True
    path: tuple[str, ...] = ()
    log_level: int = logging.INFO
    consume: bool = True


# --- loading and checking ----------------------------------------------------
def load_app(ref: str) -> App:
    """The :class:`App` named by ``ref`` (``"package.module:attr"``)."""
    from .._app import App

    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"app reference {ref!r}: write it as 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigurationError(
                f"app reference {ref!r}: no module named {exc.name!r} (looked in "
                f"{os.getcwd()} and on sys.path); run from the directory that holds it"
            ) from exc
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(
                f"app reference {ref!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not isinstance(obj, App):
        raise ConfigurationError(
            f"app reference {ref!r} names a {type(obj).__name__}, not a surge.App"
        )
    return obj


def check_workers(transport_url: str, workers: int) -> None:
    """Refuse a worker count that cannot work on ``transport_url``."""
    if workers < 1:
        raise ConfigurationError(f"--workers {workers}: give at least 1")
    scheme = transport_url.split("://", 1)[0] if "://" in transport_url else ""
    if scheme == "memory" and workers > 1:
        raise ConfigurationError(
            f"--workers {workers} with {transport_url}: memory:// lives inside one process, "
            "so each worker would get its own private queues and events published in one "
            "would never reach the others. Use --transport sqlite:///path.db for several "
            "workers on one machine (or redis:// / nats:// across machines), or --workers 1."
        )


# --- the supervisor ----------------------------------------------------------
class _Slot:
    """One worker position: the process in it now and its history."""

    __slots__ = ("failures", "index", "proc", "ready", "ready_fd", "started_at", "waiter")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.ready_fd: int | None = None
        self.started_at = 0.0
        self.failures = 0  # consecutive quick deaths, for the backoff
        self.waiter: asyncio.Task[None] | None = None


class Supervisor:
    """Runs ``workers`` processes of one app on one shared transport.

    ``await run()`` until :meth:`request_stop`; it returns the exit code
    (0 when every worker drained and exited cleanly). ``pids`` lists the
    live workers, ``restarts`` counts restarts, and :meth:`wait_ready`
    waits until every slot has a worker whose app has started.
    """

    def __init__(
        self,
        app_ref: str,
        transport_url: str,
        workers: int,
        *,
        http: tuple[str, int] | None = None,
        admin: tuple[str, int] | None = None,
        redact: bool = False,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        shutdown_timeout: float = 10.0,
        grace: float = 2.0,
        backoff: float = 0.1,
        backoff_cap: float = 30.0,
        stable_after: float = 5.0,
        env: dict[str, str] | None = None,
        clock: Clock | None = None,
        consume: bool = True,
    ) -> None:
        check_workers(transport_url, workers)
        self.app_ref = app_ref
        self.consume = consume
        self.transport_url = transport_url
        self.workers = workers
        self.http = http
        self.admin = admin
        self.redact = redact
        self.tls = (tls_cert, tls_key)
        self.shutdown_timeout = shutdown_timeout
        self.grace = grace
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.stable_after = stable_after
        self.env = env
        self.clock: Clock = clock or RealClock()
        self.restarts = 0
        self._ever_ready = False  # a worker of this run was ready once
        self.exit_codes: list[int] = []
        self._slots = [_Slot(i) for i in range(workers)]
        # asyncio.Event binds to a loop on first wait, not here
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._fatal: int | None = None
        self._kill_now = False
        self._restart_tasks: set[asyncio.Task[None]] = set()
        self._metrics_tmp: str | None = None

    # --- what callers see ----------------------------------------------------
    @property
    def pids(self) -> list[int]:
        """Process ids of the workers alive now."""
        return [s.proc.pid for s in self._slots if s.proc is not None and s.proc.returncode is None]

    @property
    def ready_pids(self) -> list[int]:
        """Process ids of live workers whose app has started."""
        return [
            s.proc.pid
            for s in self._slots
            if s.proc is not None and s.proc.returncode is None and s.ready
        ]

    async def wait_ready(self) -> None:
        """Wait until every slot holds a started worker."""
        while len(self.ready_pids) < self.workers:
            if self._fatal is not None:
                raise ConfigurationError(f"workers exit with code {self._fatal}; see their log")
            await self._wait_change()

    async def wait_restarted(self, pid: int) -> None:
        """Wait until the worker ``pid`` is gone and its slot is ready again."""
        while pid in self.pids or len(self.ready_pids) < self.workers:
            await self._wait_change()

    def request_stop(self) -> None:
        """Ask :meth:`run` to drain the workers and return (signal-safe).

        A second request kills the workers at once.
        """
        if self._stop.is_set():
            self._kill_now = True
        self._stop.set()
        self._notify()

    # --- running -------------------------------------------------------------
    async def run(self) -> int:
        """Start the workers, keep them running until asked to stop; exit code."""
        owned_dir = self._metrics_dir() is None
        try:
            for slot in self._slots:
                await self._start(slot)
            await self._stop.wait()
        finally:
            for t in list(self._restart_tasks):
                t.cancel()
            await asyncio.gather(*self._restart_tasks, return_exceptions=True)
            code = await self._shutdown()
            if owned_dir and self._metrics_tmp is not None:
                shutil.rmtree(self._metrics_tmp, ignore_errors=True)
        return self._fatal if self._fatal is not None else code

    def _metrics_dir(self) -> str | None:
        """The directory where workers write metric snapshots
        (``SURGE_METRICS_DIR`` from the environment given, else a temporary
        one), so a scrape of any worker sums all of them (surge.observe).
        Files left by an earlier run are removed."""
        given = (os.environ if self.env is None else self.env).get(_METRICS_ENV)
        if given:
            for old in Path(given).glob("*.json"):
                old.unlink(missing_ok=True)
            self._metrics_tmp = None
            return given
        self._metrics_tmp = tempfile.mkdtemp(prefix="surge-metrics-")
        return None

    def _spec(self, ready_fd: int) -> WorkerSpec:
        return WorkerSpec(
            app=self.app_ref,
            transport=self.transport_url,
            http=self.http,
            admin=self.admin,
            redact=self.redact,
            tls_cert=self.tls[0],
            tls_key=self.tls[1],
            shutdown_timeout=self.shutdown_timeout,
            ready_fd=ready_fd,
            path=tuple(p for p in sys.path if p),
            log_level=log.getEffectiveLevel(),
            consume=self.consume,
        )

    async def _start(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        env = dict(os.environ if self.env is None else self.env)
        env[_ENV] = msgspec.json.encode(self._spec(write_fd)).decode()
        if self._metrics_tmp is not None:
            env.setdefault(_METRICS_ENV, self._metrics_tmp)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "surge.cli._supervisor",
                "worker",
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                # Ctrl-C signals the terminal's whole process group: keep the
                # workers out of it, so the supervisor alone decides when
                # they drain (and a worker stopped by it is not "restarted")
                start_new_session=True,
                env=env,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        slot.proc = proc
        slot.ready = False
        slot.ready_fd = read_fd
        slot.started_at = self.clock.monotonic()
        os.set_blocking(read_fd, False)
        loop.add_reader(read_fd, self._on_ready_pipe, slot, read_fd)
        slot.waiter = loop.create_task(self._watch(slot, proc))
        log.info("worker %d started (pid %d)", slot.index, proc.pid)
        self._notify()

    def _on_ready_pipe(self, slot: _Slot, fd: int) -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and slot.ready_fd == fd:
            slot.ready = True
            self._ever_ready = True
            self._notify()
        if not data:
            self._close_ready(slot, fd)

    def _close_ready(self, slot: _Slot, fd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
        if slot.ready_fd == fd:
            slot.ready_fd = None

    async def _watch(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        if slot.ready_fd is not None:
            self._close_ready(slot, slot.ready_fd)
        self.exit_codes.append(code)
        slot.ready = False
        if self._stop.is_set():
            self._notify()
            return
        if code == EX_CONFIG:
            log.error(
                "worker %d (pid %d) cannot load or configure the app (exit %d); stopping",
                slot.index,
                proc.pid,
                code,
            )
            self._fatal = EX_CONFIG
            self._stop.set()
            self._notify()
            return
        if code == EX_START and not self._ever_ready:
            log.error(
                "worker %d (pid %d) could not start the app (its line above says why); stopping",
                slot.index,
                proc.pid,
            )
            self._fatal = 1
            self._stop.set()
            self._notify()
            return
        uptime = self.clock.monotonic() - slot.started_at
        slot.failures = slot.failures + 1 if uptime < self.stable_after else 0
        delay = 0.0
        if slot.failures:
            delay = min(self.backoff_cap, self.backoff * 2 ** (slot.failures - 1))
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        log.warning(
            "worker %d (pid %d) died (%s) after %.1fs; restarting%s",
            slot.index,
            proc.pid,
            how,
            uptime,
            f" in {delay:.1f}s ({slot.failures} quick deaths in a row)" if delay else "",
        )
        self._notify()
        task = asyncio.get_running_loop().create_task(self._restart(slot, delay))
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    async def _restart(self, slot: _Slot, delay: float) -> None:
        if delay:
            await self.clock.sleep(delay)
        if self._stop.is_set():
            return
        self.restarts += 1
        await self._start(slot)

    async def _shutdown(self) -> int:
        live = [s for s in self._slots if s.proc is not None and s.proc.returncode is None]
        was_ready = {id(s): s.ready for s in live}
        for s in live:
            assert s.proc is not None
            with contextlib.suppress(ProcessLookupError):
                s.proc.send_signal(signal.SIGKILL if self._kill_now else signal.SIGTERM)
        if live:
            log.info(
                "draining %d workers (deadline %.1fs)",
                len(live),
                self.shutdown_timeout + self.grace,
            )
        waiters = [s.waiter for s in live if s.waiter is not None]
        killed = 0
        if waiters:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.shutdown_timeout + self.grace
            while not self._kill_now:
                pending = [w for w in waiters if not w.done()]
                left = deadline - loop.time()
                if not pending or left <= 0:
                    break
                # wake on a worker's exit or on a second signal ("now")
                change = loop.create_task(self._wait_change())
                await asyncio.wait([*pending, change], timeout=left, return_when="FIRST_COMPLETED")
                change.cancel()
            for s in live:
                if s.proc is not None and s.proc.returncode is None:
                    killed += 1
                    with contextlib.suppress(ProcessLookupError):
                        s.proc.kill()
            if killed:
                log.warning("killed %d workers that did not drain in time", killed)
            await asyncio.gather(*waiters, return_exceptions=True)
        clean = True
        for s in live:
            assert s.proc is not None
            code = s.proc.returncode
            if code == 0 or (code == -signal.SIGTERM and not was_ready[id(s)]):
                continue
            clean = False
        for s in self._slots:
            if s.ready_fd is not None:
                self._close_ready(s, s.ready_fd)
        code = 0 if clean and not killed else 1
        log.info("workers stopped (%s)", "cleanly" if code == 0 else "not all cleanly")
        return code

    def _notify(self) -> None:
        self._changed.set()

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()


def run_workers(
    app_ref: str,
    transport_url: str,
    workers: int,
    *,
    http: tuple[str, int] | None = None,
    admin: tuple[str, int] | None = None,
    redact: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    shutdown_timeout: float | None = None,
    consume: bool = True,
) -> int:
    """Run ``workers`` processes of the app ``app_ref`` on ``transport_url``
    until SIGTERM or SIGINT, then drain them; the exit code.

    With ``consume=False`` the workers only declare the groups and publish
    (an ingress-only tier, ``surge run --no-consume``).

    ``shutdown_timeout`` defaults to the app's own. With ``http=(host,
    port)`` every worker serves HTTP on that port (SO_REUSEPORT), and with
    ``admin=(host, port)`` an admin listener there too (see
    :func:`surge.http.serve`; ``SURGE_ADMIN_TOKEN`` sets the admin token).
    """
    check_workers(transport_url, workers)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    app = load_app(app_ref)
    timeout = app.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
    sup = Supervisor(
        app_ref,
        transport_url,
        workers,
        http=http,
        admin=admin,
        redact=redact,
        tls_cert=tls_cert,
        tls_key=tls_key,
        shutdown_timeout=timeout,
        consume=consume,
    )

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, sup.request_stop)
        return await sup.run()

    return asyncio.run(main())


# --- the worker ----------------------------------------------------------------
def _watch_parent() -> None:
    """Drain when the supervisor dies: its end of our stdin pipe closes."""

    def wait_eof() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_eof, name="surge-parent-watch", daemon=True).start()


def _serve_http(spec: WorkerSpec, app: App, ready: Callable[[], object] | None) -> None:
    # Imported here, so a worker without --http never imports uvicorn.
    from .._app import run_loop
    from ..http import Server, serve
    from ..observe import ADMIN_TOKEN_ENV, mount

    assert spec.http is not None
    # /_surge/ and the subscriptions' metrics, summed over workers
    mount(app.http, redact=spec.redact)
    app.http.set_admin_token(os.environ.get(ADMIN_TOKEN_ENV) or None)

    def listening(server: Server) -> None:
        # ready once the last listener listens
        if ready is not None and server.admin == (spec.admin is not None):
            ready()

    host, port = spec.http
    run_loop(
        serve(
            app,
            host=host,
            port=port,
            admin=spec.admin,
            reuse_port=True,
            ready=listening,
            tls_cert=spec.tls_cert,
            tls_key=spec.tls_key,
        )
    )


def _tell_ready(fd: int) -> None:
    os.write(fd, b"R")
    os.close(fd)


def worker_main(spec: WorkerSpec) -> int:
    """Run one worker process's app until SIGTERM; its exit code."""
    logging.basicConfig(
        level=spec.log_level,
        format="%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s",
    )
    if spec.watch_parent:
        _watch_parent()
    for p in reversed(spec.path):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        app = load_app(spec.app)
        app.use_transport(spec.transport)
    except ConfigurationError as exc:
        log.error("%s", exc)
        return EX_CONFIG
    if spec.shutdown_timeout is not None:
        app.shutdown_timeout = spec.shutdown_timeout
    if not spec.consume:
        app.consume = False
    ready_fd = spec.ready_fd
    ready = False

    def tell_ready() -> None:
        nonlocal ready
        ready = True
        if ready_fd is not None:
            _tell_ready(ready_fd)

    try:
        if spec.http is not None:
            # ready once the port listens, not merely once the app started
            _serve_http(spec, app, tell_ready)
        else:

            async def started() -> None:
                tell_ready()

            app.on_start(started)
            app.run()
    except ConfigurationError as exc:
        log.error("%s", exc)
        return EX_CONFIG
    except SurgeError as exc:
        log.error("%s", one_line(exc))  # as surge run prints in one process
        return 1 if ready else EX_START
    finally:
        # The app's loop (and its SIGTERM handler) is gone; the process
        # still has its interpreter to end. A SIGTERM now (the supervisor's
        # stop after one the worker got on its own) must not kill it with
        # -15 and make a clean drain count as a failed one.
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["worker"] or _ENV not in os.environ:
        print(
            "usage: SURGE_WORKER='{...}' python -m surge.cli._supervisor worker "
            "(started by 'surge run --workers N', not by hand)",
            file=sys.stderr,
        )
        return 2
    try:
        spec = msgspec.json.decode(os.environ[_ENV], type=WorkerSpec)
    except msgspec.DecodeError as exc:
        print(f"{_ENV}: {exc}", file=sys.stderr)
        return 2
    return worker_main(spec)


if __name__ == "__main__":
    sys.exit(main())
