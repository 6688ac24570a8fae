"""The last requests of each key, and recent refusals, in memory (the console's key and activity pages).

Fed by the access log's tap (``AccessLog.tap``, one call per finished request), so an entry
is exactly what the canonical log line says — path already redacted as logged
(``http.accesslog.redact_path``), no header, no credential, only the form it came in.

Bounded whatever the traffic: ``per_key`` entries for each of at most ``max_keys`` keys
(the least recently active key is forgotten first), ``max_events`` authentication failures
and as many rate-limit refusals, and ``max_ips`` failing addresses counted. Per process and
gone at a restart: the durable record is the access log, the usage table and the audit log.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from ..core.scope import RequestScope
from .logfilter import redact_path_keys

__all__ = ["AUTH_FAILURES", "RATE_REFUSALS", "Entry", "RecentRequests"]

# Contract error codes that count as an authentication or authorization failure, and as a refusal for volume.
AUTH_FAILURES = frozenset(
    {"unauthorized", "invalid_key", "expired_key", "revoked_key", "insufficient_permissions",
     "too_many_failed_attempts", "console_sign_in"}
)  # fmt: skip
RATE_REFUSALS = frozenset({"rate_limit_exceeded", "quota_exceeded"})


class Entry(NamedTuple):
    """One finished request as the access log wrote it (a tuple: ~10x cheaper to build than a frozen dataclass)."""

    at: float  # Unix time it ended
    method: str
    path: str  # redacted as in the access log
    status: int
    duration_ms: float
    client_ip: str
    upstream: str
    key_id: str
    error: str = ""
    bytes: int = 0
    tool: str = ""
    credential: str = ""


class RecentRequests:
    def __init__(
        self,
        *,
        per_key: int = 100,
        max_keys: int = 1000,
        max_events: int = 500,
        max_ips: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.per_key = per_key
        self.max_keys = max_keys
        self.max_ips = max_ips
        self.clock = clock
        self._keys: OrderedDict[str, deque[Entry]] = OrderedDict()
        self.failures: deque[Entry] = deque(maxlen=max_events)
        self.refusals: deque[Entry] = deque(maxlen=max_events)
        self.failures_by_reason: dict[str, int] = {}  # since start (reasons are a fixed set)
        self.failures_by_ip: OrderedDict[str, int] = OrderedDict()  # since start, least recent forgotten

    def add(self, scope: RequestScope) -> None:
        """Remember one finished request (hot path: a few dict and deque operations)."""
        error = scope.error
        key_id = scope.key_id
        if not key_id and not error:
            return  # neither a key's request nor a refusal: nothing this keeps
        entry = Entry(
            self.clock(), scope.method, scope.path, scope.status, (time.perf_counter() - scope.start) * 1000,
            scope.client_ip, scope.upstream, key_id, error, scope.bytes_sent,
            redact_path_keys(scope.tool), scope.credential,  # a tool name is the client's text: no key shown
        )  # fmt: skip
        if key_id:
            ring = self._keys.get(key_id)
            if ring is None:
                if len(self._keys) >= self.max_keys:
                    self._keys.popitem(last=False)
                ring = self._keys[key_id] = deque(maxlen=self.per_key)
            else:
                self._keys.move_to_end(key_id)
            ring.append(entry)
        if error:
            if error in AUTH_FAILURES or (error == "bad_request" and not key_id):
                self._failed(entry)
            elif error in RATE_REFUSALS or scope.rate_limited:
                self.refusals.append(entry)

    def note(self, entry: Entry) -> None:
        """A failure the proxy did not see (a refused console sign-in)."""
        self._failed(entry)

    def _failed(self, entry: Entry) -> None:
        self.failures.append(entry)
        self.failures_by_reason[entry.error] = self.failures_by_reason.get(entry.error, 0) + 1
        ip = entry.client_ip
        n = self.failures_by_ip.pop(ip, 0)
        if n == 0 and len(self.failures_by_ip) >= self.max_ips:
            self.failures_by_ip.popitem(last=False)
        self.failures_by_ip[ip] = n + 1

    def for_key(self, key_id: str) -> list[Entry]:
        """The key's last requests, newest first."""
        ring = self._keys.get(key_id)
        return list(reversed(ring)) if ring else []

    def key_ids(self) -> Iterable[str]:
        """Ids of the keys with remembered requests, most recently active last."""
        return list(self._keys)
