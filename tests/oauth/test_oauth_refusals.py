"""What the authorization server and the protected resource refuse, each as the attacker
would try it: PKCE, redirect URIs, resources, replays, reuse, expiry, token placement,
other upstreams, and grants wider than the approving key."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import Running
from mcp_server import MCP_TOKEN, McpUpstream
from oauth_support import (
    CALLBACK,
    authorize_url,
    code_for,
    consent,
    exchange,
    free_port,
    oauth_config,
    pkce,
    register,
    start_sidecar,
)

from sidecar.app import Sidecar

INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}  # fmt: skip
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
PERMS = {"upstreams": ["*"], "tools": {"tools": ["search", "fetch"], "other": ["search"]}}
# A client from the config file: errors go back to it by redirect (a registered one gets a page, see
# test_oauth_attacks.py::test_errors_go_back_to_an_unvouched_client_only_by_a_link).
CONFIGURED = {"client_id": "conf", "client_name": "Configured", "redirect_uris": [CALLBACK]}


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def gw(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], clock: Clock
) -> Running:
    cfg = oauth_config(upstream, tmp_path, free_port(), access_token_ttl="10m", clients=[CONFIGURED])
    return await start_sidecar(aiohttp_client, cfg, tmp_path, started, clock=clock)


async def tokens(gw: Running, key: str) -> tuple[str, dict[str, Any]]:
    client = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client)
    status, answer = await exchange(gw, client, code, verifier)
    assert status == 200, answer
    return client, answer


async def call(gw: Running, access: str, prefix: str = "/mcp/tools", **kw: Any) -> Any:
    headers = {**ACCEPT, "Authorization": f"Bearer {access}", **kw.pop("headers", {})}
    return await gw.proxy.post(prefix, json=INIT, headers=headers, **kw)


async def test_wrong_pkce_verifier_is_refused(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    code, _ = await code_for(gw, key, client)
    other, _ = pkce()
    status, answer = await exchange(gw, client, code, other)
    assert status == 400 and answer["error"] == "invalid_grant" and "PKCE" in answer["error_description"]
    status, answer = await exchange(gw, client, code, "")
    assert status == 400 and answer["error"] == "invalid_grant"


async def test_plain_pkce_and_missing_pkce_go_back_as_errors(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client = "conf"
    v, _ = pkce()
    for params in ({"code_challenge_method": "plain"}, {"code_challenge_method": ""}):
        back = await consent(authorize_url(gw, client, v, **params), key)
        assert back.location.startswith(CALLBACK) and back.params["error"] == "invalid_request"
        assert back.params["state"] == "st-1" and back.params["iss"] == gw.config.oauth.public_url


async def test_redirect_uri_mismatch_is_refused_without_redirecting(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    _, challenge = pkce()
    for evil in ("https://evil.example/cb", CALLBACK + "/x", CALLBACK + "?x=1", CALLBACK.upper()):
        back = await consent(authorize_url(gw, client, challenge, redirect_uri=evil), key)
        assert back.location.startswith("status:400:") and "redirect URI" in back.location
    # and at the token endpoint
    code, verifier = await code_for(gw, key, client)
    status, answer = await exchange(gw, client, code, verifier, redirect_uri="http://127.0.0.1:1/other")
    assert status == 400 and answer["error"] == "invalid_grant"


async def test_loopback_redirect_may_name_any_port_nothing_else(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw, redirect_uris=["http://127.0.0.1/cb", "http://localhost:7777/cb"]))["client_id"]
    _, challenge = pkce()
    back = await consent(authorize_url(gw, client, challenge, redirect_uri="http://127.0.0.1:5555/cb"), key)
    assert back.location.startswith("http://127.0.0.1:5555/cb?code="), back.location
    for evil in ("http://127.0.0.1:5555/cb2", "http://localhost:5555/cb", "http://127.0.0.2:5555/cb",
                 "http://127.0.0.1:5555/cb?x=1", "https://127.0.0.1:5555/cb", "http://127.0.0.1:99999/cb"):  # fmt: skip
        back = await consent(authorize_url(gw, client, challenge, redirect_uri=evil), key)
        assert back.location.startswith("status:400:"), evil


async def test_dynamic_registration_refuses_bad_redirect_uris(gw: Running) -> None:
    for uris in (
        ["http://evil.example/cb"],
        ["https://x.example/cb#frag"],
        [],
        "https://x/cb",
        ["javascript:alert(1)"],
    ):
        r = await gw.proxy.post("/oauth/register", json={"redirect_uris": uris})
        assert r.status == 400 and (await r.json())["error"] == "invalid_redirect_uri"


async def test_wrong_resource_is_refused(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    _, challenge = pkce()
    issuer = gw.config.oauth.public_url
    for resource in ("https://evil.example/mcp/tools", f"{issuer}/mcp", f"{issuer}/mcp/toolsx", f"{issuer}/"):
        back = await consent(authorize_url(gw, "conf", challenge, resource=resource), key)
        assert back.params.get("error") == "invalid_target", (resource, back.location)
    code, verifier = await code_for(gw, key, client)
    status, answer = await exchange(gw, client, code, verifier, resource=f"{issuer}/mcp/other")
    assert status == 400 and answer["error"] == "invalid_target"


async def test_token_is_refused_at_another_upstream_and_never_reaches_one(gw: Running, upstream: McpUpstream) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    _, answer = await tokens(gw, key)
    access = answer["access_token"]
    r = await call(gw, access)
    assert r.status == 200
    r = await call(gw, access, "/mcp/other")
    body = await r.json()
    assert r.status == 401 and body["error"]["code"] == "invalid_key" and "another resource" in body["error"]["message"]
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    seen = [v for rq in upstream.rec.requests for k, v in rq.headers if k.lower() == "authorization"]
    assert seen and all(v == f"Bearer {MCP_TOKEN}" for v in seen)
    assert not any(access in str(rq.headers) + rq.query for rq in upstream.rec.requests)


async def test_token_only_in_the_bearer_header(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    _, answer = await tokens(gw, key)
    access = answer["access_token"]
    for headers, params in (
        ({}, {"X-Plex-Token": access}),
        ({"x-api-key": access}, {}),
        ({"Authorization": f"ApiKey {access}"}, {}),
    ):
        r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**ACCEPT, **headers}, params=params)
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_key", headers
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers=ACCEPT, params={"access_token": access})
    assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"


async def test_replayed_code_is_refused_and_revokes_its_grant(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client)
    status, answer = await exchange(gw, client, code, verifier)
    assert status == 200
    status, again = await exchange(gw, client, code, verifier)
    assert status == 400 and again["error"] == "invalid_grant" and "already used" in again["error_description"]
    r = await call(gw, answer["access_token"])
    assert r.status == 401 and (await r.json())["error"]["code"] == "revoked_key"


async def test_reused_refresh_token_revokes_the_grant(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client, first = await tokens(gw, key)
    form = {"grant_type": "refresh_token", "client_id": client}
    r = await gw.proxy.post("/oauth/token", data={**form, "refresh_token": first["refresh_token"]})
    second = await r.json()
    assert r.status == 200 and second["refresh_token"] != first["refresh_token"]
    r = await gw.proxy.post("/oauth/token", data={**form, "refresh_token": first["refresh_token"]})
    assert r.status == 400 and (await r.json())["error"] == "invalid_grant"
    r = await call(gw, second["access_token"])
    assert r.status == 401 and (await r.json())["error"]["code"] == "revoked_key"
    r = await gw.proxy.post("/oauth/token", data={**form, "refresh_token": second["refresh_token"]})
    assert r.status == 400 and (await r.json())["error"] == "invalid_grant"


async def test_another_client_cannot_burn_a_code_or_refresh_token(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    thief = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client)
    status, answer = await exchange(gw, thief, code, verifier)
    assert status == 400 and answer["error"] == "invalid_grant"
    status, answer = await exchange(gw, client, code, verifier)
    assert status == 200
    form = {"grant_type": "refresh_token", "refresh_token": answer["refresh_token"]}
    r = await gw.proxy.post("/oauth/token", data={**form, "client_id": thief})
    assert r.status == 400
    r = await gw.proxy.post("/oauth/token", data={**form, "client_id": client})
    assert r.status == 200


async def test_expired_access_token_is_refused(gw: Running, clock: Clock) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    _, answer = await tokens(gw, key)
    assert answer["expires_in"] == 600
    clock.now += 601
    r = await call(gw, answer["access_token"])
    assert r.status == 401 and (await r.json())["error"]["code"] == "expired_key"
    assert 'resource_metadata="' in r.headers["WWW-Authenticate"]


async def test_revoking_the_parent_key_ends_its_grants(gw: Running) -> None:
    parent, key = await gw.create_key(permissions=PERMS)
    client, answer = await tokens(gw, key)
    assert (await call(gw, answer["access_token"])).status == 200
    await gw.sc.manager().revoke(parent.id, "test")
    await gw.sc.verifier.refresh()
    r = await call(gw, answer["access_token"])
    assert r.status == 401 and (await r.json())["error"]["code"] == "revoked_key"
    form = {"grant_type": "refresh_token", "client_id": client, "refresh_token": answer["refresh_token"]}
    r = await gw.proxy.post("/oauth/token", data=form)
    assert r.status == 400 and (await r.json())["error"] == "invalid_grant"


async def test_consent_never_grants_more_than_the_key(gw: Running) -> None:
    _, key = await gw.create_key(permissions={"upstreams": ["other"]})
    client = (await register(gw))["client_id"]
    _, challenge = pkce()
    back = await consent(authorize_url(gw, client, challenge), key)
    assert back.location.startswith("status:400:") and "may not use" in back.location
    _, key = await gw.create_key(permissions=PERMS)
    pages: list[str] = []
    for tools in ("delete_everything", "*", "search,fetch*"):
        back = await consent(authorize_url(gw, client, challenge), key, tools=tools, pages=pages)
        assert back.location.startswith("status:400:") and "choose among the listed" in back.location, tools
    # the tools step lists the upstream's tools that this key may use, and no other
    assert 'value="search"' in pages[0] and 'value="fetch"' in pages[0] and "delete_everything" not in pages[0]
    back = await consent(authorize_url(gw, client, challenge), "pmcp_" + "0" * 68)
    assert back.location.startswith("status:400:") and "API key" in back.location


async def test_consent_form_needs_its_csrf_cookie(gw: Running) -> None:
    import re

    import aiohttp

    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    _, challenge = pkce()
    async with aiohttp.ClientSession() as http:  # default jar: keeps no cookie for 127.0.0.1
        async with http.get(authorize_url(gw, client, challenge)) as page:
            html = await page.text()
            assert page.headers["X-Frame-Options"] == "DENY"
        hidden = dict(re.findall(r'name=(request_id|csrf) value="([^"]+)"', html))
        form = {**hidden, "api_key": key, "lifetime": "3600", "decision": "allow"}
        async with http.post(f"{gw.config.oauth.public_url}/oauth/authorize", data=form, allow_redirects=False) as r:
            assert r.status == 403 and "CSRF" in await r.text()


async def test_confidential_client_must_authenticate(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    reg = await register(gw, token_endpoint_auth_method="client_secret_basic")
    client, secret = reg["client_id"], reg["client_secret"]
    code, verifier = await code_for(gw, key, client)
    status, answer = await exchange(gw, client, code, verifier, client_secret="dcs_wrong")
    assert status == 401 and answer["error"] == "invalid_client"
    code, verifier = await code_for(gw, key, client)
    status, answer = await exchange(gw, client, code, verifier, client_secret=secret)
    assert status == 200 and answer["token_type"] == "Bearer"


async def test_secrets_stay_out_of_the_store_and_the_log(gw: Running, tmp_path: Path) -> None:
    import sqlite3

    _, key = await gw.create_key(permissions=PERMS)
    _, answer = await tokens(gw, key)
    await call(gw, answer["access_token"])
    dump = "\n".join(sqlite3.connect(tmp_path / "sidecar.db").iterdump())
    log = (tmp_path / "access.log").read_text() if (tmp_path / "access.log").exists() else ""
    for secret in (answer["access_token"], answer["refresh_token"], key):
        assert secret not in dump and secret not in log


async def test_unauthenticated_writes_are_bounded_per_address(gw: Running) -> None:
    client = (await register(gw))["client_id"]
    _, challenge = pkce()
    url = authorize_url(gw, client, challenge).split("/oauth/authorize", 1)[1]
    statuses = [(await gw.proxy.get("/oauth/authorize" + url)).status for _ in range(31)]
    assert statuses[:29] == [200] * 29 and statuses[-1] == 429
    statuses = [(await gw.proxy.post("/oauth/register", json={"redirect_uris": [CALLBACK]})).status for _ in range(31)]
    assert statuses[:29] == [201] * 29 and statuses[-1] == 429


async def test_tools_are_typed_when_the_upstream_cannot_list_them(gw: Running, upstream: McpUpstream) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    await upstream.stop()
    _, challenge = pkce()
    pages: list[str] = []
    back = await consent(authorize_url(gw, client, challenge), key, tools="search,delete_everything", pages=pages)
    assert "name=tools" in pages[0]
    assert back.location.startswith("status:400:") and "not among" in back.location
    back = await consent(authorize_url(gw, client, challenge), key, tools="search")
    assert "code" in back.params, back.location


async def test_repeated_parameters_are_refused_and_burn_nothing(gw: Running) -> None:
    """RFC 6749 §3.1: a parameter given twice is refused. At /authorize nothing is redirected (a
    second redirect_uri must not be the one followed); at /token the code is not spent by the
    refused request and still works once after it."""
    from yarl import URL

    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    _, challenge = pkce()
    base = URL(authorize_url(gw, client, challenge))
    for name, second in (("redirect_uri", "https://evil.example/cb"), ("code_challenge", "x" * 43),
                         ("resource", "https://evil.example/mcp"), ("state", "")):  # fmt: skip
        raw = f"{base.path_qs}&{name}={second}"
        r = await gw.proxy.get(raw, allow_redirects=False)
        assert r.status == 400 and "Location" not in r.headers, (name, r.status)
        assert f"{name} given twice" in await r.text()
    code, verifier = await code_for(gw, key, client)
    form = [("grant_type", "authorization_code"), ("code", code), ("code_verifier", verifier),
            ("code_verifier", "y" * 43), ("redirect_uri", CALLBACK), ("client_id", client)]  # fmt: skip
    r = await gw.proxy.post("/oauth/token", data=form)
    answer = await r.json()
    assert r.status == 400 and answer["error"] == "invalid_request" and "given twice" in answer["error_description"]
    status, answer = await exchange(gw, client, code, verifier)
    assert status == 200 and answer["access_token"]


async def test_the_grants_cap_holds_however_the_codes_are_collected(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], clock: Clock
) -> None:
    """Each grant has its own rate budget, so ``max_grants_per_key`` bounds how far one key's holder
    can multiply it. An attacker approves many requests first (no grant exists yet, so each approval
    passes the cap), then exchanges every code, some at once: only the cap's worth become grants;
    the rest are ``invalid_grant`` and leave no key behind."""
    cfg = oauth_config(upstream, tmp_path, free_port(), max_grants_per_key=2)
    gw = await start_sidecar(aiohttp_client, cfg, tmp_path, started, clock=clock)
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    codes = [await code_for(gw, key, client) for _ in range(6)]
    answers = [await exchange(gw, client, *codes[0])]
    answers += await asyncio.gather(*(exchange(gw, client, code, verifier) for code, verifier in codes[1:]))
    granted = [a for status, a in answers if status == 200]
    refused = [a for status, a in answers if status != 200]
    assert len(granted) == 2, answers
    assert len(refused) == 4 and all(a["error"] == "invalid_grant" for a in refused), refused
    assert all("number of OAuth grants" in a["error_description"] for a in refused), refused
    children = [r for r in await gw.sc.store.list_keys() if r.parent_id is not None]
    assert len(children) == 2, children
    # Revoking one frees a place: the next approval and exchange succeed.
    await gw.sc.manager().revoke(children[0].id, "test")
    await gw.sc.verifier.refresh()
    status, answer = await exchange(gw, client, *(await code_for(gw, key, client)))
    assert status == 200, answer
