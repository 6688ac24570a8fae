"""A JWT's grant on an MCP upstream: the official SDK client, the SDK server, a real JWKS.

Group ``agents`` may use the tools ``search`` and ``fet*`` at 60/minute: ``tools/list`` shows
only those, a call to another tool is refused without reaching the upstream, the upstream
never sees the JWT, and metrics count the calls under the subject's ``jwt:`` id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest
from conftest import MakeSidecar, Running, base_config
from jwt_support import IdP, bearer, provider
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_server import MCP_TOKEN, McpUpstream

from sidecar.auth.jwt import identity_id
from sidecar.upstreams.mcp.jsonrpc import TOOL_FORBIDDEN

AGENTS = {
    "when": {"group": "agents"},
    "grant": {"upstreams": ["tools"], "tools": ["search", "fet*"], "rate_limits": ["60/minute"]},
}
READERS = {"when": {"scope": "mcp:read"}, "grant": {"upstreams": ["tools"], "tools": {"tools": ["fetch"]}}}


@pytest.fixture
async def idp(aiohttp_server: Any) -> IdP:
    idp = IdP()
    idp.add_key("k1", "RSA")
    return await idp.start(aiohttp_server)


@pytest.fixture
async def gw(make_sidecar: MakeSidecar, upstream: McpUpstream, idp: IdP, tmp_path: Path) -> Running:
    cfg = base_config(upstream.url, tmp_path)
    cfg["upstreams"] = [
        {
            "id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools",
            "headers": {"Authorization": "Bearer ${MCP_TOKEN}"},
        }
    ]  # fmt: skip
    cfg["jwt"] = [provider(idp, [AGENTS, READERS], claims={"groups": "groups", "scope": "scp"})]
    return await make_sidecar(cfg, extra_env={"MCP_TOKEN": MCP_TOKEN})


async def test_the_sdk_client_sees_and_calls_only_the_granted_tools(
    gw: Running, upstream: McpUpstream, idp: IdP, tmp_path: Path
) -> None:
    token = idp.token(sub="agent-7", groups=["agents", "staff"])
    async with (
        httpx2.AsyncClient(headers=bearer(token)) as http,
        streamable_http_client(str(gw.proxy.make_url("/mcp/tools")), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        listed = await session.list_tools()
        assert {t.name for t in listed.tools} == {"search", "fetch"}
        found = await session.call_tool("search", {"query": "cats"})
        assert found.content[0].text == "results for cats"  # type: ignore[union-attr]
        with pytest.raises(MCPError) as refused:
            await session.call_tool("delete_everything", {})
        assert refused.value.code == TOOL_FORBIDDEN
        fetched = await session.call_tool("fetch", {"url": "doc"})
        assert fetched.content[0].text == "fetched doc"  # type: ignore[union-attr]

    assert upstream.rec.calls == ["search", "fetch"]  # the forbidden tool never ran
    for r in upstream.rec.requests:
        assert r.header("authorization") == f"Bearer {MCP_TOKEN}"
        assert all(token not in v for _, v in r.headers)
        assert token.encode() not in r.body
    ident = identity_id(idp.issuer, "agent-7")
    sample = gw.sc.metrics.registry.get_sample_value
    labels = {"key": ident, "upstream": "tools"}
    assert sample("sidecar_mcp_tool_calls_total", {**labels, "tool": "search", "outcome": "ok"}) == 1
    assert sample("sidecar_mcp_tool_calls_total", {**labels, "tool": "delete_everything", "outcome": "denied"}) == 1
    gw.sc.access_log.flush()
    text = (tmp_path / "access.log").read_text()
    assert token not in text
    assert {json.loads(x)["key"] for x in text.splitlines()} == {ident}


async def test_a_scope_rule_grants_its_own_tools(gw: Running, idp: IdP) -> None:
    token = idp.token(sub="reader", scp="openid mcp:read")  # Entra ID's space-separated scp
    async with (
        httpx2.AsyncClient(headers=bearer(token)) as http,
        streamable_http_client(str(gw.proxy.make_url("/mcp/tools")), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert {t.name for t in (await session.list_tools()).tools} == {"fetch"}
        with pytest.raises(MCPError) as refused:
            await session.call_tool("search", {"query": "x"})
        assert refused.value.code == TOOL_FORBIDDEN


async def test_an_expired_token_at_the_mcp_route_is_401_invalid_token(gw: Running, idp: IdP) -> None:
    token = idp.token(groups=["agents"], lifetime=-120)
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    r = await gw.proxy.post("/mcp/tools", json=init, headers={**bearer(token), "Accept": "application/json"})
    assert r.status == 401
    assert await r.json() == {
        "success": False,
        "error": {"code": "invalid_token", "message": "invalid token: token expired"},
    }
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
