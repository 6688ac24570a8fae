"""Prometheus metrics: the contract's names and labels, on a registry the app owns.

``key`` labels carry the key id (never the secret). Series are bounded:

- traffic without a verified key uses ``key=""``, and a label that does not apply
  (no upstream matched) is ``""`` too;
- a key gets its own label value the first time it is seen (loaded or created while
  active, or on first traffic) until ``max_key_series`` keys have one; every other key
  folds into ``key="other"``;
- methods outside the standard set are ``method="other"``; MCP tool names past
  ``MAX_TOOL_SERIES`` are ``tool="other"``, and so are new names from a key that has
  already introduced ``MAX_TOOL_SERIES_PER_KEY`` (one key cannot use up every tool label).

Cost on the hot path. ``observe(scope)`` runs once per request, so the per-request
families are not prometheus_client ``Counter``/``Histogram`` objects: every ``inc`` and
``observe`` takes a lock, and ``.labels()`` validates and hashes on every call. Here a
request costs one dict lookup for its (key, upstream, method, code) series, whose
slots hold the counters and its upstream's histograms, plus a ``bisect`` per histogram;
a collector turns them into metric families at scrape time. ``bench/observe_cost.py``
measures it: about 6x cheaper than prometheus_client with cached children, 12x cheaper
than ``.labels()`` per request. Everything runs on the event loop (observe in the
handler, collect in the ``/metrics`` handler), so no locks are needed. ``exposition``
(``sidecar.observe.families``) writes the text itself with each series' label string escaped once, because
``generate_latest`` costs tens of µs per series, on the event loop, every scrape.

Key state (``sidecar_keys``, ``sidecar_key_info``, ``sidecar_key_expires_timestamp_seconds``)
is computed at scrape time from the last key table snapshot and the clock, so a key
that expires while nothing changes in the store is counted as expired at the next scrape.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from time import perf_counter
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from ..auth.models import KeyRecord
from ..config import UpstreamConfig
from ..core.names import safe, split
from ..core.scope import RequestScope
from ..upstreams import health as upstream_health
from .families import CONTENT_TYPE, DURATION_BUCKETS, FamilyCollector, Histogram, Spec, write_family
from .logfilter import redact_path_keys

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "MAX_TOOL_SERIES", "MAX_TOOL_SERIES_PER_KEY", "OTHER", "Metrics"]

OTHER = "other"
MAX_TOOL_SERIES = 500
# New tool names one key may give a label of their own: a key allowed every name (the default) cannot
# take all MAX_TOOL_SERIES with made-up ones and leave every other key's real tools at tool="other".
MAX_TOOL_SERIES_PER_KEY = 100
MAX_TOOL_NAME = 128
UPSTREAM_PROBE_INTERVAL = 15.0
UPSTREAM_PROBE_TIMEOUT = 1.0

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
AUTH_REASONS = (
    "unauthorized", "invalid_key", "expired_key", "revoked_key", "bad_request",
    "insufficient_permissions", "too_many_failed_attempts", "invalid_token",  # invalid_token: a JWT (auth/jwt.py)
)  # fmt: skip
CACHE_RESULTS = ("hit", "miss", "bypass", "expired", "stale")
KEY_STATES = ("active", "expired", "revoked")
_AUTH_REASONS = frozenset(AUTH_REASONS) - {"bad_request"}  # bad_request is an auth failure only before a key
_RATE_ERRORS = frozenset({"rate_limit_exceeded", "quota_exceeded"})
_UPSTREAM_ERRORS = frozenset({"upstream_unavailable", "upstream_timeout"})
_NOT_ERRORS = frozenset({"", "client_disconnected"})


class _Series:
    """Counters of one (key, upstream, method, code); bytes are summed per (key, upstream) at scrape time."""

    __slots__ = ("duration", "received", "requests", "sent", "upstream_duration")

    def __init__(self, duration: Histogram, upstream_duration: Histogram) -> None:
        self.requests = 0
        self.sent = 0
        self.received = 0
        self.duration = duration
        self.upstream_duration = upstream_duration


class _InFlight:
    """A gauge the pipeline bumps twice per request: a plain int, read at scrape time."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def dec(self, amount: int = 1) -> None:
        self.value -= amount


class Metrics:
    """All of one sidecar's metrics. ``observe`` per request; everything else is rare."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        max_key_series: int = 1000,
        *,
        clock: Callable[[], float] = time.time,
        upstreams: Iterable[str] = (),
        cached_upstreams: Iterable[str] = (),
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.max_key_series = max_key_series
        self.clock = clock
        # key id -> label slot held (a set: a key either has its own label or is "other")
        self._slots: set[str] = set()
        self._records: list[KeyRecord] = []
        # (key, upstream, method, code) -> its counters: the one dict lookup per request
        self.series: dict[tuple[str, str, str, int], _Series] = {}
        # upstream -> histogram (shared by that upstream's _Series)
        self.request_duration: dict[str, Histogram] = {}
        self.upstream_duration: dict[str, Histogram] = {}
        self.auth_failures: dict[str, int] = dict.fromkeys(AUTH_REASONS, 0)
        self.rate_limited: dict[tuple[str, str], int] = {}
        self.quota_exceeded: dict[tuple[str, str], int] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}  # (upstream, error), also bodies cut short
        self.cache_requests: dict[tuple[str, str], int] = {}
        self.mcp_tool_calls: dict[tuple[str, str, str, str], int] = {}
        self._tools: set[tuple[str, str]] = set()
        self._tool_claims: dict[str, int] = {}  # key id -> tool labels it introduced (<= MAX_TOOL_SERIES keys)
        self.in_flight = _InFlight()
        # (key id, scope) -> (limit, used, window end); the app points this at the limiter's
        # table so quota gauges cost nothing per request, only at scrape time.
        self.quota_levels: Mapping[tuple[str, str], tuple[int, int, float]] = {}
        # (what, reason) -> writes the store refused; the app points this at the store's table.
        self.store_write_failures: Mapping[tuple[str, str], int] = {}
        self._up: dict[str, float] = {}
        for up in upstreams:
            self.request_duration[up] = Histogram()
            self.upstream_duration[up] = Histogram()
        for up in cached_upstreams:
            for result in CACHE_RESULTS:
                self.cache_requests[(up, result)] = 0

        # Rarely updated families stay prometheus_client objects; other modules register
        # theirs on the same registry (the rate limiter's backend errors, for one).
        self.upstream_up = Gauge(
            "sidecar_upstream_up", "1 if the upstream accepted a connection at the last check or request, else 0",
            ["upstream"], registry=self.registry,
        )  # fmt: skip
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self._collector = FamilyCollector(self._specs)
        self.registry.register(self._collector)
        self._prefixes: dict[str, dict[Any, Any]] = {}

    # ---------------------------------------------------------------- labels

    def key_label(self, key_id: str) -> str:
        """The ``key`` label for a key id: itself while slots last, then ``other``."""
        if not key_id or key_id in self._slots:
            return key_id
        if len(self._slots) >= self.max_key_series:
            return OTHER
        self._slots.add(key_id)
        return key_id

    def _tool_label(self, upstream: str, tool: str, key_id: str = "") -> str:
        """The ``tool`` label: the name once it has one, else a new one while slots last and the key
        has introduced fewer than ``MAX_TOOL_SERIES_PER_KEY`` (denied names too: operators want to see
        which tool was refused, and a refusal is free, so the per-key share is what bounds them)."""
        if len(tool) > MAX_TOOL_NAME or not tool.isprintable() or tool != tool.strip():
            # never cut: a cut made-up name would count as the real tool it starts with; nor one a dashboard
            # shows as another (``search\u200b``, `` search``, a bidi override): the MCP spec's names are plain
            return OTHER
        tool = safe(redact_path_keys(tool))  # the client's text: a key pasted there stays out; encodable
        if (upstream, tool) in self._tools:
            return tool
        if len(self._tools) >= MAX_TOOL_SERIES:
            return OTHER
        claims = self._tool_claims.get(key_id, 0)
        if claims >= MAX_TOOL_SERIES_PER_KEY:
            return OTHER
        self._tool_claims[key_id] = claims + 1
        self._tools.add((upstream, tool))
        return tool

    # -------------------------------------------------------------- hot path

    def observe(self, scope: RequestScope) -> None:
        """One call per finished request: the hot path's only metrics cost."""
        key = scope.key_id
        if key and key not in self._slots:
            key = self.key_label(key)
        up = scope.upstream
        method = scope.method if scope.method in METHODS else OTHER
        series = (key, up, method, scope.status or 500)  # 0: the handler failed unexpectedly, aiohttp sent 500
        s = self.series.get(series)
        if s is None:
            s = self.series[series] = self._new_series(up)
        s.requests += 1
        s.sent += scope.bytes_sent
        s.received += scope.bytes_received
        hist = s.duration  # Histogram.observe, inlined: this runs per request
        elapsed = perf_counter() - scope.start
        hist.counts[bisect_left(DURATION_BUCKETS, elapsed)] += 1
        hist.sum += elapsed
        upstream_seconds = scope.upstream_seconds
        if upstream_seconds is not None:
            hist = s.upstream_duration
            hist.counts[bisect_left(DURATION_BUCKETS, upstream_seconds)] += 1
            hist.sum += upstream_seconds

        error = scope.error
        if error:
            self._observe_error(scope, key, up, error)
        elif upstream_seconds is not None and self._up.get(up) != 1:
            self.set_upstream_up(up, 1)
        if scope.cache:
            kc = (up, scope.cache.lower())
            self.cache_requests[kc] = self.cache_requests.get(kc, 0) + 1
        if scope.tool:
            self._observe_tools(scope, key, up)

    def _new_series(self, up: str) -> _Series:
        duration = self.request_duration.get(up)
        if duration is None:
            duration = self.request_duration[up] = Histogram()
        upstream_duration = self.upstream_duration.get(up)
        if upstream_duration is None:
            upstream_duration = self.upstream_duration[up] = Histogram()
        return _Series(duration, upstream_duration)

    def _observe_error(self, scope: RequestScope, key: str, up: str, error: str) -> None:
        if error in _UPSTREAM_ERRORS:  # a 502/504, or a 200 whose body the upstream broke off (the code can't say)
            self.upstream_errors[(up, error)] = self.upstream_errors.get((up, error), 0) + 1
        if error in _AUTH_REASONS or (error == "bad_request" and not scope.key_id):
            self.auth_failures[error] = self.auth_failures.get(error, 0) + 1
        elif error == "rate_limit_exceeded":
            self.rate_limited[(key, up)] = self.rate_limited.get((key, up), 0) + 1
        elif error == "quota_exceeded":
            self.quota_exceeded[(key, up)] = self.quota_exceeded.get((key, up), 0) + 1
        elif error == "upstream_unavailable":
            self.set_upstream_up(up, 0)
        elif scope.upstream_seconds is not None and self._up.get(up) != 1:
            self.set_upstream_up(up, 1)  # e.g. the client left mid-stream: the upstream did answer

    def _observe_tools(self, scope: RequestScope, key: str, up: str) -> None:
        error = scope.error
        if error == "insufficient_permissions":
            outcome = "denied"
        elif error in _RATE_ERRORS:
            outcome = "rate_limited"
        elif error not in _NOT_ERRORS or (scope.status >= 400 and scope.status != 499):
            outcome = "error"
        else:
            outcome = "ok"
        for tool in split(scope.tool):  # as the gateway joined them: a name's own ',' is no second tool
            if tool != "":  # None: a name cut or not written (core/names.py), counted as "other"
                kt = (key, up, OTHER if tool is None else self._tool_label(up, tool, scope.key_id), outcome)
                self.mcp_tool_calls[kt] = self.mcp_tool_calls.get(kt, 0) + 1

    def set_upstream_up(self, upstream: str, value: float) -> None:
        """Record a reachability check (the probe, a request, ``/readyz``)."""
        if upstream:
            self._up[upstream] = value
            self.upstream_up.labels(upstream).set(value)

    # ------------------------------------------------------------- key table

    def set_keys(self, records: Iterable[KeyRecord], now: float | None = None) -> None:
        """Take a snapshot of the key table (on load and after every store change).

        Active keys get their label slot here, in table order, so a key's series are
        per-key from its first request. States are computed at scrape time, not here.
        """
        self._records = list(records)
        now = self.clock() if now is None else now
        for rec in self._records:
            if rec.id not in self._slots and len(self._slots) < self.max_key_series and rec.state(now) == "active":
                self._slots.add(rec.id)

    # --------------------------------------------------------- upstream probe

    async def watch_upstreams(
        self, upstreams: Sequence[UpstreamConfig], interval: float = UPSTREAM_PROBE_INTERVAL
    ) -> None:
        """Probe each upstream now and every ``interval`` (run as a task), as ``/readyz`` does:
        name, TCP and for https a TLS handshake with its trust settings (``sidecar.upstreams.health``).

        Requests update ``sidecar_upstream_up`` too (an answer sets 1, a refused or reset
        connection 0); the probe keeps it true for an upstream nobody is calling.
        """

        async def probe(up: UpstreamConfig) -> None:
            ok = await upstream_health.check(up, UPSTREAM_PROBE_TIMEOUT) == "ok"
            self.set_upstream_up(up.id, 1 if ok else 0)

        while True:
            await asyncio.gather(*(probe(u) for u in upstreams))
            await asyncio.sleep(interval)

    # ------------------------------------------------------------ exposition

    def _specs(self) -> list[Spec]:
        """Every family this object owns, with its current values (no copies)."""
        now = self.clock()
        counts = dict.fromkeys(KEY_STATES, 0)
        info: dict[tuple[str, ...], float] = {}
        expires: dict[tuple[str, ...], float] = {}
        for rec in self._records:
            state = rec.state(now)
            counts[state] += 1
            if rec.id in self._slots:
                # a key pasted into the wrong field is no label (whoever reads Prometheus could use it)
                info[(rec.id, redact_path_keys(rec.name), redact_path_keys(rec.owner or ""))] = 1
                if state == "active" and rec.expires_at is not None:
                    expires[(rec.id,)] = rec.expires_at
        quota_limit: dict[tuple[str, str], int] = {}
        quota_remaining: dict[tuple[str, str], int] = {}
        for (kid, scope), (limit, used, end) in list(self.quota_levels.items()):
            if kid in self._slots:  # folding quotas into "other" would add up unrelated budgets
                quota_limit[(kid, scope)] = limit
                quota_remaining[(kid, scope)] = limit if end <= now else max(0, limit - used)
        requests: dict[tuple[str, str, str, int], int] = {}
        sent: dict[tuple[str, str], int] = {}
        received: dict[tuple[str, str], int] = {}
        for k, s in self.series.items():
            requests[k] = s.requests
            if s.sent:
                sent[k[:2]] = sent.get(k[:2], 0) + s.sent
            if s.received:
                received[k[:2]] = received.get(k[:2], 0) + s.received
        return [
            Spec("sidecar_requests", "counter", "Requests answered, by key, upstream, method and status code",
                  ("key", "upstream", "method", "code"), requests),
            Spec("sidecar_request_duration_seconds", "histogram",
                  "Time from request to the last byte sent, by upstream", ("upstream",), self.request_duration),
            Spec("sidecar_upstream_duration_seconds", "histogram",
                  "Time until the upstream's response headers, by upstream", ("upstream",), self.upstream_duration),
            Spec("sidecar_response_bytes", "counter",
                  "Response body bytes sent to clients (websockets: upstream to client messages)",
                  ("key", "upstream"), sent),
            Spec("sidecar_request_bytes", "counter",
                  "Request body bytes received from clients (websockets: client to upstream messages)",
                  ("key", "upstream"), received),
            Spec("sidecar_auth_failures", "counter", "Requests refused for their credential or permissions, by reason",
                  ("reason",), self.auth_failures),
            Spec("sidecar_rate_limited", "counter", "Requests refused by a rate limit", ("key", "upstream"),
                  self.rate_limited),
            Spec("sidecar_quota_exceeded", "counter", "Requests refused by a quota", ("key", "upstream"),
                  self.quota_exceeded),
            Spec("sidecar_quota_limit", "gauge",
                  "A key's quota per window; upstream is the quota's scope (\"*\": all upstreams)",
                  ("key", "upstream"), quota_limit),
            Spec("sidecar_quota_remaining", "gauge",
                  "Requests left in a key's current quota window, as of its last request",
                  ("key", "upstream"), quota_remaining),
            Spec("sidecar_upstream_errors", "counter",
                  "Upstream faults by error (upstream_unavailable, upstream_timeout): answered 502/504, "
                  "or a response cut short after its headers were sent", ("upstream", "error"), self.upstream_errors),
            Spec("sidecar_cache_requests", "counter", "Requests under a cache rule, by cache result",
                  ("upstream", "result"), self.cache_requests),
            Spec("sidecar_mcp_tool_calls", "counter",
                  "MCP tools/call requests, by tool and outcome (ok, error, denied, rate_limited)",
                  ("key", "upstream", "tool", "outcome"), self.mcp_tool_calls),
            Spec("sidecar_store_write_failures", "counter",
                  "Writes the key/state database refused (kind: key, usage, last_used, quota, audit; reason: "
                  "locked, disk_full, read_only, io_error, other); usage, quota and audit writes are retried",
                  ("kind", "reason"), self.store_write_failures),
            Spec("sidecar_in_flight_requests", "gauge", "Requests being served", (), {(): self.in_flight.value}),
            Spec("sidecar_key_info", "gauge", "Key metadata (always 1)", ("key", "name", "owner"), info),
            Spec("sidecar_keys", "gauge", "Keys in the store, by state", ("state",),
                  {(state,): n for state, n in counts.items()}),
            Spec("sidecar_key_expires_timestamp_seconds", "gauge", "When an active key expires (Unix time)",
                  ("key",), expires),
        ]  # fmt: skip

    def exposition(self) -> bytes:
        """The text exposition (format 0.0.4) of the whole registry, for ``/metrics``.

        Same content as ``generate_latest(registry)``, an order of magnitude faster for
        our families: every series' ``name{labels} `` prefix is escaped once and cached,
        so a scrape of tens of thousands of series does not stall the event loop.
        """
        out: list[str] = []
        for spec in self._specs():
            write_family(spec, out, self._prefixes.setdefault(spec.name, {}) if spec.kind != "gauge" else {})
        # Everything else on the registry, formatted by prometheus_client, without ours twice.
        self._collector.muted = True
        try:
            out.append(generate_latest(self.registry).decode())
        finally:
            self._collector.muted = False
        return "".join(out).encode()
