"""A load run's latency over time as one self-contained HTML file (inline
SVG, no script, no network)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._load import LoadReport

__all__ = ("render_chart", "write_chart")

_W, _H, _PAD = 860, 300, 56
_SERIES = (("p50", 2, "#2563eb"), ("p99", 3, "#ea580c"), ("max", 4, "#9ca3af"))


def write_chart(report: LoadReport, path: Path) -> Path:
    path.write_text(render_chart(report), encoding="utf-8")
    return path


def render_chart(report: LoadReport) -> str:
    ms = 1000.0
    rows = report.timeline
    t_end = max(report.duration, rows[-1][0] if rows else 0.0) or 1.0
    width = (rows[1][0] - rows[0][0]) if len(rows) > 1 else t_end
    y_top = max((r[4] for r in rows), default=0.0) * ms or 1.0
    rps_top = max((r[1] / width for r in rows), default=0.0) or 1.0

    def x(t: float) -> float:
        return _PAD + (_W - 2 * _PAD) * t / t_end

    def y(v: float, top: float, height: int) -> float:
        return _PAD / 2 + (height - _PAD) * (1 - v / top)

    lines = []
    for name, col, color in _SERIES:
        pts = " ".join(f"{x(r[0]):.1f},{y(r[col] * ms, y_top, _H):.1f}" for r in rows)
        dash = ' stroke-dasharray="4 3"' if name == "max" else ""
        lines.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.6"{dash} points="{pts}"/>'
        )
    legend = "".join(
        f'<text x="{_PAD + 90 * k}" y="14" fill="{c}" font-size="12">{n} latency</text>'
        for k, (n, _, c) in enumerate(_SERIES)
    )
    rps_pts = " ".join(f"{x(r[0]):.1f},{y(r[1] / width, rps_top, 200):.1f}" for r in rows)
    axis = (_axes(t_end, y_top, "ms", _H), _axes(t_end, rps_top, "req/s", 200))
    statuses = ", ".join(f"{k}: {v:,}" for k, v in report.statuses.items()) or "none"
    errors = ", ".join(f"{k}: {v:,}" for k, v in sorted(report.errors.items())) or "none"
    summary = [
        ("URL", report.url),
        ("answered", f"{report.completed:,} / {report.requests:,} in {report.duration:.2f} s"),
        ("throughput", f"{report.rps:,.0f} req/s"),
        (
            "latency",
            f"p50 {report.p50 * ms:.2f} ms · p95 {report.p95 * ms:.2f} ms · "
            f"p99 {report.p99 * ms:.2f} ms · max {report.max * ms:.2f} ms",
        ),
        ("status codes", statuses),
        ("errors", errors),
    ]
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>surge load report</title>
<style>
body{{font:14px system-ui,sans-serif;margin:24px;color:#111}}
th{{text-align:left;padding-right:16px;color:#555;font-weight:500}}
svg{{background:#fafafa;border:1px solid #ddd;margin-top:12px;display:block}}
</style></head><body>
<h1>surge load report</h1>
<table>{table}</table>
<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img"
 aria-label="latency over time">{legend}{axis[0]}{"".join(lines)}</svg>
<svg width="{_W}" height="200" viewBox="0 0 {_W} 200" role="img"
 aria-label="throughput over time"><text x="{_PAD}" y="14" font-size="12"
 fill="#16a34a">answers per second</text>{axis[1]}
<polyline fill="none" stroke="#16a34a" stroke-width="1.6" points="{rps_pts}"/></svg>
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
