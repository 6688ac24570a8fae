"""A wall clock stepped back must not make an expired authorization code, access token or refresh token
valid again (invariant 5, docs/reliability.md "Clock").

Their ends are moments on the wall clock. Once the sidecar has seen a later wall time, all three
stay refused with their designed errors when NTP or an operator steps the clock back an hour —
though the code and the refresh token were never presented while the clock was ahead. Before the
fix all three worked again (the code exchanged, the token proxied, the refresh answered 200).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from limits_support import Clocks
from mcp_server import McpUpstream
from oauth_support import code_for, exchange, free_port, oauth_config, register, start_sidecar

from sidecar.app import Sidecar

HOUR = 3600.0
CLIENT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": CLIENT}


async def test_a_step_back_revives_no_code_access_or_refresh_token(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar]
) -> None:
    clocks = Clocks(time.time())
    port = free_port()
    cfg = oauth_config(upstream, tmp_path, port, code_ttl="1m", access_token_ttl="10m", refresh_token_ttl="30m")
    cfg["keys"] = {"argon2": "cheapest"}
    gw = await start_sidecar(aiohttp_client, cfg, tmp_path, started, clock=clocks.wall, steady=clocks.steady)
    _, key = await gw.create_key(permissions={"upstreams": ["*"]})
    client_id = (await register(gw, token_endpoint_auth_method="none"))["client_id"]
    code, verifier = await code_for(gw, key, client_id)  # never exchanged while the clock is ahead
    status, tokens = await exchange(gw, client_id, *await code_for(gw, key, client_id))
    assert status == 200, tokens

    async def use(access: str) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {access}", "Accept": "application/json, text/event-stream"}
        r = await gw.proxy.post("/mcp/tools", json=INIT, headers=headers)
        return r.status, "" if r.status < 400 else (await r.json())["error"]["code"]

    async def refresh() -> tuple[int, dict[str, Any]]:
        form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}
        r = await gw.proxy.post("/oauth/token", data=form)
        return r.status, await r.json()

    assert (await use(tokens["access_token"]))[0] == 200
    clocks.step = +HOUR  # past the code's minute, the access token's ten and the refresh token's thirty
    assert await use(tokens["access_token"]) == (401, "expired_key")  # the sidecar has seen this time
    clocks.step = 0.0  # and the wall clock is stepped back an hour
    seen = {
        "code": await exchange(gw, client_id, code, verifier),
        "access": await use(tokens["access_token"]),
        "refresh": await refresh(),
    }
    assert seen == {
        "code": (400, {"error": "invalid_grant", "error_description": "authorization code expired"}),
        "access": (401, "expired_key"),
        "refresh": (400, {"error": "invalid_grant", "error_description": "refresh token expired"}),
    }
    # A new flow after the step works: codes and tokens are issued on the clock they are judged on.
    status, fresh = await exchange(gw, client_id, *await code_for(gw, key, client_id))
    assert status == 200 and fresh["expires_in"] == 600, fresh
    assert (await use(fresh["access_token"]))[0] == 200
