"""Delegated key management (issue 20.7; DESIGN invariant 10).

A key with ``admin: true`` manages keys of its own owner within its own reach; it can never
widen itself, reach another owner, or grant more than it holds. ``admin: full`` and the admin
token keep full power. Every refusal is 403 insufficient_permissions (or 404 for a key of
another owner, which it may not even see), and nothing changes in the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config

from sidecar.admin.delegation import glob_covered
from sidecar.auth.models import KeyRecord

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

DELEGATE_PERMS = {"upstreams": ["plex"], "methods": ["GET"], "paths": ["plex:read", "/library/*"], "admin": True}


async def call(running: Running, method: str, path: str, key: str | None = None, **kw: Any) -> tuple[int, Any]:
    kw["headers"] = {"Authorization": f"Bearer {key}"} if key else H
    resp = await running.admin.request(method, path, **kw)
    return resp.status, await resp.json()


@pytest.fixture
async def two_upstreams(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> Running:
    url = str(plex_upstream.make_url("")).rstrip("/")
    cfg = base_config(url, tmp_path)
    cfg["upstreams"].append({"id": "plex2", "kind": "plex", "url": url, "token_env": "PLEX_TOKEN",
                             "path_prefix": "/two"})  # fmt: skip
    cfg["keys"] = {"argon2": "cheapest", "upstream_token_envs": ["PLEX_TOKEN_*"]}
    return await make_sidecar(cfg)


async def delegate(sc: Running) -> tuple[KeyRecord, str]:
    return await sc.create_key(
        name="ann-manager", owner="ann", permissions=DELEGATE_PERMS, rate_limits=["10/second"], quota="1000/day",
        concurrency=4, expires="30d",
    )  # fmt: skip


WITHIN = {"name": "child", "permissions": {"upstreams": ["plex"], "methods": ["GET"], "paths": ["plex:read"]},
          "rate_limits": ["5/second"], "quota": "500/day", "concurrency": 2, "expires": "7d"}  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"permissions": {**DELEGATE_PERMS, "upstreams": ["*"]}},
        {"permissions": {**DELEGATE_PERMS, "upstreams": ["plex", "plex2"]}},
        {"permissions": {**DELEGATE_PERMS, "methods": []}},
        {"permissions": {**DELEGATE_PERMS, "methods": ["GET", "DELETE"]}},
        {"permissions": {**DELEGATE_PERMS, "paths": ["*"]}},
        {"permissions": {**DELEGATE_PERMS, "paths": ["plex:playback"]}},
        {"permissions": {**DELEGATE_PERMS, "paths": ["/library*"]}},
        {"permissions": {**DELEGATE_PERMS, "paths": ["/*"]}},
        {"permissions": {**DELEGATE_PERMS, "admin": "full"}},
        {"rate_limits": []},
        {"rate_limits": ["100/second"]},
        {"rate_limits": ["10/second", "1000/minute"], "quota": None},
        {"quota": "100000/day"},
        {"quota": "1000/month"},
        {"concurrency": None},
        {"concurrency": 64},
        {"expires": None},
        {"expires": "365d"},
        {"upstream_token_env": {"plex": "PLEX_TOKEN_OTHER"}},
        {"owner": "bob"},
    ],
)
async def test_a_delegated_key_can_never_widen_itself(two_upstreams: Running, change: dict[str, Any]) -> None:
    """PATCH of its own record with anything broader is 403, and the record is unchanged."""
    me, key = await delegate(two_upstreams)
    status, body = await call(two_upstreams, "PATCH", f"/admin/keys/{me.id}", key, json=change)
    assert status == 403, body
    assert body["error"]["code"] == "insufficient_permissions"
    stored = await two_upstreams.sc.store.get(me.id)
    assert stored is not None and stored.to_stored() == me.to_stored()


@pytest.mark.parametrize(
    "change",
    [
        {"permissions": {"upstreams": ["*"], "methods": ["GET"], "paths": ["plex:read"]}},
        {"permissions": {"upstreams": ["plex"], "paths": ["plex:read"]}},
        {"permissions": {"upstreams": ["plex"], "methods": ["GET"]}},
        {"permissions": {"upstreams": ["plex"], "methods": ["GET"], "paths": ["/library/*", "/status/*"]}},
        {"permissions": {"upstreams": ["plex"], "methods": ["GET"], "paths": ["plex:read"], "admin": "full"}},
        {"rate_limits": None},
        {"rate_limits": ["11/second"]},
        {"quota": None},
        {"expires": "31d"},
        {"expires": None},
        {"owner": "bob"},
        {"upstream_token_env": {"plex": "PLEX_TOKEN_KIDS"}},
    ],
)
async def test_a_delegated_key_cannot_create_a_key_broader_than_itself(
    two_upstreams: Running, change: dict[str, Any]
) -> None:
    """Each dimension broader than the creating key's own is 403 and creates nothing (before the
    fix every one of these was 201)."""
    _, key = await delegate(two_upstreams)
    body_in = {**WITHIN, **change}
    body_in = {k: v for k, v in body_in.items() if v is not None or k in ("expires",)}
    before = len(await two_upstreams.sc.store.list_keys())
    status, body = await call(two_upstreams, "POST", "/admin/keys", key, json=body_in)
    assert status == 403, body
    assert body["error"]["code"] == "insufficient_permissions"
    assert len(await two_upstreams.sc.store.list_keys()) == before


async def test_a_delegated_key_manages_its_own_owners_keys_within_reach(two_upstreams: Running) -> None:
    """Within reach it may create (owner defaults to its own), edit, rotate and revoke; it sees
    only its owner's keys, their usage and audit; other owners' keys are 404 to it; quota resets
    and cache purges need full admin (403)."""
    sc = two_upstreams
    me, key = await delegate(sc)
    bob, _ = await sc.create_key(name="bob's", owner="bob")
    broad, _ = await sc.create_key(name="ann-broad", owner="ann")  # all upstreams, no limits
    status, body = await call(sc, "POST", "/admin/keys", key, json=WITHIN)
    assert status == 201, body
    child = body["data"]
    assert child["owner"] == "ann" and (await sc.sc.store.get(child["id"])) is not None
    status, body = await call(sc, "PATCH", f"/admin/keys/{child['id']}", key, json={"rate_limits": ["1/second"]})
    assert status == 200, body
    status, body = await call(sc, "POST", f"/admin/keys/{child['id']}/rotate", key, json={"grace": "1m"})
    assert status == 201, body
    status, body = await call(sc, "DELETE", f"/admin/keys/{body['data']['id']}", key)
    assert status == 200 and body["data"]["state"] == "revoked"
    status, body = await call(sc, "GET", "/admin/keys", key)
    assert status == 200 and {k["owner"] for k in body["data"]} == {"ann"}
    for method, path in (("GET", f"/admin/keys/{bob.id}"), ("DELETE", f"/admin/keys/{bob.id}"),
                         ("PATCH", f"/admin/keys/{bob.id}"), ("POST", f"/admin/keys/{bob.id}/rotate"),
                         ("GET", f"/admin/keys/{bob.id}/usage"), ("GET", f"/admin/audit?key={bob.id}")):  # fmt: skip
        status, body = await call(sc, method, path, key, json={"name": "x"} if method == "PATCH" else None)
        assert status == 404, (method, path, body)
    # A broader key of the same owner is out of reach: no revoking the owner's other keys.
    status, body = await call(sc, "DELETE", f"/admin/keys/{broad.id}", key)
    assert status == 403 and body["error"]["code"] == "insufficient_permissions"
    assert (await sc.sc.store.get(broad.id)).state() == "active"  # type: ignore[union-attr]
    status, body = await call(sc, "POST", f"/admin/keys/{me.id}/quota", key, json={"used": 0})
    assert status == 403
    status, body = await call(sc, "DELETE", "/admin/cache", key)
    assert status == 403
    status, body = await call(sc, "GET", "/admin/audit", key)
    assert status == 200 and body["data"] and all(e["key"] != bob.id for e in body["data"])


async def test_full_admin_keys_and_the_admin_token_keep_full_power(two_upstreams: Running) -> None:
    """admin: full acts like the admin token: any owner, anything; and only they may grant it."""
    sc = two_upstreams
    _, full_key = await sc.create_key(name="ops", permissions={"admin": "full", "upstreams": ["plex"]})
    status, body = await call(sc, "POST", "/admin/keys", full_key, json={"name": "b", "owner": "bob"})
    assert status == 201, body
    status, body = await call(sc, "POST", "/admin/keys", full_key,
                              json={"name": "c", "permissions": {"admin": "full"}})  # fmt: skip
    assert status == 201 and body["data"]["permissions"]["admin"] == "full"
    _, dkey = await delegate(sc)
    status, body = await call(sc, "POST", "/admin/keys", dkey, json={**WITHIN, "permissions": {
        **WITHIN["permissions"], "admin": True}})  # fmt: skip
    assert status == 201, body  # a delegate may hand on what it holds: admin (delegate)
    status, body = await call(sc, "GET", "/admin/keys", full_key)
    assert {k["owner"] for k in body["data"]} >= {"ann", "bob"}


async def test_a_delegated_key_without_an_owner_manages_nothing(two_upstreams: Running) -> None:
    _, key = await two_upstreams.create_key(name="ownerless", permissions={"admin": True})
    status, body = await call(two_upstreams, "POST", "/admin/keys", key, json={"name": "x"})
    assert status == 403 and "no owner" in body["error"]["message"]


@pytest.mark.parametrize(
    ("child", "parent", "covered"),
    [
        ("/library/sections", "/library/*", True),
        ("/library/sections/*", "/library/*", True),
        ("/library*", "/library/*", False),  # /libraryX is not under /library/
        ("/a/[bc]", "/a/*", True),
        ("/*", "/library/*", False),
        ("*", "/*", False),
        ("/a/b", "/a/?", True),
        ("/a/?", "/a/b", False),
        ("/x/*/y", "/x/*/y", True),
        ("/x/a/y*", "/x/*/y*", False),  # sound, not complete: refused when in doubt
        ("anything", "*", True),
    ],
)
def test_glob_subset_is_conservative(child: str, parent: str, covered: bool) -> None:
    assert glob_covered(child, parent) is covered


MCP_PARENT = {"upstreams": ["assistant"], "tools": {"assistant": ["search_*"]},
              "resources": {"assistant": ["file:///docs/*"]}, "admin": True}  # fmt: skip


@pytest.mark.parametrize(
    ("child", "status"),
    [
        ({"tools": {"assistant": ["search_web"]}, "resources": {"assistant": ["file:///docs/a.md"]}}, 201),
        ({"tools": {"assistant": ["search_web"]}}, 201),  # naming tools only denies resources: narrower
        ({}, 403),  # no MCP limits at all: every tool, resource and prompt
        ({"tools": {"assistant": ["*"]}}, 403),
        ({"tools": {"*": ["search_*", "delete_*"]}}, 403),
        ({"tools": {"assistant": ["search_*"]}, "resources": {"assistant": ["secret://*"]}}, 403),
        ({"tools": {"assistant": ["search_*"]}, "resources": {"assistant": ["file:///*"]}}, 403),
        ({"tools": {"assistant": ["search_*"]}, "prompts": {"assistant": ["greet"]}}, 403),  # parent: no prompts
    ],
)
async def test_mcp_tools_resources_and_prompts_are_subset_checked(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, child: dict[str, Any], status: int
) -> None:
    """A delegate limited to search_* tools and file:///docs/* resources (so no prompts) may only
    hand on subsets of those, judged with the gateway's own rule for absent lists."""
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"].append({"id": "assistant", "kind": "mcp", "url": "http://127.0.0.1:9/mcp", "path_prefix": "/mcp"})
    sc = await make_sidecar(cfg)
    _, key = await sc.create_key(name="mcp-manager", owner="ann", permissions=MCP_PARENT)
    perms = {"upstreams": ["assistant"], **child}
    got, body = await call(sc, "POST", "/admin/keys", key, json={"name": "c", "permissions": perms})
    assert got == status, body
