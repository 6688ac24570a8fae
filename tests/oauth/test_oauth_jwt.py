"""Sidecar's own authorization server next to ``jwt:`` identity providers on the same MCP upstreams.

RFC 9728 metadata names Sidecar first (the full flow: registration, consent, grants as keys),
then every IdP whose rules grant that upstream; a JWT from the IdP works there too, and an
invalid one gets a 401 whose challenge points at that metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Running
from jwt_support import IdP, bearer, provider
from mcp_server import McpUpstream
from oauth_support import free_port, oauth_config, start_sidecar

from sidecar.app import Sidecar

INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}  # fmt: skip
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
AGENTS = {"when": {"group": "agents"}, "grant": {"upstreams": ["tools"], "tools": ["search"]}}
PRM = "/.well-known/oauth-protected-resource"


@pytest.fixture
async def idp(aiohttp_server: Any) -> IdP:
    idp = IdP()
    idp.add_key("k1", "RSA")
    return await idp.start(aiohttp_server)


@pytest.fixture
async def gw(aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], idp: IdP) -> Running:
    cfg = oauth_config(upstream, tmp_path, free_port())
    cfg["jwt"] = [provider(idp, [AGENTS], claims={"groups": "groups"})]
    return await start_sidecar(aiohttp_client, cfg, tmp_path, started)


async def test_the_metadata_names_sidecar_first_then_the_idps_granting_the_upstream(gw: Running, idp: IdP) -> None:
    issuer = gw.config.oauth.issuer(gw.config.server.public_url)
    tools = await (await gw.proxy.get(f"{PRM}/mcp/tools")).json()
    assert tools["authorization_servers"] == [issuer, idp.issuer]
    assert tools["resource"] == f"{issuer}/mcp/tools"
    other = await (await gw.proxy.get(f"{PRM}/mcp/other")).json()
    assert other["authorization_servers"] == [issuer]  # no jwt rule grants "other"


async def test_a_jwt_works_at_an_oauth_protected_upstream_and_a_bad_one_points_at_the_metadata(
    gw: Running, idp: IdP
) -> None:
    issuer = gw.config.oauth.issuer(gw.config.server.public_url)
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**bearer(idp.token(groups=["agents"])), **ACCEPT})
    assert r.status == 200
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**bearer(idp.token(lifetime=-120)), **ACCEPT})
    assert r.status == 401
    assert (await r.json())["error"]["code"] == "invalid_token"
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="sidecar", resource_metadata="{issuer}{PRM}/mcp/tools", '
        'error="invalid_token", error_description="token expired"'
    )
