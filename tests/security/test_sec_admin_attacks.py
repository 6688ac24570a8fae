"""Attacks on key management: admin-API callers and keys that manage keys (DESIGN invariants 5, 9,
10), and key-lifecycle holes. Each test is what the attacker sends and what it gets back.
"""

from __future__ import annotations

import time
from typing import Any

from conftest import ADMIN_TOKEN, Running

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
