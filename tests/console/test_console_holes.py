"""Holes an attacker's review of the console found: each test failed before its fix.

The attacker: a web page the operator visits (another site, or a page served through the
proxy listener, which is the same *site* as the admin listener: ``SameSite=Strict`` cookies go
with its requests), a holder of a delegated admin key, or anyone who reaches the admin listener.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config
from console_support import sign_in

from sidecar.console.sessions import COOKIE, COOKIE_TLS
from sidecar.demo import SEEN
from sidecar.http.outbound import CONSOLE_COOKIES


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
    assert {COOKIE, COOKIE_TLS} == CONSOLE_COOKIES
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
