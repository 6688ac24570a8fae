"""The whole OAuth 2.1 flow with the official MCP SDK's client (``OAuthClientProvider``)
against Sidecar as authorization server, in front of the SDK's own MCP server.

401 → RFC 9728 discovery → RFC 8414 discovery → registration (RFC 7591, or a Client ID
Metadata Document) → consent (filled by the test like a person would) → code → token →
``tools/list`` filtered to the granted tools → a granted call works, an ungranted one is
refused → refresh → revoke → 401.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx2
import pytest
from conftest import Running
from mcp.client.auth import OAuthClientProvider
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from mcp.shared.exceptions import MCPError
from mcp_server import McpUpstream
from oauth_support import CALLBACK, consent, free_port, oauth_config, start_sidecar

from sidecar.app import Sidecar


class Memory:
    """The SDK's TokenStorage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


@pytest.fixture
async def gw(aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar]) -> Running:
    port = free_port()
    return await start_sidecar(aiohttp_client, oauth_config(upstream, tmp_path, port), tmp_path, started)


def provider(gw: Running, api_key: str, storage: Memory, *, tools: str = "", metadata_url: str | None = None
             ) -> tuple[OAuthClientProvider, list[str]]:  # fmt: skip
    """The SDK's provider; its redirect handler is a person who consents with ``api_key``."""
    seen: list[str] = []

    async def redirect(url: str) -> None:
        seen.append(url)

    async def callback() -> AuthorizationCodeResult:
        back = await consent(seen[-1], api_key, tools=tools)
        p = back.params
        assert "code" in p, back.location
        return AuthorizationCodeResult(code=p["code"], state=p.get("state"), iss=p.get("iss"))

    meta = OAuthClientMetadata(client_name="Test Agent", redirect_uris=[CALLBACK])  # type: ignore[list-item]
    base = str(gw.proxy.make_url("/mcp/tools"))
    return OAuthClientProvider(base, meta, storage, redirect, callback, client_metadata_url=metadata_url), seen


async def list_and_call(gw: Running, auth: OAuthClientProvider) -> tuple[set[str], Any, Any]:
    async with (
        httpx2.AsyncClient(auth=auth) as http,
        streamable_http_client(str(gw.proxy.make_url("/mcp/tools")), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        names = {t.name for t in (await session.list_tools()).tools}
        ok = await session.call_tool("search", {"query": "x"})
        with pytest.raises(MCPError) as refused:
            await session.call_tool("fetch", {"id": "1"})
        return names, ok, refused.value


async def test_sdk_client_completes_the_flow_with_dynamic_registration(gw: Running) -> None:
    perms = {"upstreams": ["*"], "tools": {"tools": ["search", "fetch"]}}
    parent, key = await gw.create_key(name="person", owner="alice", permissions=perms)
    storage = Memory()
    auth, seen = provider(gw, key, storage, tools="search")
    names, ok, refused = await list_and_call(gw, auth)
    assert len(seen) == 1 and "code_challenge_method=S256" in seen[0] and "resource=" in seen[0]
    assert names == {"search"}  # filtered to the granted tool, not the parent's two
    assert not ok.is_error
    assert "may not call tool 'fetch'" in str(refused)
    assert storage.client is not None and storage.client.client_id.startswith("dcr_")
    assert storage.tokens is not None and storage.tokens.refresh_token
    access = storage.tokens.access_token
    assert key not in access and access.startswith("pmcp_oat_")

    # The grant is a key: a child of the approving key, listed in the admin API.
    r = await gw.admin.get("/admin/oauth/grants", params={"key": parent.id}, headers=gw.admin_headers())
    grants = (await r.json())["data"]
    assert len(grants) == 1 and grants[0]["parent_id"] == parent.id and grants[0]["owner"] == "alice"
    assert grants[0]["grant"]["client_id"] == storage.client.client_id and grants[0]["grant"]["tools"] == ["search"]
    assert grants[0]["permissions"]["tools"] == {"tools": ["search"]}
    r = await gw.admin.get("/admin/keys", headers=gw.admin_headers())
    assert any(k["id"] == grants[0]["id"] for k in (await r.json())["data"])

    # Refresh: a new pair; the old refresh token then revokes the whole grant.
    token_url = "/oauth/token"
    old = storage.tokens.refresh_token
    form = {"grant_type": "refresh_token", "refresh_token": old, "client_id": storage.client.client_id}
    r = await gw.proxy.post(token_url, data=form)
    fresh = await r.json()
    assert r.status == 200 and fresh["refresh_token"] != old and fresh["access_token"] != access
    r = await gw.proxy.post(
        "/mcp/tools", json=PING, headers={**ACCEPT, "Authorization": f"Bearer {fresh['access_token']}"}
    )
    assert r.status == 200

    # Revoke (RFC 7009): the grant ends, the access token answers 401 with the challenge.
    r = await gw.proxy.post("/oauth/revoke", data={"token": fresh["refresh_token"],
                                                   "client_id": storage.client.client_id})  # fmt: skip
    assert r.status == 200
    r = await gw.proxy.post(
        "/mcp/tools", json=PING, headers={**ACCEPT, "Authorization": f"Bearer {fresh['access_token']}"}
    )
    assert r.status == 401 and (await r.json())["error"]["code"] == "revoked_key"
    challenge = r.headers["WWW-Authenticate"]
    assert 'resource_metadata="http://127.0.0.1:' in challenge and 'scope="mcp"' in challenge
    assert 'error="invalid_token"' in challenge


PING = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}  # fmt: skip
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def test_discovery_documents(gw: Running) -> None:
    r = await gw.proxy.post("/mcp/tools", json=PING, headers=ACCEPT)
    assert r.status == 401
    challenge = r.headers["WWW-Authenticate"]
    issuer = str(gw.proxy.make_url("")).rstrip("/")
    assert (
        challenge == f'Bearer resource_metadata="{issuer}/.well-known/oauth-protected-resource/mcp/tools", scope="mcp"'
    )
    r = await gw.proxy.get("/.well-known/oauth-protected-resource/mcp/tools", headers={"Host": "evil.example"})
    prm = await r.json()
    assert prm["resource"] == f"{issuer}/mcp/tools" and prm["authorization_servers"] == [issuer]
    r = await gw.proxy.get("/.well-known/oauth-authorization-server", headers={"Host": "evil.example"})
    asm = await r.json()
    assert asm["issuer"] == issuer and asm["code_challenge_methods_supported"] == ["S256"]
    assert asm["client_id_metadata_document_supported"] is True
    assert asm["authorization_response_iss_parameter_supported"] is True
    assert (
        asm["token_endpoint"] == f"{issuer}/oauth/token" and asm["registration_endpoint"] == f"{issuer}/oauth/register"
    )
    # the root paths older clients guess
    r = await gw.proxy.post("/token", data={"grant_type": "password"})
    assert r.status == 401 and (await r.json())["error"] == "invalid_client"
    r = await gw.proxy.get("/authorize", params={"client_id": "nobody"})
    assert r.status == 400 and "unknown" in await r.text() and r.headers["X-Frame-Options"] == "DENY"
    r = await gw.proxy.get("/oauth/token")
    assert r.status == 405 and r.headers["Allow"] == "POST"
    r = await gw.proxy.options("/oauth/register", headers={"Origin": "https://inspector.example"})
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
    r = await gw.proxy.options("/oauth/authorize")
    assert r.status == 405
    r = await gw.proxy.post(
        "/oauth/token", data="x" * 20_000, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert r.status == 400 and (await r.json())["error"] == "invalid_request"
    await asyncio.sleep(0)


async def test_auto_mode_client_negotiates_2026_with_an_oauth_token(gw: Running) -> None:
    from mcp.client import Client

    _, key = await gw.create_key(permissions={"upstreams": ["tools"], "tools": {"tools": ["search", "fetch"]}})
    storage = Memory()
    auth, _ = provider(gw, key, storage, tools="fetch")
    async with (
        httpx2.AsyncClient(auth=auth) as http,
        Client(streamable_http_client(str(gw.proxy.make_url("/mcp/tools")), http_client=http), mode="auto") as client,
    ):
        assert client.protocol_version == "2026-07-28"
        assert {t.name for t in (await client.list_tools()).tools} == {"fetch"}
        found = await client.call_tool("fetch", {"url": "x"})
        assert found.content[0].text == "fetched x"  # type: ignore[union-attr]
        with pytest.raises(MCPError):
            await client.call_tool("search", {"query": "x"})
