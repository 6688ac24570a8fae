"""``keys.max_lifetime`` holds for keys written in a YAML keys file (GitOps), as for the admin API's.

An attacker's review found a keys-file entry with no ``expires_at`` (or one years past
``created_at + max_lifetime``) accepted forever. These tests run a real sidecar on a real keys
file and look at what the client sees: ``401 expired_key`` at the cap, across reloads and a
clock stepped back; the warning naming the key id, never its hash; ``sidecar config check``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, PLEX_TOKEN, MakeSidecar, Running, base_config

from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord, Permissions, iso
from sidecar.auth.verify import password_hasher
from sidecar.cli import main

CHEAP = password_hasher("cheapest")
DAY = 86400.0
LIFE = 30 * DAY
T0 = 1_800_000_000.0  # the sidecar's (fake) wall clock


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def new_key(**kw: Any) -> tuple[KeyRecord, str]:
    key, parts = generate_key("pmcp_")
    rec = KeyRecord(
        id=parts.key_id,
        name="gitops",
        hash=CHEAP.hash(parts.secret),
        display=display_form("pmcp_", parts.key_id, key),
        permissions=Permissions(upstreams=("plex",)),
        **kw,
    )
    return rec, key


def write_keys(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump({"keys": entries}, sort_keys=False))


async def start(make_sidecar: MakeSidecar, upstream: TestServer, tmp_path: Path, clock: Clock) -> Running:
    cfg = base_config(
        str(upstream.make_url("")).rstrip("/"),
        tmp_path,
        store={"kind": "yaml", "path": str(tmp_path / "keys.yaml"), "state_path": str(tmp_path / "state.db")},
        keys={"argon2": "cheapest", "max_lifetime": "30d"},
    )
    return await make_sidecar(cfg, clock=clock)


async def answer(running: Running, key: str) -> tuple[int, str]:
    resp = await running.proxy.get("/library/sections", headers={"X-Plex-Token": key})
    if resp.status < 400:
        return resp.status, "ok"
    return resp.status, str((await resp.json())["error"]["code"])


async def test_yaml_keys_live_no_longer_than_max_lifetime_from_created_at(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    old_forever, k_old = new_key(created_at=T0 - 31 * DAY)  # no expires_at: accepted forever before
    old_far, k_far = new_key(created_at=T0 - 31 * DAY, expires_at=T0 + 365 * DAY)
    young, k_young = new_key(created_at=T0 - DAY)
    young_far, k_young_far = new_key(created_at=T0 - DAY, expires_at=T0 + 365 * DAY)
    ageless, k_ageless = new_key()  # no created_at: its age cannot be counted
    entries = [r.to_dict() for r in (old_forever, old_far, young, young_far)]
    entries.append({k: v for k, v in ageless.to_dict().items() if k != "created_at"})
    future, k_future = new_key(created_at=T0 + 365 * DAY)  # would push the cap out at will
    entries.append(future.to_dict())
    write_keys(tmp_path / "keys.yaml", entries)
    running = await start(make_sidecar, plex_upstream, tmp_path, Clock())

    assert await answer(running, k_old) == (401, "expired_key")
    assert await answer(running, k_far) == (401, "expired_key")
    assert await answer(running, k_ageless) == (401, "expired_key")
    assert await answer(running, k_future) == (401, "expired_key")
    assert await answer(running, k_young) == (200, "ok")
    assert await answer(running, k_young_far) == (200, "ok")
    # The admin API shows the effective expiry, the same the verifier applies.
    resp = await running.admin.get(f"/admin/keys/{young_far.id}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert (await resp.json())["data"]["expires_at"] == iso(T0 - DAY + LIFE)


async def test_a_yaml_key_expiring_beyond_the_cap_ends_at_the_cap_and_stays_ended(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    clock = Clock()
    rec, key = new_key(created_at=T0 - LIFE + 60, expires_at=T0 + 365 * DAY)
    write_keys(tmp_path / "keys.yaml", [rec.to_dict()])
    running = await start(make_sidecar, plex_upstream, tmp_path, clock)
    assert await answer(running, key) == (200, "ok")
    clock.now = T0 + 61  # past created_at + max_lifetime, long before its own expires_at
    assert await answer(running, key) == (401, "expired_key")
    # A reload (SIGHUP; an edit of another field) and a wall clock stepped back revive nothing:
    # the re-read entry has the same capped expiry, so the verifier's "seen ended" latch holds.
    clock.now = T0 - 3600
    write_keys(tmp_path / "keys.yaml", [{**rec.to_dict(), "name": "renamed"}])
    assert await running.sc.verifier.refresh(force=True)
    assert await answer(running, key) == (401, "expired_key")
    # Only a later created_at (a new lifetime the operator writes) judges it afresh.
    clock.now = T0 + 61
    write_keys(tmp_path / "keys.yaml", [{**rec.to_dict(), "created_at": iso(T0)}])
    assert await running.sc.verifier.refresh(force=True)
    assert await answer(running, key) == (200, "ok")


async def test_the_cap_is_logged_once_naming_the_key_id_and_expiry_never_the_hash(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inside, _ = new_key(created_at=T0 - DAY, expires_at=T0 + DAY)
    capped, _ = new_key(created_at=T0 - DAY)
    write_keys(tmp_path / "keys.yaml", [inside.to_dict(), capped.to_dict()])
    with caplog.at_level(logging.WARNING, logger="sidecar.store"):
        running = await start(make_sidecar, plex_upstream, tmp_path, Clock())
        write_keys(tmp_path / "keys.yaml", [inside.to_dict(), {**capped.to_dict(), "name": "edited"}])
        assert await running.sc.verifier.refresh(force=True)
    said = [r.getMessage() for r in caplog.records if r.name == "sidecar.store" and r.levelno == logging.WARNING]
    assert len(said) == 1, said  # once, not again on a reload that keeps it
    assert f"keys[1] (id {capped.id})" in said[0] and iso(T0 - DAY + LIFE) in said[0]
    assert inside.id not in said[0]
    for rec in (inside, capped):
        assert rec.hash not in caplog.text and rec.hash.rsplit("$", 1)[1] not in caplog.text


def test_config_check_reports_yaml_keys_the_cap_shortens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    monkeypatch.setenv("PLEX_TOKEN", PLEX_TOKEN)
    now = time.time()
    capped, _ = new_key(created_at=now - 31 * DAY)
    fine, _ = new_key(created_at=now - DAY, expires_at=now + DAY)
    write_keys(tmp_path / "keys.yaml", [fine.to_dict(), capped.to_dict()])
    cfg = base_config("http://127.0.0.1:32400", tmp_path)
    cfg.update(
        store={"kind": "yaml", "path": str(tmp_path / "keys.yaml"), "state_path": str(tmp_path / "state.db")},
        keys={"argon2": "cheapest", "max_lifetime": "30d"},
        admin={"listen": "127.0.0.1:0"},
    )
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["config", "check", "-c", str(tmp_path / "sidecar.yaml")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "max_lifetime" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("warning: ") and f"keys[1] (id {capped.id})" in lines[0]
    assert iso(capped.created_at + LIFE) in lines[0] and capped.hash not in err and fine.id not in err
