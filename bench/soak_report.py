"""The soak's figures, bars and Markdown: slopes by least squares, quantiles, one table per view."""

from __future__ import annotations

import datetime as dt
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .soak import Settings


@dataclass
class Sample:
    t: float  # seconds since the load began
    phase: str  # start | load | end
    rss_mib: float
    fds: dict[str, int]
    requests_total: float
    lag: dict[str, float]  # cumulative lag histogram, le -> count
    healthz_s: float
    cpu_s: float = 0.0  # the sidecar's user + system CPU seconds so far


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x, or None with fewer than 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else None


def quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def hist_quantile(before: Mapping[str, float], after: Mapping[str, float], q: float) -> float | None:
    """``histogram_quantile`` over the difference of two cumulative histograms (linear in a bucket)."""
    bounds = sorted(((math.inf if le == "+Inf" else float(le)), after.get(le, 0) - before.get(le, 0)) for le in after)
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in bounds:
        if count >= rank:
            if math.isinf(bound):
                return lo_bound
            return lo_bound + (bound - lo_bound) * ((rank - lo_count) / (count - lo_count) if count > lo_count else 1)
        lo_bound, lo_count = bound, count
    return None


def ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f} ms"


def verdicts(s: Settings, samples: Sequence[Sample], result: Mapping[str, Any]) -> tuple[list[Check], dict[str, Any]]:
    stats, end = result["stats"], result["end"]
    start = samples[0]
    after = [x for x in samples if x.phase == "load" and x.t >= s.warmup]
    rss_slope = slope([(x.t / 60, x.rss_mib) for x in after])
    fd_slope = slope([(x.t / 60, x.fds["total"]) for x in after])
    warm = min(after, key=lambda x: x.t) if after else start
    load = [x for x in samples if x.phase == "load"]
    last_load = load[-1] if load else end
    requests = sum(stats.requests.values())
    figures: dict[str, Any] = {
        "minutes": s.minutes, "connections": s.connections, "rate_target": s.rate,
        "requests": requests, "requests_per_second": requests / s.seconds,
        "client_requests": requests - stats.requests["admin"],  # the admin listener is not counted there
        "by_kind": dict(stats.requests), "unexpected": sum(stats.unexpected.values()),
        "unexpected_by_kind": dict(stats.unexpected), "examples": stats.examples,
        "answers": {f"{k} {st} {c}".strip(): n for (k, st, c), n in sorted(stats.answers.items())},
        "upstream_errors": {f"{k} {st} {c}": n for (k, st, c), n in sorted(stats.upstream_errors.items())},
        "server_errors_5xx": sum(n for (_, st, _), n in stats.answers.items() if st >= 500),
        "ws_sessions": stats.ws_sessions, "ws_messages": stats.ws_messages,
        "streams_done": stats.streams_done, "stream_mib": stats.stream_bytes / 2**20,
        "keys_created": stats.keys_created, "keys_revoked": stats.keys_revoked, "cache_hits": stats.cache_hits,
        "rss_start_mib": start.rss_mib, "rss_end_mib": end.rss_mib, "rss_max_mib": max(x.rss_mib for x in samples),
        "rss_slope_mib_per_min": rss_slope, "rss_warmup_s": s.warmup,
        "fds_start": start.fds, "fds_end": end.fds, "fds_max": max(x.fds["total"] for x in samples),
        "fds_slope_per_min": fd_slope,
        "lag_p99_s": hist_quantile(warm.lag, last_load.lag, 0.99),
        "lag_p50_s": hist_quantile(warm.lag, last_load.lag, 0.50),
        "lag_max_bucket": _max_bucket(start.lag, last_load.lag),
        "healthz_p99_s": quantile([x.healthz_s for x in load], 0.99),
        "sidecar_cpu_percent": 100 * (last_load.cpu_s - start.cpu_s) / last_load.t if last_load.t > 0 else None,
        "requests_total": end.requests_total, "access_log_lines": result["access_log_lines"],
        "latency": {
            str(i): {"n": len(v), "p50": quantile(v, 0.5), "p99": quantile(v, 0.99)}
            for i, v in sorted(stats.latency.items())
            if i * result["plan"].period < s.seconds - 1  # not the stragglers after the end
        },
        "sidecar_alive": result["sidecar_alive"], "sidecar_tracebacks": result["sidecar_log_tracebacks"],
        "sidecar_errors": result["sidecar_log_errors"],
    }  # fmt: skip
    checks = [
        Check(
            f"RSS slope after {s.warmup:.0f} s warm-up < {s.rss_slope_bar:g} MiB/min",
            rss_slope is not None and rss_slope < s.rss_slope_bar,
            "too few samples" if rss_slope is None else f"{rss_slope:+.3f} MiB/min",
        ),
        Check(
            "every answer is one its request may get (designed JSON errors only)",
            figures["unexpected"] == 0,
            f"{figures['unexpected']} unexpected" + (f": {stats.examples[:3]}" if stats.examples else ""),
        ),
        Check(
            "access-log lines = sum(sidecar_requests_total)",
            result["access_log_lines"] == int(end.requests_total),
            f"{result['access_log_lines']} lines, {end.requests_total:.0f} counted",
        ),
        Check(
            "every request the clients sent is counted once (sidecar_requests_total)",
            figures["client_requests"] == int(end.requests_total),
            f"{figures['client_requests']} sent to the proxy listener, {end.requests_total:.0f} counted",
        ),
        Check("client sockets all closed at the end", end.fds["client"] == 0, f"{end.fds['client']} open"),
        Check(
            "no descriptor leak (non-socket and listener fds back to the start)",
            end.fds["other"] <= start.fds["other"] + 2,
            f"{start.fds['other']} at start, {end.fds['other']} at end "
            f"(+ {end.fds['upstream']} pooled upstream connections, closed after 30 s idle)",
        ),
        Check(
            "sidecar alive, no traceback in its log",
            result["sidecar_alive"] and result["sidecar_log_tracebacks"] == 0,
            f"alive={result['sidecar_alive']}, tracebacks={result['sidecar_log_tracebacks']}",
        ),
    ]
    return checks, figures


def _max_bucket(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    """The highest lag bucket any sample fell into during the load (``≤ 0.05`` s, say)."""
    worst = "none"
    prev = 0.0
    for le, count in sorted(after.items(), key=lambda kv: math.inf if kv[0] == "+Inf" else float(kv[0])):
        cumulative = count - before.get(le, 0)
        if cumulative > prev:  # some samples fell into this very bucket
            worst = f"≤ {le} s" if le != "+Inf" else "over the top bucket"
        prev = cumulative
    return worst


def render(
    s: Settings, samples: Sequence[Sample], result: Mapping[str, Any], checks: Sequence[Check], f: Mapping[str, Any]
) -> str:
    plan = result["plan"]
    out = [
        "# Sidecar soak",
        "",
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} · {platform.node()} · "
        f"{platform.python_implementation()} {platform.python_version()} · bench/soak --minutes {s.minutes:g} "
        f"--connections {s.connections} · loadavg now {_loadavg()}",
        "",
        f"{s.connections} connections: {plan.http_workers} HTTP workers (~{s.rate:.0f} req/s offered, exponential "
        f"think time), {plan.websockets} websocket clients, {plan.streams} long streams, 1 bad-key client "
        f"({plan.bad_per_second:g}/s), 1 admin client ("
        + (
            f"a key created every {plan.churn_every:g} s, the oldest of {plan.live_keys + 1} revoked"
            if plan.churn_every > 0
            else "no key churn"
        )
        + "). Load generator, upstreams and sidecar share the machine's cores.",
        "",
        "## Figures",
        "",
        "| | |",
        "|---|---|",
        f"| requests | {f['requests']:,} ({f['requests_per_second']:.0f}/s): "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(f["by_kind"].items()))
        + " |",
        f"| websockets | {f['ws_sessions']} sessions closed cleanly, {f['ws_messages']:,} echoes |",
        f"| long streams | {f['streams_done']} complete, {f['stream_mib']:.0f} MiB |",
        f"| key churn | {f['keys_created']} created, {f['keys_revoked']} revoked |",
        f"| cache hits | {f['cache_hits']:,} |",
        f"| unexpected answers | {f['unexpected']} |",
        f"| designed upstream errors (502/504) | {sum(f['upstream_errors'].values())} |",
        f"| RSS | start {f['rss_start_mib']:.1f} MiB, end {f['rss_end_mib']:.1f}, max {f['rss_max_mib']:.1f}; "
        f"slope after {f['rss_warmup_s']:.0f} s: {_num(f['rss_slope_mib_per_min'], '+.3f')} MiB/min |",
        f"| open fds | start {f['fds_start']['total']}, max {f['fds_max']}, end {f['fds_end']['total']} "
        f"({f['fds_end']['client']} client, {f['fds_end']['upstream']} upstream pool, {f['fds_end']['other']} other); "
        f"slope after warm-up {_num(f['fds_slope_per_min'], '+.1f')}/min |",
        f"| event-loop lag (sidecar_event_loop_lag_seconds, after warm-up) | p50 {ms(f['lag_p50_s'])}, "
        f"p99 {ms(f['lag_p99_s'])}, worst bucket {f['lag_max_bucket']} |",
        f"| admin /healthz round trip under load | p99 {ms(f['healthz_p99_s'])} |",
        f"| sidecar CPU during the load | {_num(f['sidecar_cpu_percent'], '.0f')} % of one core |",
        f"| access log vs sidecar_requests_total | {f['access_log_lines']:,} lines, "
        f"{f['requests_total']:,.0f} counted |",
        "",
        "## Answers other than 2xx",
        "",
        "| kind | status | code | count |",
        "|---|---|---|---|",
    ]
    for name, n in f["answers"].items():
        kind, status, *code = name.split(" ")
        out.append(f"| {kind} | {status} | {' '.join(code)} | {n:,} |")
    if f["unexpected_by_kind"]:
        out += ["", "Unexpected:", ""] + [f"- {k}: {v}" for k, v in f["unexpected_by_kind"].items()]
        out += [f"  - `{e}`" for e in f["examples"][:10]]
    period = plan.period
    out += ["", f"## Latency per {period:g} s (HTTP requests; streams and websockets excluded)", ""]
    out += ["| from | requests | p50 | p99 |", "|---|---|---|---|"]
    for i, row in f["latency"].items():
        out.append(f"| {int(i) * period:.0f} s | {row['n']:,} | {ms(row['p50'])} | {ms(row['p99'])} |")
    out += ["", f"## Samples every {s.sample_every:g} s", ""]
    out += ["| t | phase | RSS MiB | fds (client / upstream / other) | requests_total | CPU | lag p99 | /healthz |"]
    out += ["|---|---|---|---|---|---|---|---|"]
    prev = samples[0]
    for x in samples:
        lag = hist_quantile(prev.lag, x.lag, 0.99) if x is not prev else None
        cpu = f"{100 * (x.cpu_s - prev.cpu_s) / (x.t - prev.t):.0f} %" if x.t > prev.t else ""
        out.append(
            f"| {x.t:.0f} s | {x.phase} | {x.rss_mib:.1f} | {x.fds['total']} ({x.fds['client']} / "
            f"{x.fds['upstream']} / {x.fds['other']}) | {x.requests_total:,.0f} | {cpu} | {ms(lag)} | "
            f"{ms(x.healthz_s)} |"
        )
        prev = x
    out += ["", "## Bars", ""]
    out += [f"{'PASS' if c.ok else 'MISS'}  {c.name}: {c.detail}" for c in checks]
    if f["sidecar_errors"]:
        out += ["", "Sidecar log errors:", ""] + [f"    {e}" for e in f["sidecar_errors"]]
    return "\n".join(out) + "\n"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"
