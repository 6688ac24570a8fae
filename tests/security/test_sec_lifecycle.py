"""Key lifecycle limits under attack (issue 20.1-20.3, 14.12; DESIGN invariant 10).

- the owner key limit holds for parallel creates (admin API and separate CLI processes);
- rotation is count-neutral and atomic (parallel rotations make one successor);
- a PATCH racing a revoke cannot resurrect the key;
- ``max_lifetime`` is counted from creation: a PATCH loop cannot extend a key;
- admin query and body numbers that are huge, negative, not numbers or repeated are 400s.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config

from sidecar.auth.models import parse_time
from sidecar.store import SqliteStore

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DAY = 86400.0


async def call(running: Running, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    kw.setdefault("headers", H)
    resp = await running.admin.request(method, path, **kw)
    body = await resp.json()
    return resp.status, body


async def limited(make_sidecar: MakeSidecar, upstream: TestServer, tmp_path: Path, **keys: Any) -> Running:
    cfg = base_config(str(upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["keys"] = {"argon2": "cheapest", **keys}
    return await make_sidecar(cfg)


def counting(keys: list[dict[str, Any]], owner: str) -> list[dict[str, Any]]:
    """The owner's keys that count for max_keys_per_owner: active and not rotated away."""
    return [k for k in keys if k["owner"] == owner and k["state"] == "active" and not k["rotated_to"]]


# ------------------------------------------------------------------ 20.1 owner limit race


async def test_parallel_creates_through_the_admin_api_respect_the_owner_limit(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Twelve parallel POST /admin/keys for one owner at max_keys_per_owner 2: exactly two get
    201, the other ten get 409 conflict (before the fix all twelve got 201)."""
    sc = await limited(make_sidecar, plex_upstream, tmp_path, max_keys_per_owner=2)
    results = await asyncio.gather(
        *(call(sc, "POST", "/admin/keys", json={"name": f"k{i}", "owner": "mallory"}) for i in range(12))
    )
    statuses = sorted(s for s, _ in results)
    assert statuses == [201] * 2 + [409] * 10, statuses
    assert all(b["error"]["code"] == "conflict" for s, b in results if s == 409)
    _, listed = await call(sc, "GET", "/admin/keys")
    assert len(counting(listed["data"], "mallory")) == 2


def _cli(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", "keys", *args, "-c", str(cfg), "--json"]


async def test_parallel_creates_from_several_cli_processes_respect_the_owner_limit(tmp_path: Path) -> None:
    """Four `sidecar keys create` processes at once on one SQLite file, max_keys_per_owner 2:
    exactly two print a key (exit 0), the other two exit 1 with the conflict message."""
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "admin": {"listen": "127.0.0.1:0"},
                "store": {"kind": "sqlite", "path": str(tmp_path / "sidecar.db")},
                "keys": {"argon2": "cheapest", "max_keys_per_owner": 2},
                "upstreams": [{"id": "plex", "kind": "plex", "url": "http://127.0.0.1:9", "token_env": "PLEX_TOKEN"}],
            }
        )
    )
    # Create the file first, so the processes race on the limit rather than on migrating it.
    store = SqliteStore(tmp_path / "sidecar.db")
    await store.open()
    await store.close()
    procs = [
        await asyncio.create_subprocess_exec(
            *_cli(cfg, "create", "--name", f"k{i}", "--owner", "mallory"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        for i in range(4)
    ]
    outs = [await p.communicate() for p in procs]
    codes = sorted(p.returncode or 0 for p in procs)
    assert codes == [0, 0, 1, 1], [o[1].decode() for o in outs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode:
            assert "maximum of 2 active keys" in err.decode()
    await store.open()
    try:
        assert await store.count_active("mallory") == 2
    finally:
        await store.close()


async def test_patching_keys_onto_a_full_owner_in_parallel_is_refused(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Moving keys to another owner is the same race: eight parallel PATCH {"owner"} onto an
    owner with room for one more give one 200 and seven 409."""
    sc = await limited(make_sidecar, plex_upstream, tmp_path, max_keys_per_owner=2)
    await sc.create_key(owner="ann")
    ids = [(await sc.create_key(name=f"free{i}"))[0].id for i in range(8)]
    results = await asyncio.gather(*(call(sc, "PATCH", f"/admin/keys/{i}", json={"owner": "ann"}) for i in ids))
    assert sorted(s for s, _ in results) == [200] + [409] * 7


async def test_an_expired_key_cannot_be_revived_past_the_owner_limit(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """An expired key does not count; giving it a new expiry makes it count again, so at the
    limit that PATCH is 409, not a third working key."""
    now = [1_800_000_000.0]
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["keys"] = {"argon2": "cheapest", "max_keys_per_owner": 2}
    sc = await make_sidecar(cfg, clock=lambda: now[0])
    old, _ = await sc.create_key(owner="ann", expires="1d")
    now[0] += 2 * DAY
    await sc.create_key(owner="ann")
    await sc.create_key(owner="ann")
    status, body = await call(sc, "PATCH", f"/admin/keys/{old.id}", json={"expires": "30d"})
    assert status == 409, body


# ------------------------------------------------------------------ 20.2 rotation


async def test_rotation_at_the_limit_is_count_neutral_and_parallel_rotations_make_one_key(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """At the limit, rotating works (the replaced key, living out its grace, stops counting as its
    successor starts); eight parallel rotations of one key make exactly one successor (201) and
    seven 409s, so rotation cannot multiply keys; a create during the grace is still 409."""
    sc = await limited(make_sidecar, plex_upstream, tmp_path, max_keys_per_owner=2)
    a, a_key = await sc.create_key(owner="ann")
    await sc.create_key(owner="ann")
    results = await asyncio.gather(
        *(call(sc, "POST", f"/admin/keys/{a.id}/rotate", json={"grace": "1h"}) for _ in range(8))
    )
    assert sorted(s for s, _ in results) == [201] + [409] * 7
    _, listed = await call(sc, "GET", "/admin/keys")
    ann = [k for k in listed["data"] if k["owner"] == "ann"]
    assert len(ann) == 3 and len(counting(ann, "ann")) == 2
    assert (await sc.proxy.get("/identity", headers={"X-Plex-Token": a_key})).status == 200  # grace
    status, body = await call(sc, "POST", "/admin/keys", json={"name": "third", "owner": "ann"})
    assert status == 409 and body["error"]["code"] == "conflict"
    # The CLI and the API share KeyManager: the same rule for `sidecar keys rotate`.
    (new_id,) = [b["data"]["id"] for s, b in results if s == 201]
    await sc.sc.manager().rotate(new_id, "cli", 60.0)
    assert await sc.sc.store.count_active("ann") == 2


async def test_a_patch_racing_a_revoke_never_resurrects_the_key(plex_sidecar: Running) -> None:
    """PATCH reads, changes and writes the key in one transaction: however a revoke and
    renames interleave, the key ends revoked (it used to come back active)."""
    for _ in range(5):
        rec, key = await plex_sidecar.create_key()
        ops = [call(plex_sidecar, "PATCH", f"/admin/keys/{rec.id}", json={"name": f"n{i}"}) for i in range(6)]
        ops.insert(3, call(plex_sidecar, "DELETE", f"/admin/keys/{rec.id}"))
        results = await asyncio.gather(*ops)
        assert {s for s, _ in results} <= {200, 409}
        _, shown = await call(plex_sidecar, "GET", f"/admin/keys/{rec.id}")
        assert shown["data"]["state"] == "revoked"
        assert (await plex_sidecar.proxy.get("/identity", headers={"X-Plex-Token": key})).status == 401


# ------------------------------------------------------------------ 20.3 lifetime from creation


async def test_a_patch_loop_cannot_carry_a_key_past_created_plus_max_lifetime(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """With max_lifetime 30d, PATCH {"expires": null} or {"expires": "30d"} every five days used
    to push the expiry out forever; now the expiry never passes created + 30d, a PATCH asking
    for more is 400, shortening works, and once the 30 days are up the key stays expired."""
    now = [1_800_000_000.0]
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["keys"] = {"argon2": "cheapest", "max_lifetime": "30d"}
    sc = await make_sidecar(cfg, clock=lambda: now[0])
    rec, key = await sc.create_key()
    created = rec.created_at
    assert rec.expires_at == created + 30 * DAY
    for _ in range(5):
        now[0] += 5 * DAY
        status, body = await call(sc, "PATCH", f"/admin/keys/{rec.id}", json={"expires": None})
        assert status == 200, body
        assert parse_time(body["data"]["expires_at"]) == created + 30 * DAY
        status, body = await call(sc, "PATCH", f"/admin/keys/{rec.id}", json={"expires": "30d"})
        assert status == 400 and "maximum key lifetime" in body["error"]["message"]
    status, body = await call(sc, "PATCH", f"/admin/keys/{rec.id}", json={"expires": "1d"})
    assert status == 200 and parse_time(body["data"]["expires_at"]) == now[0] + DAY  # shortening is fine
    now[0] = created + 31 * DAY
    status, body = await call(sc, "PATCH", f"/admin/keys/{rec.id}", json={"expires": None})
    assert status == 400 and "reached the maximum key lifetime" in body["error"]["message"]
    status, body = await call(sc, "PATCH", f"/admin/keys/{rec.id}", json={"expires": "1d"})
    assert status == 400
    resp = await sc.proxy.get("/identity", headers={"X-Plex-Token": key})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "expired_key"


# ------------------------------------------------------------------ 14.12 numbers in admin input


@pytest.mark.parametrize(
    "path",
    [
        "/admin/audit?limit=99999999999999999999",
        "/admin/audit?limit=-1",
        "/admin/audit?limit=0",
        "/admin/audit?limit=ten",
        "/admin/audit?limit=1e3",
        "/admin/audit?limit=%201",
        "/admin/audit?limit=1&limit=2",
        "/admin/audit?key=a&key=b",
        "/admin/keys/{id}/usage?days=99999999999999999999",
        "/admin/keys/{id}/usage?days=-5",
        "/admin/keys/{id}/usage?days=1&days=2",
        "/admin/keys/{id}/usage?days=",
    ],
)
async def test_bad_numbers_in_admin_queries_are_400(plex_sidecar: Running, path: str) -> None:
    """A 20-digit, negative, zero, non-numeric or repeated number is 400 bad_request, never a 500
    (limit=99999999999999999999 overflowed SQLite) nor a negative LIMIT that means "all"."""
    rec, _ = await plex_sidecar.create_key()
    status, body = await call(plex_sidecar, "GET", path.replace("{id}", rec.id))
    assert status == 400, body
    assert body["error"]["code"] == "bad_request"


@pytest.mark.parametrize(
    ("method", "suffix", "raw"),
    [
        ("PATCH", "", '{"expires": 1e20}'),
        ("PATCH", "", '{"expires": 100000000000000000000000000000000000000000000000}'),
        ("PATCH", "", '{"expires": "99999999999d"}'),
        ("PATCH", "", '{"expires": Infinity}'),
        ("PATCH", "", '{"concurrency": 100000000000000000000}'),
        ("PATCH", "", '{"owner": "%s"}' % ("o" * 201)),  # the owner is a metrics label
        ("PATCH", "", '{"description": "%s"}' % ("d" * 2001)),
        ("POST", "/rotate", '{"grace": 1e999}'),
        ("POST", "/rotate", '{"grace": NaN}'),
        ("POST", "/rotate", '{"grace": 99999999999999999999}'),
        ("POST", "/rotate", '{"grace": -1}'),
        ("POST", "/quota", '{"used": 100000000000000000000}'),
        ("POST", "/quota", '{"add": -100000000000000000000}'),
    ],
)
async def test_bad_numbers_in_admin_bodies_are_400(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, method: str, suffix: str, raw: str
) -> None:
    """Huge, infinite or NaN numbers in bodies are 400 bad_request; nothing is stored that would
    make every later GET /admin/keys a 500 (an expiry in the year 3 000 000 cannot be shown)."""
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["rate_limits"] = {"quota": "1000/day"}
    sc = await make_sidecar(cfg)
    rec, _ = await sc.create_key()
    headers = {**H, "Content-Type": "application/json"}
    status, body = await call(sc, method, f"/admin/keys/{rec.id}{suffix}", data=raw, headers=headers)
    assert status == 400, body
    assert body["error"]["code"] == "bad_request"
    status, _ = await call(sc, "GET", "/admin/keys")
    assert status == 200
