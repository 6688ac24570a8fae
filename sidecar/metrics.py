"""Prometheus metrics: the contract's names and labels, on a registry the app owns.

``key`` labels carry the key id (never the secret). Series are bounded: traffic with
no verified key uses ``key=""``; past ``metrics.max_key_series`` distinct keys the
rest fold into ``key="other"``.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .models import KeyRecord
from .scope import RequestScope

__all__ = ["Metrics"]

# Fast API calls (ms) through long streams (minutes).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
OTHER = "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_key_series: int = 1000) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.max_key_series = max_key_series
        self._keys_seen: set[str] = set()
        r = self.registry
        self.requests = Counter(
            "sidecar_requests", "Requests answered, by key, upstream, method and status code",
            ["key", "upstream", "method", "code"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds", "Time from request to last byte, by upstream",
            ["upstream"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "sidecar_upstream_duration_seconds", "Time until the upstream's response headers, by upstream",
            ["upstream"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.response_bytes = Counter(
            "sidecar_response_bytes", "Response body bytes sent to clients", ["key", "upstream"], registry=r
        )
        self.request_bytes = Counter(
            "sidecar_request_bytes", "Request body bytes received from clients", ["key", "upstream"], registry=r
        )
        self.auth_failures = Counter("sidecar_auth_failures", "Refused credentials, by reason", ["reason"], registry=r)
        self.rate_limited = Counter(
            "sidecar_rate_limited", "Requests refused by a rate limit", ["key", "upstream"], registry=r
        )
        self.quota_exceeded = Counter(
            "sidecar_quota_exceeded", "Requests refused by a quota", ["key", "upstream"], registry=r
        )
        self.cache_requests = Counter(
            "sidecar_cache_requests", "Cache lookups by result", ["upstream", "result"], registry=r
        )
        self.mcp_tool_calls = Counter(
            "sidecar_mcp_tool_calls", "MCP tools/call requests", ["key", "upstream", "tool", "outcome"], registry=r
        )
        self.in_flight = Gauge("sidecar_in_flight_requests", "Requests being served", registry=r)
        self.key_info = Gauge("sidecar_key_info", "Key metadata (always 1)", ["key", "name", "owner"], registry=r)
        self.keys = Gauge("sidecar_keys", "Keys by state", ["state"], registry=r)
        self.key_expires = Gauge(
            "sidecar_key_expires_timestamp_seconds", "When a key expires (Unix time)", ["key"], registry=r
        )
        self.upstream_up = Gauge(
            "sidecar_upstream_up", "Upstream reachable at the last check", ["upstream"], registry=r
        )
        for state in ("active", "expired", "revoked"):
            self.keys.labels(state)
        for reason in ("unauthorized", "invalid_key", "expired_key", "revoked_key", "bad_request",
                       "insufficient_permissions", "too_many_failed_attempts"):  # fmt: skip
            self.auth_failures.labels(reason)

    def key_label(self, key_id: str) -> str:
        if not key_id or key_id in self._keys_seen:
            return key_id
        if len(self._keys_seen) >= self.max_key_series:
            return OTHER
        self._keys_seen.add(key_id)
        return key_id

    def observe(self, scope: RequestScope) -> None:
        """One call per finished request: the hot path's only metrics cost."""
        key = self.key_label(scope.key_id)
        up = scope.upstream or "none"
        self.requests.labels(key, up, scope.method, str(scope.status)).inc()
        self.request_duration.labels(up).observe(scope.elapsed())
        if scope.upstream_seconds is not None:
            self.upstream_duration.labels(up).observe(scope.upstream_seconds)
        if scope.bytes_sent:
            self.response_bytes.labels(key, up).inc(scope.bytes_sent)
        if scope.error in self._auth_reasons:
            self.auth_failures.labels(scope.error).inc()
        elif scope.error == "rate_limit_exceeded":
            self.rate_limited.labels(key, up).inc()
        elif scope.error == "quota_exceeded":
            self.quota_exceeded.labels(key, up).inc()
        if scope.cache:
            self.cache_requests.labels(up, scope.cache.lower()).inc()

    _auth_reasons = frozenset(
        {"unauthorized", "invalid_key", "expired_key", "revoked_key", "insufficient_permissions",
         "too_many_failed_attempts"}
    )  # fmt: skip

    def set_keys(self, records: Iterable[KeyRecord], now: float) -> None:
        """Refresh key info and counts (on load and after every store change)."""
        counts = {"active": 0, "expired": 0, "revoked": 0}
        self.key_info.clear()
        self.key_expires.clear()
        for rec in records:
            state = rec.state(now)
            counts[state] += 1
            if state == "active":
                label = self.key_label(rec.id)
                if label != OTHER:
                    self.key_info.labels(rec.id, rec.name, rec.owner or "").set(1)
                    if rec.expires_at is not None:
                        self.key_expires.labels(rec.id).set(rec.expires_at)
        for state, n in counts.items():
            self.keys.labels(state).set(n)
