"""Invariant 3 and "secrets never in a log line or an error": a key in the URL path, the ways around.

The key-in-path refusal (``http.keypath``) runs once the key has verified, and replaces the
logged path with a placeholder. A request that fails *before* it (an unknown, revoked or
expired key; a path no upstream serves) still carried the key in its path: the access log
redacts only key-shaped runs of hex, so a twice percent-encoded key (``%2570%256D…``) went
into the log as it was, and the 404 body echoed the decoded path. The Basic form's
base64 (``user:key``) in the path is the key too, and is refused like it.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeSidecar, Running, base_config, log_lines
from plexrig import Answer, Recorder, raw_request, recording_handler


def pct(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


def twice(text: str) -> str:
    return pct(text).replace("%", "%25")


def secrets_of(key: str) -> list[str]:
    return [key, pct(key), twice(key), key[5:], pct(key[5:]), twice(key[5:])]


@pytest.fixture
async def rig(make_sidecar: MakeSidecar, aiohttp_raw_server: Any, tmp_path: Path) -> tuple[Running, Recorder]:
    """Plex under /plex only: a path outside it is served by no upstream."""
    rec = Recorder()
    server = await aiohttp_raw_server(recording_handler(rec))
    cfg = base_config(str(server.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"][0]["path_prefix"] = "/plex"
    return await make_sidecar(cfg), rec


async def send(running: Running, target: str, headers: list[tuple[str, str]]) -> Answer:
    return await raw_request(running.proxy.server.host, running.proxy.server.port, "GET", target, headers)


def assert_clean(ans: Answer, key: str) -> None:
    for secret in secrets_of(key):
        assert secret.encode() not in ans.body, ans.body
        assert all(secret not in v for v in ans.headers.values())


async def no_key_in_log(tmp_path: Path, key: str, count: int) -> list[dict[str, Any]]:
    lines = await log_lines(tmp_path / "access.log", want=count)
    text = (tmp_path / "access.log").read_text()
    for secret in secrets_of(key):
        assert secret not in text, text
    return lines


@pytest.mark.parametrize("encode", [str, pct, twice], ids=["raw", "encoded", "encoded-twice"])
async def test_a_revoked_or_unknown_key_in_the_path_is_not_logged(
    rig: tuple[Running, Recorder], tmp_path: Path, encode: Any
) -> None:
    running, rec = rig
    record, revoked = await running.create_key()
    resp = await running.admin.delete(f"/admin/keys/{record.id}", headers=running.admin_headers())
    assert resp.status == 200
    unknown = revoked[:-4] + ("0000" if not revoked.endswith("0000") else "1111")
    for key in (revoked, unknown):
        ans = await send(running, f"/plex/library/{encode(key)}/x", [("X-Plex-Token", key)])
        assert ans.status == 401, ans.body
        assert_clean(ans, key)
    lines = await no_key_in_log(tmp_path, revoked, 2)
    await no_key_in_log(tmp_path, unknown, 2)
    assert [ln["path"] for ln in lines] == ["/plex/REDACTED", "/plex/REDACTED"]
    assert rec.seen == []


@pytest.mark.parametrize("encode", [str, pct, twice], ids=["raw", "encoded", "encoded-twice"])
async def test_a_key_in_a_path_no_upstream_serves_is_neither_echoed_nor_logged(
    rig: tuple[Running, Recorder], tmp_path: Path, encode: Any
) -> None:
    running, rec = rig
    _, key = await running.create_key()
    ans = await send(running, f"/nowhere/{encode(key)}", [("X-Plex-Token", key)])
    assert ans.status == 404, ans.body
    assert ans.json()["error"]["code"] == "no_route"
    assert_clean(ans, key)
    await no_key_in_log(tmp_path, key, 1)
    assert rec.seen == []


async def test_the_basic_credential_in_the_path_is_refused(rig: tuple[Running, Recorder], tmp_path: Path) -> None:
    """``Authorization: Basic base64(user:key)`` and that same base64 in the path: the key, readable upstream."""
    running, rec = rig
    _, key = await running.create_key(permissions={"upstreams": ["*"]})
    basic = base64.b64encode(f"me:{key}".encode()).decode()
    for target in (f"/plex/library/{basic}", f"/plex/library/{pct(basic)}"):
        ans = await send(running, target, [("Authorization", f"Basic {basic}")])
        assert ans.status == 400, ans.body
        assert basic.encode() not in ans.body
    assert rec.seen == []
    text = (tmp_path / "access.log").read_text() if (tmp_path / "access.log").exists() else ""
    assert basic not in text


@pytest.mark.parametrize("encode", [str, pct, twice], ids=["raw", "encoded", "encoded-twice"])
async def test_a_key_glued_to_the_prefix_by_an_encoded_slash_is_neither_echoed_nor_logged(
    rig: tuple[Running, Recorder], tmp_path: Path, encode: Any
) -> None:
    """``/plex%2F<key>`` routes to /plex once decoded, but its raw first segment is not the prefix:
    the 400 used to quote that segment, key and all, before the key-in-path check ran."""
    running, rec = rig
    _, key = await running.create_key(permissions={"upstreams": ["*"]})
    ans = await send(running, f"/plex%2F{encode(key)}/x", [("X-Plex-Token", key)])
    assert ans.status == 400, ans.body
    assert_clean(ans, key)
    await no_key_in_log(tmp_path, key, 1)
    assert rec.seen == []


@pytest.mark.parametrize("prefix", ["/plex/library/sections", "/nowhere"])
async def test_a_twice_encoded_key_in_the_query_is_not_logged(
    rig: tuple[Running, Recorder], tmp_path: Path, prefix: str
) -> None:
    """The query loses the key on the way up, but the log kept the target as sent: the access log's
    key-shaped-run filter does not see through ``%25``, so ``?foo=%2570%256D…`` was logged whole."""
    running, rec = rig
    _, key = await running.create_key(permissions={"upstreams": ["*"]})
    targets = [f"{prefix}?foo={twice(key)}", f"{prefix}?url=/x%3Ffoo%3D{twice(key)}"]
    for target in targets:
        ans = await send(running, target, [("X-Plex-Token", key)])
        assert ans.status in (200, 404), ans.body
        assert_clean(ans, key)
    await no_key_in_log(tmp_path, key, len(targets))
    assert all(key not in s.target and twice(key) not in s.target for s in rec.seen)
