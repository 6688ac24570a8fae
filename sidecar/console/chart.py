"""The key page's requests-per-day chart: a small SVG drawn on the server.

No chart library: thirty bars and two labels are a few dozen lines of SVG, need no
JavaScript, pass a ``script-src 'self'`` / ``style-src 'self'`` CSP untouched (presentation
attributes and classes only, no ``style=``), print, and weigh about 4 KB. Every bar has a
``<title>`` (hover, screen readers); the same numbers are in a table beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

__all__ = ["Day", "bar_chart", "fill_days", "human_bytes"]

WIDTH, HEIGHT = 900, 150
TOP, BOTTOM, LEFT = 14, 20, 4  # room for the scale label above and the dates below


@dataclass(frozen=True, slots=True)
class Day:
    day: str  # YYYY-MM-DD (UTC)
    requests: int = 0
    errors: int = 0
    bytes: int = 0
    rate_limited: int = 0


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - the loop returns


def fill_days(rows: list[dict[str, Any]], days: int, now: float) -> list[Day]:
    """One ``Day`` per UTC day of the last ``days`` (today last), zeros where nothing was counted."""
    by_day = {str(r["day"]): r for r in rows}
    out = []
    for i in range(days - 1, -1, -1):
        d = time.strftime("%Y-%m-%d", time.gmtime(now - i * 86400))
        r = by_day.get(d, {})
        out.append(
            Day(d, int(r.get("requests", 0)), int(r.get("errors", 0)), int(r.get("bytes", 0)),
                int(r.get("rate_limited", 0)))
        )  # fmt: skip
    return out


def bar_chart(days: list[Day]) -> Markup:
    """Requests per day as bars, the errors of each day drawn over its bar in the error colour."""
    top = max((d.requests for d in days), default=0) or 1
    n = max(len(days), 1)
    slot = (WIDTH - LEFT) / n
    bar = max(slot * 0.7, 1.0)
    plot = HEIGHT - TOP - BOTTOM
    total = sum(d.requests for d in days)
    errors = sum(d.errors for d in days)
    label = f"Requests per day, {days[0].day} to {days[-1].day}: {total} requests, {errors} errors" if days else ""
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f'<line class="axis" x1="0" y1="{HEIGHT - BOTTOM}" x2="{WIDTH}" y2="{HEIGHT - BOTTOM}"/>',
        f'<text class="scale" x="{LEFT}" y="10">{top} req/day</text>',
    ]
    for i, d in enumerate(days):
        x = LEFT + i * slot + (slot - bar) / 2
        h = plot * d.requests / top
        eh = plot * min(d.errors, d.requests) / top
        base = HEIGHT - BOTTOM
        tip = (f"{d.day}: {d.requests} requests, {d.errors} errors, {d.rate_limited} rate-limited, "
               f"{human_bytes(d.bytes)}")  # fmt: skip
        parts.append(f'<g class="day"><title>{escape(tip)}</title>')
        parts.append(f'<rect class="hit" x="{LEFT + i * slot:.1f}" y="{TOP}" width="{slot:.1f}" height="{plot}"/>')
        if d.requests:
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{base - h:.1f}" width="{bar:.1f}" height="{max(h, 1):.1f}"/>'
            )
        if d.errors:
            parts.append(
                f'<rect class="bar-err" x="{x:.1f}" y="{base - eh:.1f}" width="{bar:.1f}" height="{max(eh, 1):.1f}"/>'
            )
        parts.append("</g>")
    if days:
        parts.append(f'<text class="date" x="{LEFT}" y="{HEIGHT - 5}">{days[0].day}</text>')
        parts.append(f'<text class="date" x="{WIDTH}" y="{HEIGHT - 5}" text-anchor="end">{days[-1].day}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - built from numbers and escaped text only
