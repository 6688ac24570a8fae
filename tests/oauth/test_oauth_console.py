"""The console's OAuth pages over plain HTTP, as an attacker would poke them: approving a pending
request from the console (who may grant from which key, single use, deny, CSRF), revoking a
grant, and the clients page. The browser flow is tests/console/test_console_oauth.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_TOKEN, Running
from mcp_server import McpUpstream
from oauth_support import CALLBACK, authorize_url, code_for, exchange, free_port, oauth_config, pkce, register
from oauth_support import start_sidecar as start_oauth_sidecar

from sidecar.app import Sidecar

CSRF = re.compile(r'<input type="hidden" name="csrf" value="([^"]*)">')
CONSOLE_URL = "https://admin.example.test:9443"


@pytest.fixture
async def gw(aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path) -> AsyncIterator[Running]:
    started: list[Sidecar] = []
    cfg = oauth_config(upstream, tmp_path, free_port(), console_url=CONSOLE_URL)
    gw = await start_oauth_sidecar(aiohttp_client, cfg, tmp_path, started)
    yield gw
    for sc in started:
        await sc.close()


async def _sign_in(gw: Running, token: str = ADMIN_TOKEN) -> None:
    r = await gw.admin.post("/signin", data={"token": token, "next": "/"}, allow_redirects=False)
    assert r.status == 303, await r.text()


async def _request_id(gw: Running, client_id: str) -> str:
    """Start an authorization at the proxy; the request id the consent page's console link carries."""
    _, challenge = pkce()
    r = await gw.proxy.get(authorize_url(gw, client_id, challenge).split(gw.config.oauth.public_url or "", 1)[1])
    html = await r.text()
    m = re.search(r'id=console href="' + re.escape(CONSOLE_URL) + r'/oauth/consent/([^"]+)"', html)
    assert r.status == 200 and m, html
    return m.group(1)


async def _page(gw: Running, request_id: str) -> tuple[int, str, str]:
    r = await gw.admin.get(f"/oauth/consent/{request_id}?b=1", allow_redirects=False)
    html = await r.text()
    m = CSRF.search(html)
    return r.status, html, m.group(1) if m else ""


async def test_a_delegated_admin_key_grants_only_from_keys_within_its_reach(gw: Running) -> None:
    narrow, _ = await gw.create_key(name="narrow", owner="alice", permissions={
        "upstreams": ["tools"], "tools": {"tools": ["search"]}})  # fmt: skip
    wide, _ = await gw.create_key(name="wide", owner="alice", permissions={"upstreams": ["tools"]})
    _, boss_key = await gw.create_key(name="boss", owner="alice", permissions={
        "admin": True, "upstreams": ["tools"], "tools": {"tools": ["search"]}})  # fmt: skip
    client_id = (await register(gw))["client_id"]
    rid = await _request_id(gw, client_id)
    await _sign_in(gw, boss_key)
    status, html, csrf = await _page(gw, rid)
    assert status == 200 and f'value="{narrow.id}"' in html and f'value="{wide.id}"' not in html
    assert f"form-action 'self' {CALLBACK.rsplit('/', 1)[0]}" in (await gw.admin.get(
        f"/oauth/consent/{rid}?b=1")).headers["Content-Security-Policy"]  # fmt: skip
    # The wide key (beyond the delegate's reach) is refused, and nothing is spent.
    form = {"csrf": csrf, "decision": "allow", "key": wide.id, "tool": "search", "lifetime": "3600"}
    r = await gw.admin.post(f"/oauth/consent/{rid}", data=form, allow_redirects=False)
    assert r.status == 400 and "choose one of the listed keys" in await r.text()
    r = await gw.admin.post(f"/oauth/consent/{rid}", data={**form, "key": narrow.id, "tool": "fetch"},
                            allow_redirects=False)  # fmt: skip
    assert r.status == 400 and "is not among this API key" in await r.text()
    r = await gw.admin.post(f"/oauth/consent/{rid}", data={**form, "key": narrow.id}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith(CALLBACK + "?code=")
    # Single use: the same request cannot be answered twice.
    r = await gw.admin.post(f"/oauth/consent/{rid}", data={**form, "key": narrow.id}, allow_redirects=False)
    assert r.status == 410
    assert (await gw.admin.get("/oauth/clients")).status == 403  # clients: full admins only


async def test_deny_unknown_request_and_csrf(gw: Running) -> None:
    client_id = (await register(gw))["client_id"]
    rid = await _request_id(gw, client_id)
    r = await gw.admin.get(f"/oauth/consent/{rid}", allow_redirects=False)
    assert r.status == 200 and 'http-equiv="refresh"' in await r.text()  # no cookie yet: reload same-site once
    r = await gw.admin.get(f"/oauth/consent/{rid}?b=1", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/signin?next=")  # not signed in
    await _sign_in(gw)
    assert (await _page(gw, "nope"))[0] == 410
    status, _, csrf = await _page(gw, rid)
    assert status == 200
    r = await gw.admin.post(f"/oauth/consent/{rid}", data={"decision": "deny", "csrf": "x"}, allow_redirects=False)
    assert r.status == 403
    r = await gw.admin.post(f"/oauth/consent/{rid}", data={"decision": "deny", "csrf": csrf}, allow_redirects=False)
    assert r.status == 303 and "error=access_denied" in r.headers["Location"] and "state=st-1" in r.headers["Location"]
    audit = await gw.sc.store.audit_log(None, 20)
    assert any(e.action == "oauth_denied" and e.actor == "console" for e in audit)


async def test_revoke_a_grant_from_the_console(gw: Running) -> None:
    parent, key = await gw.create_key(name="p", permissions={"upstreams": ["tools"]})
    other, _ = await gw.create_key(name="o", permissions={"upstreams": ["tools"]})
    client_id = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client_id, tools="search")
    status, body = await exchange(gw, client_id, code, verifier)
    assert status == 200
    grant = next(r for r in gw.sc.verifier.table.values() if r.parent_id == parent.id)
    assert grant.grant["redirect_uri"] == CALLBACK
    await _sign_in(gw)
    html = await (await gw.admin.get(f"/keys/{parent.id}")).text()
    assert "OAuth grants" in html and f'data-grant="{grant.id}"' in html and body["access_token"] not in html
    csrf = CSRF.search(html)
    assert csrf
    url = f"/keys/{parent.id}/grants/{grant.id}/revoke"
    assert (await gw.admin.post(url, data={"csrf": "forged"}, allow_redirects=False)).status == 403
    wrong = f"/keys/{other.id}/grants/{grant.id}/revoke"  # a grant is revoked under its own parent only
    assert (await gw.admin.post(wrong, data={"csrf": csrf.group(1)}, allow_redirects=False)).status == 404
    assert gw.sc.verifier.state(gw.sc.verifier.table[grant.id], gw.sc.clock()) == "active"
    r = await gw.admin.post(url, data={"csrf": csrf.group(1)}, allow_redirects=False)
    assert r.status == 303
    assert gw.sc.verifier.state(gw.sc.verifier.table[grant.id], gw.sc.clock()) == "revoked"
    keys = await (await gw.admin.get("/?kind=grant")).text()
    assert f'data-key="{grant.id}"' in keys and f'data-key="{parent.id}"' not in keys and "OAuth: Raw client" in keys


def test_the_oauth_screenshots_are_committed() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "console"
    for name in ("consent", "grants"):
        hint = "run tests/console/test_console_oauth.py with SIDECAR_SCREENSHOTS=1"
        assert (docs / f"{name}.png").is_file(), f"docs/console/{name}.png: {hint}"
