"""The MCP tools picker: the upstream's live ``tools/list``, fetched by the sidecar.

The sidecar asks the upstream itself, with the upstream's own credential (the configured
headers), on the pooled connections and the REST caller's JSON-RPC client
(``upstreams.mcp.rest.RestClient.list_tools``) — the browser never talks to the upstream and
never sees its credential. Names and descriptions are scrubbed of that credential like any
upstream text (invariant 1). Answers are kept ``TTL`` seconds so a page reload does not
ask again; following ``nextCursor`` stops after ``MAX_PAGES`` pages or ``MAX_TOOLS`` tools.
When the upstream cannot answer, the form says so and tool names can be typed instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp

from ..config import UpstreamConfig
from ..core.errors import NotFound
from ..upstreams.mcp.rest import RestClient

__all__ = ["ToolLister"]

TTL = 30.0
MAX_PAGES = 10
MAX_TOOLS = 1000
MAX_DESCRIPTION = 300
TIMEOUT = 5.0


class ToolLister:
    def __init__(self, sessions: dict[str, aiohttp.ClientSession], clock: Callable[[], float] = time.monotonic):
        self.client = RestClient(sessions)
        self.clock = clock
        self._cache: dict[str, tuple[float, list[dict[str, str]]]] = {}

    async def tools(self, upstream: UpstreamConfig | None) -> list[dict[str, str]]:
        """``[{"name", "description"}]`` of an MCP upstream; a SidecarError when it cannot say."""
        if upstream is None or upstream.kind != "mcp":
            raise NotFound("no MCP upstream with that id")
        hit = self._cache.get(upstream.id)
        if hit is not None and self.clock() - hit[0] < TTL:
            return hit[1]
        async with asyncio.timeout(TIMEOUT):
            found = await self._fetch(upstream)
        self._cache[upstream.id] = (self.clock(), found)
        return found

    async def _fetch(self, upstream: UpstreamConfig) -> list[dict[str, str]]:
        return await self.client.list_tools(upstream, MAX_PAGES, MAX_TOOLS, MAX_DESCRIPTION)

    async def close(self, upstreams: list[UpstreamConfig]) -> None:
        await self.client.close(upstreams)
