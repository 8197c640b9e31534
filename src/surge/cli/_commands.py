"""The ``surge`` command: run an app, run the demo, look after dead letters.

::

    surge run module:app [--transport URL] [--workers N] [--http HOST:PORT]
              [--admin [HOST:]PORT] [--redact-bodies] [--no-consume]
    surge demo [--requests N] [--concurrency C] [--report PATH] [--in-process]
    surge dlq list|show|replay|purge module:app [--subscription S] [--id ID ...]
    surge asyncapi module:app [--yaml] [--output PATH]
    surge declare module:app [--transport URL]
    surge relay POSTGRES_URL TARGET_URL [--topic PATTERN ...] [--declare-only]

Commands that live in optional modules (``surge load``, ``surge top``) are
found lazily: the CLI works without them, and names what to install when one
needs an extra that is missing.
"""

from __future__ import annotations

import datetime
import errno
import importlib
import importlib.util
import ipaddress
import logging
import math
import os
import pathlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click
import msgspec
from rich.console import Console
from rich.table import Table

from .._errors import ConfigurationError, SurgeError, one_line

if TYPE_CHECKING:
    from .._app import App
    from .._transport import DeadLetter

__all__ = ("command_app", "load_app", "main")

T = TypeVar("T")
ADMIN_TOKEN_ENV = "SURGE_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a token
"""surge.observe.ADMIN_TOKEN_ENV, named again here: the CLI imports
surge.observe only when it serves HTTP."""

# name -> (module, attribute, what it does): commands other modules provide
_LAZY: dict[str, tuple[str, str, str]] = {
    "load": ("surge.cli._load", "load", "Drive HTTP load at a running app."),
    "top": ("surge.cli._top", "top", "A live terminal view of a running app."),
}


class _Group(click.Group):
    """A group that also offers the commands of optional modules, imported
    only when such a command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        for name, (module, _, _) in _LAZY.items():
            if _module_exists(module):
                names.add(name)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None or cmd_name not in _LAZY:
            return cmd
        module, attr, help_text = _LAZY[cmd_name]
        if not _module_exists(module):
            return None
        try:
            found = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            hint = "; try: pip install 'surge[http]'" if cmd_name == "load" else ""
            return _unavailable(cmd_name, help_text, f"{exc}{hint}")
        except Exception as exc:  # a broken optional module must not break the CLI
            return _unavailable(cmd_name, help_text, f"{type(exc).__name__}: {exc}")
        if not isinstance(found, click.Command):
            return _unavailable(cmd_name, help_text, f"{module}.{attr} is not a click command")
        return found


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _unavailable(name: str, help_text: str, reason: str) -> click.Command:
    def fail() -> None:
        raise click.ClickException(f"surge {name} is unavailable: {reason}")

    return click.Command(name, callback=fail, help=f"{help_text} (unavailable: {reason})")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surge", prog_name="surge")
def main() -> None:
    """surge: event-driven high-concurrency applications."""


# --- loading an app -----------------------------------------------------------
def load_app(ref: str) -> App:
    """The :class:`App` named by ``ref`` (``"package.module:attr"``), looked
    for in the current directory first, as a user running ``surge`` expects."""
    from ._supervisor import load_app as load

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return load(ref)


def command_app(ref: str, transport: str | None) -> App:
    """The app ``ref`` for a command, on ``transport`` when given; a
    ClickException saying why when it cannot be loaded."""
    try:
        app = load_app(ref)
        if transport is not None:
            app.use_transport(transport)
        # made here, not at start: a missing extra or a bad URL is told
        # before anything runs (it connects only at start)
        app.transport  # noqa: B018
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    except ImportError as exc:
        raise click.ClickException(_missing(exc)) from None
    return app


def _missing(exc: ImportError) -> str:
    """One line for an ImportError: surge's own name the extra to install;
    a module the app imports is named with where it was asked for."""
    text = str(exc)
    if "pip install" in text:
        return text
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" (imported at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
    return f"{text}{where}: install it in this environment"


def _transport_url(app: App, override: str | None) -> str:
    # app.transport makes the transport object; it connects only at start
    if override is not None:
        return override
    try:
        return app.transport.url
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    except ImportError as exc:
        raise click.ClickException(_missing(exc)) from None


def _host_port(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{value!r}: write it as HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]") or "127.0.0.1", int(port)


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    from .._app import run_loop

    async def main() -> T:
        return await coro_fn()

    return run_loop(main())


def _failed(exc: SurgeError) -> click.ClickException:
    """The one line for a surge error: the class a user can look up (a
    transport's private subclass shows as the public class it refines) and
    the message."""
    return click.ClickException(one_line(exc))


# --- surge run ----------------------------------------------------------------
@main.command()
@click.argument("app_ref", metavar="MODULE:APP")
@click.option("--transport", "-t", metavar="URL", help="Override the app's transport.")
@click.option(
    "--workers",
    "-w",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes (needs a transport they share: sqlite, redis, nats).",
)
@click.option("--http", "http", metavar="HOST:PORT", help="Also serve the app's HTTP ingress.")
@click.option(
    "--admin",
    "admin",
    metavar="[HOST:]PORT",
    help="Serve /metrics and /_surge/ on this admin listener (host 127.0.0.1 by default).",
)
@click.option(
    "--redact-bodies", is_flag=True, help="Show no event bodies in the dashboard's dead letters."
)
@click.option(
    "--no-consume",
    is_flag=True,
    help="Publish only (an ingress tier): declare the subscriptions' groups, handle nothing.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    metavar="PEM",
    help="Serve HTTPS with this certificate (chain).",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    metavar="PEM",
    help="The private key of --tls-cert.",
)
def run(
    app_ref: str,
    transport: str | None,
    workers: int,
    http: str | None,
    admin: str | None,
    redact_bodies: bool,
    no_consume: bool,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Run the app MODULE:APP until SIGINT or SIGTERM, then stop gracefully.

    With --no-consume the process declares every subscription's group (so
    what it publishes before any worker ran is kept for them) and handles
    nothing: an HTTP front beside separate workers.

    With --http, the operator surface (/metrics, /_surge/) is not served on
    the public listener unless SURGE_ADMIN_TOKEN is set (then only to
    requests bearing it); --admin serves it on a listener of its own.
    """
    address = _host_port(http)
    admin_address = _admin_address(admin, address)
    if (tls_cert is None) != (tls_key is None):
        raise click.BadParameter("--tls-cert and --tls-key go together")
    tls: dict[str, str] = {"tls_cert": tls_cert, "tls_key": tls_key} if tls_cert and tls_key else {}
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = command_app(app_ref, transport)
    if no_consume:
        app.consume = False
    url = _transport_url(app, transport)
    if workers > 1:
        if url.split("://", 1)[0] == "memory":
            raise click.ClickException(
                f"--workers {workers} needs a transport that processes share, and {url} "
                "lives inside one process: use --transport sqlite:///app.db (one machine) or "
                "redis:// / nats:// (many), or run with --workers 1"
            )
        try:
            supervisor = importlib.import_module("surge.cli._supervisor")
        except ImportError as exc:
            raise click.ClickException(
                f"--workers is unavailable: the supervisor module cannot be imported ({exc})"
            ) from None
        try:
            code = supervisor.run_workers(
                app_ref,
                url,
                workers,
                http=address,
                admin=admin_address,
                redact=redact_bodies,
                consume=not no_consume,
                **tls,
            )
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from None
        sys.exit(code)
    try:
        if address is not None:
            _serve_http(app, address, admin_address, redact_bodies, tls)
        else:
            app.run()
    except SurgeError as exc:
        raise _failed(exc) from None


def _admin_address(value: str | None, http: tuple[str, int] | None) -> tuple[str, int] | None:
    """``--admin``'s host and port (loopback unless named); a listener on
    another interface needs the admin token, since reaching it is all the
    proof of identity it asks for otherwise."""
    if value is None:
        return None
    if http is None:
        raise click.BadParameter("--admin serves the operator surface of --http: give both")
    address = _host_port(value if ":" in value else f"127.0.0.1:{value}")
    assert address is not None
    if not _is_loopback(address[0]) and not os.environ.get(ADMIN_TOKEN_ENV):
        raise click.BadParameter(
            f"--admin {value}: an admin listener off loopback needs {ADMIN_TOKEN_ENV} set"
        )
    return address


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve_http(
    app: App,
    address: tuple[str, int],
    admin: tuple[str, int] | None,
    redact: bool,
    tls: dict[str, str],
) -> None:
    try:
        from ..http import run as run_http
        from ..observe import mount
    except ImportError as exc:
        raise click.ClickException(
            f"--http needs surge's HTTP ingress: pip install 'surge[http]' ({exc})"
        ) from None
    mount(app.http, redact=redact)  # /_surge/ and the subscriptions' metrics
    from ..asyncapi import mount as mount_asyncapi

    mount_asyncapi(app.http)  # /asyncapi.json, public like an OpenAPI document
    app.http.set_admin_token(os.environ.get(ADMIN_TOKEN_ENV) or None)

    def ready(server: Any) -> None:
        # the bound port: --http HOST:0 picks a free one
        scheme = "https" if tls else "http"
        if server.admin:
            click.echo(f"serving the admin surface on {scheme}://{server.host}:{server.port}")
        else:
            click.echo(f"serving HTTP on {scheme}://{address[0]}:{server.port}")

    try:
        run_http(app, address[0], address[1], admin=admin, ready=ready, **tls)
    except OSError as exc:
        raise click.ClickException(_bind_error(exc, address, admin)) from None


def _bind_error(exc: OSError, address: tuple[str, int], admin: tuple[str, int] | None) -> str:
    """What to do about a listener that could not bind (or a TLS file that
    could not be read, the other OSError serving raises)."""
    where = " or ".join(f"{h}:{p}" for h, p in (address, *([admin] if admin else [])))
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: the address is in use by another program; "
            "stop it or pick another port (--http HOST:0 takes a free one)"
        )
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied; use a port above 1023"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: no interface of this machine has that address"
    if exc.filename is not None:
        return f"cannot read {os.path.abspath(exc.filename)}: {exc.strerror}"
    return f"cannot listen on {where}: {exc.strerror or exc}"


# --- surge demo ---------------------------------------------------------------
@main.command()
@click.option(
    "--events",
    "--requests",
    "-n",
    "events",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Orders to send.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="HTTP connections the load generator keeps open.",
)
@click.option(
    "--client",
    type=click.Choice(["process", "loop"]),
    default="process",
    show_default=True,
    help="Run the load generator in a child process or on the server's loop.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    default=pathlib.Path("surge-demo-report.html"),
    show_default=True,
    help="Where to write the latency-over-time chart (self-contained HTML).",
)
@click.option(
    "--in-process",
    is_flag=True,
    help="Publish from coroutines in the app's process instead of over HTTP.",
)
@click.option(
    "--producers",
    "-p",
    type=click.IntRange(min=1),
    default=1_000,
    show_default=True,
    help="Producer coroutines (with --in-process).",
)
@click.option(
    "--target-latency",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Queueing delay (seconds) the ingress admits up to [0.25]: lower sheds more "
    "and ships sooner.",
)
@click.option("--transport", "-t", metavar="URL", default="memory://", show_default=True)
@click.option("--progress/--no-progress", default=True, help="Show the live progress bars.")
def demo(
    events: int,
    concurrency: int,
    client: str,
    report_path: pathlib.Path,
    in_process: bool,
    producers: int,
    target_latency: float | None,
    transport: str,
    progress: bool,
) -> None:
    """Run the example order pipeline (surge.examples.shop) with its HTTP
    ingress on a local port, drive it with the built-in load generator over
    real sockets, and report requests/s, latency, status codes and whether
    every accepted order was handled exactly once. --in-process floods it
    from coroutines in its own process instead."""
    if in_process and target_latency is not None:
        raise click.UsageError("--target-latency is the HTTP ingress's: not with --in-process")
    if target_latency is not None and not math.isfinite(target_latency):
        raise click.UsageError("--target-latency takes a finite number of seconds")
    try:
        if in_process:
            from ..tools import run_demo

            ok = run_demo(
                events=events, producers=producers, transport=transport, progress=progress
            ).ok
        else:
            try:
                from ..http import Server  # noqa: F401 - needs the http extra
                from ..tools import run_http_demo
            except ImportError as exc:
                raise click.ClickException(f"{exc} (or run `surge demo --in-process`)") from None
            ok = run_http_demo(
                requests=events,
                concurrency=concurrency,
                transport=transport,
                chart=report_path,
                progress=progress,
                client=client,
                target_latency=target_latency,
            ).ok
    except SurgeError as exc:
        raise _failed(exc) from None
    if not ok:
        sys.exit(1)


# --- surge asyncapi -----------------------------------------------------------
@main.command()
@click.argument("app_ref", metavar="MODULE:APP")
@click.option("--yaml", "as_yaml", is_flag=True, help="YAML instead of JSON (needs PyYAML).")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="Write it here instead of printing it.",
)
@click.option("--transport", "-t", metavar="URL", help="Describe the app on this transport.")
@click.option("--title", help="The document's title [the app's name].")
@click.option("--version", "doc_version", default="1.0.0", show_default=True, help="info.version")
def asyncapi(
    app_ref: str,
    as_yaml: bool,
    output: pathlib.Path | None,
    transport: str | None,
    title: str | None,
    doc_version: str,
) -> None:
    """Print the AsyncAPI 3.0 document of MODULE:APP: a channel per topic,
    the event types' JSON Schemas, an operation per subscription and per
    event a handler returns, the HTTP routes, the transport as server."""
    from ..asyncapi import document

    app = command_app(app_ref, transport)
    doc = document(app, title=title, version=doc_version)
    if as_yaml:
        try:
            import yaml
        except ImportError:
            raise click.ClickException(
                "--yaml needs PyYAML: pip install 'surge[asyncapi]' (or leave --yaml out for JSON)"
            ) from None
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    else:
        text = msgspec.json.format(msgspec.json.encode(doc), indent=2).decode() + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)


# --- surge declare ------------------------------------------------------------
@main.command()
@click.argument("app_ref", metavar="MODULE:APP")
@click.option("--transport", "-t", metavar="URL", help="Override the app's transport.")
def declare(app_ref: str, transport: str | None) -> None:
    """Declare every group of MODULE:APP's subscriptions on its transport,
    then exit (a deploy step): from then on the transport keeps what is
    published for them, before any worker ever ran."""
    app = command_app(app_ref, transport)

    async def go() -> None:
        await app.start(consume=False)
        await app.stop()

    try:
        _run(go)
    except SurgeError as exc:
        raise _failed(exc) from None
    for name, sub in sorted(app.subscriptions.items()):
        click.echo(f"{name}: {' '.join(sub.topics)}")


# --- surge relay ---------------------------------------------------------------
@main.command()
@click.argument("source", metavar="POSTGRES_URL")
@click.argument("target", metavar="TARGET_URL")
@click.option(
    "--topic",
    "topics",
    multiple=True,
    metavar="PATTERN",
    help="Relay only topics matching PATTERN (repeatable; '*' one token, '>' the rest). "
    "Default: every topic.",
)
@click.option("--group", default="surge.relay", show_default=True, help="The relay's group.")
@click.option(
    "--declare-only", is_flag=True, help="Declare the relay's group, then exit (a deploy step)."
)
def relay(
    source: str, target: str, topics: tuple[str, ...], group: str, declare_only: bool
) -> None:
    """Move the events committed to a postgresql:// outbox to TARGET_URL
    (redis://, nats://, ...) until SIGINT or SIGTERM.

    The app writes its events inside its own transactions on the schema
    (app.publish(event, connection=conn) on an App whose transport is
    POSTGRES_URL); the relay publishes each committed one on the target,
    at least once, a key's events in order, and never a rolled-back one.
    Only what is written after the group exists is kept: run the relay
    (or --declare-only) before the first write."""
    import signal

    from ..transports.postgres import Relay

    try:
        r = Relay(source, target, topics=topics or (">",), group=group)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    except ImportError as exc:
        raise click.ClickException(_missing(exc)) from None

    async def go() -> None:
        import asyncio

        await r.start()
        try:
            if declare_only:
                return
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, r.stop)
            click.echo(f"relaying {', '.join(r.topics)} from {r.source!r} as {group}", err=True)
            await r.run()
        finally:
            await r.close()

    try:
        _run(go)
    except SurgeError as exc:
        raise _failed(exc) from None
    if declare_only:
        click.echo(f"{group}: {' '.join(r.topics)}")
    else:
        click.echo(f"relayed {r.relayed} events ({r.dead} dead-lettered)", err=True)


# --- surge dlq ----------------------------------------------------------------
@main.group()
def dlq() -> None:
    """Inspect, replay or purge dead letters (without running any handler)."""


def _dlq_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--transport", "-t", metavar="URL", help="Override the app's transport.")(fn)
    fn = click.option(
        "--id", "ids", multiple=True, metavar="ID", help="Only this dead letter (repeatable)."
    )(fn)
    fn = click.option("--subscription", "-s", metavar="NAME", help="Only this subscription.")(fn)
    return click.argument("app_ref", metavar="MODULE:APP")(fn)


async def _letters(app: App, subscription: str | None, ids: Sequence[str]) -> list[DeadLetter]:
    """The dead letters asked for; an id given that is not among them is a
    ClickException (exit 1), never an empty answer."""
    letters = await app.dead_letters(subscription)
    if ids:
        wanted = set(ids)
        letters = [d for d in letters if d.id in wanted]
        missing = sorted(wanted - {d.id for d in letters})
        if missing:
            where = f" of subscription {subscription!r}" if subscription else ""
            raise click.ClickException(
                f"no dead letter{'s' if len(missing) > 1 else ''}{where} with id "
                f"{', '.join(missing)}; `surge dlq list` shows the ids there are"
            )
    return letters


def _with_transport(app_ref: str, transport: str | None, work: Callable[[App], Awaitable[T]]) -> T:
    """Open the app's transport (declaring nothing, consuming nothing), run
    ``work``, close it."""
    app = command_app(app_ref, transport)

    async def go() -> T:
        await app.transport.start()
        try:
            return await work(app)
        finally:
            await app.transport.close()

    try:
        return _run(go)
    except SurgeError as exc:
        raise _failed(exc) from None


def _console() -> Console:
    console = Console()
    # Piped output keeps whole ids and tracebacks rather than 80 columns.
    return console if console.is_terminal else Console(width=160)


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@dlq.command("list")
@_dlq_options
def dlq_list(
    app_ref: str, subscription: str | None, ids: tuple[str, ...], transport: str | None
) -> None:
    """List dead letters: id, subscription, topic, error, attempts, when."""
    console = _console()

    async def work(app: App) -> None:
        letters = await _letters(app, subscription, ids)
        if not letters:
            console.print("no dead letters")
            return
        table = Table(box=None, pad_edge=False)
        for col in ("id", "subscription", "topic", "error", "attempts", "failed at (UTC)"):
            table.add_column(
                col, no_wrap=col == "id", justify="right" if col == "attempts" else "left"
            )
        for d in letters:
            table.add_row(
                d.id,
                d.group,  # the name metrics, the dashboard and logs use
                d.topic,
                d.error_type,
                str(d.attempts),
                _when(d.failed_at),
            )
        console.print(table)
        console.print(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}")

    _with_transport(app_ref, transport, work)


def _body_text(body: bytes) -> str:
    """The body as indented JSON when it decodes as msgpack or JSON."""
    for decode in (msgspec.msgpack.decode, msgspec.json.decode):
        try:
            value = decode(body)
        except (msgspec.DecodeError, ValueError):
            continue
        try:
            return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
        except (TypeError, ValueError):
            break
    return repr(body)


@dlq.command("show")
@_dlq_options
def dlq_show(
    app_ref: str, subscription: str | None, ids: tuple[str, ...], transport: str | None
) -> None:
    """Show dead letters in full: headers, body, error and traceback."""
    console = _console()

    async def work(app: App) -> None:
        letters = await _letters(app, subscription, ids)
        if not letters:
            console.print("no dead letters")
        for d in letters:
            console.rule(f"[bold]{d.id}[/bold]")
            table = Table.grid(padding=(0, 2))
            table.add_column(style="bold")
            table.add_column()
            table.add_row("subscription", d.group)
            table.add_row("topic", d.topic)
            table.add_row("key", d.key or "-")
            table.add_row("attempts", str(d.attempts))
            table.add_row("first attempt", _when(d.first_attempt_at))
            table.add_row("failed at", _when(d.failed_at))
            table.add_row("error", f"{d.error_type}: {d.error}")
            table.add_row("headers", msgspec.json.encode(d.headers or {}).decode())
            console.print(table)
            console.print("[bold]body[/bold]")
            console.print(_body_text(d.body), markup=False, highlight=False)
            console.print("[bold]traceback[/bold]")
            console.print(d.traceback.rstrip() or "-", markup=False, highlight=False)

    _with_transport(app_ref, transport, work)


async def _settle(
    app: App,
    subscription: str | None,
    ids: Sequence[str],
    action: Callable[[str, Sequence[str] | None], Awaitable[int]],
) -> dict[str, int]:
    """Apply ``action`` per subscription that holds matching dead letters."""
    letters = await _letters(app, subscription, ids)
    groups: dict[str, list[str]] = {}
    for d in letters:
        groups.setdefault(d.group, []).append(d.id)
    done: dict[str, int] = {}
    for group, group_ids in groups.items():
        done[group] = await action(group, group_ids if ids else None)
    return done


def _settle_command(verb: str, past: str) -> Callable[..., None]:
    def command(
        app_ref: str,
        subscription: str | None,
        ids: tuple[str, ...],
        transport: str | None,
        all_: bool,
    ) -> None:
        if not ids and not all_:
            raise click.UsageError("say which: --id ID (repeatable) or --all")
        console = _console()

        async def work(app: App) -> dict[str, int]:
            fn = app.replay if verb == "replay" else app.purge
            return await _settle(app, subscription, ids, fn)

        done = _with_transport(app_ref, transport, work)
        total = sum(done.values())
        for group, n in sorted(done.items()):
            console.print(f"{group}: {n} {past}")
        console.print(f"{total} dead letter{'s' if total != 1 else ''} {past}")
        if ids and total < len(set(ids)):
            raise click.ClickException(f"{len(set(ids)) - total} of the given ids were not found")

    return command


_ALL = click.option("--all", "all_", is_flag=True, help="Every dead letter that matches.")

dlq.command(
    "replay", help="Deliver dead letters to their subscription again (next run consumes them)."
)(_ALL(_dlq_options(_settle_command("replay", "replayed"))))
dlq.command("purge", help="Delete dead letters for good.")(
    _ALL(_dlq_options(_settle_command("purge", "purged")))
)
