"""What the MCP tests send by hand, shared: the headers, an initialize, a ``tools/call``, the
usual two-upstream config, a 2025-11-25 session opened the raw way, and a legacy SSE session
read by hand."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from conftest import Running, base_config
from mcp_server import McpUpstream

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
LEGACY_INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
# A key limited to one tool, the public docs and one prompt, on every MCP upstream.
SCOPED = {
    "upstreams": ["*"],
    "tools": {"*": ["search"]},
    "resources": {"*": ["docs://public/*"]},
    "prompts": {"*": ["greet"]},
}


def answer_messages(text: str) -> list[Any]:
    """The JSON-RPC messages of a POST's answer: a JSON body (the sidecar sends a stream holding just
    the answer as JSON, ``sidecar.http.whole``) or an event stream's ``data:`` lines."""
    if text.lstrip().startswith(("{", "[")):
        body = json.loads(text)
        return body if isinstance(body, list) else [body]
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip() for line in block.split("\n") if line.startswith("data:")]
        if data and "".join(data):
            out.append(json.loads("\n".join(data)))
    return out


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(rid: Any, tool: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


def mcp_config(upstream: McpUpstream, tmp_path: Path) -> dict[str, Any]:
    """The SDK server twice: Streamable HTTP at /mcp/tools, legacy SSE at /mcp/legacy."""
    cfg = base_config(upstream.url, tmp_path)
    auth = {"Authorization": "Bearer ${MCP_TOKEN}"}
    cfg["upstreams"] = [
        {"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools", "headers": auth},
        {"id": "legacy", "kind": "mcp", "url": upstream.url, "path_prefix": "/mcp/legacy", "headers": auth},
    ]
    return cfg


async def session(gw: Running, key: str, prefix: str = "/mcp/tools") -> dict[str, str]:
    """A 2025-11-25 session opened by hand: the headers of its later requests."""
    r = await gw.proxy.post(prefix, json=INIT, headers={**ACCEPT, **bearer(key)})
    assert r.status == 200, await r.text()
    await r.read()
    h = {**ACCEPT, **bearer(key), "Mcp-Session-Id": r.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}
    r = await gw.proxy.post(prefix, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=h)
    assert r.status == 202
    return h


class LegacyStream:
    """A legacy SSE session opened through the sidecar with raw aiohttp: its endpoint and its events."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.buf = ""
        self.endpoint = ""

    async def event(self) -> tuple[str, str]:
        while "\n\n" not in self.buf.replace("\r\n", "\n"):
            chunk = await asyncio.wait_for(self.resp.content.readany(), 10)
            assert chunk, "the event stream ended"
            self.buf += chunk.decode()
        self.buf = self.buf.replace("\r\n", "\n")
        raw, self.buf = self.buf.split("\n\n", 1)
        name, data = "message", []
        for line in raw.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        return name, "\n".join(data)

    async def answer(self, rid: Any) -> dict[str, Any]:
        while True:
            name, data = await self.event()
            if name == "message" and data:
                msg = json.loads(data)
                if msg.get("id") == rid and ("result" in msg or "error" in msg):
                    return msg

    @property
    def sid(self) -> str:
        return self.endpoint.split("session_id=", 1)[1]


@asynccontextmanager
async def legacy_stream(gw: Running, key: str) -> AsyncIterator[LegacyStream]:
    """Open the stream, read the endpoint event, initialise the session."""
    async with gw.proxy.get("/mcp/legacy/sse", headers={**bearer(key), "Accept": "text/event-stream"}) as resp:
        assert resp.status == 200
        s = LegacyStream(resp)
        name, s.endpoint = await s.event()
        assert name == "endpoint" and s.endpoint.startswith("/mcp/legacy/messages/?session_id=")
        r = await gw.proxy.post(s.endpoint, json=LEGACY_INIT, headers={**ACCEPT, **bearer(key)})
        assert r.status == 202
        await s.answer(1)
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await gw.proxy.post(s.endpoint, json=note, headers={**ACCEPT, **bearer(key)})).status == 202
        yield s
