"""Event-loop lag: how late the loop runs a timer, as ``sidecar_event_loop_lag_seconds``.

Everything a sidecar does shares one event loop, so a callback that hogs it (a big
scrape, a slow parse, CPU starvation) delays every request. A background task asks to
wake up every ``INTERVAL`` seconds and records how much later than asked it did: that
delay is the wait any ready callback had at that moment. Four wake-ups a second and a
``bisect`` each: nothing on the request path. Exported as a histogram (buckets from a
millisecond to seconds) on the app's registry; ``bench/soak`` reads its p99 over time.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BUCKETS", "INTERVAL", "LoopLag"]

INTERVAL = 0.25  # seconds between wake-ups
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
NAME = "sidecar_event_loop_lag_seconds"


class LoopLag(Collector):
    """Samples the loop's timer lateness; registers itself as a collector on ``registry``."""

    def __init__(self, registry: CollectorRegistry, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        registry.register(self)

    def observe(self, lag: float) -> None:
        self.counts[bisect_left(BUCKETS, lag)] += 1
        self.sum += lag

    async def run(self) -> None:
        """Sleep ``interval`` again and again; each time record how late the wake-up came."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.observe(max(0.0, loop.time() - asked))

    def collect(self) -> Iterator[Metric]:
        running = 0
        buckets: list[tuple[str, float]] = []
        for le, n in zip((*(repr(b) for b in BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            buckets.append((le, running))
        yield HistogramMetricFamily(
            NAME,
            "How much later than asked the event loop ran a timer (sampled every 0.25 s)",
            buckets=buckets,
            sum_value=self.sum,
        )
