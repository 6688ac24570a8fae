"""Holes an attacker's review of the console found: each test failed before its fix.

The attacker: a web page the operator visits (another site, or a page served through the
proxy listener, which is the same *site* as the admin listener: ``SameSite=Strict`` cookies go
with its requests), a holder of a delegated admin key, or anyone who reaches the admin listener.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config
from console_support import key_form, sign_in

from sidecar.console import CONSOLE
from sidecar.console.sessions import COOKIE, COOKIE_TLS
from sidecar.demo import SEEN
from sidecar.http.browser import upstream_cookie


async def start(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> Running:
    return await make_sidecar(base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path))


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/keys/0123456789ab/nope"), ("GET", "/static/"), ("HEAD", "/signin/once/x"), ("PUT", "/keys/new"),
     ("GET", "/signout"), ("GET", "/admin/keys"), ("GET", "/admin/nope")],
)  # fmt: skip
async def test_every_answer_of_the_admin_listener_carries_the_console_headers(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, method: str, path: str
) -> None:
    """The router's own 404/405 (and the admin API's JSON) went out without a CSP, ``frame-ancestors``,
    ``X-Frame-Options`` or ``no-store``: a page the console did not render is still the console's origin."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    await sign_in(sc.admin)
    resp = await sc.admin.request(method, path, allow_redirects=False)
    assert resp.status in (401, 404, 405), resp.status
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-store"


async def test_the_console_session_cookie_never_reaches_an_upstream(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Cookies are not per port: the operator's browser sends its console cookie (``HttpOnly``,
    ``SameSite=Strict``, but the proxy listener is the same site) with every request to the proxy
    listener on that host, Plex web's or a page an MCP upstream serves. The proxy forwarded it, so
    any upstream (or its access log) held a live admin session of the console."""
    assert upstream_cookie(f"{COOKIE}=a; plex=1; {COOKIE_TLS}=b") == "plex=1"  # both names are the sidecar's
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    _, key = await sc.create_key(name="plex web")
    resp = await sc.admin.post("/signin", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    sid = resp.cookies[COOKIE].value
    seen = plex_upstream.app[SEEN]
    cookies = [
        f"{COOKIE}={sid}", f"a=1; {COOKIE}={sid}; b=2", f"{COOKIE_TLS}={sid};theme=dark", f"a=1;  {COOKIE} = {sid} ",
        f"{COOKIE}={sid}; {COOKIE}={sid}",
    ]  # fmt: skip
    for cookie in cookies:
        got = await sc.proxy.get("/library/sections", headers={"X-Plex-Token": key, "Cookie": cookie})
        assert got.status == 200
        sent = str(seen[-1]["headers"])
        assert sid not in sent and "sidecar_console" not in sent, (cookie, sent)
    forwarded = seen[-4]["headers"]
    assert isinstance(forwarded, dict) and forwarded["Cookie"] == "a=1; b=2"  # the upstream's own cookies still go
    assert "Cookie" not in seen[-5]["headers"]  # type: ignore[operator]


async def test_no_console_form_acts_for_a_page_of_the_proxy_listener(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Every state-changing route, enumerated from the router (a route added later is covered too):
    a page served through the proxy listener is the same site, so the browser sends the session cookie;
    even holding the session's CSRF token (as a script that read a page could), it is refused and
    nothing changes. (A check that holds: recorded so that it keeps holding.)"""
    url = str(plex_upstream.make_url("")).rstrip("/")
    mcp = {"id": "tools", "kind": "mcp", "url": f"{url}/mcp", "path_prefix": "/mcp"}
    cfg = base_config(url, tmp_path, oauth={"enabled": True, "public_url": "http://127.0.0.1:1"})
    cfg["upstreams"].append(mcp)
    sc = await make_sidecar(cfg)
    rec, _ = await sc.create_key(name="victim")
    hidden = await sign_in(sc.admin)
    proxy_origin = f"http://127.0.0.1:{sc.proxy.port}"
    posts = sorted({
        r.resource.canonical for r in sc.admin.app.router.routes()
        if r.method == "POST" and r.resource is not None and not r.resource.canonical.startswith("/admin/")
    })  # fmt: skip
    assert {"/signin", "/signout", "/keys/new", "/keys/{id}/revoke", "/oauth/consent/{request}"} <= set(posts)
    for template in posts:
        path = template.replace("{id}", rec.id).replace("{grant}", rec.id).replace("{request}", "r" * 43)
        for site in ({"Origin": proxy_origin, "Sec-Fetch-Site": "same-site"}, {"Origin": proxy_origin}):
            data = {**hidden, "token": ADMIN_TOKEN, "name": "made", "client_id": "c", "decision": "deny"}
            resp = await sc.admin.post(path, data=data, headers=site, allow_redirects=False)
            assert resp.status == 403, (path, site, resp.status)
            assert "Set-Cookie" not in resp.headers
    assert [r.name for r in await sc.sc.store.list_keys()] == ["victim"]
    assert (await sc.sc.store.get(rec.id)).revoked_at is None  # type: ignore[union-attr]
    assert (await sc.admin.get("/", allow_redirects=False)).status == 200  # not signed out either


async def test_an_upstream_cannot_set_the_console_cookie_through_the_proxy(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The other way round: a hostile upstream's ``Set-Cookie: sidecar_console=…`` went to the browser,
    which keeps it for the host whatever the port, so the operator's next console page ran in the
    session it names (a delegated key's own, planted) or signed the operator out. Its other cookies pass."""

    async def planting(request: web.Request) -> web.Response:
        resp = web.Response(text="<html>hello</html>", content_type="text/html")
        for name in (COOKIE, COOKIE_TLS, " sidecar_console", "theme"):
            resp.headers.add("Set-Cookie", f"{name}=planted; Path=/; HttpOnly; SameSite=Strict")
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", planting)
    hostile = await aiohttp_server(app)
    sc = await make_sidecar(base_config(str(hostile.make_url("")).rstrip("/"), tmp_path))
    _, key = await sc.create_key(name="player")
    resp = await sc.proxy.get("/web/index.html", headers={"X-Plex-Token": key})
    assert resp.status == 200
    assert resp.headers.getall("Set-Cookie") == ["theme=planted; Path=/; HttpOnly; SameSite=Strict"]


async def test_two_console_cookies_are_never_guessed_between(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """A page on another port of the host can still plant a console cookie from script (``Domain=<host>``
    makes it a second cookie beside the operator's ``HttpOnly`` one, and the newer is sent last). The
    console read the last one: the operator's browser ran in the planted session, a delegated key's
    that the attacker signed in with. With two, neither is used, and the sign-in page says why."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    _, delegate_key = await sc.create_key(name="boss-a", owner="team-a", permissions={"admin": True})
    resp = await sc.admin.post("/signin", data={"token": delegate_key}, allow_redirects=False)
    planted = resp.cookies[COOKIE].value
    sc.admin.session.cookie_jar.clear()
    resp = await sc.admin.post("/signin", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    operator = resp.cookies[COOKIE].value
    sc.admin.session.cookie_jar.clear()
    for both in (f"{COOKIE}={operator}; {COOKIE}={planted}", f"{COOKIE}={planted}; theme=x; {COOKIE}={operator}"):
        resp = await sc.admin.get("/", headers={"Cookie": both}, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"].startswith("/signin"), resp.status
        page = await sc.admin.get("/signin", headers={"Cookie": both}, allow_redirects=False)
        assert page.status == 200 and "two console cookies" in await page.text()
    for one in (operator, planted):  # each alone is its own session, as before
        assert (await sc.admin.get("/", headers={"Cookie": f"{COOKIE}={one}"}, allow_redirects=False)).status == 200


async def test_removing_an_oauth_client_is_audited_from_the_console_and_the_admin_api(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """ "Every action ... is audited": removing a registered client (its new authorizations refused from
    then on) left no trail, from the console or from ``DELETE /admin/oauth/clients/{id}``."""
    url = str(plex_upstream.make_url("")).rstrip("/")
    cfg = base_config(url, tmp_path, oauth={"enabled": True, "public_url": "http://127.0.0.1:1"})
    cfg["upstreams"].append({"id": "tools", "kind": "mcp", "url": f"{url}/mcp", "path_prefix": "/mcp"})
    sc = await make_sidecar(cfg)
    assert sc.sc.oauth is not None
    made = [await sc.sc.oauth.clients.register({"client_name": n, "redirect_uris": ["http://127.0.0.1:1/cb"]})
            for n in ("one", "two")]  # fmt: skip
    hidden = await sign_in(sc.admin)
    resp = await sc.admin.post(
        "/oauth/clients/remove", data={"csrf": hidden["csrf"], "client_id": made[0]["client_id"]}, allow_redirects=False
    )
    assert resp.status == 303
    resp = await sc.admin.delete(f"/admin/oauth/clients/{made[1]['client_id']}", headers=sc.admin_headers())
    assert resp.status == 200
    events = [(e.actor, e.action, e.detail.get("client_id")) for e in await sc.sc.store.audit_log(None, 10)]
    assert ("console", "oauth_client_removed", made[0]["client_id"]) in events, events
    assert ("admin", "oauth_client_removed", made[1]["client_id"]) in events, events
    html = await (await sc.admin.get("/activity")).text()
    assert "oauth_client_removed" in html


async def test_a_delegate_creates_a_key_in_the_console_without_typing_its_owner(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """The form sent an empty owner as ``"owner": null``, which the delegation check refused (another
    owner's key); ``POST /admin/keys`` without an owner makes the delegate's owner's key. Now both do."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    _, boss_key = await sc.create_key(name="boss", owner="team-a", permissions={"admin": True})
    hidden = await sign_in(sc.admin, boss_key)
    resp = await sc.admin.post("/keys/new", data={**key_form("made"), **hidden}, allow_redirects=False)
    assert resp.status == 200, await resp.text()
    made = [r for r in await sc.sc.store.list_keys() if r.name == "made"]
    assert len(made) == 1 and made[0].owner == "team-a"
    hidden = await sign_in(sc.admin, boss_key)
    resp = await sc.admin.post("/keys/new", data={**key_form("theirs", owner="team-b"), **hidden})
    assert resp.status == 403 and not [r for r in await sc.sc.store.list_keys() if r.name == "theirs"]


def hostile_mcp(tools: list[dict[str, str]]) -> web.Application:
    """An MCP upstream (plain JSON-RPC over HTTP) whose ``tools/list`` names tools as it likes."""

    async def rpc(request: web.Request) -> web.Response:
        msg = await request.json()
        if "id" not in msg:
            return web.Response(status=202)
        if msg["method"] == "initialize":
            result: dict[str, Any] = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                                      "serverInfo": {"name": "hostile", "version": "1"}}  # fmt: skip
        else:
            result = {"tools": [{**t, "inputSchema": {"type": "object"}} for t in tools]}
        return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": result})

    app = web.Application()
    app.router.add_post("/mcp", rpc)
    return app


async def test_a_tool_named_like_a_glob_is_allowed_as_that_one_tool(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Permissions take tool *globs*, and the picker ticked a listed tool's name as it was: a tool an
    upstream (or one server behind an aggregating one) names ``*`` or ``read_*``, ticked as one tool,
    allowed every tool. The picker's value now matches that name only."""
    from sidecar.auth.permissions import tool_allowed

    upstream = await aiohttp_server(hostile_mcp([{"name": "*", "description": "just one tool"},
                                                 {"name": "read_?[x]", "description": ""}]))  # fmt: skip
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"].append({"id": "agg", "kind": "mcp", "url": str(upstream.make_url("/mcp")), "path_prefix": "/mcp"})
    sc = await make_sidecar(cfg)
    hidden = await sign_in(sc.admin)
    listed = (await (await sc.admin.get("/console/tools/agg")).json())["tools"]
    assert [(t["name"], t["allow"]) for t in listed] == [("*", "[*]"), ("read_?[x]", "read_[?][[]x]")]
    form = {**key_form("one tool"), **hidden, "tools_mode.agg": "some", "tool.agg": listed[0]["allow"]}
    resp = await sc.admin.post("/keys/new", data=form)
    assert resp.status == 200, await resp.text()
    (rec,) = [r for r in await sc.sc.store.list_keys() if r.name == "one tool"]
    assert tool_allowed(rec.permissions, "agg", "*")
    assert not tool_allowed(rec.permissions, "agg", "delete_everything")
    assert tool_allowed(rec.permissions, "agg", "read_?[x]") is False  # not ticked


@pytest.mark.parametrize("host", ["evil.example", "evil.example:9188", "127.0.0.1.evil.example", "localhost.evil"])
async def test_a_loopback_admin_listener_answers_no_renamed_host(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, host: str
) -> None:
    """DNS rebinding: a web page at ``evil.example`` re-points its name at 127.0.0.1, and the operator's
    browser then talks to the loopback admin listener as that page's *own* origin: ``Origin`` matches
    ``Host``, so the console's origin check passes; it reads ``/metrics`` (key ids, names, owners, counts)
    and can guess at the sign-in until the operator's own address is throttled. A listener bound to
    loopback only ever has loopback names: any other ``Host`` is refused before anything runs."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    await sc.create_key(name="secret-project", owner="team-a")
    origin = {"Host": host, "Origin": f"http://{host}"}
    for method, path in (("GET", "/metrics"), ("POST", "/signin"), ("GET", "/admin/keys"), ("GET", "/signin")):
        resp = await sc.admin.request(method, path, headers=origin, data={"token": "guess"}, allow_redirects=False)
        assert resp.status == 400, (method, path, resp.status)
        body = await resp.text()
        assert "secret-project" not in body and "rebinding" in body
    assert not sc.admin.app[CONSOLE].recent.failures  # the guess was never tried
    port = sc.admin.port
    for own in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1", f"LOCALHOST:{port}"):
        assert (await sc.admin.get("/metrics", headers={"Host": own})).status == 200, own


async def test_a_delegate_sees_only_the_tools_its_own_key_may_list(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A key's ``tools`` filter its ``tools/list`` (names and descriptions of the others stay hidden), but
    the console's picker showed a delegated admin key every tool of the upstream, with descriptions."""
    tools = [{"name": "search", "description": "public"}, {"name": "wipe_db", "description": "internal: prod db"}]
    upstream = await aiohttp_server(hostile_mcp(tools))
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"].append({"id": "agg", "kind": "mcp", "url": str(upstream.make_url("/mcp")), "path_prefix": "/mcp"})
    sc = await make_sidecar(cfg)
    _, boss = await sc.create_key(
        name="boss", owner="team-a", permissions={"upstreams": ["agg"], "tools": {"agg": ["search"]}, "admin": True}
    )
    await sign_in(sc.admin, boss)
    body = await (await sc.admin.get("/console/tools/agg")).json()
    assert [t["name"] for t in body["tools"]] == ["search"] and "prod db" not in str(body)
    sc.admin.session.cookie_jar.clear()
    await sign_in(sc.admin)  # the admin token sees them all
    body = await (await sc.admin.get("/console/tools/agg")).json()
    assert [t["name"] for t in body["tools"]] == ["search", "wipe_db"]
