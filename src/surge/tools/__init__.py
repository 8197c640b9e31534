"""Tools built on surge: the demo (in process and over HTTP) and an HTTP
load generator with its client and latency chart.

Not part of any app: ``surge demo`` and ``surge load`` run them. The load
generator needs the ``http`` extra (httptools), so its names are imported
on first use and the in-process demo works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = (
    "LoadReport",
    "Response",
    "fetch",
    "run_demo",
    "run_http_demo",
    "run_load",
    "write_chart",
)

if TYPE_CHECKING:
    from ._chart import write_chart
    from ._client import Response, fetch
    from ._demo import run_demo
    from ._demo_http import run_http_demo
    from ._load import LoadReport, run_load

_HOMES = {
    "LoadReport": "_load",
    "Response": "_client",
    "fetch": "_client",
    "run_demo": "_demo",
    "run_http_demo": "_demo_http",
    "run_load": "_load",
    "write_chart": "_chart",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'surge.tools' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
