"""The console's forms attacked with bodies no console page sends: never a 500, never a traceback.

Anyone who reaches the admin listener (or any web page the operator visits: a cross-site form
may be ``multipart/form-data`` with no boundary, a "simple" request needing no preflight) can
post to ``/signin`` without a session; a signed-in browser's script can post anything. Each
such body is a designed 400 page (hardened like every console page), nothing is changed, and
nothing is logged as an internal error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config
from console_support import key_form, sign_in

URLENC = "application/x-www-form-urlencoded"
HOSTILE = [
    ("multipart/form-data", b"--b\r\ntoken\r\n"),  # no boundary
    ("multipart/form-data; boundary=b", b"--b\r\nnot a header\r\n\r\nx\r\n--b--\r\n"),
    (URLENC + "; charset=no-such-charset", b"token=x"),
    (URLENC + "; charset=utf-16", b"token=x"),
    (URLENC, b"token=\xff\xfe\x00x"),  # not UTF-8
]


async def start(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> Running:
    return await make_sidecar(base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path))


def no_internal_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize(("ctype", "body"), HOSTILE)
async def test_a_hostile_sign_in_body_is_a_designed_400_not_a_500(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    ctype: str, body: bytes,
) -> None:  # fmt: skip
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    caplog.set_level(logging.INFO)
    resp = await sc.admin.post("/signin", data=body, headers={"Content-Type": ctype}, allow_redirects=False)
    assert resp.status == 400, await resp.text()
    assert resp.content_type == "text/html" and "Set-Cookie" not in resp.headers
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert resp.headers["Cache-Control"] == "no-store"
    no_internal_errors(caplog)
    # From another origin the body is not even read: the origin check comes first.
    resp = await sc.admin.post(
        "/signin", data=body, headers={"Content-Type": ctype, "Origin": "http://evil.example"}, allow_redirects=False
    )
    assert resp.status == 403
    no_internal_errors(caplog)


async def test_a_signed_in_form_with_a_file_or_another_encoding_changes_nothing(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    rec, _ = await sc.create_key(name="victim")
    hidden = await sign_in(sc.admin)
    caplog.set_level(logging.INFO)
    fields: dict[str, Any] = {**key_form("made"), **hidden}
    upload = aiohttp.FormData()
    for name, value in fields.items():
        if name == "name":
            upload.add_field(name, b"made", filename="name.txt")  # a file where the form has text
        else:
            upload.add_field(name, value)
    resp = await sc.admin.post("/keys/new", data=upload, allow_redirects=False)
    assert resp.status == 400, await resp.text()
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    for ctype, body in HOSTILE:
        encoded = f"csrf={hidden['csrf']}&".encode() + body
        for path in ("/keys/new", f"/keys/{rec.id}/revoke", "/signout"):
            resp = await sc.admin.post(path, data=encoded, headers={"Content-Type": ctype}, allow_redirects=False)
            assert resp.status == 400, (path, ctype, await resp.text())
            assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    no_internal_errors(caplog)
    assert [r.name for r in await sc.sc.store.list_keys()] == ["victim"]
    assert (await sc.sc.store.get(rec.id)).revoked_at is None  # type: ignore[union-attr]
    assert (await sc.admin.get("/", allow_redirects=False)).status == 200  # still signed in
    assert ADMIN_TOKEN not in caplog.text


@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "http://[bad]:1"])
async def test_an_origin_header_that_is_not_a_url_is_refused_not_a_500(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    origin: str,
) -> None:  # fmt: skip
    """``urlsplit`` raises on a broken IPv6 host: the origin check itself was a 500 (and a traceback)
    for anyone posting to ``/signin``."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    caplog.set_level(logging.INFO)
    signin = {"token": ADMIN_TOKEN}
    resp = await sc.admin.post("/signin", data=signin, headers={"Origin": origin}, allow_redirects=False)
    assert resp.status == 403 and "Set-Cookie" not in resp.headers
    hidden = await sign_in(sc.admin)
    resp = await sc.admin.post("/signout", data=hidden, headers={"Origin": origin}, allow_redirects=False)
    assert resp.status == 403
    no_internal_errors(caplog)
