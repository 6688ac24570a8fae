"""The admin API: who may call it, the key lifecycle, usage, the audit trail, OpenAPI,
and hashes that never leave the store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config

from sidecar.store import SqliteStore

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def api(running: Running, method: str, path: str, *, status: int = 200, **kw: Any) -> Any:
    kw.setdefault("headers", H)
    resp = await running.admin.request(method, path, **kw)
    text = await resp.text()
    running.env.setdefault("_transcript", "")
    running.env["_transcript"] += text  # every answer, for the hash leak check
    assert resp.status == status, text
    body = await resp.json()
    if status < 400:
        assert body["success"] is True
        return body["data"]
    assert body["success"] is False and set(body["error"]) == {"code", "message"}
    return body["error"]


async def proxy_ok(running: Running, key: str, path: str = "/identity") -> int:
    return (await running.proxy.get(path, headers={"X-Plex-Token": key})).status


# ---------------------------------------------------------------------------- who may call it


async def test_admin_auth(plex_sidecar: Running) -> None:
    err = await api(plex_sidecar, "GET", "/admin/keys", headers={}, status=401)
    assert err["code"] == "unauthorized"
    resp = await plex_sidecar.admin.get("/admin/keys")
    assert "Bearer" in resp.headers["WWW-Authenticate"]
    err = await api(plex_sidecar, "GET", "/admin/keys", headers={"Authorization": "Bearer wrong"}, status=401)
    assert err["code"] == "invalid_key"
    # A key with the admin permission may manage keys (of its own owner, within its own reach:
    # tests/security/test_sec_delegation.py); its actions are audited under its id.
    admin_rec, admin_key = await plex_sidecar.create_key(permissions={"admin": True}, owner="ops")
    created = await api(plex_sidecar, "POST", "/admin/keys", json={"name": "by-key"},
                        headers={"Authorization": f"Bearer {admin_key}"}, status=201)  # fmt: skip
    events = await api(plex_sidecar, "GET", f"/admin/audit?key={created['id']}")
    assert events[0]["actor"] == f"key:{admin_rec.id}"
    _, plain = await plex_sidecar.create_key()
    err = await api(plex_sidecar, "GET", "/admin/keys", headers={"x-api-key": plain}, status=403)
    assert err["code"] == "insufficient_permissions"
    # Health and metrics need no token; the spec neither.
    assert (await plex_sidecar.admin.get("/healthz")).status == 200
    assert (await plex_sidecar.admin.get("/admin/openapi.json")).status == 200


async def test_without_an_admin_token_only_admin_keys_use_the_admin_api(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """No master secret configured: a request without credentials is told which variable is
    unset and that keys with the admin permission still work; such a key does, others do not."""
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["admin"]["token_env"] = "UNSET_ADMIN_TOKEN_VAR"
    running = await make_sidecar(cfg)
    err = await api(running, "GET", "/admin/keys", headers={}, status=503)
    assert "UNSET_ADMIN_TOKEN_VAR" in err["message"] and "admin permission" in err["message"]
    _, admin_key = await running.create_key(name="ops", permissions={"upstreams": ["*"], "admin": "full"})
    _, plain_key = await running.create_key(name="app")
    await api(running, "GET", "/admin/keys", headers={"Authorization": f"Bearer {admin_key}"}, status=200)
    await api(running, "GET", "/admin/keys", headers={"Authorization": f"Bearer {plain_key}"}, status=403)
    await api(running, "GET", "/admin/keys", headers={"Authorization": "Bearer not-the-token"}, status=401)


# ---------------------------------------------------------------------------- lifecycle


async def test_key_lifecycle_and_audit(plex_sidecar: Running) -> None:
    created = await api(
        plex_sidecar,
        "POST",
        "/admin/keys",
        status=201,
        json={"name": "living room", "owner": "ann", "description": "TV",
              "permissions": {"upstreams": ["plex"], "paths": ["plex:playback"]},
              "rate_limits": ["60/minute"], "expires": "30d"},
    )  # fmt: skip
    key, kid = created["key"], created["id"]
    assert key.startswith("pmcp_") and kid in key
    assert created["display"] == f"pmcp_{kid[:4]}…{key[-4:]}"
    assert created["state"] == "active" and created["owner"] == "ann"
    assert await proxy_ok(plex_sidecar, key) == 200

    listed = await api(plex_sidecar, "GET", "/admin/keys")
    assert [k["id"] for k in listed] == [kid]
    assert "key" not in listed[0] and key not in str(listed)  # display form only, after creation
    shown = await api(plex_sidecar, "GET", f"/admin/keys/{kid}")
    assert shown["name"] == "living room" and "key" not in shown

    narrower = {"name": "den", "permissions": {"upstreams": ["plex"], "paths": ["/library*"]}}
    patched = await api(plex_sidecar, "PATCH", f"/admin/keys/{kid}", json=narrower)
    assert patched["name"] == "den" and patched["permissions"]["paths"] == ["/library*"]
    assert await proxy_ok(plex_sidecar, key) == 403  # at once, in this process

    rotated = await api(plex_sidecar, "POST", f"/admin/keys/{kid}/rotate", json={"grace": "1h"}, status=201)
    new_key, new_id = rotated["key"], rotated["id"]
    assert new_id != kid and rotated["permissions"] == patched["permissions"] and rotated["owner"] == "ann"
    assert rotated["name"] == "den" and rotated["rate_limits"] == ["60/minute"]
    assert await proxy_ok(plex_sidecar, new_key, "/library/sections") == 200
    assert await proxy_ok(plex_sidecar, key, "/library/sections") == 200  # grace
    old = await api(plex_sidecar, "GET", f"/admin/keys/{kid}")
    assert old["rotated_to"] == new_id and old["state"] == "active" and old["revoked_at"] is not None

    revoked = await api(plex_sidecar, "DELETE", f"/admin/keys/{new_id}")
    assert revoked["state"] == "revoked"
    assert await proxy_ok(plex_sidecar, new_key) == 401
    assert {k["id"]: k["state"] for k in await api(plex_sidecar, "GET", "/admin/keys")}[new_id] == "revoked"

    events = await api(plex_sidecar, "GET", "/admin/audit")
    assert [(e["action"], e["key"]) for e in events] == [
        ("revoked", new_id), ("rotated", kid), ("patched", kid), ("created", kid),
    ]  # fmt: skip
    assert all(e["actor"] == "admin" and e["at"].endswith("Z") for e in events)
    assert events[1]["new_key"] == new_id and events[2]["fields"] == ["name", "permissions"]
    assert len(await api(plex_sidecar, "GET", "/admin/audit?limit=1")) == 1


async def test_rotation_grace_ends(plex_sidecar: Running) -> None:
    created = await api(plex_sidecar, "POST", "/admin/keys", json={"name": "r"}, status=201)
    await api(plex_sidecar, "POST", f"/admin/keys/{created['id']}/rotate", json={"grace": "1s"}, status=201)
    assert await proxy_ok(plex_sidecar, created["key"]) == 200
    deadline = time.monotonic() + 3
    while await proxy_ok(plex_sidecar, created["key"]) == 200:
        assert time.monotonic() < deadline, "the old key still works after its grace"
        await asyncio.sleep(0.05)
    resp = await plex_sidecar.proxy.get("/identity", headers={"X-Plex-Token": created["key"]})
    assert (await resp.json())["error"]["code"] == "revoked_key"
    # Rotating without grace ends the old key at once; a rotated key cannot be rotated again.
    other = await api(plex_sidecar, "POST", "/admin/keys", json={"name": "r2"}, status=201)
    await api(plex_sidecar, "POST", f"/admin/keys/{other['id']}/rotate", status=201)
    assert await proxy_ok(plex_sidecar, other["key"]) == 401
    err = await api(plex_sidecar, "POST", f"/admin/keys/{other['id']}/rotate", status=409)
    assert err["code"] == "conflict"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "name: required"),
        ({"name": ""}, "name: required"),
        ({"name": "x", "colour": "red"}, "unknown field(s): colour"),
        ({"name": "x", "permissions": {"upstreams": ["nope"]}}, "no upstream with id 'nope'"),
        ({"name": "x", "permissions": {"pathz": ["/"]}}, "unknown field(s) pathz"),
        ({"name": "x", "rate_limits": ["lots"]}, "rate_limits:"),
        ({"name": "x", "quota": "many"}, "quota:"),
        ({"name": "x", "expires": "yesterday"}, "expires:"),
        ({"name": "x", "upstream_token_env": {"plex": "not a var"}}, "upstream_token_env"),
        ({"name": "x", "upstream_token_env": {"ghost": "VAR"}}, "no upstream with id 'ghost'"),
    ],
)
async def test_bad_input_is_400_naming_the_field(plex_sidecar: Running, body: dict[str, Any], needle: str) -> None:
    err = await api(plex_sidecar, "POST", "/admin/keys", json=body, status=400)
    assert err["code"] == "bad_request" and needle in err["message"], err


async def test_not_found_and_bad_json(plex_sidecar: Running) -> None:
    for method, path in (("GET", "/admin/keys/000000000000"), ("PATCH", "/admin/keys/000000000000"),
                         ("DELETE", "/admin/keys/000000000000"), ("POST", "/admin/keys/000000000000/rotate"),
                         ("GET", "/admin/keys/000000000000/usage")):  # fmt: skip
        err = await api(plex_sidecar, method, path, json={"name": "x"}, status=404)
        assert err["code"] == "not_found"
    err = await api(plex_sidecar, "POST", "/admin/keys", data=b"{not json", status=400)
    assert "JSON" in err["message"]
    created = await api(plex_sidecar, "POST", "/admin/keys", json={"name": "x"}, status=201)
    await api(plex_sidecar, "DELETE", f"/admin/keys/{created['id']}")
    err = await api(plex_sidecar, "PATCH", f"/admin/keys/{created['id']}", json={"name": "y"}, status=409)
    assert "revoked" in err["message"]


async def test_patch_with_null_permissions_is_refused_not_reset_to_everything(plex_sidecar: Running) -> None:
    """``{"permissions": null}`` used to widen a key to every upstream and path (a fail-open
    edit); it is a 400 saying what to send instead, and the key keeps what it had."""
    narrow = {"upstreams": ["plex"], "paths": ["/library*"]}
    created = await api(plex_sidecar, "POST", "/admin/keys", json={"name": "n", "permissions": narrow}, status=201)
    kid, key = created["id"], created["key"]
    assert await proxy_ok(plex_sidecar, key) == 403
    for body in ({"permissions": None}, {"name": "renamed", "permissions": None}):
        err = await api(plex_sidecar, "PATCH", f"/admin/keys/{kid}", json=body, status=400)
        assert err["code"] == "bad_request" and err["message"].startswith("permissions:"), err
        assert '{"upstreams": ["*"]}' in err["message"] and "leave" in err["message"], err
        assert key not in err["message"]
    shown = await api(plex_sidecar, "GET", f"/admin/keys/{kid}")
    assert shown["name"] == "n" and shown["permissions"]["upstreams"] == ["plex"]
    assert shown["permissions"]["paths"] == ["/library*"]
    assert await proxy_ok(plex_sidecar, key) == 403  # still narrow
    assert [e["action"] for e in await api(plex_sidecar, "GET", f"/admin/audit?key={kid}")] == ["created"]
    # Every upstream, said explicitly, still works; creating without permissions keeps its default.
    wide = await api(plex_sidecar, "PATCH", f"/admin/keys/{kid}", json={"permissions": {"upstreams": ["*"]}})
    assert wide["permissions"] == {"upstreams": ["*"]}
    assert await proxy_ok(plex_sidecar, key) == 200
    for body in ({"name": "d"}, {"name": "d", "permissions": None}):
        default = await api(plex_sidecar, "POST", "/admin/keys", json=body, status=201)
        assert default["permissions"]["upstreams"] == ["*"]


# ---------------------------------------------------------------------------- usage and last used


async def test_last_used_and_usage_through_the_api_after_a_flush(plex_sidecar: Running, tmp_path: Path) -> None:
    created = await api(plex_sidecar, "POST", "/admin/keys", json={"name": "u"}, status=201)
    for _ in range(3):
        assert await proxy_ok(plex_sidecar, created["key"]) == 200
    before = await api(plex_sidecar, "GET", f"/admin/keys/{created['id']}")
    usage = await api(plex_sidecar, "GET", f"/admin/keys/{created['id']}/usage")  # flushes first
    assert usage["last_used_at"] is not None and usage["last_used_ip"] == "127.0.0.1"
    assert sum(d["requests"] for d in usage["days"]) == 3
    after = await api(plex_sidecar, "GET", f"/admin/keys/{created['id']}")
    assert before["last_used_at"] is None or before["last_used_at"] <= after["last_used_at"]
    assert after["last_used_ip"] == "127.0.0.1"

    # Shutdown flushes what is left: nothing written per request, nothing lost at close.
    assert await proxy_ok(plex_sidecar, created["key"]) == 200
    await plex_sidecar.sc.usage.close()
    store = SqliteStore(plex_sidecar.config.store.path)
    await store.open()
    try:
        assert sum(d["requests"] for d in await store.usage(created["id"])) == 4
        rec = await store.get(created["id"])
        assert rec is not None and rec.last_used_ip == "127.0.0.1"
    finally:
        await store.close()


# ---------------------------------------------------------------------------- YAML store, OpenAPI, leaks


async def test_yaml_store_keys_are_changed_in_the_file(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": []}))
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path,
                      store={"kind": "yaml", "path": str(keys_file)})  # fmt: skip
    running = await make_sidecar(cfg)
    err = await api(running, "POST", "/admin/keys", json={"name": "x"}, status=409)
    assert err["code"] == "conflict" and "sidecar keys create" in err["message"]
    assert await api(running, "GET", "/admin/keys") == []


async def test_openapi_is_a_valid_openapi_3_1_document(plex_sidecar: Running) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    resp = await plex_sidecar.admin.get("/admin/openapi.json")
    spec = await resp.json()
    assert spec["openapi"].startswith("3.1")
    validator.validate(spec)
    for path in ("/admin/keys", "/admin/keys/{id}", "/admin/keys/{id}/rotate", "/admin/keys/{id}/usage",
                 "/admin/audit", "/admin/cache"):  # fmt: skip
        assert path in spec["paths"], path
    assert set(spec["paths"]["/admin/keys/{id}"]) >= {"get", "patch", "delete"}


async def test_hashes_never_leave_the_store(plex_sidecar: Running, tmp_path: Path) -> None:
    created = await api(plex_sidecar, "POST", "/admin/keys", json={"name": "h"}, status=201)
    kid = created["id"]
    await proxy_ok(plex_sidecar, created["key"])
    await proxy_ok(plex_sidecar, "pmcp_" + "0" * 68)
    await api(plex_sidecar, "GET", "/admin/keys")
    await api(plex_sidecar, "GET", f"/admin/keys/{kid}")
    await api(plex_sidecar, "PATCH", f"/admin/keys/{kid}", json={"description": "d"})
    await api(plex_sidecar, "GET", f"/admin/keys/{kid}/usage")
    await api(plex_sidecar, "POST", f"/admin/keys/{kid}/rotate", status=201)
    await api(plex_sidecar, "GET", "/admin/audit")
    await api(plex_sidecar, "DELETE", f"/admin/keys/{kid}")
    transcript = plex_sidecar.env["_transcript"]
    assert kid in transcript and "$argon2" not in transcript
    plex_sidecar.sc.access_log.close()
    access_log = Path(plex_sidecar.config.log.access).read_text()
    assert kid in access_log and "$argon2" not in access_log and created["key"] not in access_log


async def test_a_bug_in_an_admin_route_is_the_designed_json_500_and_a_log_line(
    plex_sidecar: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """A route that raises (a bug of ours, not bad input): the caller gets the designed JSON error
    with no traceback, and the log says what broke; aiohttp's text/plain 500 never goes out."""

    def broken() -> Any:
        raise RuntimeError("no_such_thing")

    plex_sidecar.sc.manager = broken  # type: ignore[method-assign]
    resp = await plex_sidecar.admin.post("/admin/keys", json={"name": "x"}, headers=plex_sidecar.admin_headers())
    assert resp.status == 500 and resp.content_type == "application/json"
    assert await resp.json() == {"success": False, "error": {"code": "internal_error", "message": "internal error"}}
    logged = [r for r in caplog.records if r.getMessage() == "admin: POST /admin/keys failed"]
    assert logged and "no_such_thing" in (logged[0].exc_text or ""), caplog.text


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "team-b\u202eyek"), ("name", "ci\x00key"), ("name", "two\nlines"), ("owner", "acme\u2066"),
     ("owner", "acme\tcorp"), ("description", "note\u202e"), ("description", "bell\x07")],
)  # fmt: skip
async def test_names_that_render_as_other_text_are_refused(plex_sidecar: Running, field: str, value: str) -> None:
    """A right-to-left override makes ``team-b\u202eyek`` show as another key's name in the console
    and the lists; a NUL or a newline breaks whatever quotes it. Refused on create and on edit; a
    description may still wrap (newlines and tabs)."""
    h = plex_sidecar.admin_headers()
    body = {"name": "k", **{field: value}}
    resp = await plex_sidecar.admin.post("/admin/keys", json=body, headers=h)
    answer = await resp.json()
    assert (resp.status, answer["error"]["code"]) == (400, "bad_request"), answer
    assert answer["error"]["message"].startswith(f"{field}: no control"), answer
    created = await plex_sidecar.admin.post("/admin/keys", json={"name": "k"}, headers=h)
    kid = (await created.json())["data"]["id"]
    resp = await plex_sidecar.admin.patch(f"/admin/keys/{kid}", json={field: value}, headers=h)
    assert resp.status == 400
    wraps = {"description": "line one\nline two\tend"}
    ok = await plex_sidecar.admin.patch(f"/admin/keys/{kid}", json=wraps, headers=h)
    assert ok.status == 200
