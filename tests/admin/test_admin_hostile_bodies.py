"""Admin API bodies an attacker (or a buggy client) sends: each a designed 400, never a 500 and a traceback."""

from __future__ import annotations

import logging

import pytest
from conftest import ADMIN_TOKEN, Running

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BODIES = [
    ("application/json", b'{"name": ' + b"7" * 5000 + b"}"),  # past Python's int-digits limit: ValueError
    ("application/json", b'{"name": "x", "concurrency": -' + b"9" * 4400 + b"}"),
    ("application/json; charset=no-such-charset", b'{"name": "x"}'),
    ("application/json; charset=utf-7", b'{"name": "+AHg-"}'),
]


@pytest.mark.parametrize(("ctype", "body"), BODIES)
async def test_a_body_python_cannot_read_is_a_bad_request(
    plex_sidecar: Running, caplog: pytest.LogCaptureFixture, ctype: str, body: bytes
) -> None:
    rec, _ = await plex_sidecar.create_key(name="k")
    caplog.set_level(logging.INFO)
    routes = [("POST", "/admin/keys"), ("PATCH", f"/admin/keys/{rec.id}"), ("POST", f"/admin/keys/{rec.id}/rotate"),
              ("POST", f"/admin/keys/{rec.id}/quota")]  # fmt: skip
    for method, path in routes:
        resp = await plex_sidecar.admin.request(method, path, data=body, headers={**H, "Content-Type": ctype})
        answer = await resp.json()
        assert resp.status == 400 and answer["error"]["code"] == "bad_request", (method, path, answer)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert [r.name for r in await plex_sidecar.sc.store.list_keys()] == ["k"]


async def test_a_page_of_another_origin_cannot_drive_the_admin_api(plex_sidecar: Running) -> None:
    """The admin API takes ``Authorization: Basic base64(any:<key>)`` (every credential form is on by
    default), which a browser remembers for an origin and adds by itself; and a "simple" cross-origin
    POST (``text/plain``) needs no preflight, while ``request.json`` ignores the content type. So a page
    of another origin (the proxy listener's, the same site) could create keys with a browser's
    remembered credentials. Browsers say where a request comes from: such requests are refused before
    any credential is looked at; scripts and curl (no ``Origin``, no ``Sec-Fetch-Site``) are unaffected."""
    import base64

    _, admin_key = await plex_sidecar.create_key(name="ops", permissions={"admin": "full"})
    basic = {"Authorization": "Basic " + base64.b64encode(f"ops:{admin_key}".encode()).decode()}
    page = f"http://127.0.0.1:{plex_sidecar.proxy.port}"
    body = b'{"name": "planted"}'
    for site in ({"Origin": page, "Sec-Fetch-Site": "same-site"}, {"Origin": page}, {"Sec-Fetch-Site": "cross-site"},
                 {"Origin": "null"}):  # fmt: skip
        headers = {**basic, **site, "Content-Type": "text/plain"}
        resp = await plex_sidecar.admin.post("/admin/keys", data=body, headers=headers)
        answer = await resp.json()
        assert resp.status == 403 and answer["error"]["code"] == "insufficient_permissions", (site, answer)
        resp = await plex_sidecar.admin.get("/admin/keys", headers={**basic, **site})
        assert resp.status == 403, site
    assert [r.name for r in await plex_sidecar.sc.store.list_keys()] == ["ops"]
    # The same credentials from a script, or from the console's own origin, work as before.
    own = f"http://{plex_sidecar.admin.host}:{plex_sidecar.admin.port}"
    for site in ({}, {"Origin": own, "Sec-Fetch-Site": "same-origin"}):
        resp = await plex_sidecar.admin.get("/admin/keys", headers={**basic, **site})
        assert resp.status == 200, site
