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
