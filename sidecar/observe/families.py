"""The metric families' storage and text form: duration histograms, family specs, the
exposition writer, and the prometheus_client collector over the same families.

``sidecar.observe.metrics.Metrics`` counts; this module only shapes what it counted.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core.names import safe

__all__ = ["BUCKET_LABELS", "CONTENT_TYPE", "DURATION_BUCKETS", "FamilyCollector", "Histogram", "Spec", "write_family"]

# From sub-millisecond cache hits and API calls through minute-long downloads and
# hour-long SSE / websocket streams (which land in the top buckets or +Inf).
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    1800.0, 3600.0,
)  # fmt: skip
BUCKET_LABELS = (*(repr(b) for b in DURATION_BUCKETS), "+Inf")  # "0.0005", "1.0": what prometheus_client writes


class Histogram:
    """One histogram series: per-bucket counts (not cumulative), sum and count."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for le, n in zip(BUCKET_LABELS, self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Spec:
    name: str  # the family name (a counter's samples add ``_total``)
    kind: str  # counter, gauge or histogram
    doc: str
    labels: tuple[str, ...]
    values: Mapping[Any, Any]  # label values (tuple, or one str) -> number; histograms: upstream -> Histogram


def _label_values(k: Any) -> tuple[str, ...]:
    return (k,) if isinstance(k, str) else tuple(str(x) for x in k)


def _escape(value: str) -> str:
    value = safe(value)  # a lone surrogate would fail the whole exposition's encode: /metrics dead for everyone
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return value


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)) + "}"


def _number(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def write_family(spec: Spec, out: list[str], cache: dict[Any, Any]) -> None:
    sample = spec.name + "_total" if spec.kind == "counter" else spec.name
    doc = spec.doc.replace("\\", r"\\").replace("\n", r"\n")
    out.append(f"# HELP {sample} {doc}\n# TYPE {sample} {spec.kind}\n")
    if spec.kind != "histogram":
        for k, v in spec.values.items():
            prefix = cache.get(k)
            if prefix is None:
                prefix = cache[k] = f"{sample}{_labels(spec.labels, _label_values(k))} "
            out.append(f"{prefix}{_number(v)}\n")
        return
    for up, h in spec.values.items():
        prefixes = cache.get(up)
        if prefixes is None:
            lbl = f'upstream="{_escape(up)}"'
            prefixes = cache[up] = (
                [f'{spec.name}_bucket{{{lbl},le="{le}"}} ' for le in BUCKET_LABELS],
                f"{spec.name}_count{{{lbl}}} ",
                f"{spec.name}_sum{{{lbl}}} ",
            )
        buckets, count, total = prefixes
        running = 0
        for prefix, n in zip(buckets, h.counts, strict=True):
            running += n
            out.append(f"{prefix}{running}\n")
        out.append(f"{count}{running}\n{total}{_number(h.sum)}\n")


class FamilyCollector(Collector):
    """The same families as prometheus_client objects: ``generate_latest(registry)``,
    ``registry.get_sample_value`` and anything else that reads the registry."""

    def __init__(self, specs: Callable[[], list[Spec]]) -> None:
        self.specs = specs  # ``Metrics._specs``: the families as of now
        self.muted = False  # set while ``Metrics.exposition`` writes these families itself

    def describe(self) -> Iterable[Metric]:
        return [self._family(spec, empty=True) for spec in self.specs()]

    def collect(self) -> Iterable[Metric]:
        if self.muted:
            return []
        return [self._family(spec, empty=False) for spec in self.specs()]

    @staticmethod
    def _family(spec: Spec, empty: bool) -> Metric:
        labels = list(spec.labels)
        fam: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
        if spec.kind == "histogram":
            fam = HistogramMetricFamily(spec.name, spec.doc, labels=labels)
            if not empty:
                for up, h in spec.values.items():
                    fam.add_metric([up], h.cumulative(), h.sum)
            return fam
        fam = (CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily)(spec.name, spec.doc, labels=labels)
        if not empty:
            for k, v in spec.values.items():
                fam.add_metric(list(_label_values(k)), v)
        return fam
