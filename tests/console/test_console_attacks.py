"""The console attacked: open redirects after sign-in, XSS through attacker-set text, hardened error pages.

Each test plays the attacker (a key holder whose text shows up in the console, a website the
operator visits, or someone on the network) and asserts what the operator's browser gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config
from console_support import sign_in

from sidecar.console import CONSOLE


async def start(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, **over: Any) -> Running:
    return await make_sidecar(base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, **over))


EVIL_NEXT = ["/\t/evil.example/", "/\n/evil.example/", "/\r/evil.example", "/ /evil.example", "/%2F/evil.example",
             "/\x00x", "/\u2028x", "/\x7f/evil.example"]  # fmt: skip


@pytest.mark.parametrize("evil", EVIL_NEXT)
async def test_next_after_sign_in_never_leaves_the_listener(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, evil: str
) -> None:
    """Browsers drop tabs and newlines from a URL: ``/<TAB>/evil`` would be ``//evil``, another site."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    resp = await sc.admin.post("/signin", data={"token": ADMIN_TOKEN, "next": evil}, allow_redirects=False)
    assert resp.status == 303
    print(repr(resp.headers["Location"]))
    loc = resp.headers["Location"]
    assert loc.startswith("/") and not any(c in loc for c in "\t\r\n\\ \x00\x7f") and not loc.startswith("//")
    # Signed in already: the sign-in page sends the browser on at once.
    resp = await sc.admin.get("/signin", params={"next": evil}, allow_redirects=False)
    print(resp.status, repr(resp.headers.get("Location")))
    assert resp.status == 303
    loc = resp.headers["Location"]
    assert loc.startswith("/") and not any(c in loc for c in "\t\r\n\\ \x00\x7f") and not loc.startswith("//")


async def test_a_delegate_cannot_learn_other_owners_admins_from_the_activity_filters(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    _, boss_key = await sc.create_key(name="boss-a", owner="team-a", permissions={"admin": True})
    other_boss, _ = await sc.create_key(name="boss-b", owner="team-b", permissions={"admin": True})
    theirs, _ = await sc.create_key(name="team-b-key", owner="team-b")
    await sc.sc.manager().revoke(theirs.id, f"console:key:{other_boss.id}", by=other_boss)
    await sign_in(sc.admin, boss_key)
    for query in ("", f"?key={theirs.id}", f"?actor=console:key:{other_boss.id}&action=revoked"):
        html = await (await sc.admin.get("/activity" + query)).text()
        assert other_boss.id not in html, query
        assert theirs.id not in html.replace(f'value="{theirs.id}"', ""), query  # only the filter typed


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/nope", 404, "not_found"), ("GET", "/keys/x/rotate", 405, "method_not_allowed"),
     ("PUT", "/keys/new", 405, "method_not_allowed"), ("GET", "/signout", 405, "method_not_allowed"),
     ("HEAD", "/signin/once/x", 405, "method_not_allowed"), ("POST", "/keys/new", 413, "payload_too_large")],
)  # fmt: skip
async def test_the_admin_listeners_own_refusals_are_designed_errors(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, method: str, path: str, status: int,
    code: str,
) -> None:  # fmt: skip
    """aiohttp's router answered these in text/plain without ``nosniff``; now the designed JSON error."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    await sign_in(sc.admin)
    data = {"name": "x" * (3 << 20)} if status == 413 else None
    resp = await sc.admin.request(method, path, data=data, allow_redirects=False)
    assert resp.status == status
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    if method != "HEAD":
        body = await resp.json()
        assert body["success"] is False and body["error"]["code"] == code
    if status == 405:
        assert resp.headers["Allow"]


XSS = '"><script>alert(1)</script><img src=x onerror=alert(2)>'


async def test_text_a_key_holder_controls_is_escaped_on_every_page(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Name, description, owner (a delegate sets them), request paths and audit details, as text only."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    rec, key = await sc.create_key(name="n" + XSS, description=XSS, owner="o" + XSS)
    await sc.proxy.get(f"/library/{XSS}?q={XSS}", headers={"X-Plex-Token": key, "User-Agent": XSS})
    await sc.proxy.get("/library/x", headers={"X-Plex-Token": key + "0", "User-Agent": XSS})
    hidden = await sign_in(sc.admin)
    await sc.admin.post(f"/keys/{rec.id}/revoke", data={"csrf": hidden["csrf"]})
    for path in ("/", f"/?q={XSS}&owner={XSS}", f"/keys/{rec.id}", f"/keys/{rec.id}/edit", f"/keys/{rec.id}/revoke",
                 f"/activity?ip={XSS}&key={XSS}", '/keys/"><script>alert(1)<img src=x onerror=alert(2)>'):  # fmt: skip
        resp = await sc.admin.get(path)
        html = await resp.text()
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'"), path
        if path.startswith("/keys/"):  # shown, as text
            assert "&lt;script&gt;alert(1)" in html or "%3Cscript%3Ealert(1)" in html, path


async def test_a_delegate_signing_in_again_and_again_evicts_only_its_own_sessions(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """The session table is bounded; a full table used to drop the least recently used session,
    whoever's: any admin key could sign the operator out by signing in ``max_sessions`` times."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    sc.admin.server.app[CONSOLE].sessions.max_sessions = 4
    _, delegate_key = await sc.create_key(name="boss-a", owner="team-a", permissions={"admin": True})
    resp = await sc.admin.post("/signin", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    operator = resp.cookies["sidecar_console"].value
    for _ in range(10):
        sc.admin.session.cookie_jar.clear()
        resp = await sc.admin.post("/signin", data={"token": delegate_key}, allow_redirects=False)
        assert resp.status == 303
        latest = resp.cookies["sidecar_console"].value
    sc.admin.session.cookie_jar.clear()
    for sid in (operator, latest):
        resp = await sc.admin.get("/", headers={"Cookie": f"sidecar_console={sid}"}, allow_redirects=False)
        assert resp.status == 200
