"""MCP attacks through upstreams other than the SDK's: a server with per-session state, a JavaScript one.

The same attacker as ``test_sec_mcp_bypass.py`` (a key limited to tool ``search``, resources
``docs://public/*``, prompt ``greet``), against small real JSON-RPC servers that behave as common
MCP servers do where the SDK's own server does not: state kept per session (a login, a
workspace, a browser), and numbers read as JavaScript reads them (the TypeScript SDK's servers).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web
from conftest import MakeSidecar, base_config
from mcp_server import ALL_TOOLS
from mcp_support import ACCEPT, SCOPED, bearer

from sidecar.upstreams.mcp.jsonrpc import INVALID_REQUEST


def listed_tools(text: str) -> set[str]:
    return {t["name"] for t in json.loads(text)["result"]["tools"]}


def stateful_app() -> web.Application:
    """An MCP server that keeps a note per session, as servers holding a login, a workspace or a
    browser per session do: ``remember`` stores it, ``recall`` reads it back."""
    notes: dict[str, str] = {}

    async def post(request: web.Request) -> web.Response:
        msg = await request.json()
        sid = request.headers.get("Mcp-Session-Id", "")
        if msg.get("method") == "initialize":
            sid = uuid.uuid4().hex
            notes[sid] = ""
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "s"}}
            return web.json_response(
                {"jsonrpc": "2.0", "id": msg["id"], "result": result}, headers={"Mcp-Session-Id": sid}
            )
        if "id" not in msg:
            return web.Response(status=202)
        if sid not in notes:
            return web.Response(status=404)
        params = msg["params"]
        if params["name"] == "remember":
            notes[sid] = params["arguments"]["note"]
        text = notes[sid]
        return web.json_response(
            {"jsonrpc": "2.0", "id": msg["id"], "result": {"content": [{"type": "text", "text": text}]}}
        )

    app = web.Application()
    app.router.add_post("/mcp", post)
    return app


async def test_rest_callers_never_share_an_upstream_session(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """``POST /mcp`` (the REST tool call) runs on a session of the calling key's own.

    Before: one pooled session per upstream served every key, so what one key left in its session
    upstream (here a note; elsewhere a login or a browser page) the next key's call was served from.
    """
    up = await aiohttp_server(stateful_app())
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "state", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/state"}]
    gw = await make_sidecar(cfg)
    perms = {"upstreams": ["*"], "tools": {"*": ["remember", "recall"]}}
    _, alice = await gw.create_key(name="alice", permissions=perms)
    _, mallory = await gw.create_key(name="mallory", permissions=perms)

    async def rest(key: str, tool: str, **arguments: Any) -> str:
        body = {"mcp_id": "state", "tool": tool, "arguments": arguments}
        r = await gw.proxy.post("/mcp", json=body, headers=bearer(key))
        assert r.status == 200, await r.text()
        return str((await r.json())["data"]["content"][0]["text"])

    assert await rest(alice, "remember", note="alice's note") == "alice's note"
    assert await rest(mallory, "recall") == ""
    assert await rest(alice, "recall") == "alice's note"


def javascript_app() -> web.Application:
    """A JSON-RPC server that reads numbers as JavaScript does (``JSON.parse``: every number a double),
    as the TypeScript SDK's servers do: an integer id past 2^53 comes back as a different integer."""

    async def post(request: web.Request) -> web.Response:
        msg = json.loads(await request.read(), parse_int=float)
        rid = msg.get("id")
        rid = int(rid) if isinstance(rid, float) and rid.is_integer() else rid  # JSON.stringify's form
        result = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in ALL_TOOLS]}
        return web.json_response({"jsonrpc": "2.0", "id": rid, "result": result})

    app = web.Application()
    app.router.add_post("/mcp", post)
    return app


async def test_ids_a_javascript_upstream_cannot_echo_are_refused(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The gateway finds a list's answer by its id; an upstream that echoes another id must not unfilter it.

    Before: ``tools/list`` with id 2^60+1 came back as id 2^60 from a JavaScript upstream, matched no
    mark, and the whole list went down. Integer ids past ±(2^53-1) are now a 400 (-32600), never sent up.
    """
    up = await aiohttp_server(javascript_app())
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "js", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/js"}]
    gw = await make_sidecar(cfg)
    _, key = await gw.create_key(name="attacker", permissions=SCOPED)
    h = {**ACCEPT, **bearer(key)}
    for rid in (2**60 + 1, -(2**53), 2**53):
        r = await gw.proxy.post("/mcp/js", json={"jsonrpc": "2.0", "id": rid, "method": "tools/list"}, headers=h)
        assert r.status == 400, await r.text()
        assert (await r.json())["error"]["code"] == INVALID_REQUEST
    for rid in (2**53 - 1, -(2**53 - 1), "9007199254740993"):  # what every upstream echoes exactly
        r = await gw.proxy.post("/mcp/js", json={"jsonrpc": "2.0", "id": rid, "method": "tools/list"}, headers=h)
        assert r.status == 200, await r.text()
        assert listed_tools(await r.text()) == {"search"}
