"""Turning rounds of measurements into the one results table, the ratios and the budget.

A ``Cell`` is one target in one scenario: its wrk rounds (aggregated by median, so one
noisy round cannot swing the result) or, for in-process rows, pre-formatted text.
``render`` produces Markdown that reads well in a terminal too, so stdout and
``bench/results/latest.md`` are the same text.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from .wrk import WrkResult

__all__ = ["Budget", "Cell", "fmt_ms", "fmt_us", "render"]


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return ""
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def fmt_us(us: float | None) -> str:
    if us is None:
        return ""
    if us >= 1000:
        return fmt_ms(us / 1000)
    return f"{us:.1f} µs"


def fmt_num(x: float | None) -> str:
    if x is None:
        return ""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


@dataclass
class Cell:
    scenario: str
    target: str
    samples: list[WrkResult] = field(default_factory=list)
    na: str | None = None  # why this target could not be measured
    rss_mib: float | None = None
    note: str = ""
    # In-process rows fill these instead of samples.
    text_p50: str = ""
    text_p99: str = ""
    show_mb_s: bool = False

    @property
    def ok(self) -> bool:
        return self.na is None and bool(self.samples)

    def _median(self, attr: str) -> float | None:
        if not self.ok:
            return None
        return statistics.median(getattr(s, attr) for s in self.samples)

    @property
    def rps(self) -> float | None:
        return self._median("rps")

    @property
    def p50_ms(self) -> float | None:
        return self._median("p50_ms")

    @property
    def p99_ms(self) -> float | None:
        return self._median("p99_ms")

    @property
    def mb_s(self) -> float | None:
        return self._median("mb_s")

    @property
    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.samples:
            for k, v in s.errors.items():
                out[k] = out.get(k, 0) + v
        return out

    def spread(self) -> str:
        """Min–max of req/s over the rounds, as a share of the median (drift indicator)."""
        rps = self.rps
        if not self.ok or len(self.samples) < 2 or not rps:
            return ""
        lo = min(s.rps for s in self.samples)
        hi = max(s.rps for s in self.samples)
        return f"±{(hi - lo) / 2 / rps * 100:.0f}%"

    def row(self) -> list[str]:
        if self.na is not None:
            return [self.scenario, self.target, "n/a", "", "", "", "", f"n/a ({self.na})"]
        notes = [n for n in (self.note, self.spread()) if n]
        errs = self.errors
        if errs:
            notes.append("ERRORS " + ", ".join(f"{k} {v}" for k, v in sorted(errs.items())))
        if self.samples:
            p50, p99 = fmt_ms(self.p50_ms), fmt_ms(self.p99_ms)
            rps = fmt_num(self.rps)
            mbs = fmt_num(self.mb_s) if self.show_mb_s else ""
        else:
            p50, p99, rps, mbs = self.text_p50, self.text_p99, "", ""
        rss = f"{self.rss_mib:.0f} MiB" if self.rss_mib is not None else ""
        return [self.scenario, self.target, rps, p50, p99, mbs, rss, "; ".join(notes)]


@dataclass(frozen=True, slots=True)
class Budget:
    what: str
    value: str  # measured, formatted
    ok: bool | None  # None: could not be measured

    def line(self) -> str:
        verdict = "n/a " if self.ok is None else ("PASS" if self.ok else "MISS")
        return f"{verdict}  {self.what}: {self.value}"


HEADERS = ["Scenario", "Target", "req/s", "p50", "p99", "MB/s", "peak RSS", "notes"]


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [HEADERS, *rows]) for i in range(len(HEADERS))]
    right = {2, 3, 4, 5, 6}

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return [line(HEADERS), sep, *(line(r) for r in rows)]


def render(
    title: str,
    setup: Sequence[str],
    cells: Sequence[Cell],
    ratios: Sequence[tuple[str, str]],
    budget: Sequence[Budget],
    footnotes: Sequence[str] = (),
) -> str:
    out = [f"# {title}", ""]
    out += [f"- {s}" for s in setup]
    out += ["", *_table([c.row() for c in cells]), ""]
    out += ["## Ratios (same run)", ""]
    width = max((len(k) for k, _ in ratios), default=0)
    out += [f"- {k.ljust(width)}  {v}" for k, v in ratios]
    out += ["", "## Budget (2-core machine)", "", "```"]
    out += [b.line() for b in budget]
    out += ["```"]
    if footnotes:
        out += ["", *(f"- {f}" for f in footnotes)]
    return "\n".join(out) + "\n"
