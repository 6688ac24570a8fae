"""The MCP tools picker: the upstream's live ``tools/list``, fetched by the sidecar.

The sidecar asks the upstream itself, with the upstream's own credential (the configured
headers), on the pooled connections and the REST caller's JSON-RPC client
(``upstreams.mcp.rest.RestClient.request``) — the browser never talks to the upstream and
never sees its credential. Names and descriptions are scrubbed of that credential like any
upstream text (invariant 1). Answers are kept ``TTL`` seconds so a page reload does not
ask again; following ``nextCursor`` stops after ``MAX_PAGES`` pages or ``MAX_TOOLS`` tools.
When the upstream cannot answer, the form says so and tool names can be typed instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from ..config import UpstreamConfig
from ..core.errors import NotFound, UpstreamUnavailable
from ..upstreams.mcp.rest import RestClient
from ..upstreams.mcp.scrub import scrub_text

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
        out: list[dict[str, str]] = []
        params: dict[str, Any] = {}
        for _ in range(MAX_PAGES):
            result = await self.client.request(upstream, "tools/list", params)
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                raise UpstreamUnavailable(f"upstream {upstream.id} answered tools/list without a list of tools")
            for tool in result["tools"]:
                if isinstance(tool, dict) and isinstance(tool.get("name"), str) and len(out) < MAX_TOOLS:
                    desc = tool.get("description") if isinstance(tool.get("description"), str) else ""
                    out.append({
                        "name": scrub_text(upstream, tool["name"]),
                        "description": scrub_text(upstream, str(desc)[:MAX_DESCRIPTION]),
                    })  # fmt: skip
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor or len(out) >= MAX_TOOLS:
                break
            params = {"cursor": cursor}
        return out

    async def close(self, upstreams: list[UpstreamConfig]) -> None:
        await self.client.close(upstreams)
