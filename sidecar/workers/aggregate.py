"""One ``/metrics`` for the host: the workers' expositions merged with the supervisor's own.

Each worker serves its registry on its private admin socket in the same text format as
a single sidecar (so its per-key series and ``metrics.max_key_series`` cap are as they
always were); the supervisor reads them all at scrape time and merges by family type:

- counters, histograms and summaries: summed per label set (``*_created``: the earliest);
- the host's own gauges (``HOST_GAUGES``: the key table, quota levels, upstream up) come
  from the supervisor alone, which holds the key table and — with the memory backend —
  the host's quota counts; summing them would count each key N times;
- other gauges (requests in flight, open sessions, …) are summed;
- per-process families (``process_*``, ``python_*``, the event-loop lag) keep one series
  per process, labelled ``worker="0"`` … and ``worker="supervisor"``.

Added families: ``sidecar_workers`` (running), ``sidecar_worker_restarts_total`` and
``sidecar_worker_requests_total`` per worker (how the port spreads the load).

A worker that dies takes its counters with it; its replacement starts from zero. So that
the host's sums never step down (which Prometheus would read as a reset of the whole
host), the counters and histograms of a worker's last exposition the supervisor read are
kept (``Retired``) and added to every later merge: what a dead worker counted after that
last read is lost, as a crashed single process loses it, but nothing is counted twice.
A worker that is alive but does not answer a scrape (hung, or slower than the scrape
timeout) counts as it was last read, for that scrape (``scrape_merge``): leaving it out made
the host's counters dip, which Prometheus reads as a reset (and its return as everything again).
Why not prometheus_client's multiprocess mode: it keeps one mmap file per process and
metric, reads them all at scrape time, cannot express the cheap per-request families
(``sidecar.observe.metrics``) and has no per-key label cap of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["HOST_GAUGES", "Retired", "merge", "scrape_merge"]

HOST_GAUGES = frozenset(
    {
        "sidecar_keys", "sidecar_key_info", "sidecar_key_expires_timestamp_seconds", "sidecar_quota_limit",
        "sidecar_quota_remaining", "sidecar_quota_flush_interval_seconds", "sidecar_quota_unflushed",
        "sidecar_quota_unflushed_max", "sidecar_upstream_up",
    }
)  # fmt: skip
PER_PROCESS = ("process_", "python_", "sidecar_event_loop_lag_seconds")
REQUESTS = "sidecar_requests_total"
SUMMED = frozenset({"counter", "histogram", "summary"})


class _Family:
    __slots__ = ("help", "kind", "samples", "type")

    def __init__(self, help_line: str, type_line: str, kind: str) -> None:
        self.help = help_line
        self.type = type_line
        self.kind = kind
        self.samples: dict[str, float] = {}


def _number(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _with_worker(series: str, who: str) -> str:
    if series.endswith("}"):
        name, _, rest = series.partition("{")
        return f'{name}{{worker="{who}",{rest}' if rest != "}" else f'{name}{{worker="{who}"}}'
    return f'{series}{{worker="{who}"}}'


def _parse(text: str) -> Iterable[tuple[str, str, str, str, float]]:
    """(family, help line, type line, series, value) for each sample of an exposition."""
    family, help_line, type_line, kind = "", "", "", "untyped"
    for line in text.splitlines():
        if not line:
            continue
        if line[0] == "#":
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] == "HELP":
                family, help_line = parts[2], line
            elif len(parts) >= 4 and parts[1] == "TYPE":
                family, type_line, kind = parts[2], line, parts[3]
            continue
        series, _, value = line.rpartition(" ")
        yield family, help_line, type_line + "\x00" + kind, series, float(value)


class Retired:
    """Counters and histograms of workers that exited, as last read (summed over all of them)."""

    def __init__(self) -> None:
        self.families: dict[str, _Family] = {}

    def add(self, text: str) -> None:
        for name, help_line, typed, series, value in _parse(text):
            type_line, _, kind = typed.partition("\x00")
            if kind not in SUMMED or name.startswith(PER_PROCESS):
                continue
            fam = self.families.get(name)
            if fam is None:
                fam = self.families[name] = _Family(help_line, type_line, kind)
            _add(fam, name, series, value)

    def plus(self, texts: Iterable[str]) -> Retired:
        """A copy with these expositions' counters added (workers that did not answer, as last read)."""
        out = Retired()
        for name, fam in self.families.items():
            copy = out.families[name] = _Family(fam.help, fam.type, fam.kind)
            copy.samples = dict(fam.samples)
        for text in texts:
            out.add(text)
        return out


def scrape_merge(
    own: str, texts: Sequence[str | None], last: dict[int, str], restarts: Sequence[int], retired: Retired
) -> str:
    """``merge`` of one scrape (None: a worker that did not answer); ``last`` keeps each worker's
    latest read, and a silent worker's counters count as that read, not as zero."""
    last.update((i, text) for i, text in enumerate(texts) if text is not None)
    silent = [last[i] for i, text in enumerate(texts) if text is None and i in last]
    return merge(own, list(enumerate(texts)), restarts, retired.plus(silent) if silent else retired)


def _add(fam: _Family, name: str, series: str, value: float) -> None:
    old = fam.samples.get(series)
    if old is None:
        fam.samples[series] = value
    elif series.startswith(name.removesuffix("_total") + "_created"):
        fam.samples[series] = min(old, value)
    else:
        fam.samples[series] = old + value


def merge(
    own: str, workers: Sequence[tuple[int, str | None]], restarts: Sequence[int], retired: Retired | None = None
) -> str:
    """The host's exposition from the supervisor's (``own``) and each worker's (None: unreadable now)."""
    families: dict[str, _Family] = {}
    per_worker: dict[int, float] = {}
    sources: list[tuple[str, str]] = [("supervisor", own)]
    sources += [(str(i), text) for i, text in workers if text is not None]
    for who, text in sources:
        for name, help_line, typed, series, value in _parse(text):
            fam = families.get(name)
            if fam is None:
                type_line, _, kind = typed.partition("\x00")
                fam = families[name] = _Family(help_line, type_line, kind)
            if name.startswith(PER_PROCESS):
                fam.samples[_with_worker(series, who)] = value
                continue
            if fam.kind == "gauge":
                if name in HOST_GAUGES:
                    if who == "supervisor":
                        fam.samples[series] = value
                    continue
            elif name == REQUESTS and who != "supervisor":
                per_worker[int(who)] = per_worker.get(int(who), 0) + value
            _add(fam, name, series, value)
    for name, gone in (retired.families if retired is not None else {}).items():
        fam = families.get(name)
        if fam is None:
            fam = families[name] = _Family(gone.help, gone.type, gone.kind)
        for series, value in gone.samples.items():
            _add(fam, name, series, value)
    out: list[str] = []
    for fam in families.values():
        if fam.help:
            out.append(fam.help + "\n")
        if fam.type:
            out.append(fam.type + "\n")
        out.extend(f"{series} {_number(v)}\n" for series, v in fam.samples.items())
    alive = sum(1 for _, text in workers if text is not None)
    out.append("# HELP sidecar_workers Worker processes answering the supervisor\n# TYPE sidecar_workers gauge\n")
    out.append(f"sidecar_workers {alive}\n")
    out.append(
        "# HELP sidecar_worker_restarts_total Times a worker process was restarted after it died\n"
        "# TYPE sidecar_worker_restarts_total counter\n"
    )
    out.extend(f'sidecar_worker_restarts_total{{worker="{i}"}} {n}\n' for i, n in enumerate(restarts))
    out.append(
        "# HELP sidecar_worker_requests_total Requests answered by each worker since it started\n"
        "# TYPE sidecar_worker_requests_total counter\n"
    )
    out.extend(f'sidecar_worker_requests_total{{worker="{i}"}} {_number(n)}\n' for i, n in sorted(per_worker.items()))
    return "".join(out)
