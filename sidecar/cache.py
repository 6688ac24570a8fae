"""Response cache (placeholder: never caches).

Interface used by the pipeline (keep it):
    ResponseCache(config: CacheConfig, *, clock=time.monotonic)
    rule_for(upstream_id, method, path) -> CacheRule | None
    await serve(request, scope, upstream, url, headers, identity, fetch) -> web.StreamResponse
        fetch(response_filter_or_None) -> Awaitable[web.StreamResponse] streams from upstream.
    purge(upstream=None, path_glob=None) -> int
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import CacheConfig, CacheRule, UpstreamConfig
from .scope import RequestScope

__all__ = ["ResponseCache"]

Fetch = Callable[[], Awaitable[web.StreamResponse]]


class ResponseCache:
    def __init__(self, config: CacheConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock

    def rule_for(self, upstream_id: str, method: str, path: str) -> CacheRule | None:
        return None

    async def serve(
        self,
        request: web.Request,
        scope: RequestScope,
        upstream: UpstreamConfig,
        url: URL,
        headers: CIMultiDict[str],
        identity: str,
        fetch: Fetch,
    ) -> web.StreamResponse:
        scope.cache = "BYPASS"
        return await fetch()

    def purge(self, upstream: str | None = None, path_glob: str | None = None) -> int:
        return 0
