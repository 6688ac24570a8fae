"""``tools/list`` ``cacheScope`` / ``ttlMs`` (MCP 2026-07-28) through the sidecar (issue 19 §3).

A list that passes through the sidecar depends on the key that asked (its ``tools``,
``resources``, ``prompts``), so the upstream's ``"public"`` (shareable across
authorization contexts by a client cache) never reaches a client: it becomes
``"private"``, for a restricted key and an unrestricted one alike, in JSON and SSE
answers. ``ttlMs`` passes untouched; the gateway itself caches no list (the response
cache serves GET/HEAD only), so no key is ever answered another key's list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config

TOOLS = [{"name": n, "inputSchema": {"type": "object"}} for n in ("search", "fetch", "delete_everything")]
SCOPES = {"public": "public", "private": "private", "absent": None, "escaped": "\\u0070ublic"}


def upstream_app() -> web.Application:
    """A 2026-07-28 style server: tools/list with the cacheScope the X-Scope header names, JSON or SSE."""
    app = web.Application()

    async def post(request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        scope = SCOPES[request.headers.get("X-Scope", "public")]
        result = '{"tools":' + json.dumps(TOOLS) + ',"ttlMs":60000'
        result += f',"cacheScope":"{scope}"' if scope is not None else ""
        body = f'{{"jsonrpc":"2.0","id":{json.dumps(msg["id"])},"result":{result}}}}}'.encode()
        if request.headers.get("X-Answer") == "sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"event: message\ndata: " + body + b"\n\n")
            await resp.write_eof()
            return resp
        return web.Response(body=body, content_type="application/json")

    app.router.add_post("/mcp", post)
    return app


@pytest.fixture
async def gw(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> Running:
    up: TestServer = await aiohttp_server(upstream_app())
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"] = [
        {"id": "tools", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/tools"},
    ]
    return await make_sidecar(cfg)


async def listed(gw: Running, key: str, answer: str, scope: str) -> tuple[dict[str, Any], bytes]:
    headers = {"Authorization": f"Bearer {key}", "X-Answer": answer, "X-Scope": scope,
               "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28"}  # fmt: skip
    r = await gw.proxy.post("/mcp/tools", json={"jsonrpc": "2.0", "id": 7, "method": "tools/list"}, headers=headers)
    assert r.status == 200
    raw = await r.read()
    if answer == "sse" and r.content_type == "text/event-stream":  # a finished one-answer stream comes as JSON
        data = next(x for x in raw.decode().splitlines() if x.startswith("data:"))[5:]
        return json.loads(data)["result"], raw
    return json.loads(raw)["result"], raw


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_a_public_list_is_never_public_through_the_sidecar(gw: Running, answer: str) -> None:
    _, everything = await gw.create_key(name="all")
    _, limited = await gw.create_key(name="one", permissions={"upstreams": ["*"], "tools": {"tools": ["search"]}})
    for key, names in ((everything, ["search", "fetch", "delete_everything"]), (limited, ["search"])):
        for scope in ("public", "escaped"):
            result, _ = await listed(gw, key, answer, scope)
            assert [t["name"] for t in result["tools"]] == names
            assert result["cacheScope"] == "private"  # a client cache keeps it to this key's context
            assert result["ttlMs"] == 60000  # freshness is the upstream's to say


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_lists_that_are_already_private_pass_untouched(gw: Running, answer: str) -> None:
    _, everything = await gw.create_key(name="all")
    for scope in ("private", "absent"):
        result, raw = await listed(gw, everything, answer, scope)
        assert len(result["tools"]) == 3 and result.get("cacheScope") in ("private", None)
        assert b'"ttlMs":60000' in raw  # byte for byte: not re-serialised
