"""What metrics cost per request: ``Metrics.observe(scope)`` (plus the in-flight gauge) in µs.

Run from the repository root: ``.venv/bin/python -m bench.observe_cost``. Not a test:
timings depend on the machine, so this prints numbers instead of asserting them.

It times the hot path on a realistic mix (200 keys, 2 upstreams, a few methods and
codes, cache results, some bytes), and for comparison the same work done the usual
prometheus_client way: ``Counter.labels(...).inc()`` / ``Histogram.labels(...).observe()``
on every request, and with the labelled children cached per label tuple. It also
times one ``/metrics`` scrape (``generate_latest``) of the resulting registry.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sidecar.auth.models import KeyRecord
from sidecar.core.scope import RequestScope
from sidecar.observe.metrics import DURATION_BUCKETS, Metrics

REQUEST_MS = 1.0  # the order of a proxied request through the sidecar on loopback


def scopes(n: int, keys: int) -> list[RequestScope]:
    rnd = random.Random(5)
    out = []
    for _ in range(n):
        s = RequestScope(method=rnd.choice(("GET", "GET", "GET", "POST", "HEAD")), path="/x", client_ip="127.0.0.1")
        s.upstream = rnd.choice(("plex", "mcp"))
        s.key_id = f"{rnd.randrange(keys):012x}"
        s.status = rnd.choice((200, 200, 200, 200, 206, 304, 404))
        s.bytes_sent = rnd.randrange(100, 20000)
        s.bytes_received = rnd.choice((0, 0, 0, 300))
        s.upstream_seconds = rnd.random() / 1000
        s.cache = rnd.choice(("", "", "HIT", "MISS"))
        out.append(s)
    return out


class ClassicMetrics:
    """The textbook prometheus_client way, optionally caching the labelled children."""

    def __init__(self, cache_children: bool) -> None:
        r = self.registry = CollectorRegistry()
        self.cache_children = cache_children
        self.requests = Counter("sidecar_requests", "", ["key", "upstream", "method", "code"], registry=r)
        self.duration = Histogram(
            "sidecar_request_duration_seconds", "", ["upstream"], buckets=DURATION_BUCKETS, registry=r
        )
        self.up_duration = Histogram(
            "sidecar_upstream_duration_seconds", "", ["upstream"], buckets=DURATION_BUCKETS, registry=r
        )
        self.resp_bytes = Counter("sidecar_response_bytes", "", ["key", "upstream"], registry=r)
        self.req_bytes = Counter("sidecar_request_bytes", "", ["key", "upstream"], registry=r)
        self.cache = Counter("sidecar_cache_requests", "", ["upstream", "result"], registry=r)
        self.in_flight = Gauge("sidecar_in_flight_requests", "", registry=r)
        self._children: dict[tuple[str, str, str, int], tuple[Counter, Histogram, Histogram, Counter, Counter]] = {}

    def observe(self, s: RequestScope) -> None:
        if self.cache_children:
            k = (s.key_id, s.upstream, s.method, s.status)
            c = self._children.get(k)
            if c is None:
                c = self._children[k] = (
                    self.requests.labels(s.key_id, s.upstream, s.method, str(s.status)),
                    self.duration.labels(s.upstream),
                    self.up_duration.labels(s.upstream),
                    self.resp_bytes.labels(s.key_id, s.upstream),
                    self.req_bytes.labels(s.key_id, s.upstream),
                )
            req, dur, updur, rb, qb = c
        else:
            req = self.requests.labels(s.key_id, s.upstream, s.method, str(s.status))
            dur = self.duration.labels(s.upstream)
            updur = self.up_duration.labels(s.upstream)
            rb = self.resp_bytes.labels(s.key_id, s.upstream)
            qb = self.req_bytes.labels(s.key_id, s.upstream)
        req.inc()
        dur.observe(s.elapsed())
        if s.upstream_seconds is not None:
            updur.observe(s.upstream_seconds)
        if s.bytes_sent:
            rb.inc(s.bytes_sent)
        if s.bytes_received:
            qb.inc(s.bytes_received)
        if s.cache:
            self.cache.labels(s.upstream, s.cache.lower()).inc()


def per_request_us(m: Metrics | ClassicMetrics, batch: list[RequestScope], rounds: int) -> float:
    """Median over rounds of the mean µs per request: in_flight.inc(), observe(), in_flight.dec()."""
    observe: Callable[[RequestScope], None] = m.observe
    inc, dec = m.in_flight.inc, m.in_flight.dec
    for s in batch:  # warm up: every series exists, as in a long-running sidecar
        observe(s)
    results = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for s in batch:
            inc()
            observe(s)
            dec()
        results.append((time.perf_counter() - t0) / len(batch) * 1e6)
    return statistics.median(results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--keys", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    batch = scopes(args.requests, args.keys)

    m = Metrics(CollectorRegistry())
    m.set_keys([KeyRecord(id=f"{i:012x}", name=f"key {i}", hash="$argon2id$x", owner="team") for i in range(args.keys)])
    rows = [
        ("Metrics.observe (sidecar.observe.metrics)", per_request_us(m, batch, args.rounds)),
        ("prometheus_client, children cached", per_request_us(ClassicMetrics(True), batch, args.rounds)),
        ("prometheus_client, .labels() each time", per_request_us(ClassicMetrics(False), batch, args.rounds)),
    ]
    print(f"{args.requests} requests x {args.rounds} rounds, {args.keys} keys; median µs per request")
    print("(in_flight inc + observe + in_flight dec), share of a ~1 ms request:")
    for name, us in rows:
        print(f"  {name:<42}{us:8.2f} µs  {us / (REQUEST_MS * 1000):7.2%}")

    def ms(fn: Callable[[], bytes]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000

    first = ms(m.exposition)  # escapes and caches every series' label string
    steady = statistics.median(ms(m.exposition) for _ in range(args.rounds))
    classic = statistics.median(ms(lambda: generate_latest(m.registry)) for _ in range(3))
    size = len(m.exposition()) / 1024
    print(f"one /metrics scrape ({len(m.series)} request series, {size:.0f} KiB), median ms:")
    print(f"  Metrics.exposition()       {steady:8.1f} ms  (first scrape {first:.1f} ms)")
    print(f"  generate_latest(registry)  {classic:8.1f} ms")


if __name__ == "__main__":
    main()
