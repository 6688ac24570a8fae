"""What a relayed answer may make a browser do to the proxy's origin (sidecar/http/browser.py).

The attacker is an upstream (or what it echoes: a poster, an MCP resource, a reflected
parameter) on the same origin as the sidecar's consent page, and a browser that keeps cookies
per host, not per port (the console's session cookie reaches the proxy port too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config

from sidecar.http.browser import SANDBOX, WORKER_FORBIDDEN, upstream_cookie, worker_refusal
from sidecar.oauth.metadata import ENDPOINTS

HOSTILE = {
    "Service-Worker-Allowed": "/",
    "Clear-Site-Data": '"*"',
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains; preload",
    "Alt-Svc": 'h2="evil.example:443"; ma=86400',
    "Access-Control-Allow-Origin": "https://evil.example",
    "Access-Control-Allow-Credentials": "true",
    "NEL": '{"report_to": "g", "max_age": 31536000, "include_subdomains": true, "success_fraction": 1.0}',
    "Report-To": '{"group": "g", "max_age": 31536000, "endpoints": [{"url": "https://evil.example/r"}]}',
    "Content-Security-Policy": "img-src 'none'; report-uri https://evil.example/csp",
    "Reporting-Endpoints": 'e="https://evil.example/r"',
}
ORIGIN_WIDE = ("Service-Worker-Allowed", "Clear-Site-Data", "Strict-Transport-Security", "Alt-Svc",
               "Access-Control-Allow-Credentials", "NEL", "Report-To")  # fmt: skip
TOSSED = (
    "sidecar_console=attacker; Path=/; HttpOnly",
    "__Host-sidecar_console=attacker; Path=/; Secure",
    "sidecar_oauth_csrf=attacker; Path=/oauth",
    " Sidecar_OAuth_CSRF =x",
    "bomb1=" + "x" * 4000 + "; Path=/oauth/authorize",  # a few of these: the consent page is over the header limit
    "bomb2=x; Max-Age=99999999; path = /OAUTH",
    "bomb3=x; Path=/.well-known/oauth-authorization-server",
)


async def hostile_upstream(aiohttp_server: Any) -> tuple[str, list[web.Request]]:
    """Answers every path with the origin-wide headers above; ``?type=`` picks the Content-Type
    (``none``: no Content-Type at all); records what reached it."""
    seen: list[web.Request] = []

    async def any_path(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        resp = web.StreamResponse(headers=HOSTILE)
        for c in (*TOSSED, "plex_pref=1; Path=/"):
            resp.headers.add("Set-Cookie", c)
        kind = request.query.get("type", "application/javascript")
        if kind != "none":
            resp.headers["Content-Type"] = kind
        await resp.prepare(request)
        await resp.write(b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(document.domain)</script></svg>")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


async def plex_front(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> tuple[Running, str, list[Any]]:
    url, seen = await hostile_upstream(aiohttp_server)
    sc = await make_sidecar(base_config(url, tmp_path))
    _, key = await sc.create_key(permissions={"upstreams": ["*"]})
    return sc, key, seen


# --------------------------------------------------------------------------- going up


async def test_the_sidecars_own_cookies_never_reach_the_upstream(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The console on the admin port and the proxy share a host, so the browser sends the console's
    session cookie (and the consent page's CSRF cookie) with every Plex Web request: an upstream
    that logs or echoes its Cookie header would hand over an admin session. Its own cookies pass."""
    sc, key, seen = await plex_front(make_sidecar, aiohttp_server, tmp_path)
    cookie = "sidecar_console=SESSION1; plex_pref=1; __Host-sidecar_console=SESSION2; sidecar_oauth_csrf=CSRF"
    assert (await sc.proxy.get("/web/index.html", headers={"X-Plex-Token": key, "Cookie": cookie})).status == 200
    assert seen[-1].headers.getall("Cookie") == ["plex_pref=1"]
    sc.proxy.session.cookie_jar.clear()  # what the upstream set on the first answer
    only_ours = {"X-Plex-Token": key, "Cookie": "sidecar_console=SESSION1"}
    assert (await sc.proxy.get("/web/index.html", headers=only_ours)).status == 200
    assert "Cookie" not in seen[-1].headers


def test_cookie_filter_keeps_everything_else_as_sent() -> None:
    assert upstream_cookie("a=1; b=2") == "a=1; b=2"  # untouched (no copy) when none of ours is there
    assert upstream_cookie("a=sidecar_console; b=2") == "a=sidecar_console; b=2"  # a value, not a name
    assert upstream_cookie("__Secure-sidecar_x=1;a=1") == "a=1"
    assert upstream_cookie("sidecar_console=1") == ""


# --------------------------------------------------------------------------- coming down


async def test_headers_that_act_on_the_whole_origin_are_dropped(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A Plex upstream cannot widen a service worker's scope to "/", wipe the origin's storage,
    pin its transport, install Network Error Logging (every later URL on the origin, keys in
    Plex Web's queries, reported to it for a year), allow credentialed cross-origin reads, or
    toss cookies over the sidecar's own (console session, consent CSRF) or aim them at its pages.
    Its own cookies and CORS origin stay (browser Plex apps)."""
    sc, key, _ = await plex_front(make_sidecar, aiohttp_server, tmp_path)
    resp = await sc.proxy.get("/web/sw.js", headers={"X-Plex-Token": key})
    assert resp.status == 200
    for name in ORIGIN_WIDE:
        assert name not in resp.headers, name
    assert resp.headers.getall("Set-Cookie") == ["plex_pref=1; Path=/"]
    assert resp.headers["Access-Control-Allow-Origin"] == "https://evil.example"  # Plex's own CORS


@pytest.mark.parametrize(
    ("ctype", "sandboxed", "nosniff"),
    [
        ("image/svg+xml", True, False),  # a poster someone uploaded
        ("text/xml; charset=utf-8", True, False),  # Plex's API answers, echoing titles
        ("application/xhtml+xml", True, False),
        ("application/atom+xml", True, False),  # any +xml renders as an XML document
        ("multipart/x-mixed-replace; boundary=b", True, False),  # each part renders by its own type
        ("none", False, False),  # no type: relayed as application/octet-stream (aiohttp), never sniffed
        ("unknown/unknown", False, True),  # a type browsers sniff: HTML could come out of it
        ("*/*", False, True),
        ("text/html", True, False),  # HTML outside Plex Web: an error page or a reflection
        ("application/javascript", False, False),  # Plex Web's scripts
        ("image/jpeg", False, False),
    ],
)
async def test_types_a_browser_would_run_are_sandboxed(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, ctype: str, sandboxed: bool, nosniff: bool
) -> None:
    """A poster, an XML answer that echoes a title, a reflected HTML page: navigated to, none of
    them runs script on the origin the consent page shares."""
    sc, key, _ = await plex_front(make_sidecar, aiohttp_server, tmp_path)
    resp = await sc.proxy.get("/library/metadata/1/thumb", params={"type": ctype, "X-Plex-Token": key})
    assert resp.status == 200
    if sandboxed:  # only the sidecar's policy: the upstream's could only add a report address (the URL, key and all)
        assert resp.headers.getall("Content-Security-Policy") == [SANDBOX]
        assert "Reporting-Endpoints" not in resp.headers
    else:  # Plex Web's own policy stays
        assert resp.headers.getall("Content-Security-Policy") == [HOSTILE["Content-Security-Policy"]]
    assert (resp.headers.get("X-Content-Type-Options") == "nosniff") is nosniff
    if ctype == "none":
        assert resp.headers["Content-Type"] == "application/octet-stream"


def mcp_config(url: str, tmp_path: Path, **cors: Any) -> dict[str, Any]:
    cfg = base_config(url, tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"{url}/mcp", "path_prefix": "/mcp/tools"}]
    if cors:
        cfg["cors"] = cors
    return cfg


PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


@pytest.mark.parametrize("cors", [{}, {"enabled": True, "origins": ["https://good.example"]}])
async def test_an_mcp_upstream_cannot_widen_the_sidecars_cors(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, cors: dict[str, Any]
) -> None:
    """On MCP routes the ``cors`` section is the whole CORS policy: the upstream's own
    Access-Control-* never reach a browser, so a site the operator did not list cannot read an
    MCP answer. MCP answers are data for programs: nosniff and a sandbox CSP."""
    url, _ = await hostile_upstream(aiohttp_server)
    sc = await make_sidecar(mcp_config(url, tmp_path, **cors))
    _, key = await sc.create_key(permissions={"upstreams": ["*"]})
    auth = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
    resp = await sc.proxy.post("/mcp/tools?type=application/json", json=PING,
                               headers={**auth, "Origin": "https://evil.example"})  # fmt: skip
    assert resp.status == 200
    assert not [h for h in resp.headers if h.lower().startswith("access-control-")], dict(resp.headers)
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers.getall("Content-Security-Policy") == [SANDBOX]
    if cors:
        good = await sc.proxy.post("/mcp/tools?type=application/json", json=PING,
                                   headers={**auth, "Origin": "https://good.example"})  # fmt: skip
        assert good.headers["Access-Control-Allow-Origin"] == "https://good.example"
        assert "Access-Control-Allow-Credentials" not in good.headers


# --------------------------------------------------------------------------- service workers


@pytest.mark.parametrize(
    ("path", "refused"),
    [("/sw.js", True), ("/oauth/sw.js", True), ("/web/sw.js", False), ("/web/js/sw.js", False)],
)
async def test_a_service_worker_that_would_cover_the_consent_page_is_not_served(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, path: str, refused: bool
) -> None:
    """A script fetched to register a service worker (``Service-Worker: script``) from "/" or
    "/oauth/" would control the consent page, where people type their keys, for as long as the
    browser keeps it. Refused with the designed error; Plex Web's own folder registers as before."""
    sc, key, seen = await plex_front(make_sidecar, aiohttp_server, tmp_path)
    before = len(seen)
    resp = await sc.proxy.get(path, params={"X-Plex-Token": key}, headers={"Service-Worker": "script"})
    if refused:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "insufficient_permissions"
        assert len(seen) == before  # never fetched from the upstream
    else:
        assert resp.status == 200
    plain = await sc.proxy.get(path, params={"X-Plex-Token": key})  # the same file as a plain script: served
    assert plain.status == 200


def test_every_sidecar_page_is_guarded_against_workers() -> None:
    """Each OAuth page's folders (the widest scopes a worker could claim over it) are refused."""
    for path in (*ENDPOINTS.values(), "/authorize", "/token"):
        folders = {path[: i + 1] for i, c in enumerate(path) if c == "/"}
        assert folders <= WORKER_FORBIDDEN, path
    assert worker_refusal("/web/sw.js") is None


@pytest.mark.parametrize(
    ("prefix", "path", "sandboxed"),
    [
        ("/", "/web/index.html", False),  # Plex Web: the application, untouched
        ("/", "/web", False),
        ("/", "/webhooks/x", True),
        ("/", "/search", True),
        ("/plex", "/plex/web/index.html", False),
        ("/plex", "/web/index.html", True),  # not the Plex upstream's own /web (no route: 404 anyway)
        ("/plex", "/plex/library/x", True),
    ],
)
async def test_only_plex_webs_own_html_runs(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, prefix: str, path: str, sandboxed: bool
) -> None:
    url, _ = await hostile_upstream(aiohttp_server)
    cfg = base_config(url, tmp_path)
    cfg["upstreams"][0]["path_prefix"] = prefix
    sc = await make_sidecar(cfg)
    _, key = await sc.create_key(permissions={"upstreams": ["*"]})
    resp = await sc.proxy.get(path, params={"type": "text/html", "X-Plex-Token": key})
    if resp.status == 404:
        assert sandboxed
        return
    assert (resp.headers.getall("Content-Security-Policy") == [SANDBOX]) is sandboxed


async def test_an_upstream_cannot_make_the_browser_collect_a_key(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A Basic (or Digest, NTLM, Negotiate) challenge relayed on the sidecar's origin opens the
    browser's password dialog; a key typed there becomes Basic credentials the browser then sends
    with every request to the origin, other sites' forms and images included. Dropped; other
    challenges pass."""

    async def refuse(request: web.Request) -> web.Response:
        resp = web.Response(status=401, text="no")
        for value in ('Basic realm="Plex"', 'Digest realm="x", nonce="1"', "NTLM", "basic\trealm=x", "Negotiate",
                      'Bearer realm="plex", Basic realm="b"', 'X-Plex realm="plex"'):  # fmt: skip
            resp.headers.add("WWW-Authenticate", value)
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    server = await aiohttp_server(app)
    sc = await make_sidecar(base_config(str(server.make_url("")).rstrip("/"), tmp_path))
    _, key = await sc.create_key(permissions={"upstreams": ["*"]})
    resp = await sc.proxy.get("/library/sections", headers={"X-Plex-Token": key})
    assert resp.status == 401 and await resp.text() == "no"  # Plex's own refusal, otherwise untouched
    assert resp.headers.getall("WWW-Authenticate") == ['X-Plex realm="plex"']


async def test_the_sidecars_own_errors_are_json_and_never_sniffed(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """An error that quotes the path carries markup an attacker chose; typed JSON with nosniff, a
    browser shows it as text, whatever it contains."""
    url, _ = await hostile_upstream(aiohttp_server)
    cfg = base_config(url, tmp_path)
    cfg["upstreams"][0]["path_prefix"] = "/plex"
    sc = await make_sidecar(cfg)
    resp = await sc.proxy.get("/<svg onload=alert(1)>")
    assert resp.status == 404 and "<svg" in await resp.text()
    assert resp.content_type == "application/json"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


def test_the_oauth_endpoints_json_is_never_sniffed() -> None:
    """Token, registration and revocation answers and their errors (which may quote a client's input)."""
    from sidecar.oauth.server import NO_STORE, oauth_error

    assert oauth_error("invalid_request", "<script>").headers["X-Content-Type-Options"] == "nosniff"
    assert NO_STORE["X-Content-Type-Options"] == "nosniff"
