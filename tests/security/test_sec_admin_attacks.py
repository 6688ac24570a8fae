"""Attacks on key management: admin-API callers and keys that manage keys (DESIGN invariants 5, 9,
10), and key-lifecycle holes. Each test is what the attacker sends and what it gets back.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from pathlib import Path
from typing import Any

import argon2
import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config

from sidecar.auth.keys import ID_LEN, display_form, generate_key
from sidecar.auth.models import KeyRecord, Permissions

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def call(running: Running, method: str, path: str, key: str | None = None, **kw: Any) -> tuple[int, Any]:
    kw["headers"] = {"Authorization": f"Bearer {key}"} if key else H
    resp = await running.admin.request(method, path, **kw)
    return resp.status, await resp.json()


async def add_grant(running: Running, parent: KeyRecord) -> KeyRecord:
    """An OAuth grant as ``sidecar.oauth.grants.create_grant`` writes it: a child key of ``parent``."""
    now = time.time()
    grant = KeyRecord(id="0a1b2c3d4e5f", name="oauth: client", hash=parent.hash, owner=parent.owner,
                      permissions=Permissions(upstreams=("plex",)), created_at=now, expires_at=now + 3600,
                      parent_id=parent.id, grant={"client_id": "c1"})  # fmt: skip
    await running.sc.store.create_key(grant, max_per_owner=None, now=now)
    await running.sc.verifier.refresh()
    return grant


async def test_an_oauth_grant_cannot_be_rotated_into_a_key_that_outlives_its_parent(plex_sidecar: Running) -> None:
    """Before the fix, rotating a grant (admin token, or the delegate that approved it) answered 201
    with a plain ``pmcp_`` key: no ``parent_id``, so revoking the approving key no longer ended it
    (it kept answering 200 on the proxy). Now 409, and nothing is written."""
    sc = plex_sidecar
    parent, parent_key = await sc.create_key(name="approver", owner="ann", permissions={"admin": True})
    grant = await add_grant(sc, parent)
    before = len(await sc.sc.store.list_keys())
    for key in (None, parent_key):
        status, body = await call(sc, "POST", f"/admin/keys/{grant.id}/rotate", key, json={})
        assert status == 409, body
        assert body["error"]["code"] == "conflict" and "OAuth grant" in body["error"]["message"]
    assert len(await sc.sc.store.list_keys()) == before
    stored = await sc.sc.store.get(grant.id)
    assert stored is not None and stored.rotated_to is None and stored.revoked_at is None


CHEAP = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)


def yaml_key(key_id: str | None = None, secret_of: str | None = None, **kw: Any) -> tuple[dict[str, Any], str]:
    """A keys-file entry and its key; ``secret_of``: reuse that key's secret (a copy-pasted hash)."""
    key, parts = generate_key("pmcp_", key_id)
    secret = secret_of[5 + ID_LEN : -8] if secret_of else parts.secret
    if secret_of:
        body = parts.key_id + secret
        key = f"pmcp_{body}{zlib.crc32(('pmcp_' + body).encode()):08x}"
    rec = KeyRecord(id=parts.key_id, name="n", hash=CHEAP.hash(secret), display=display_form("pmcp_", parts.key_id),
                    created_at=time.time(), **kw)  # fmt: skip
    return rec.to_dict(), key


async def test_a_hash_copied_to_a_second_keys_file_entry_is_refused(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """An operator copies an entry to make a broader key and keeps the hash (the same secret). Anyone
    holding the narrow key could then become the broad one: its secret under the other id, with a
    fresh checksum. Before the fix that crafted key answered 200 on a path only the broad key may
    use; now the file is refused (the last good set stays) and the crafted key is unknown (401)."""
    narrow, narrow_key = yaml_key(permissions=Permissions(upstreams=("plex",), paths=("/identity",)))
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [narrow]}))
    store = {"kind": "yaml", "path": str(keys_file), "state_path": str(tmp_path / "state.db")}
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, store=store)
    sc = await make_sidecar(cfg)
    broad, crafted = yaml_key(secret_of=narrow_key)
    broad["hash"] = narrow["hash"]  # the copied entry
    keys_file.write_text(yaml.safe_dump({"keys": [narrow, broad]}))
    await sc.sc.verifier.refresh(force=True)
    resp = await sc.proxy.get("/library/sections", headers={"X-Plex-Token": crafted})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_key"
    assert "keys[1].hash" in str(getattr(sc.sc.store, "last_error", ""))
    resp = await sc.proxy.get("/identity", headers={"X-Plex-Token": narrow_key})
    assert resp.status == 200


async def test_an_empty_upstream_list_is_refused_not_read_as_every_upstream(plex_sidecar: Running) -> None:
    """``upstreams: []`` (a script whose list came out empty, a keys-file entry meant to reach nothing)
    was stored as ``"*"``: a key for every upstream, including ones added later. Now 400 naming
    the field, for the admin API as for the keys file (``Permissions.from_dict``)."""
    for perms in ({"upstreams": []}, {"upstreams": [], "paths": ["/identity"]}):
        status, body = await call(plex_sidecar, "POST", "/admin/keys", json={"name": "x", "permissions": perms})
        assert status == 400, body
        assert body["error"]["code"] == "bad_request" and "permissions.upstreams" in body["error"]["message"]
    rec, _ = await plex_sidecar.create_key(name="y", permissions={"upstreams": ["plex"]})
    status, body = await call(plex_sidecar, "PATCH", f"/admin/keys/{rec.id}", json={"permissions": {"upstreams": []}})
    assert status == 400 and "permissions.upstreams" in body["error"]["message"], body
    assert (await plex_sidecar.sc.store.get(rec.id)).permissions.upstreams == ("plex",)  # type: ignore[union-attr]
    assert not [r for r in await plex_sidecar.sc.store.list_keys() if r.name == "x"]


async def test_a_deeply_nested_body_is_400_not_500(plex_sidecar: Running) -> None:
    """100 KB of nested brackets made ``json.loads`` raise RecursionError: a 500 with aiohttp's
    text body (invariant 8). Now the designed 400 on every route that reads a body."""
    rec, key = await plex_sidecar.create_key(name="d", owner="ann", permissions={"admin": True})
    deep = "[" * 50_000 + "]" * 50_000
    for method, path in (("POST", "/admin/keys"), ("PATCH", f"/admin/keys/{rec.id}"),
                         ("POST", f"/admin/keys/{rec.id}/rotate")):  # fmt: skip
        for who in (None, key):
            status, body = await call(plex_sidecar, method, path, who, data=deep)
            assert status == 400, (method, path, body)
            assert body["error"]["code"] == "bad_request"


async def test_a_keys_file_hash_too_costly_to_verify_is_refused(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Key ids are public (metrics, logs), so anyone can make the sidecar verify a guess against
    any entry's hash. An entry with ``m=4194304,t=1000`` (4 GiB, a thousand passes: an edit gone
    wrong) was loaded, and each guess would hold one of the two argon2 threads for minutes: no new
    key could be verified. Now the file is refused (the last good set stays) and a guess for that
    id is an unknown key: 401, no argon2."""
    good, good_key = yaml_key(permissions=Permissions(upstreams=("plex",)))
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [good]}))
    store = {"kind": "yaml", "path": str(keys_file), "state_path": str(tmp_path / "state.db")}
    sc = await make_sidecar(base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, store=store))
    for costly in ("m=4194304,t=1000,p=1", "m=8,t=100000,p=1", "m=65536,t=3,p=255"):
        heavy, guess = yaml_key()
        heavy["hash"] = heavy["hash"].replace("m=8,t=1,p=1", costly)
        keys_file.write_text(yaml.safe_dump({"keys": [good, heavy]}))
        await sc.sc.verifier.refresh(force=True)
        assert heavy["id"] not in sc.sc.verifier.table, costly  # checked first: never run that argon2 here
        assert "keys[1].hash" in str(getattr(sc.sc.store, "last_error", ""))
        runs = sc.sc.verifier.argon2_runs
        resp = await sc.proxy.get("/identity", headers={"X-Plex-Token": guess})
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_key"
        assert sc.sc.verifier.argon2_runs == runs
    resp = await sc.proxy.get("/identity", headers={"X-Plex-Token": good_key})
    assert resp.status == 200


async def slow_posts(running: Running, key: str, requests: list[tuple[str, bytes]]) -> list[Any]:
    """Open ``requests`` (path, body) with ``key``, holding each body back, and return once the key
    was verified for all of them: authorised with the key as it is now, not yet handled."""
    verified, real_verify = asyncio.Semaphore(0), running.sc.verifier.verify

    async def verify(raw: str, ip: str) -> KeyRecord:  # the real check, and a signal that it passed
        rec = await real_verify(raw, ip)
        verified.release()
        return rec

    running.sc.verifier.verify = verify  # type: ignore[method-assign]
    out = []
    for path, body in requests:
        reader, writer = await asyncio.open_connection(running.admin.host, running.admin.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        writer.write(head.encode() + body[:1])
        await writer.drain()
        out.append((reader, writer, body))
    for _ in requests:
        await asyncio.wait_for(verified.acquire(), 5)
    running.sc.verifier.verify = real_verify  # type: ignore[method-assign]
    return out


async def finish(pending: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    """Send the held bodies; each answer's status and JSON."""
    answers = []
    for reader, writer, body in pending:
        writer.write(body[1:])
        await writer.drain()
        head, _, rest = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
        answers.append((int(head.split()[1]), json.loads(rest)))
    return answers


@pytest.mark.parametrize("change", ["revoke", "narrow"])
async def test_a_request_begun_before_its_key_was_revoked_or_narrowed_cannot_finish_with_its_old_powers(
    plex_sidecar: Running, change: str
) -> None:
    """A stolen delegate key opens requests and holds their bodies; the operator revokes the key (or
    takes ``admin`` away); the bodies then arrive. Before the fix each request was judged with the
    record read when its headers came, so the revoked key still created keys (201) that nobody knew
    to revoke. Now the acting key is read again before the write: 401 revoked_key / 403."""
    sc = plex_sidecar
    me, key = await sc.create_key(name="ann-manager", owner="ann", permissions={"admin": True})
    target, _ = await sc.create_key(name="ann-child", owner="ann")
    body = json.dumps({"name": "planted"}).encode()
    pending = await slow_posts(sc, key, [("/admin/keys", body), (f"/admin/keys/{target.id}/rotate", b"{}  ")])
    if change == "revoke":
        status, _ = await call(sc, "DELETE", f"/admin/keys/{me.id}")
    else:
        status, _ = await call(sc, "PATCH", f"/admin/keys/{me.id}", json={"permissions": {"upstreams": ["*"]}})
    assert status == 200
    want = (401, "revoked_key") if change == "revoke" else (403, "insufficient_permissions")
    for status, got in await finish(pending):
        assert (status, got["error"]["code"]) == want, got
    names = [r.name for r in await sc.sc.store.list_keys()]
    assert "planted" not in names and names.count("ann-child") == 1  # nothing created, nothing rotated
    assert (await sc.sc.store.get(target.id)).rotated_to is None  # type: ignore[union-attr]


async def test_a_console_session_whose_key_is_gone_is_never_taken_for_the_admin_token(plex_sidecar: Running) -> None:
    """The console's acting key was ``None`` — the admin token — when a key session's record had
    left the key table (an entry deleted from a keys file, applied while a POST's form was read):
    that request ran with full power. Now it is refused as a revoked key."""
    from sidecar.console import CONSOLE
    from sidecar.core.errors import RevokedKey

    me, key = await plex_sidecar.create_key(name="ann-manager", owner="ann", permissions={"admin": True})
    resp = await plex_sidecar.admin.post("/signin", data={"token": key, "next": "/"}, allow_redirects=False)
    assert resp.status == 303
    console = plex_sidecar.admin.app[CONSOLE]
    session = next(iter(console.sessions._table.values()))
    assert console.acting_key(session) is plex_sidecar.sc.verifier.table[me.id]
    del plex_sidecar.sc.verifier.table[me.id]  # what a reload without the entry leaves
    assert not console.still_allowed(session)
    with pytest.raises(RevokedKey):
        console.acting_key(session)


async def test_a_quota_reset_begun_before_its_full_admin_key_was_revoked_is_refused(plex_sidecar: Running) -> None:
    """The same held-body trick on ``POST /admin/keys/{id}/quota`` (full admin only): the reset was
    judged with the key as it was when the headers came (200, the budget refilled); now 401."""
    sc = plex_sidecar
    ops, key = await sc.create_key(name="ops", permissions={"admin": "full"})
    spender, _ = await sc.create_key(name="spender", quota="5/day")
    status, _ = await call(sc, "POST", f"/admin/keys/{spender.id}/quota", json={"used": 5})
    assert status == 200
    pending = await slow_posts(sc, key, [(f"/admin/keys/{spender.id}/quota", b'{"used": 0}')])
    assert (await call(sc, "DELETE", f"/admin/keys/{ops.id}"))[0] == 200
    [(status, got)] = await finish(pending)
    assert (status, got["error"]["code"]) == (401, "revoked_key"), got
    status, body = await call(sc, "GET", f"/admin/keys/{spender.id}")
    assert body["data"]["quota_status"][0]["used"] == 5, body


NARROW = {"upstreams": ["plex"], "methods": ["GET"], "paths": ["/library/*"], "admin": True}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/admin/keys", {"name": "c", "owner": "Ann", "permissions": {**NARROW, "admin": False}}),
        ("POST", "/admin/keys", {"name": "c", "owner": "ann ", "permissions": {**NARROW, "admin": False}}),
        ("POST", "/admin/keys", {"name": "c", "owner": None, "permissions": {**NARROW, "admin": False}}),
        ("POST", "/admin/keys", {"name": "c", "permissions": {**NARROW, "upstreams": ["plex", "*"]}}),
        ("POST", "/admin/keys", {"name": "c", "permissions": {**NARROW, "paths": ["/library/*", "/LIBRARY*"]}}),
        ("POST", "/admin/keys", {"name": "c", "permissions": {**NARROW, "paths": ["/library*"]}}),
        ("POST", "/admin/keys", {"name": "c", "permissions": {**NARROW, "methods": ["get", "post"]}}),
        ("POST", "/admin/keys", {"name": "c", "permissions": {**NARROW, "admin": "full"}}),
        ("PATCH", "/admin/keys/{wide}", {"name": "renamed"}),
        ("POST", "/admin/keys/{wide}/rotate", {}),
        ("DELETE", "/admin/keys/{full}", None),
        ("PATCH", "/admin/keys/{full}", {"permissions": NARROW}),
        ("POST", "/admin/keys/{self}/quota", {"used": 0}),
    ],
)
async def test_a_delegate_cannot_reach_past_its_own_by_case_spacing_mixing_or_other_keys(
    plex_sidecar: Running, method: str, path: str, body: dict[str, Any] | None
) -> None:
    """Owner spelled another way, ``"*"`` mixed into a list, a glob wider by case or a shorter
    prefix, lowercase methods, and same-owner keys wider than the delegate (or ``admin: full``): 403,
    and nothing in the store changes."""
    sc = plex_sidecar
    me, key = await sc.create_key(name="ann-manager", owner="ann", permissions=NARROW)
    wide, _ = await sc.create_key(name="ann-wide", owner="ann", permissions={"upstreams": ["plex"]})
    full, _ = await sc.create_key(name="ann-full", owner="ann", permissions={"admin": "full"})
    before = sorted(json.dumps(r.to_stored(), sort_keys=True) for r in await sc.sc.store.list_keys())
    url = path.format(wide=wide.id, full=full.id, self=me.id)
    status, answer = await call(sc, method, url, key, **({} if body is None else {"json": body}))
    assert (status, answer["error"]["code"]) == (403, "insufficient_permissions"), answer
    assert sorted(json.dumps(r.to_stored(), sort_keys=True) for r in await sc.sc.store.list_keys()) == before
