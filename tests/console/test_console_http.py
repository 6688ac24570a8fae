"""The console without a browser: sessions, CSRF, the sign-in throttle, headers, one-time links, delegation.

Each test drives the real admin app (``make_sidecar``) with aiohttp's client and asserts what
a browser (or an attacker's script) would get back.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config
from console_support import hidden_fields, key_form, shown_key, sign_in
from tlscerts import make_tls

from sidecar.app import create_apps
from sidecar.console import CONSOLE
from sidecar.core.scope import RequestScope
from sidecar.observe.recent import RecentRequests


async def start(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, **over: Any) -> Running:
    return await make_sidecar(base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, **over))


async def test_pages_need_a_session_and_every_answer_is_hardened(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    for path in ("/", "/keys/new", "/activity", "/keys/0123456789ab", "/console/tools/plex"):
        resp = await sc.admin.get(path, allow_redirects=False)
        assert resp.status == 303, path
        assert resp.headers["Location"].startswith("/signin?next=")
    resp = await sc.admin.post("/keys/new", data=key_form("x"), allow_redirects=False)
    assert resp.status == 401 and "sign in again" in await resp.text()
    assert await sc.sc.store.list_keys() == []
    page = await sc.admin.get("/signin")
    assert page.status == 200
    csp = page.headers["Content-Security-Policy"]
    for part in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'",
                 "form-action 'self'", "base-uri 'none'"):  # fmt: skip
        assert part in csp
    assert "unsafe-inline" not in csp and "http" not in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["Referrer-Policy"] == "same-origin"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    html = await page.text()
    assert "<script>" not in html and "style=" not in html  # nothing inline: the CSP allows none
    for asset in ("console.css", "console.js", "favicon.svg"):
        assert f"/static/{asset}?v=" in html
        got = await sc.admin.get(f"/static/{asset}")
        assert got.status == 200 and "immutable" in got.headers["Cache-Control"]
        assert got.headers["Content-Security-Policy"] == csp
    assert (await sc.admin.get("/static/../../etc/passwd")).status == 404
    # The admin API, metrics and health are where they were.
    assert (await sc.admin.get("/healthz")).status == 200
    assert (await sc.admin.get("/admin/keys")).status == 401


async def test_admin_token_sign_in_sets_a_strict_session_cookie(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    resp = await sc.admin.post("/signin", data={"token": ADMIN_TOKEN, "next": "/activity"}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/activity"
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("sidecar_console=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
    assert ADMIN_TOKEN not in cookie
    page = await sc.admin.get("/")
    assert page.status == 200 and "API Keys" in await page.text()
    # After sign-in, "next" never leaves this listener.
    for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        other = await sc.admin.post("/signin", data={"token": ADMIN_TOKEN, "next": evil}, allow_redirects=False)
        assert other.headers["Location"] == "/"


async def test_over_tls_the_cookie_is_secure_with_the_host_prefix(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, aiohttp_client: Any
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    tls = make_tls(tmp_path)
    _, admin_app = create_apps(sc.sc)  # the admin app served over TLS, as a TLS admin listener would
    server = TestServer(admin_app)
    await server.start_server(ssl=tls.server_context())
    client = await aiohttp_client(server)
    assert str(client.make_url("/")).startswith("https://")
    ctx: ssl.SSLContext = tls.client_context()
    resp = await client.post("/signin", data={"token": ADMIN_TOKEN, "next": "/"}, allow_redirects=False, ssl=ctx)
    assert resp.status == 303
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("__Host-sidecar_console=")
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Domain" not in cookie
    assert (await client.get("/", ssl=ctx)).status == 200


async def test_failed_sign_ins_are_throttled_per_address(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    sc = await start(
        make_sidecar, plex_upstream, tmp_path, keys={"argon2": "cheapest", "failed_attempts_per_minute": 3}
    )
    for guess in ("nope", "admin", "pmcp_" + "0" * 40):
        resp = await sc.admin.post("/signin", data={"token": guess}, allow_redirects=False)
        assert resp.status == 401
        assert "not the admin token" in await resp.text() or "invalid" in (await resp.text()).lower()
    # Past the threshold even the right token waits: nothing is compared until the window has room.
    resp = await sc.admin.post("/signin", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
    assert "Set-Cookie" not in resp.headers
    console = sc.admin.app[CONSOLE]
    assert console.recent.failures_by_reason["console_sign_in"] == 3
    assert console.recent.failures_by_reason["too_many_failed_attempts"] == 1
    # The window passes (the console's steady clock moves on): the right token works again.
    start_clock = console.throttle.clock
    console.throttle.clock = lambda: start_clock() + 61
    resp = await sc.admin.post("/signin", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert resp.status == 303


INGRESS = {"trusted_proxies": ["127.0.0.1"]}  # the test client connects from here: an ingress in front


def via_ingress(client: str, **more: str) -> dict[str, str]:
    """What an ingress that ended TLS for ``client`` adds to the request."""
    return {"X-Forwarded-For": client, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "console.example", **more}


async def test_behind_a_trusted_ingress_one_guesser_does_not_lock_out_the_operators(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """All browsers arrive from the ingress's one address: the sign-in throttle counts the client
    the ingress names, so a guesser is throttled and the operator, elsewhere, signs in; the cookie
    is ``Secure`` with the ``__Host-`` prefix because the browser used https."""
    sc = await start(
        make_sidecar,
        plex_upstream,
        tmp_path,
        server=INGRESS,
        keys={"argon2": "cheapest", "failed_attempts_per_minute": 3},
    )
    guesser, operator = via_ingress("203.0.113.9"), via_ingress("198.51.100.7", Origin="https://console.example")
    for guess in ("nope", "admin", "admin-token"):
        resp = await sc.admin.post("/signin", data={"token": guess}, headers=guesser, allow_redirects=False)
        assert resp.status == 401
    resp = await sc.admin.post("/signin", data={"token": ADMIN_TOKEN}, headers=guesser, allow_redirects=False)
    assert resp.status == 429, "the guesser's own address is throttled"
    resp = await sc.admin.post("/signin", data={"token": ADMIN_TOKEN}, headers=operator, allow_redirects=False)
    assert resp.status == 303, "another client behind the same ingress signs in"
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("__Host-sidecar_console=") and "Secure" in cookie and "HttpOnly" in cookie
    sid = cookie.split(";")[0].split("=", 1)[1]
    page = await sc.admin.get("/", headers={**operator, "Cookie": f"__Host-sidecar_console={sid}"})
    assert page.status == 200 and "Sign in" not in await page.text()
    # The activity page counts the failures against the guesser, not the ingress.
    failures = [e.client_ip for e in sc.admin.app[CONSOLE].recent.failures]
    assert failures and set(failures) == {"203.0.113.9"}, failures
    # The origin check compares the host the browser used: a form from another origin is still refused.
    evil = {**operator, "Origin": "https://evil.example", "Cookie": f"__Host-sidecar_console={sid}"}
    assert (await sc.admin.post("/signout", data={}, headers=evil)).status == 403


async def test_an_untrusted_peer_cannot_claim_another_address_or_https(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Without ``trusted_proxies`` the forwarded headers are the client's own word: rotating them
    evades nothing, and they do not make the cookie one for https."""
    sc = await start(
        make_sidecar, plex_upstream, tmp_path, keys={"argon2": "cheapest", "failed_attempts_per_minute": 3}
    )
    for i, guess in enumerate(("nope", "admin", "admin-token")):
        headers = via_ingress(f"203.0.113.{i + 1}")
        resp = await sc.admin.post("/signin", data={"token": guess}, headers=headers, allow_redirects=False)
        assert resp.status == 401
    resp = await sc.admin.post(
        "/signin", data={"token": "wrong"}, headers=via_ingress("198.51.100.7"), allow_redirects=False
    )
    assert resp.status == 429, "a new X-Forwarded-For from an untrusted peer is the same client"
    fresh = await start(make_sidecar, plex_upstream, tmp_path / "b")
    resp = await fresh.admin.post(
        "/signin", data={"token": ADMIN_TOKEN}, headers=via_ingress("198.51.100.7"), allow_redirects=False
    )
    assert resp.status == 303
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("sidecar_console=") and "Secure" not in cookie, cookie


async def test_state_changes_need_the_session_csrf_token_and_same_origin(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    hidden = await sign_in(sc.admin)
    for bad in ({}, {"csrf": "x" * 43}, {"csrf": ""}):
        resp = await sc.admin.post("/keys/new", data={**key_form("forged"), "once": hidden["once"], **bad})
        assert resp.status == 403 and "CSRF" in await resp.text()
    forged = {**key_form("forged"), **hidden}
    resp = await sc.admin.post("/keys/new", data=forged, headers={"Origin": "http://evil.example"})
    assert resp.status == 403
    for site in ("cross-site", "same-site"):  # same-site: e.g. a page served through the proxy's port
        resp = await sc.admin.post("/keys/new", data=forged, headers={"Sec-Fetch-Site": site})
        assert resp.status == 403
    assert await sc.sc.store.list_keys() == []  # nothing was created by any of them
    resp = await sc.admin.post("/keys/new", data=forged)
    assert resp.status == 200, await resp.text()
    key = shown_key(await resp.text())
    assert resp.headers["Cache-Control"] == "no-store"
    # The same form again (a reload of the page that showed the key) creates nothing more.
    again = await sc.admin.post("/keys/new", data=forged, allow_redirects=False)
    assert again.status == 303
    assert len(await sc.sc.store.list_keys()) == 1
    # The key works at once, and the audit log names the console.
    assert (await sc.proxy.get("/library/sections", headers={"X-Plex-Token": key})).status == 200
    events = await sc.sc.store.audit_log()
    assert [(e.actor, e.action) for e in events] == [("console", "created")]
    # Sign-out needs the token too; then the old cookie is worthless.
    assert (await sc.admin.post("/signout", data={})).status == 403
    assert (await sc.admin.post("/signout", data={"csrf": hidden["csrf"]})).status == 200
    assert (await sc.admin.get("/", allow_redirects=False)).status == 303


async def test_sessions_end_after_inactivity(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    admin = {"listen": "127.0.0.1:0", "token_env": "SIDECAR_ADMIN_TOKEN", "console": {"session_idle": "2m"}}
    sc = await start(make_sidecar, plex_upstream, tmp_path, admin=admin)
    hidden = await sign_in(sc.admin)
    console = sc.admin.app[CONSOLE]
    real = console.sessions.clock
    console.sessions.clock = lambda: real() + 100  # active within the idle time: still signed in
    assert (await sc.admin.get("/", allow_redirects=False)).status == 200
    console.sessions.clock = lambda: real() + 100 + 121  # two minutes and a second without a request
    resp = await sc.admin.get("/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/signin")
    resp = await sc.admin.post("/keys/new", data={**key_form("late"), **hidden})
    assert resp.status == 401
    assert await sc.sc.store.list_keys() == []
    assert len(console.sessions) == 0


async def test_one_time_sign_in_link_works_once(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    console = sc.admin.app[CONSOLE]
    token = console.links.issue()
    resp = await sc.admin.get(f"/signin/once/{token}", allow_redirects=False)
    assert resp.status == 200
    assert 'http-equiv="refresh"' in await resp.text()  # a same-site navigation carries the Strict cookie
    assert "sidecar_console=" in resp.headers["Set-Cookie"]
    assert (await sc.admin.get("/", allow_redirects=False)).status == 200
    sc.admin.session.cookie_jar.clear()
    again = await sc.admin.get(f"/signin/once/{token}", allow_redirects=False)
    assert again.status == 401 and "Set-Cookie" not in again.headers
    stale = console.links.issue()
    real = console.links.clock
    console.links.clock = lambda: real() + 121
    assert (await sc.admin.get(f"/signin/once/{stale}", allow_redirects=False)).status == 401


async def test_a_delegated_admin_key_signs_in_and_sees_only_its_owner(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    boss, boss_key = await sc.create_key(name="boss", owner="team-a", permissions={"admin": True})
    mine, _ = await sc.create_key(name="team-a-key", owner="team-a")
    theirs, _ = await sc.create_key(name="team-b-key", owner="team-b")
    _, plain_key = await sc.create_key(name="plain", owner="team-a")
    resp = await sc.admin.post("/signin", data={"token": plain_key}, allow_redirects=False)
    assert resp.status == 401  # a key without admin is not a console user
    hidden = await sign_in(sc.admin, boss_key)
    listing = await (await sc.admin.get("/")).text()
    assert "team-a-key" in listing and "team-b-key" not in listing
    assert (await sc.admin.get(f"/keys/{theirs.id}")).status == 404
    assert (await sc.admin.get(f"/keys/{mine.id}")).status == 200
    resp = await sc.admin.post(f"/keys/{mine.id}/revoke", data={"csrf": hidden["csrf"]}, allow_redirects=False)
    assert resp.status == 303
    events = await sc.sc.store.audit_log(mine.id)
    assert events[0].actor == f"console:key:{boss.id}" and events[0].action == "revoked"
    # Revoking the admin key ends its console session on the next request.
    await sc.sc.manager().revoke(boss.id, "test")
    await sc.sc.verifier.refresh()
    assert (await sc.admin.get("/", allow_redirects=False)).status == 303


async def test_key_pages_never_show_a_key_or_its_hash(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    rec, key = await sc.create_key(name="secretive", rate_limits=["5/second"])
    assert (await sc.proxy.get(f"/library/sections?X-Plex-Token={key}")).status == 200
    assert (await sc.proxy.get("/library/sections", headers={"X-Plex-Token": key + "0"})).status in (400, 401)
    await sign_in(sc.admin)
    stored = await sc.sc.store.get(rec.id)
    assert stored is not None
    for path in ("/", f"/keys/{rec.id}", f"/keys/{rec.id}/edit", f"/keys/{rec.id}/revoke", "/activity"):
        html = await (await sc.admin.get(path)).text()
        assert key not in html and stored.hash not in html and key[5:] not in html, path
        assert "REDACTED" in html or path != f"/keys/{rec.id}" or "X-Plex-Token" not in html
    page = await (await sc.admin.get(f"/keys/{rec.id}")).text()
    assert "/library/sections?X-Plex-Token=REDACTED" in page  # the path as the access log writes it


async def test_forms_report_the_admin_api_errors(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    hidden = await sign_in(sc.admin)
    resp = await sc.admin.post("/keys/new", data={**key_form("bad", rate_limits="lots"), **hidden})
    assert resp.status == 400
    html = await resp.text()
    assert "rate_limits:" in html and 'value="bad"' in html  # KeyManager's message, the form kept
    new = hidden_fields(html)
    resp = await sc.admin.post("/keys/new", data={**key_form("ok", rate_limits="60/minute"), **new})
    assert resp.status == 200
    rec = (await sc.sc.store.list_keys())[0]
    assert rec.rate_limits == ("60/minute",)


def test_recent_requests_are_bounded_and_newest_first() -> None:
    ring = RecentRequests(per_key=100, max_keys=3, max_events=5, max_ips=2)
    for i in range(150):
        ring.add(RequestScope("GET", f"/p/{i}", "10.0.0.1", key_id="k1", status=200))
    got = ring.for_key("k1")
    assert len(got) == 100 and got[0].path == "/p/149" and got[-1].path == "/p/50"
    for k in ("k2", "k3", "k4"):
        ring.add(RequestScope("GET", "/", "10.0.0.1", key_id=k, status=200))
    assert ring.for_key("k1") == [] and list(ring.key_ids()) == ["k2", "k3", "k4"]
    for i in range(10):
        ring.add(RequestScope("GET", "/", f"10.0.0.{i}", error="invalid_key", status=401))
    ring.add(RequestScope("GET", "/", "10.0.0.1", key_id="k4", error="rate_limit_exceeded", status=429))
    ring.add(RequestScope("GET", "/", "10.0.0.1"))  # no key, no error: not kept
    assert len(ring.failures) == 5 and ring.failures_by_reason == {"invalid_key": 10}
    assert list(ring.failures_by_ip) == ["10.0.0.8", "10.0.0.9"]
    assert [e.error for e in ring.refusals] == ["rate_limit_exceeded"]


def test_screenshots_are_committed() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "console"
    for name in ("signin", "keys", "create", "created", "key", "revoke", "activity"):
        assert (docs / f"{name}.png").is_file(), f"docs/console/{name}.png: run python docs/console/shoot.py"


async def test_the_tools_picker_says_when_the_upstream_cannot_list(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    from sidecar.demo import free_port

    dead = {"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{free_port()}/mcp", "path_prefix": "/mcp/tools",
            "headers": {"Authorization": "Bearer upstream-secret-0123456789"}}  # fmt: skip
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"].append(dead)
    sc = await make_sidecar(cfg)
    await sign_in(sc.admin)
    resp = await sc.admin.get("/console/tools/tools")
    assert resp.status == 502
    body = await resp.json()
    assert "tools" in body["error"] and "upstream-secret" not in await resp.text()
    assert (await sc.admin.get("/console/tools/plex")).status == 404  # not an MCP upstream
    form = await (await sc.admin.get("/keys/new")).text()
    assert 'name="typed.tools"' in form  # names can always be typed


async def test_an_unchanged_edit_form_changes_nothing_and_an_edit_changes_only_its_field(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, aiohttp_client: Any
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    perms = {"upstreams": ["plex"], "methods": ["GET"], "paths": ["/library/*", "plex:read"]}
    rec, _ = await sc.create_key(
        name="kept", description="two\nlines", owner="ops", permissions=perms,
        rate_limits=["5/second", "100/minute"], quota="1000/day", concurrency=3,
    )  # fmt: skip
    hidden = await sign_in(sc.admin)
    form_html = await (await sc.admin.get(f"/keys/{rec.id}/edit")).text()
    assert 'value="kept"' in form_html and "two\nlines</textarea>" in form_html
    # What a browser sends back for the form as shown (textarea line breaks as CRLF).
    sent = key_form("kept", description="two\r\nlines", owner="ops", expires="keep", access="some", upstream="plex",
                    methods="GET", preset="plex:read", paths="/library/*", rate_limits="5/second, 100/minute",
                    quota="1000/day", concurrency="3", csrf=hidden["csrf"])  # fmt: skip
    resp = await sc.admin.post(f"/keys/{rec.id}/edit", data=sent)
    assert "Nothing changed." in await resp.text()
    resp = await sc.admin.post(f"/keys/{rec.id}/edit", data={**sent, "quota": "2000/day"})
    assert "Changes saved." in await resp.text()
    after = await sc.sc.store.get(rec.id)
    assert after is not None and after.quota == "2000/day"
    assert after.permissions == rec.permissions and after.description == "two\nlines"
    events = await sc.sc.store.audit_log(rec.id)
    assert (events[0].actor, events[0].action, events[0].detail) == ("console", "patched", {"fields": ["quota"]})


async def test_a_bug_in_a_page_is_a_hardened_error_page_and_a_log_line(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, caplog: Any
) -> None:
    """A template that breaks (a bug of ours, not bad input): the browser gets the console's 500 page
    with every hardening header, no traceback, and the log says what broke; when the error page
    itself cannot render (the bug is in its base template), a bare page, hardened all the same."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    await sign_in(sc.admin)
    console = sc.admin.app[CONSOLE]
    real = console.env.get_template

    def broken(*names: str) -> Any:
        def get(name: str, *a: Any, **k: Any) -> Any:
            if name in names:
                return console.env.from_string("{{ no_such_variable }}")  # StrictUndefined: raises
            return real(name, *a, **k)

        return get

    for names, marker in ((("keys.html",), "That did not work"), (("keys.html", "error.html"), "<title>Error</title>")):
        console.env.get_template = broken(*names)
        caplog.clear()
        resp = await sc.admin.get("/")
        text = await resp.text()
        assert resp.status == 500 and marker in text and "internal error" in text, text
        assert "Traceback" not in text and "no_such_variable" not in text
        assert resp.headers["Content-Security-Policy"] and resp.headers["Cache-Control"] == "no-store"
        logged = [r for r in caplog.records if r.getMessage() == "console: GET / failed"]
        assert logged and "UndefinedError" in (logged[0].exc_text or ""), caplog.text
    console.env.get_template = real
    assert (await sc.admin.get("/")).status == 200
