"""``surge top``: a live terminal view of a running app's subscriptions.

Given a URL, it polls the app's ingress (``GET /_surge/stats``): rates,
handlers in flight, backlog, duration quantiles and dead letters. Given an
app reference (``module:app``), it reads the app's transport directly
(nothing is consumed): backlog, leased, scheduled and dead letters, with
rates from the backlog's changes.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import click
import msgspec
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ("fetch_stats", "render", "top")


async def fetch_stats(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """The JSON of ``url``'s ``/_surge/stats`` (with ``SURGE_ADMIN_TOKEN``
    as the bearer token when it is set)."""
    from ..tools import fetch
    from ._commands import ADMIN_TOKEN_ENV

    base = url.rstrip("/")
    if base.endswith("/_surge"):
        base = base[: -len("/_surge")]
    token = os.environ.get(ADMIN_TOKEN_ENV)
    headers = {"authorization": f"Bearer {token}"} if token else None
    r = await fetch(base + "/_surge/stats", headers=headers, timeout=timeout)
    if r.status != 200:
        raise click.ClickException(f"{base}/_surge/stats answered {r.status}: {r.body[:200]!r}")
    try:
        data: dict[str, Any] = msgspec.json.decode(r.body)
    except msgspec.DecodeError as exc:
        raise click.ClickException(
            f"{base}/_surge/stats is not surge's stats JSON: {exc}"
        ) from None
    return data


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.1f}ms"
    return f"{value:.2f}s"


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def render(stats: dict[str, Any]) -> Table:
    """The table ``surge top`` shows for one stats answer."""
    title = f"surge top: {stats['app']}"
    if stats.get("processes", 1) > 1:
        title += f" ({stats['processes']} workers)"
    table = Table(title=title, title_justify="left", expand=False)
    for name, justify in (
        ("subscription", "left"),
        ("rate/s", "right"),
        ("errors/s", "right"),
        ("in flight", "right"),
        ("backlog", "right"),
        ("p50", "right"),
        ("p99", "right"),
        ("handled", "right"),
        ("failed", "right"),
        ("retried", "right"),
        ("dead letters", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for sub, s in sorted(stats["subscriptions"].items()):
        dead = s.get("dead_letters")
        table.add_row(
            sub,
            f"{s.get('rate', 0):,.1f}",
            Text(f"{s.get('error_rate', 0):,.1f}", style="red" if s.get("error_rate") else ""),
            _int(s.get("in_flight")),
            _int(s.get("backlog")),
            _seconds(s.get("p50")),
            _seconds(s.get("p99")),
            _int(s.get("succeeded")),
            _int(s.get("failed")),
            _int(s.get("retried")),
            Text(_int(dead), style="bold red" if dead else ""),
        )
    return table


class _TransportReader:
    """Stats of an app read from its transport, for ``surge top module:app``."""

    def __init__(self, app_ref: str, transport: str | None) -> None:
        from ._commands import command_app

        self.app = command_app(app_ref, transport)
        self._last: tuple[float, dict[str, int]] | None = None

    async def start(self) -> None:
        await self.app.transport.start()

    async def close(self) -> None:
        await self.app.transport.close()

    async def __call__(self) -> dict[str, Any]:
        from .._errors import SurgeError

        try:
            return await self._read()
        except SurgeError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None

    async def _read(self) -> dict[str, Any]:
        now = time.monotonic()
        subs: dict[str, Any] = {}
        totals: dict[str, int] = {}
        for name in self.app.subscriptions:
            st = await self.app.transport.stats(name)
            total = st.backlog + st.pending + st.scheduled
            totals[name] = total
            rate = 0.0
            if self._last is not None and now > self._last[0] and name in self._last[1]:
                # the backlog's fall is a lower bound of the handling rate
                rate = max(0.0, (self._last[1][name] - total) / (now - self._last[0]))
            subs[name] = {
                "rate": rate,
                "in_flight": st.pending,
                "backlog": st.backlog + st.scheduled,
                "dead_letters": st.dead,
            }
        self._last = (now, totals)
        return {"app": self.app.name, "processes": 1, "subscriptions": subs}


@click.command("top")
@click.argument("target", metavar="URL_OR_MODULE:APP")
@click.option("--transport", "-t", metavar="URL", help="For MODULE:APP: override its transport.")
@click.option(
    "--interval", "-i", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
    help="Seconds between refreshes.",
)  # fmt: skip
@click.option("--once", is_flag=True, help="Print one table and exit.")
def top(target: str, transport: str | None, interval: float, once: bool) -> None:
    """A live view of every subscription: rates, in flight, backlog, p99, dead letters.

    URL is a running app's HTTP ingress (``surge run ... --http``), e.g.
    http://127.0.0.1:8000; MODULE:APP reads the app's transport directly.
    """
    asyncio.run(_top(target, transport, interval, once))


async def _top(target: str, transport: str | None, interval: float, once: bool) -> None:
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped: whole names, not 80 columns
    if target.startswith(("http://", "https://")):
        if target.startswith("https://"):
            raise click.ClickException("surge top speaks plain HTTP; use http://")
        reader: Any = None

        async def read() -> dict[str, Any]:
            try:
                return await fetch_stats(target)
            except OSError as exc:
                raise click.ClickException(f"cannot reach {target}: {exc}") from None

    else:
        reader = _TransportReader(target, transport)
        await reader.start()
        read = reader
    try:
        if once:
            console.print(render(await read()))
            return
        with Live(render(await read()), console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(render(await read()), refresh=True)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        if reader is not None:
            await reader.close()
