"""What the MCP tests send by hand, shared: the headers, an initialize, a ``tools/call``, the
usual two-upstream config, and a 2025-11-25 session opened the raw way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import Running, base_config
from mcp_server import McpUpstream

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
# A key limited to one tool, the public docs and one prompt, on every MCP upstream.
SCOPED = {
    "upstreams": ["*"],
    "tools": {"*": ["search"]},
    "resources": {"*": ["docs://public/*"]},
    "prompts": {"*": ["greet"]},
}


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
