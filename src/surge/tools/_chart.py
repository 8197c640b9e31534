"""A load run's latency over time as one self-contained HTML file (inline
SVG, no script, no network); with ``pipeline``, a second latency chart (the
demo's placed-to-shipped) and more summary rows beside the HTTP figures."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._load import LoadReport

__all__ = ("render_chart", "write_chart")

_W, _H, _PAD = 860, 300, 56
_SERIES = (("p50", 2, "#2563eb"), ("p99", 3, "#ea580c"), ("max", 4, "#9ca3af"))


Timeline = list[tuple[float, int, float, float, float]]
"""Per time slice: (start s, count, p50, p99, max), as ``LoadReport.timeline``."""


def write_chart(
    report: LoadReport,
    path: Path,
    *,
    pipeline: tuple[str, Timeline] | None = None,
    rows: Sequence[tuple[str, str]] = (),
) -> Path:
    path.write_text(render_chart(report, pipeline=pipeline, rows=rows), encoding="utf-8")
    return path


def _latency_svg(rows: Timeline, t_end: float, label: str, what: str) -> str:
    ms = 1000.0
    y_top = max((r[4] for r in rows), default=0.0) * ms or 1.0

    def x(t: float) -> float:
        return _PAD + (_W - 2 * _PAD) * t / t_end

    def y(v: float) -> float:
        return _PAD / 2 + (_H - _PAD) * (1 - v / y_top)

    lines = []
    for name, col, color in _SERIES:
        pts = " ".join(f"{x(r[0]):.1f},{y(r[col] * ms):.1f}" for r in rows)
        dash = ' stroke-dasharray="4 3"' if name == "max" else ""
        lines.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.6"{dash} points="{pts}"/>'
        )
    legend = "".join(
        f'<text x="{_PAD + 160 * k}" y="14" fill="{c}" font-size="12">{n} {what}</text>'
        for k, (n, _, c) in enumerate(_SERIES)
    )
    return (
        f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img"\n'
        f' aria-label="{html.escape(label)}">{legend}{_axes(t_end, y_top, "ms", _H)}'
        f"{''.join(lines)}</svg>"
    )


def render_chart(
    report: LoadReport,
    *,
    pipeline: tuple[str, Timeline] | None = None,
    rows: Sequence[tuple[str, str]] = (),
) -> str:
    ms = 1000.0
    timeline = report.timeline
    t_end = max(report.duration, timeline[-1][0] if timeline else 0.0) or 1.0
    if pipeline is not None and pipeline[1]:
        t_end = max(t_end, pipeline[1][-1][0])
    width = (timeline[1][0] - timeline[0][0]) if len(timeline) > 1 else t_end
    rps_top = max((r[1] / width for r in timeline), default=0.0) or 1.0

    def x(t: float) -> float:
        return _PAD + (_W - 2 * _PAD) * t / t_end

    def y(v: float, top: float, height: int) -> float:
        return _PAD / 2 + (height - _PAD) * (1 - v / top)

    rps_pts = " ".join(f"{x(r[0]):.1f},{y(r[1] / width, rps_top, 200):.1f}" for r in timeline)
    statuses = ", ".join(f"{k}: {v:,}" for k, v in report.statuses.items()) or "none"
    errors = ", ".join(f"{k}: {v:,}" for k, v in sorted(report.errors.items())) or "none"
    summary = [
        ("URL", report.url),
        ("answered", f"{report.completed:,} / {report.requests:,} in {report.duration:.2f} s"),
        ("throughput", f"{report.rps:,.0f} req/s"),
        (
            "HTTP latency",
            f"p50 {report.p50 * ms:.2f} ms · p95 {report.p95 * ms:.2f} ms · "
            f"p99 {report.p99 * ms:.2f} ms · max {report.max * ms:.2f} ms",
        ),
        ("status codes", statuses),
        ("503 sent again", f"{report.retried:,} ({report.retried_requests:,} requests)"),
        ("errors", errors),
        *rows,
    ]
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary
    )
    http_svg = _latency_svg(timeline, t_end, "HTTP latency over time", "HTTP latency")
    second = ""
    if pipeline is not None:
        title, series = pipeline
        second = f"<h2>{html.escape(title)}</h2>" + _latency_svg(
            series, t_end, f"{title} over time", "latency"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>surge load report</title>
<style>
body{{font:14px system-ui,sans-serif;margin:24px;color:#111}}
th{{text-align:left;padding-right:16px;color:#555;font-weight:500}}
svg{{background:#fafafa;border:1px solid #ddd;margin-top:12px;display:block}}
h2{{font-size:16px;margin:20px 0 0}}
</style></head><body>
<h1>surge load report</h1>
<table>{table}</table>
<h2>HTTP: request to final answer, by when the request was first sent</h2>
{http_svg}
<svg width="{_W}" height="200" viewBox="0 0 {_W} 200" role="img"
 aria-label="throughput over time"><text x="{_PAD}" y="14" font-size="12"
 fill="#16a34a">answers per second</text>{_axes(t_end, rps_top, "req/s", 200)}
<polyline fill="none" stroke="#16a34a" stroke-width="1.6" points="{rps_pts}"/></svg>
{second}
</body></html>
"""


def _axes(t_end: float, top: float, unit: str, height: int) -> str:
    parts = []
    left, right = _PAD, _W - _PAD
    bottom = height - _PAD / 2
    for k in range(5):
        v = top * k / 4
        yy = _PAD / 2 + (height - _PAD) * (1 - k / 4)
        parts.append(
            f'<line x1="{left}" x2="{right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e5e7eb"/>'
            f'<text x="{left - 6}" y="{yy + 4:.1f}" font-size="11" text-anchor="end">'
            f"{v:,.1f}</text>"
        )
    for k in range(6):
        t = t_end * k / 5
        xx = left + (right - left) * k / 5
        parts.append(
            f'<text x="{xx:.1f}" y="{bottom + 16:.1f}" font-size="11" '
            f'text-anchor="middle">{t:.1f}s</text>'
        )
    parts.append(f'<text x="8" y="{_PAD / 2 - 8}" font-size="11">{unit}</text>')
    return "".join(parts)
