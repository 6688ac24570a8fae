"""An attacker's review of the authorization server: checks made at one step of
authorize → consent → code → token → refresh → use and trusted at a later one, and the
classic OAuth attacks. Each test asserts what the client sees and what was (not) written."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import Running
from mcp_server import McpUpstream
from mcp_support import answer_messages
from oauth_support import CALLBACK, authorize_url, code_for, consent, exchange, free_port, oauth_config, pkce, register
from oauth_support import start_sidecar as start
from pg_support import pg_dsn, pg_server
from test_oauth_refusals import ACCEPT, PERMS, Clock, call, tokens

from sidecar.app import Sidecar
from sidecar.oauth.fetch import public_address

__all__ = ["pg_dsn", "pg_server"]  # the fixtures, re-exported for pytest


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def gw(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], clock: Clock
) -> Running:
    cfg = oauth_config(upstream, tmp_path, free_port(), access_token_ttl="10m")
    return await start(aiohttp_client, cfg, tmp_path, started, clock=clock)


async def children(gw: Running) -> list[Any]:
    return [r for r in await gw.sc.store.list_keys() if r.parent_id is not None]


async def listed_tools(gw: Running, access: str) -> set[str] | int:
    """initialize, then tools/list with the token: the names listed, or the refusal's status."""
    r = await call(gw, access)
    if r.status != 200:
        return r.status
    headers = {**ACCEPT, "Authorization": f"Bearer {access}", "Mcp-Session-Id": r.headers["Mcp-Session-Id"]}
    await r.read()
    r = await gw.proxy.post("/mcp/tools", json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                            headers=headers)  # fmt: skip
    assert r.status == 202, await r.text()
    r = await gw.proxy.post("/mcp/tools", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=headers)
    text = await r.text()
    data = answer_messages(text)[0]
    return {t["name"] for t in data["result"]["tools"]}


async def refresh(gw: Running, client: str, token: str, **extra: str) -> tuple[int, dict[str, Any]]:
    r = await gw.proxy.post("/oauth/token", data={"grant_type": "refresh_token", "client_id": client,
                                                  "refresh_token": token, **extra})  # fmt: skip
    return r.status, dict(await r.json())


async def narrow(gw: Running, key_id: str, permissions: dict[str, Any]) -> None:
    await gw.sc.manager().patch(key_id, {"permissions": permissions}, "test")
    await gw.sc.verifier.refresh()


@pytest.mark.parametrize("chosen", ["", "fetch"])
async def test_a_grant_shrinks_with_its_parent_at_use_and_refresh(gw: Running, chosen: str) -> None:
    """The parent loses ``fetch`` after the grant was made (every tool, or ``fetch`` alone): the
    grant's tokens must not list or call it any more; the parent then loses the upstream: its
    grant's token is refused (403) and cannot be refreshed."""
    parent, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client, tools=chosen)
    status, first = await exchange(gw, client, code, verifier)
    assert status == 200, first
    assert await listed_tools(gw, first["access_token"]) == ({"search", "fetch"} if not chosen else {"fetch"})
    await narrow(gw, parent.id, {"upstreams": ["*"], "tools": {"tools": ["search"], "other": ["search"]}})
    assert await listed_tools(gw, first["access_token"]) == ({"search"} if not chosen else set())
    status, second = await refresh(gw, client, first["refresh_token"])
    assert status == 200 and await listed_tools(gw, second["access_token"]) == ({"search"} if not chosen else set())
    await narrow(gw, parent.id, {"upstreams": ["other"]})
    r = await call(gw, second["access_token"])
    assert r.status == 403 and (await r.json())["error"]["code"] == "insufficient_permissions"
    status, answer = await refresh(gw, client, second["refresh_token"])
    assert status == 400 and answer["error"] == "invalid_grant", answer


async def test_a_grant_edited_wider_stays_within_its_parent(gw: Running) -> None:
    """An admin (or a delegated admin key whose reach is wider than the approving key's) edits the
    grant itself: the client still gets no more than the key that approved it."""
    _, key = await gw.create_key(permissions=PERMS)
    _, first = await tokens(gw, key)
    (grant,) = await children(gw)
    await narrow(gw, grant.id, {"upstreams": ["*"]})
    assert await listed_tools(gw, first["access_token"]) == {"search", "fetch"}  # not delete_everything


async def test_a_code_replayed_while_its_first_exchange_runs_still_revokes_the_grant(gw: Running) -> None:
    """Two exchanges of one code at once. One of the two stole it, so the replay must revoke the
    grant even when it is seen before the first exchange has written the grant (argon2 runs
    first): no token that works comes out of it, whichever finishes first."""
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client)
    answers = await asyncio.gather(*(exchange(gw, client, code, verifier) for _ in range(2)))
    won = [a for s, a in answers if s == 200]
    lost = [a for s, a in answers if s != 200]
    assert len(won) <= 1 and lost, answers
    assert all(a["error"] == "invalid_grant" and "already used" in a["error_description"] for a in lost), answers
    for a in won:
        r = await call(gw, a["access_token"])
        assert r.status == 401 and (await r.json())["error"]["code"] == "revoked_key"
        status, answer = await refresh(gw, client, a["refresh_token"])
        assert status == 400 and answer["error"] == "invalid_grant"
    assert [c.state(gw.sc.clock()) for c in await children(gw)] == ["revoked"]


async def test_a_refresh_refused_for_its_resource_does_not_burn_the_token(gw: Running) -> None:
    """A refresh naming another resource is refused (invalid_target) before the token is spent: the
    client's next, correct refresh works instead of looking like reuse and revoking the grant."""
    _, key = await gw.create_key(permissions=PERMS)
    client, first = await tokens(gw, key)
    issuer = gw.config.oauth.public_url
    status, answer = await refresh(gw, client, first["refresh_token"], resource=f"{issuer}/mcp/other")
    assert status == 400 and answer["error"] == "invalid_target", answer
    status, answer = await refresh(gw, client, first["refresh_token"], resource=f"{issuer}/mcp/tools")
    assert status == 200, answer
    assert (await call(gw, answer["access_token"])).status == 200


@pytest.mark.parametrize(
    "uri",
    [
        "https://claude.ai@evil.example/cb",  # the consent page would show "claude.ai@evil.example"
        "https://user:pw@evil.example/cb",
        "https://evil.example\\@claude.ai/cb",  # browsers: host evil.example; urlsplit: claude.ai
        "http://claude.ai@127.0.0.1/cb",
    ],
)
async def test_registration_refuses_redirect_uris_with_userinfo(gw: Running, uri: str) -> None:
    r = await gw.proxy.post("/oauth/register", json={"redirect_uris": [uri]})
    assert r.status == 400 and (await r.json())["error"] == "invalid_redirect_uri"
    assert await gw.sc.store.oauth_clients() == []


def test_the_ssrf_guard_judges_ipv4_embedded_in_ipv6() -> None:
    """NAT64 (64:ff9b::/96, 64:ff9b:1::/48), 6to4 (2002::/16) and IPv4-compatible (::/96) addresses
    reach the IPv4 address they carry; site-local fec0::/10 is a private range."""
    for ip in ("64:ff9b::a00:1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1", "2002:a00:1::1",
               "2002:7f00:1::", "::7f00:1", "::a00:1", "fec0::1", "::ffff:0:a00:1"):  # fmt: skip
        assert not public_address(ip), ip
    for ip in ("64:ff9b::5db8:d822", "2002:5db8:d822::1", "2606:4700::1111"):  # 93.184.216.34 embedded; plain
        assert public_address(ip), ip


@pytest.mark.parametrize("lifetime", ["nan", "-1", "0", "abc", "", "-inf"])
async def test_consent_refuses_tampered_lifetimes(gw: Running, lifetime: str) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    _, challenge = pkce()
    back = await consent(authorize_url(gw, client, challenge), key, lifetime=lifetime)
    assert back.location.startswith("status:400:") and "choose a lifetime" in back.location, back.location


async def test_a_huge_lifetime_is_capped_and_admin_rights_are_never_granted(gw: Running) -> None:
    _, key = await gw.create_key(permissions={**PERMS, "admin": "full"})
    client = (await register(gw))["client_id"]
    verifier, challenge = pkce()
    back = await consent(authorize_url(gw, client, challenge), key, lifetime="1e999")
    status, answer = await exchange(gw, client, back.params["code"], verifier)
    (child,) = await children(gw)
    assert status == 200 and child.expires_at <= gw.sc.clock() + gw.config.oauth.max_grant_lifetime
    assert not child.permissions.admin and not child.permissions.full_admin
    r = await gw.admin.get("/admin/keys", headers={"Authorization": f"Bearer {answer['access_token']}"})
    assert r.status == 401


@pytest.mark.parametrize("change", ["revoke", "narrow", "other_upstream"])
async def test_a_code_is_judged_against_its_parent_at_exchange(gw: Running, change: str) -> None:
    """Approved, then the parent is revoked or narrowed before the code is exchanged: no grant."""
    parent, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client, tools="fetch")
    if change == "revoke":
        await gw.sc.manager().revoke(parent.id, "test")
        await gw.sc.verifier.refresh()
    else:
        await narrow(gw, parent.id, {"upstreams": ["other"]} if change == "other_upstream" else
                     {"upstreams": ["*"], "tools": {"tools": ["search"]}})  # fmt: skip
    status, answer = await exchange(gw, client, code, verifier)
    assert status == 400 and answer["error"] == "invalid_grant", answer
    assert await children(gw) == []


async def test_codes_and_refresh_tokens_are_no_bearer_tokens(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client, answer = await tokens(gw, key)
    code, _ = await code_for(gw, key, client)
    access = answer["access_token"]
    for value in (code, answer["refresh_token"], access[:-1] + ("1" if access.endswith("0") else "0")):  # bad CRC
        r = await call(gw, value)
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_key", value[:12]
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


async def test_a_revoked_grant_cannot_be_refreshed_or_used(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client, answer = await tokens(gw, key)
    (grant,) = await children(gw)
    thief = (await register(gw))["client_id"]  # RFC 7009: another client's revocation does nothing
    r = await gw.proxy.post("/oauth/revoke", data={"client_id": thief, "token": answer["refresh_token"]})
    assert r.status == 200 and (await call(gw, answer["access_token"])).status == 200
    r = await gw.admin.delete(f"/admin/oauth/grants/{grant.id}", headers=gw.admin_headers())
    assert r.status == 200
    status, body = await refresh(gw, client, answer["refresh_token"])
    assert status == 400 and body["error"] == "invalid_grant"
    r = await call(gw, answer["access_token"])
    assert r.status == 401 and (await r.json())["error"]["code"] == "revoked_key"


async def test_redirect_uri_is_required_and_exact_at_the_token_endpoint(gw: Running) -> None:
    """The code went to a loopback redirect with a port: the token request must name that very URI."""
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw, redirect_uris=["http://127.0.0.1/cb"]))["client_id"]
    for uri in ("", "http://127.0.0.1/cb", "http://127.0.0.1:5556/cb"):  # left out, registered form, other port
        verifier, challenge = pkce()
        back = await consent(authorize_url(gw, client, challenge, redirect_uri="http://127.0.0.1:5555/cb"), key)
        status, answer = await exchange(gw, client, back.params["code"], verifier, redirect_uri=uri)
        assert status == 400 and answer["error"] == "invalid_grant" and "redirect_uri" in answer["error_description"]
    assert await children(gw) == []


async def test_consent_csrf_is_bound_to_its_browser_and_never_a_500(gw: Running) -> None:
    """Another browser (its own cookie and token) posting the victim's request id, or a token that is
    not ASCII (``hmac.compare_digest`` raises on those): the CSRF page (403), and the request lives on."""
    import re

    import aiohttp

    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    _, challenge = pkce()
    url, post = authorize_url(gw, client, challenge), f"{gw.config.oauth.public_url}/oauth/authorize"
    pages = []
    for _ in range(2):  # the victim's browser, then the attacker's
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        async with http.get(url) as page:
            pages.append((http, dict(re.findall(r'name=(request_id|csrf) value="([^"]+)"', await page.text()))))
    (victim, mine), (attacker, theirs) = pages
    try:
        step1 = {"api_key": key, "lifetime": "3600", "decision": "continue"}
        for csrf in (theirs["csrf"], "é", "\u00e9" * 43):
            async with attacker.post(post, data={**step1, "request_id": mine["request_id"], "csrf": csrf}) as r:
                assert r.status == 403 and "CSRF" in await r.text(), csrf
        async with victim.post(post, data={**step1, **mine}, allow_redirects=False) as r:
            assert r.status == 200 and "Tools to allow" in await r.text()
    finally:
        await victim.close()
        await attacker.close()


async def test_a_client_id_the_store_cannot_hold_is_an_unknown_client(gw: Running) -> None:
    await _unholdable_client_ids(gw)


async def test_a_client_id_postgres_cannot_hold_is_an_unknown_client(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], pg_dsn: str
) -> None:
    cfg = {**oauth_config(upstream, tmp_path, free_port()), "store": {"kind": "postgres"}}
    await _unholdable_client_ids(await start(aiohttp_client, cfg, tmp_path, started,
                                             extra_env={"SIDECAR_DATABASE_URL": pg_dsn}))  # fmt: skip


async def _unholdable_client_ids(gw: Running) -> None:
    """A NUL or another control character in ``client_id``: Postgres cannot even compare such a text,
    which must not turn into ``503 temporarily_unavailable`` (nor count as a store failure)."""
    _, challenge = pkce()
    for bad in ("dcr_\x00x", "https://x.example/\x00", "a\nb", "\x7f"):
        r = await gw.proxy.post("/oauth/token", data={"grant_type": "refresh_token", "client_id": bad,
                                                      "refresh_token": "x"})  # fmt: skip
        assert r.status == 401 and (await r.json())["error"] == "invalid_client", (bad, await r.text())
        r = await gw.proxy.post("/oauth/revoke", data={"client_id": bad, "token": "x"})
        assert r.status == 401 and (await r.json())["error"] == "invalid_client", bad
        r = await gw.proxy.get(authorize_url(gw, bad, challenge).split(gw.config.oauth.public_url, 1)[1])
        assert r.status == 400 and "unknown" in await r.text(), bad
    for uri in ("https://x.example/cb\x00", "https://x.example/c\nb", "http://127.0.0.1/\x7f"):
        r = await gw.proxy.post("/oauth/register", json={"redirect_uris": [uri], "client_name": "a\x00b"})
        assert r.status == 400 and (await r.json())["error"] == "invalid_redirect_uri", uri
    client = (await register(gw, client_name="a\x00b"))["client_id"]
    r = await gw.proxy.get(authorize_url(gw, client, challenge, state="a\x00b").split(gw.config.oauth.public_url, 1)[1])
    assert r.status == 400 and "state" in await r.text()
    assert [c["client_name"] for c in await gw.sc.store.oauth_clients()] == ["ab"]


@pytest.mark.parametrize("typed", ["sea\x00rch", "*", "sea*", "search," + "x" * 201, ",".join(["search"] * 501)])
async def test_typed_tools_are_names_within_the_key(gw: Running, upstream: McpUpstream, typed: str) -> None:
    """When the upstream cannot list its tools the person types names: a glob wider than the key's
    own, a control character (Postgres cannot store NUL), a huge name or list is refused on the page."""
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    await upstream.stop()
    _, challenge = pkce()
    back = await consent(authorize_url(gw, client, challenge), key, tools=typed)
    assert back.location.startswith("status:400:") and ("not among" in back.location or "printable" in back.location)
    assert await gw.sc.store.list_keys() and await children(gw) == []


async def test_client_metadata_fetches_are_bounded_per_address(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar]
) -> None:
    """Every new https client id is an outbound fetch an anonymous caller chooses (and whose outcome
    the error tells, a port probe of public hosts). The token and revocation endpoints, like the
    authorization endpoint, must not fetch more than the per-address budget a minute."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from test_oauth_cimd import gateway
    from tlscerts import make_tls

    tls = make_tls(tmp_path)
    fetched: list[str] = []

    async def doc(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{name}", doc)
    docs = TestServer(app, host="127.0.0.1")
    await docs.start_server(ssl=tls.server_context())
    try:
        gw = await gateway(aiohttp_client, upstream, tmp_path, started, tls, ["127.0.0.1"])
        _, challenge = pkce()
        answers = []
        for i in range(20):
            url = f"https://127.0.0.1:{docs.port}/c{i}.json"
            r = await gw.proxy.post("/oauth/token", data={"grant_type": "refresh_token", "client_id": url,
                                                          "refresh_token": "x"})  # fmt: skip
            answers.append((r.status, (await r.json())["error"]))
            r = await gw.proxy.post("/oauth/revoke", data={"client_id": url + "?r", "token": "x"})
            answers.append((r.status, (await r.json())["error"]))
            r = await gw.proxy.get(authorize_url(gw, url + "?a", challenge).split(gw.config.oauth.public_url, 1)[1])
            answers.append((r.status, "page"))
        assert len(fetched) <= 30, len(fetched)
        assert answers[:3] == [(401, "invalid_client"), (401, "invalid_client"), (400, "page")]
        assert set(answers[-3:]) <= {(429, "slow_down"), (429, "page")}, answers[-3:]
    finally:
        await docs.close()


async def test_errors_go_back_to_an_unvouched_client_only_by_a_link(gw: Running) -> None:
    """RFC 9700 §4.11.2: anyone may register a redirect URI, so a deliberately bad authorization
    request must not make the sidecar's own URL an automatic redirect to it (a phishing link that
    starts at the trusted host). The error goes back by a link the person chooses to follow."""
    import html
    import re

    client = (await register(gw, redirect_uris=["https://evil.example/cb"]))["client_id"]
    _, challenge = pkce()
    for params in ({"response_type": "token"}, {"code_challenge_method": "plain"}, {"resource": "https://x/"}):
        url = authorize_url(gw, client, challenge, redirect_uri="https://evil.example/cb", **params)
        r = await gw.proxy.get(url.split(gw.config.oauth.public_url, 1)[1], allow_redirects=False)
        page = await r.text()
        assert r.status == 400 and "Location" not in r.headers, params
        (link,) = re.findall(r'<a id=back href="([^"]+)"', page)
        assert html.unescape(link).startswith("https://evil.example/cb?error=") and "state=st-1" in link
        assert "evil.example" in page and r.headers["X-Frame-Options"] == "DENY"


async def test_a_refresh_on_a_replica_that_has_not_polled_the_grant_yet(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], pg_dsn: str
) -> None:
    """Tokens from replica A, the refresh lands on B before B polled the grant: B reads it from the
    database instead of spending the refresh token on "revoked" (the client's retry on A would then
    look like reuse and revoke the grant)."""
    replicas = []
    for name, poll in (("a", "100ms"), ("b", "1h")):
        (tmp_path / name).mkdir()
        cfg = {
            **oauth_config(upstream, tmp_path / name, free_port()),
            "store": {"kind": "postgres", "poll_interval": poll},
        }
        replicas.append(
            await start(aiohttp_client, cfg, tmp_path / name, started, extra_env={"SIDECAR_DATABASE_URL": pg_dsn})
        )
    a, b = replicas
    _, key = await a.create_key(permissions=PERMS)
    client, first = await tokens(a, key)
    assert b.sc.verifier.table == {}
    status, second = await refresh(b, client, first["refresh_token"])
    assert status == 200, second
    assert (await call(b, second["access_token"])).status == 200


async def test_the_ssrf_guard_holds_for_every_spelling_of_an_internal_address(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar]
) -> None:
    """A hex IPv4 form resolves to loopback through the resolver; IPv4 carried in
    IPv6 (NAT64, 6to4, SIIT) is judged as the address it reaches: all refused as private."""
    from test_oauth_cimd import gateway, refusal
    from tlscerts import make_tls

    gw = await gateway(aiohttp_client, upstream, tmp_path, started, make_tls(tmp_path), [])
    for target in ("https://0x7f.1/c.json", "https://[64:ff9b::a9fe:a9fe]/latest", "https://[2002:a00:1::1]/c.json",
                   "https://[::ffff:0:a00:1]/c.json", "https://[::a00:1]/c.json"):  # fmt: skip
        assert "private" in await refusal(gw, target), target


@pytest.mark.parametrize(
    "uris",
    [
        [f"https://x.example/cb{i}" for i in range(11)],
        ["com.example.app:/cb"],
        ["http://localhost.evil.example/cb"],
        ["http://127.0.0.1.evil.example/cb"],
        ["data:text/html,hi"],
        ["https:///cb"],
        ["https:evil.example/cb"],
        [CALLBACK + "#"],
    ],
)
async def test_registration_refuses_more_redirect_uri_tricks(gw: Running, uris: list[str]) -> None:
    r = await gw.proxy.post("/oauth/register", json={"redirect_uris": uris})
    assert r.status == 400 and (await r.json())["error"] == "invalid_redirect_uri", uris
    assert await gw.sc.store.oauth_clients() == []


async def test_codes_and_refresh_tokens_end_with_their_ttl(gw: Running, clock: Clock) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client)
    clock.now += gw.config.oauth.code_ttl + 1
    status, answer = await exchange(gw, client, code, verifier)
    assert status == 400 and answer["error"] == "invalid_grant" and "expired" in answer["error_description"]
    assert await children(gw) == []
    client, first = await tokens(gw, key)
    clock.now += gw.config.oauth.refresh_token_ttl + 1
    status, answer = await refresh(gw, client, first["refresh_token"])
    assert status == 400 and answer["error"] == "invalid_grant"


async def test_one_refresh_token_presented_twice_at_once_ends_the_grant(gw: Running) -> None:
    _, key = await gw.create_key(permissions=PERMS)
    client, first = await tokens(gw, key)
    answers = await asyncio.gather(*(refresh(gw, client, first["refresh_token"]) for _ in range(2)))
    assert sorted(s for s, _ in answers)[-1] == 400 and [s for s, _ in answers].count(200) <= 1, answers
    for status, answer in answers:
        if status == 200:
            r = await call(gw, answer["access_token"])
            assert r.status == 401 and (await r.json())["error"]["code"] == "revoked_key"
    assert [c.state(gw.sc.clock()) for c in await children(gw)] == ["revoked"]


async def test_a_confidential_clients_secret_cannot_be_guessed_online(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar]
) -> None:
    """A configured client's secret comes from the operator's environment and may be weak: failed
    client authentications are throttled per address, and once throttled even the right secret
    answers 429 (a 200 there would tell the guesser it was right)."""
    conf = {"client_id": "conf", "client_secret": "${CONF_SECRET}", "redirect_uris": ["https://app.example/cb"]}
    cfg = oauth_config(upstream, tmp_path, free_port(), clients=[conf])
    gw = await start(aiohttp_client, cfg, tmp_path, started, extra_env={"CONF_SECRET": "hunter2"})
    form = {"grant_type": "refresh_token", "client_id": "conf", "refresh_token": "x"}
    statuses = []
    for i in range(31):
        r = await gw.proxy.post("/oauth/token", data={**form, "client_secret": f"guess{i}"})
        statuses.append((r.status, (await r.json())["error"]))
    assert statuses[:30] == [(401, "invalid_client")] * 30 and statuses[30] == (429, "slow_down"), statuses[-2:]
    r = await gw.proxy.post("/oauth/token", data={**form, "client_secret": "hunter2"})
    assert r.status == 429 and r.headers["Retry-After"]
    r = await gw.proxy.post("/oauth/revoke", data={"client_id": "conf", "client_secret": "hunter2", "token": "x"})
    assert r.status == 429
