"""An OAuth access token's open stream ends when the token expires (invariant 5), as a JWT's does.

A stream authorised by an access token never asks again. Its grant stays active for as long as
its client keeps refreshing, so a stream opened with a token that leaked (or one that simply
expired) must be bound to that token: it ends within a sweep of the token's own expiry
(``scope.until``), whatever newer tokens the grant has; the client reconnects with its new one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
from conftest import Running
from mcp_server import McpUpstream
from oauth_support import code_for, exchange, free_port, oauth_config, register, start_sidecar
from streams_support import cut

from sidecar.app import Sidecar


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def rig(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar]
) -> tuple[Running, Clock]:
    port = free_port()
    cfg = oauth_config(upstream, tmp_path, port, access_token_ttl="10m")
    cfg["upstreams"][0]["url"] = upstream.url  # the legacy SSE transport: GET /mcp/tools/sse is the stream
    cfg["keys"] = {"argon2": "cheapest", "stream_check_interval": "50ms"}
    clock = Clock()
    return await start_sidecar(aiohttp_client, cfg, tmp_path, started, clock=clock), clock


async def token(gw: Running) -> dict[str, Any]:
    _, key = await gw.create_key(permissions={"upstreams": ["*"]})
    client = await register(gw, token_endpoint_auth_method="none")
    code, verifier = await code_for(gw, key, client["client_id"])
    status, body = await exchange(gw, client["client_id"], code, verifier)
    assert status == 200, body
    return {**body, "client_id": client["client_id"]}


async def opened(gw: Running, access: str) -> aiohttp.ClientResponse:
    stream = await gw.proxy.get("/mcp/tools/sse", headers={"Authorization": f"Bearer {access}"})
    assert stream.status == 200
    first = b""
    while b"endpoint" not in first:
        first += await stream.content.readany()
    return stream


async def test_an_access_tokens_stream_ends_when_the_token_expires(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar]
) -> None:
    gw, clock = await rig(aiohttp_client, upstream, tmp_path, started)
    access = (await token(gw))["access_token"]
    headers = {"Authorization": f"Bearer {access}"}
    async with await opened(gw, access) as stream:
        clock.offset = 11 * 60.0  # the token's ten minutes are over; the grant itself stands
        await cut(stream)  # within a sweep, never a clean end
    resp = await gw.proxy.get("/mcp/tools/sse", headers=headers)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "expired_key"


async def test_a_stream_ends_with_its_own_token_though_the_client_refreshed(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar]
) -> None:
    """A leaked access token's stream must not live on while the real client keeps refreshing: before,
    the grant counted as "active" while any token of it was, so the stream of the first token ran for
    as long as the client refreshed (the sweep below ended nothing at 11 minutes)."""
    gw, clock = await rig(aiohttp_client, upstream, tmp_path, started)
    tokens = await token(gw)
    grant_id = next(r.id for r in gw.sc.verifier.table.values() if r.parent_id is not None)
    async with await opened(gw, tokens["access_token"]) as leaked:  # an attacker's copy of the first token
        clock.offset = 9 * 60.0
        form = {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": tokens["client_id"],
        }
        fresh = await (await gw.proxy.post("/oauth/token", data=form)).json()
        async with await opened(gw, fresh["access_token"]) as own:  # the client goes on with its new token
            assert gw.sc.streams.open_streams(grant_id) == 2
            clock.offset = 11 * 60.0  # the first token has expired, the second has not
            await cut(leaked)  # within a sweep, never a clean end
            assert gw.sc.streams.open_streams(grant_id) == 1  # the client's own stream goes on
            assert not own.content.at_eof()
            again = await gw.proxy.get("/mcp/tools/sse", headers={"Authorization": f"Bearer {tokens['access_token']}"})
            assert again.status == 401 and (await again.json())["error"]["code"] == "expired_key"
            clock.offset = 20 * 60.0  # the second token's end: its stream ends too
            await cut(own)  # within a sweep, never a clean end
