"""Authorization: upstreams, methods, path globs, the Plex presets, token-minting endpoints,
and the limits on who may hold how many keys for how long."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config

from sidecar.auth.models import Permissions
from sidecar.auth.permissions import allowed, normalize_path, tool_allowed
from sidecar.core.errors import BadRequest, Conflict
from sidecar.demo import SEEN


def perms(**kw: Any) -> Permissions:
    return Permissions.from_dict(kw)


READ = perms(upstreams=["plex"], paths=["plex:read"])
PLAYBACK = perms(upstreams=["plex"], paths=["plex:playback"])
ADMIN_PATHS = perms(upstreams=["plex"], paths=["plex:admin"])
ADMIN = perms(upstreams=["*"], admin=True)
ANY = perms()

# (permissions, method, path, allowed?)
CASES: list[tuple[Permissions, str, str, bool]] = [
    # plex:read: browse, search, artwork
    (READ, "GET", "/", True),
    (READ, "GET", "/identity", True),
    (READ, "GET", "/library/sections", True),
    (READ, "GET", "/library/sections/1/all", True),
    (READ, "HEAD", "/library/metadata/100/thumb/1700000000", True),
    (READ, "GET", "/hubs/search?query=bunny", True),
    (READ, "GET", "/photo/:/transcode", True),
    (READ, "GET", "/:/websockets/notifications", True),
    # ... read is not GET-only: these GETs change state or hand out the media
    (READ, "GET", "/library/sections/1/refresh", False),
    (READ, "GET", "/library/sections/1/Refresh", False),
    (READ, "GET", "/library/metadata/100/analyze", False),
    (READ, "GET", "/library/sections/1/emptyTrash", False),
    (READ, "GET", "/library/optimize", False),
    (READ, "GET", "/library/clean/bundles", False),
    (READ, "GET", "/library/metadata/100/matches", False),
    (READ, "GET", "/library/parts/300/file.mp4", False),
    (READ, "GET", "/:/scrobble", False),
    (READ, "GET", "/:/timeline", False),
    (READ, "GET", "/video/:/transcode/universal/start.m3u8", False),
    (READ, "PUT", "/library/sections/1/all", False),
    (READ, "DELETE", "/library/metadata/100", False),
    (READ, "GET", "/:/prefs", False),
    (READ, "GET", "/accounts", False),
    # plex:playback = read + streaming, transcode, timeline, scrobble
    (PLAYBACK, "GET", "/library/sections", True),
    (PLAYBACK, "GET", "/library/parts/300/file.mp4", True),
    (PLAYBACK, "GET", "/video/:/transcode/universal/start.m3u8", True),
    (PLAYBACK, "GET", "/video/:/transcode/universal/session/abc/base/index.m3u8", True),
    (PLAYBACK, "GET", "/:/timeline", True),
    (PLAYBACK, "GET", "/:/scrobble", True),
    (PLAYBACK, "POST", "/playQueues", True),
    (PLAYBACK, "GET", "/library/sections/1/refresh", False),
    (PLAYBACK, "GET", "/:/prefs", False),
    # plex:admin: everything but token minting, which only the admin permission opens
    (ADMIN_PATHS, "GET", "/library/sections/1/refresh", True),
    (ADMIN_PATHS, "PUT", "/:/prefs", True),
    (ADMIN_PATHS, "GET", "/security/token", False),
    (ADMIN_PATHS, "GET", "/security/resources", False),
    (ADMIN_PATHS, "GET", "/myplex/account", False),
    (ANY, "GET", "/security/token", False),
    (ANY, "GET", "/Security/Token", False),
    (ANY, "GET", "//security/token", False),
    (ANY, "GET", "/myplex", False),
    (perms(paths=["/security/*"]), "GET", "/security/token", False),
    (ADMIN, "GET", "/security/token", True),
    (ADMIN, "GET", "/myplex/account", True),
    # raw globs, methods, upstreams
    (perms(paths=["/library/sections*"]), "GET", "/library/sections/1/all", True),
    (perms(paths=["/library/sections*"]), "GET", "/identity", False),
    (perms(paths=["/library/sections"]), "GET", "/library/sections/1", False),
    (perms(methods=["GET"]), "GET", "/identity", True),
    (perms(methods=["GET"]), "HEAD", "/identity", True),
    (perms(methods=["GET"]), "POST", "/identity", False),
    (perms(upstreams=["other"]), "GET", "/identity", False),
    (perms(upstreams=["*"]), "GET", "/identity", True),
    # paths that would judge one path and serve another
    (READ, "GET", "/library/sections/../../security/token", False),
    (ANY, "GET", "/library/../:/prefs", False),
    (ANY, "GET", "/library/%2e%2e/:/prefs", False),
    (ANY, "GET", "/library/./sections", False),
    (READ, "GET", "/library//sections", True),
]


@pytest.mark.parametrize(("p", "method", "path", "ok"), CASES)
def test_allowed_table(p: Permissions, method: str, path: str, ok: bool) -> None:
    reason = allowed(p, "plex", "plex", method, path.split("?")[0])
    assert (reason is None) is ok, reason


def test_reasons_say_what_was_refused() -> None:
    assert "upstream 'plex'" in (allowed(perms(upstreams=["mcp"]), "plex", "plex", "GET", "/") or "")
    assert "method POST" in (allowed(perms(methods=["GET"]), "plex", "plex", "POST", "/") or "")
    assert "admin permission" in (allowed(ANY, "plex", "plex", "GET", "/security/token") or "")
    assert "path /x" in (allowed(perms(paths=["/y"]), "plex", "plex", "GET", "/x") or "")


def test_token_minting_is_a_plex_rule_only() -> None:
    assert allowed(ANY, "mcp", "mcp", "GET", "/security/token") is None


def test_star_includes_upstreams_added_later() -> None:
    assert allowed(perms(upstreams=["*"]), "added-tomorrow", "mcp", "POST", "/mcp") is None


def test_tools() -> None:
    p = perms(tools={"mcp": ["search_*", "get_item"]})
    assert tool_allowed(p, "mcp", "search_library")
    assert tool_allowed(p, "mcp", "get_item")
    assert not tool_allowed(p, "mcp", "delete_item")
    assert tool_allowed(p, "other", "anything")
    assert tool_allowed(perms(tools={"*": ["x"]}), "mcp", "x")
    assert not tool_allowed(perms(tools={"*": ["x"]}), "mcp", "y")


def test_normalize_path() -> None:
    assert normalize_path("/a//b///c") == "/a/b/c"
    assert normalize_path("/a\\b") == "/a/b"
    for bad in ("/a/../b", "/a/./b", "/..", "/a/%2E%2E/b", "/a/.%2e/b"):
        assert normalize_path(bad) is None, bad
    assert normalize_path("/a/..b/c.d") == "/a/..b/c.d"


# ---------------------------------------------------------------------------- end to end


async def test_read_key_through_the_proxy(plex_sidecar: Running, plex_upstream: TestServer) -> None:
    _, ro = await plex_sidecar.create_key(permissions={"upstreams": ["plex"], "paths": ["plex:read"]})
    h = {"X-Plex-Token": ro}
    assert (await plex_sidecar.proxy.get("/library/sections", headers=h)).status == 200
    for path in ("/library/sections/1/refresh", "/security/token", "/library/parts/300/file.mp4"):
        resp = await plex_sidecar.proxy.get(path, headers=h)
        assert resp.status == 403, path
        assert (await resp.json())["error"]["code"] == "insufficient_permissions"
    assert [s["path"] for s in plex_upstream.app[SEEN]] == ["/library/sections"]


async def test_token_minting_needs_the_admin_permission(plex_sidecar: Running, plex_upstream: TestServer) -> None:
    _, everything = await plex_sidecar.create_key(permissions={"upstreams": ["*"], "paths": ["plex:admin", "/*"]})
    resp = await plex_sidecar.proxy.get("/security/token", headers={"X-Plex-Token": everything})
    assert resp.status == 403
    _, admin = await plex_sidecar.create_key(permissions={"upstreams": ["*"], "admin": True})
    resp = await plex_sidecar.proxy.get("/security/token", headers={"X-Plex-Token": admin})
    assert resp.status == 200
    # Even then the minted token is the real one, which the sidecar scrubs from the body.
    body = await resp.text()
    assert "real-plex-token" not in body


async def test_dot_segments_never_reach_the_upstream(plex_sidecar: Running, plex_upstream: TestServer) -> None:
    _, ro = await plex_sidecar.create_key(permissions={"upstreams": ["plex"], "paths": ["plex:read"]})
    server = plex_sidecar.proxy.server
    for raw in ("/library/sections/../../security/token", "/library/%2e%2e/security/token", "//security/token"):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(f"GET {raw} HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {ro}\r\nConnection: close\r\n\r\n".encode())
        status = (await reader.read()).split(b"\r\n", 1)[0]
        writer.close()
        await writer.wait_closed()
        assert b" 403 " in status, (raw, status)
    assert plex_upstream.app[SEEN] == []


# ---------------------------------------------------------------------------- owners and lifetimes


async def test_max_keys_per_owner(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> None:
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, keys={"argon2": "cheapest",
                                                                                 "max_keys_per_owner": 2})  # fmt: skip
    running = await make_sidecar(cfg)
    m = running.sc.manager()
    a, _ = await m.create({"name": "a", "owner": "ann"}, "t")
    await m.create({"name": "b", "owner": "ann"}, "t")
    with pytest.raises(Conflict, match="maximum of 2"):
        await m.create({"name": "c", "owner": "ann"}, "t")
    await m.create({"name": "d", "owner": "bob"}, "t")  # per owner
    other, _ = await m.create({"name": "e"}, "t")  # no owner: no limit
    with pytest.raises(Conflict):
        await m.patch(other.id, {"owner": "ann"}, "t")  # moving a key to ann counts too
    await m.revoke(a.id, "t")  # revoked keys stay listed but do not count
    await m.create({"name": "c", "owner": "ann"}, "t")
    # Through the admin API: the same rule, as a 409 in the contract shape.
    resp = await running.admin.post("/admin/keys", json={"name": "f", "owner": "ann"}, headers=running.admin_headers())
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "conflict"


async def test_max_lifetime_caps_expiry(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> None:
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, keys={"argon2": "cheapest",
                                                                                 "max_lifetime": "30d"})  # fmt: skip
    running = await make_sidecar(cfg)
    m = running.sc.manager()
    now = time.time()
    forever, _ = await m.create({"name": "no expiry asked"}, "t")
    assert forever.expires_at is not None and abs(forever.expires_at - (now + 30 * 86400)) < 60
    short, _ = await m.create({"name": "short", "expires": "7d"}, "t")
    assert short.expires_at is not None and abs(short.expires_at - (now + 7 * 86400)) < 60
    with pytest.raises(BadRequest, match="maximum key lifetime"):
        await m.create({"name": "long", "expires": "90d"}, "t")
    with pytest.raises(BadRequest, match="maximum key lifetime"):
        await m.patch(short.id, {"expires": "365d"}, "t")
    patched = await m.patch(short.id, {"expires": "never"}, "t")  # "never" becomes the maximum
    assert patched.expires_at is not None and abs(patched.expires_at - (now + 30 * 86400)) < 60
    with pytest.raises(BadRequest, match="in the future"):
        await m.create({"name": "past", "expires": "2001-01-01"}, "t")
