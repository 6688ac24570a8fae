"""The one per-request record that every stage fills and the log and metrics read."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["SCOPE", "RequestScope"]


@dataclass(slots=True)
class RequestScope:
    method: str
    path: str  # as logged: credentials redacted
    client_ip: str
    start: float = field(default_factory=time.perf_counter)
    upstream: str = ""  # upstream id, "" before routing
    key_id: str = ""  # "" when unauthenticated
    key_name: str = ""
    status: int = 0
    error: str = ""  # contract error code when the sidecar answered itself
    bytes_sent: int = 0
    bytes_received: int = 0
    upstream_seconds: float | None = None
    cache: str = ""  # HIT, MISS, BYPASS, EXPIRED, STALE or ""
    tool: str = ""  # MCP tool name(s)
    credential: str = ""  # credential form(s) used
    rate_limited: bool = False
    granted: object = None  # the key's permissions (and secret) as authorised: its streams end when they change
    until: float | None = None  # the credential's own end (an OAuth access token's expiry): its streams end then

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


SCOPE = web.RequestKey("sidecar_scope", RequestScope)
