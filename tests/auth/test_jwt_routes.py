"""JWTs on the routes outside the proxied MCP session: the REST tool call, the admin API, RFC 9728
discovery, the 401's challenge, and the per-address failed-attempts throttle.

A real JWKS server (``tests/jwt_support.py``), the real SDK MCP server behind a real sidecar;
each test asserts what the client sees and what the upstream saw.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeSidecar, Running, base_config
from jwt_support import IdP, bearer, provider
from mcp_server import MCP_TOKEN, McpUpstream

from sidecar.auth.jwt import identity_id

AGENTS = {
    "when": {"group": "agents"},
    "grant": {"upstreams": ["tools"], "tools": ["search", "fet*"], "rate_limits": ["3/minute"]},
}
OTHERS = {"when": {"group": "agents"}, "grant": {"upstreams": ["other"]}}
HMAC_SECRET = "s" * 40
WELL_KNOWN = "/.well-known/oauth-protected-resource"
ATTACKER = {"X-Forwarded-For": "203.0.113.7"}
NEIGHBOUR = {"X-Forwarded-For": "198.51.100.1"}
ACCEPT = "application/json, text/event-stream"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}


@pytest.fixture
async def idp(aiohttp_server: Any) -> IdP:
    idp = IdP()
    idp.add_key("k1", "RSA")
    idp.add_key("forger", "RSA", publish=False)
    return await idp.start(aiohttp_server)


@pytest.fixture
async def idp2(aiohttp_server: Any) -> IdP:
    idp = IdP(issuer="https://login.other.test/tenant/v2.0")
    idp.add_key("e1", "EC")
    return await idp.start(aiohttp_server)


@pytest.fixture
async def gw(make_sidecar: MakeSidecar, upstream: McpUpstream, idp: IdP, idp2: IdP, tmp_path: Path) -> Running:
    cfg = base_config(upstream.url, tmp_path)
    auth = {"Authorization": "Bearer ${MCP_TOKEN}"}
    cfg["upstreams"] = [
        {"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools", "headers": auth},
        {"id": "other", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/other", "headers": auth},
    ]
    cfg["server"] = {"trusted_proxies": ["127.0.0.1/32"]}  # so a test can be two client addresses
    cfg["jwt"] = [
        provider(idp, [AGENTS], claims={"groups": "groups"}),
        provider(idp2, [OTHERS], claims={"groups": "groups"}),
        # A shared-secret minter of one's own grants everything but is no OAuth server: never listed.
        {"issuer": "https://minter.internal", "audience": "sidecar", "algorithms": ["HS256"],
         "secret_env": "JWT_SECRET", "rules": [{"grant": {"upstreams": ["*"]}}]},
    ]  # fmt: skip
    return await make_sidecar(cfg, extra_env={"MCP_TOKEN": MCP_TOKEN, "JWT_SECRET": HMAC_SECRET})


def base(gw: Running) -> str:
    return str(gw.proxy.make_url("")).rstrip("/")


async def rest(gw: Running, token: str, tool: str, **headers: str) -> tuple[int, dict[str, Any]]:
    body = {"mcp_id": "tools", "tool": tool, "arguments": {"query": "cats"} if tool == "search" else {"url": "d"}}
    r = await gw.proxy.post("/mcp", json=body, headers={**bearer(token), **headers})
    text = await r.text()
    assert token not in text
    return r.status, json.loads(text)


# ----------------------------------------------------------------------------- the REST tool call


async def test_the_rest_tool_call_takes_a_jwt_with_its_rules_tools_and_limits(
    gw: Running, upstream: McpUpstream, idp: IdP, tmp_path: Path
) -> None:
    token = idp.token(sub="agent-7", groups=["agents"])
    status, body = await rest(gw, token, "search")
    assert (status, body) == (200, {"success": True, "data": body["data"]})
    assert body["data"]["content"][0]["text"] == "results for cats"
    status, body = await rest(gw, token, "delete_everything")  # not among the rule's tools
    assert status == 403 and body["error"]["code"] == "insufficient_permissions"
    assert (await rest(gw, token, "fetch"))[0] == 200
    assert (await rest(gw, token, "search"))[0] == 200
    # The rule's 3/minute is the subject's, whatever the route: the fourth call is refused.
    status, body = await rest(gw, token, "search")
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"

    assert upstream.rec.calls == ["search", "fetch", "search"]  # the forbidden and the over-limit calls never went up
    for r in upstream.rec.requests:
        assert r.header("authorization") == f"Bearer {MCP_TOKEN}"
        assert token.encode() not in r.body and all(token not in v for _, v in r.headers)
    ident = identity_id(idp.issuer, "agent-7")
    gw.sc.access_log.flush()
    lines = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    assert {(x["key"], x["credential"]) for x in lines} == {(ident, "jwt")}


async def test_the_rest_tool_call_refuses_a_bad_jwt_as_invalid_token(gw: Running, idp: IdP) -> None:
    expired = idp.token(groups=["agents"], lifetime=-120)
    r = await gw.proxy.post("/mcp", json={"mcp_id": "tools", "tool": "search"}, headers=bearer(expired))
    assert (r.status, (await r.json())["error"]) == (
        401,
        {"code": "invalid_token", "message": "invalid token: token expired"},
    )
    meta = f"{base(gw)}{WELL_KNOWN}/mcp"  # the REST resource's metadata, which names the IdPs
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="sidecar", resource_metadata="{meta}", error="invalid_token", error_description="token expired"'
    )
    status, body = await rest(gw, idp.token(groups=["staff"]), "search")  # verifies, but no rule grants it
    assert status == 403 and body["error"]["code"] == "insufficient_permissions"
    status, body = await rest(gw, idp.token(sub="x", groups=["agents"]), "search", **{"x-api-key": "also"})
    assert status == 400  # a second credential is still ambiguous


# ----------------------------------------------------------------------------- the admin API


async def test_the_admin_api_refuses_any_jwt_without_verifying_it(gw: Running, idp: IdP) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while idp.fetches < 1 and asyncio.get_running_loop().time() < deadline:  # the fetch made at start
        await asyncio.sleep(0.01)
    fetches = idp.fetches
    for token in (idp.token(groups=["agents"]), idp.token("forger"), idp.unsigned()):
        r = await gw.admin.get("/admin/keys", headers=bearer(token))
        assert r.status == 401
        assert await r.json() == {
            "success": False,
            "error": {
                "code": "invalid_token",
                "message": "invalid token: a JWT is never accepted by the admin API: "
                "use the admin token or an API key with admin",
            },
        }
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="sidecar", error="invalid_token"')
    assert idp.fetches == fetches  # nothing was fetched or checked for the admin listener's callers
    assert (await gw.admin.get("/admin/keys", headers=gw.admin_headers())).status == 200


async def test_jwts_at_the_admin_api_count_as_failed_attempts(gw: Running, idp: IdP) -> None:
    token = idp.token(groups=["agents"])
    statuses = [(await gw.admin.get("/admin/keys", headers=bearer(token))).status for _ in range(31)]
    assert statuses == [401] * 30 + [429]
    assert (await gw.admin.get("/admin/keys", headers=gw.admin_headers())).status == 200  # the admin token still works


# ----------------------------------------------------------------------------- discovery (RFC 9728)


async def test_resource_metadata_names_the_idps_whose_tokens_each_resource_takes(
    gw: Running, idp: IdP, idp2: IdP
) -> None:
    async def servers(path: str) -> list[str] | None:
        r = await gw.proxy.get(WELL_KNOWN + path)
        assert r.status == 200
        doc = await r.json()
        assert doc["resource"] == base(gw) + path
        return doc.get("authorization_servers")  # type: ignore[no-any-return]

    assert await servers("/mcp/tools") == [idp.issuer]
    assert await servers("/mcp/other") == [idp2.issuer]
    assert await servers("/mcp") == [idp.issuer, idp2.issuer]  # the REST tool call reaches either upstream
    assert await servers("") == [idp.issuer, idp2.issuer]


async def test_without_jwt_providers_the_metadata_names_no_authorization_server(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    cfg = base_config(upstream.url, tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools"}]
    gw = await make_sidecar(cfg)
    doc = await (await gw.proxy.get(WELL_KNOWN + "/mcp/tools")).json()
    assert "authorization_servers" not in doc


async def test_an_invalid_jwt_at_an_mcp_route_points_at_the_resource_metadata(gw: Running, idp: IdP) -> None:
    token = idp.token(groups=["agents"], lifetime=-120)
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**bearer(token), "Accept": ACCEPT})
    assert r.status == 401
    assert (await r.json())["error"] == {"code": "invalid_token", "message": "invalid token: token expired"}
    meta = f"{base(gw)}{WELL_KNOWN}/mcp/tools"
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="sidecar", resource_metadata="{meta}", error="invalid_token", error_description="token expired"'
    )
    # A client that follows it finds the IdP.
    assert (await (await gw.proxy.get(meta[len(base(gw)) :])).json())["authorization_servers"] == [idp.issuer]
    # Without any credential the challenge is the usual one (the same metadata).
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={"Accept": ACCEPT})
    assert r.status == 401 and f'resource_metadata="{meta}"' in r.headers["WWW-Authenticate"]


# ----------------------------------------------------------------------------- the failed-attempts throttle


async def test_a_flood_of_forged_jwts_is_throttled_like_forged_keys(gw: Running, idp: IdP) -> None:
    _, key = await gw.create_key(name="k", permissions={"upstreams": ["tools"]})
    head = {"Accept": ACCEPT, **ATTACKER}
    assert (await gw.proxy.post("/mcp/tools", json=INIT, headers={"x-api-key": key, **head})).status == 200
    good = idp.token(sub="agent-7", groups=["agents"])
    assert (await gw.proxy.post("/mcp/tools", json=INIT, headers={**bearer(good), **head})).status == 200

    forged = [idp.token("forger", header={"kid": "k1"}, sub=f"s{i}", groups=["agents"]) for i in range(32)]
    answers = []
    for i, token in enumerate(forged):
        r = await gw.proxy.post("/mcp/tools" if i % 2 else "/mcp", json=INIT, headers={**bearer(token), **head})
        answers.append((r.status, (await r.json())["error"]["code"]))
    assert answers == [(401, "invalid_token")] * 30 + [(429, "too_many_failed_attempts")] * 2
    assert int(r.headers["Retry-After"]) >= 1

    # Throttling refuses failures, never credentials that verify: the token and the key seen before pass,
    # a new valid token from the same address too; a forged *key* from there is now a 429 as well.
    assert (await gw.proxy.post("/mcp/tools", json=INIT, headers={**bearer(good), **head})).status == 200
    assert (await gw.proxy.post("/mcp/tools", json=INIT, headers={"x-api-key": key, **head})).status == 200
    fresh = idp.token(sub="agent-8", groups=["agents"])
    assert (await gw.proxy.post("/mcp/tools", json=INIT, headers={**bearer(fresh), **head})).status == 200
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={"x-api-key": key[:-4] + "0000", **head})
    assert r.status == 429
    # Another address is not affected.
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**bearer(forged[0]), "Accept": ACCEPT,
                                                              **NEIGHBOUR})  # fmt: skip
    assert r.status == 401


async def test_the_failed_attempts_window_passes(gw: Running, idp: IdP) -> None:
    """The throttle's window is a minute of the steady clock, as for keys."""
    clock = [time.monotonic()]
    gw.sc.verifier.steady = lambda: clock[0]
    forged = idp.token("forger", header={"kid": "k1"}, groups=["agents"])
    head = {**bearer(forged), "Accept": ACCEPT, **ATTACKER}
    for _ in range(30):
        assert (await gw.proxy.post("/mcp/tools", json=INIT, headers=head)).status == 401
    assert (await gw.proxy.post("/mcp/tools", json=INIT, headers=head)).status == 429
    clock[0] += 61
    assert (await gw.proxy.post("/mcp/tools", json=INIT, headers=head)).status == 401
