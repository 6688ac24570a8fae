"""sidecar/upstreams/mcp/rest.py: the sidecar's own JSON-RPC client (REST tool call, tools picker,
OAuth consent page) against a hostile upstream: one that echoes its credential into tool names,
pages its list and expires its session mid-way."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.config import UpstreamConfig
from sidecar.core.errors import UpstreamUnavailable
from sidecar.upstreams.mcp.rest import RestClient

SECRET = "upstream-secret-0123456789"
STATE = web.AppKey("state", dict)


def hostile_upstream(pages: int, expire_on_page: int | None, answer_lists: bool = True) -> web.Application:
    state: dict[str, Any] = {"session": 0, "expired": False, "methods": []}

    async def mcp(request: web.Request) -> web.Response:
        msg = json.loads(await request.read())
        state["methods"].append(msg["method"])
        if msg["method"] == "initialize":
            state["session"] += 1
            result = {"protocolVersion": "2025-11-25", "capabilities": {}, "serverInfo": {"name": "x", "version": "1"}}
            return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": result},
                                     headers={"Mcp-Session-Id": f"s{state['session']}"})  # fmt: skip
        if "id" not in msg:
            return web.Response(status=202)
        page = int(msg["params"].get("cursor") or 0)
        if page == expire_on_page and not state["expired"]:
            state["expired"] = True
            return web.Response(status=404)  # the session expired upstream
        if not answer_lists:
            return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -1, "message": "no"}})
        tools = [{"name": f"tool{page}", "description": f"uses {SECRET} inside"}, {"name": f"leak-{SECRET}-{page}"}]
        result = {"tools": tools, **({"nextCursor": str(page + 1)} if page + 1 < pages else {})}
        return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": result})

    app = web.Application()
    app[STATE] = state
    app.router.add_post("/mcp", mcp)
    return app


async def _listed(aiohttp_server: Any, app: web.Application, **kw: int) -> list[dict[str, str]]:
    server: TestServer = await aiohttp_server(app)
    up = UpstreamConfig(
        id="t", kind="mcp", url=str(server.make_url("/mcp")), headers={"Authorization": f"Bearer {SECRET}"}
    )
    async with aiohttp.ClientSession() as session:
        client = RestClient({"t": session})
        return await client.list_tools(up, **kw)


async def test_tool_names_and_descriptions_never_carry_the_upstreams_credential(aiohttp_server: Any) -> None:
    """What the console's picker and the public consent page show: the names, the secret masked."""
    tools = await _listed(aiohttp_server, hostile_upstream(pages=3, expire_on_page=None))
    assert [t["name"] for t in tools][::2] == ["tool0", "tool1", "tool2"]
    assert SECRET not in json.dumps(tools)
    assert len(tools) == 6


async def test_pages_are_bounded_and_an_expired_session_is_renewed_once(aiohttp_server: Any) -> None:
    app = hostile_upstream(pages=50, expire_on_page=1)
    tools = await _listed(aiohttp_server, app, max_pages=3)
    assert [t["name"] for t in tools][::2] == ["tool0", "tool1", "tool2"]  # page 1 asked again on a new session
    assert app[STATE]["session"] == 2
    assert app[STATE]["methods"].count("tools/list") == 4
    tools = await _listed(aiohttp_server, hostile_upstream(pages=50, expire_on_page=None), max_tools=3)
    assert len(tools) == 3


async def test_an_upstream_that_cannot_list_is_a_clear_error(aiohttp_server: Any) -> None:
    with pytest.raises(UpstreamUnavailable, match="without a list of tools") as e:
        await _listed(aiohttp_server, hostile_upstream(pages=1, expire_on_page=None, answer_lists=False))
    assert SECRET not in e.value.message
