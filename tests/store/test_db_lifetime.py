"""``keys.max_lifetime`` lowered (or first set) holds for keys a database store already holds.

The admin API caps a key's expiry when it is written, with the cap configured then. A key created
a year ago without expiry kept working after ``max_lifetime: 30d`` was set and the sidecar
restarted. These tests write keys straight into a real SQLite (and PostgreSQL) store, as an older
sidecar would have, start a real sidecar with the cap and look at what the client sees:
``401 expired_key`` past ``created_at + max_lifetime``, the admin API's effective expiry, a latch
that holds across polls and a clock stepped back, one log line naming the key id, never its hash.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config
from pg_support import pg_dsn, pg_server
from test_yaml_lifetime import DAY, LIFE, T0, Clock, new_key

from sidecar.auth.models import KeyRecord, iso
from sidecar.store.postgres import PostgresStore
from sidecar.store.sqlite import SqliteStore

__all__ = ["pg_dsn", "pg_server"]  # the fixtures, re-exported for pytest

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def written_before(path: Path, records: list[KeyRecord]) -> None:
    """Keys as an older sidecar (no ``max_lifetime`` then) left them in the database."""
    store = SqliteStore(path)
    await store.open()
    try:
        await store.insert(records)
    finally:
        await store.close()


async def answer(running: Running, key: str) -> tuple[int, str]:
    resp = await running.proxy.get("/library/sections", headers={"X-Plex-Token": key})
    if resp.status < 400:
        return resp.status, "ok"
    return resp.status, str((await resp.json())["error"]["code"])


def capped_config(upstream: TestServer, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return base_config(
        str(upstream.make_url("")).rstrip("/"), tmp_path, keys={"argon2": "cheapest", "max_lifetime": "30d"}, **kw
    )


async def test_existing_sqlite_keys_live_no_longer_than_a_max_lifetime_set_later(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, k_old = new_key(created_at=T0 - 365 * DAY)  # no expiry: accepted forever before
    old_far, k_far = new_key(created_at=T0 - 31 * DAY, expires_at=T0 + 365 * DAY)
    young, k_young = new_key(created_at=T0 - DAY)
    young_near, k_near = new_key(created_at=T0 - DAY, expires_at=T0 + DAY)
    await written_before(tmp_path / "sidecar.db", [old, old_far, young, young_near])
    with caplog.at_level(logging.WARNING, logger="sidecar.store"):
        running = await make_sidecar(capped_config(plex_upstream, tmp_path), clock=Clock())
        assert await answer(running, k_old) == (401, "expired_key")
        assert await answer(running, k_far) == (401, "expired_key")
        assert await answer(running, k_young) == (200, "ok")
        assert await answer(running, k_near) == (200, "ok")
        # The admin API (one key, the list) shows the effective expiry the verifier applies.
        one = await (await running.admin.get(f"/admin/keys/{young.id}", headers=ADMIN)).json()
        assert one["data"]["expires_at"] == iso(T0 - DAY + LIFE)
        listed = {k["id"]: k for k in (await (await running.admin.get("/admin/keys", headers=ADMIN)).json())["data"]}
        assert listed[old.id]["expires_at"] == iso(T0 - 365 * DAY + LIFE)
        assert listed[young_near.id]["expires_at"] == iso(T0 + DAY)  # inside the cap: as written
        # A PATCH answers with the effective expiry too, and writes no capped value back.
        patched = await running.admin.patch(f"/admin/keys/{young.id}", json={"name": "renamed"}, headers=ADMIN)
        assert (await patched.json())["data"]["expires_at"] == iso(T0 - DAY + LIFE)
        assert await running.sc.verifier.refresh(force=True)  # a SIGHUP re-read says nothing again
    said = [r.getMessage() for r in caplog.records if r.name == "sidecar.store" and r.levelno == logging.WARNING]
    assert sorted(said) == sorted(s for s in said if any(r.id in s for r in (old, old_far, young)))
    assert len(said) == 3, said  # once per shortened key, not per read
    assert any(young.id in s and iso(T0 - DAY + LIFE) in s for s in said)
    assert young_near.id not in caplog.text
    for rec in (old, old_far, young, young_near):
        assert rec.hash not in caplog.text and rec.hash.rsplit("$", 1)[1] not in caplog.text
    # The database keeps what the operator wrote: nothing capped is written back.
    raw = SqliteStore(tmp_path / "sidecar.db")
    await raw.open()
    try:
        assert (await raw.get(old.id)).expires_at is None  # type: ignore[union-attr]
        assert (await raw.get(old_far.id)).expires_at == T0 + 365 * DAY  # type: ignore[union-attr]
        assert (await raw.get(young.id)).expires_at is None  # type: ignore[union-attr]
    finally:
        await raw.close()


async def test_a_capped_database_key_stays_ended_across_polls_and_a_clock_stepped_back(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    clock = Clock()
    rec, key = new_key(created_at=T0 - LIFE + 60)
    await written_before(tmp_path / "sidecar.db", [rec])
    running = await make_sidecar(capped_config(plex_upstream, tmp_path), clock=clock)
    assert await answer(running, key) == (200, "ok")
    clock.now = T0 + 61  # past created_at + max_lifetime; the key itself has no expiry
    assert await answer(running, key) == (401, "expired_key")
    # Another process edits the key (a new row version the poll brings), the clock steps back:
    # the re-read record has the same capped expiry, so the "seen ended" latch holds.
    clock.now = T0 - 3600
    await running.sc.store.update(rec.with_changes(name="renamed"))  # the stored record: no expiry
    assert await running.sc.verifier.refresh()
    assert running.sc.verifier.table[rec.id].name == "renamed"
    assert await answer(running, key) == (401, "expired_key")
    assert await running.sc.verifier.refresh(force=True)
    assert await answer(running, key) == (401, "expired_key")


async def test_existing_postgres_keys_are_capped_at_load_and_as_polls_bring_them(
    pg_dsn: str, make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    old, k_old = new_key(created_at=T0 - 365 * DAY)
    young, k_young = new_key(created_at=T0 - DAY)
    raw = PostgresStore(pg_dsn, listen=False)
    await raw.open()
    try:
        await raw.insert([old, young])
        cfg = capped_config(plex_upstream, tmp_path, store={"kind": "postgres", "dsn_env": "SIDECAR_DATABASE_URL"})
        running = await make_sidecar(cfg, extra_env={"SIDECAR_DATABASE_URL": pg_dsn}, clock=Clock())
        assert await answer(running, k_old) == (401, "expired_key")
        assert await answer(running, k_young) == (200, "ok")
        one = await (await running.admin.get(f"/admin/keys/{young.id}", headers=ADMIN)).json()
        assert one["data"]["expires_at"] == iso(T0 - DAY + LIFE)
        # A key another process writes later (LISTEN/NOTIFY, poll) is capped as it arrives.
        late, k_late = new_key(created_at=T0 - 40 * DAY)
        await raw.insert([late])
        assert await running.sc.verifier.refresh(force=True)
        assert await answer(running, k_late) == (401, "expired_key")
        assert (await raw.get(old.id)).expires_at is None  # type: ignore[union-attr]  # not written back
    finally:
        await raw.close()
