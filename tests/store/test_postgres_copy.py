"""``sidecar store copy`` (SQLite <-> PostgreSQL) and ``sidecar store migrate``, run as the
operator runs them: the real command in a child process, against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, base_config
from pg_support import PgServer, pg_dsn, pg_server

from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord, Permissions
from sidecar.auth.verify import password_hasher
from sidecar.store import SqliteStore
from sidecar.store.base import AuditEvent, UsageRow
from sidecar.store.copy import Endpoint, parse_endpoint, read_store
from sidecar.store.postgres_schema import SCHEMA_VERSION

HASHER = password_hasher("cheapest")

__all__ = ["pg_dsn", "pg_server"]  # the fixtures, re-exported for pytest


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("PGDSN", "SIDECAR_DATABASE_URL")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, env=full,
                          timeout=60, check=False)  # fmt: skip


async def installation(path: Path) -> tuple[str, KeyRecord]:
    """A SQLite installation with something of every kind; a working client key of it."""
    key, parts = generate_key("pmcp_")
    perms = Permissions(upstreams=("plex",), paths=("plex:read",))
    live = KeyRecord(id=parts.key_id, name="tv", hash=HASHER.hash(parts.secret),
                     display=display_form("pmcp_", parts.key_id, key), owner="ann", permissions=perms,
                     quota="1000/month", created_at=1_700_000_000.0)  # fmt: skip
    _, p2 = generate_key("pmcp_")
    old = KeyRecord(id=p2.key_id, name="old", hash=HASHER.hash(p2.secret), display="pmcp_…", revoked_at=1_700_000_100.0,
                    rate_limits=("60/minute",), upstream_token_env={"plex": "PLEX_TOKEN_KIDS"})  # fmt: skip
    s = SqliteStore(path)
    await s.open()
    try:
        await s.insert([live, old])
        await s.record_last_used({live.id: (1_700_000_500.0, "192.0.2.7")})
        await s.add_usage({(live.id, "2026-11-01"): UsageRow(10, 1, 2048, 2), (old.id, "2026-10-31"): UsageRow(3)})
        await s.add_quota({(live.id, "plex", "month:2026-11-01T00:00:00Z"): 10})
        for i, action in enumerate(("created", "patched", "revoked")):
            await s.audit(AuditEvent(1_700_000_000.0 + i, "admin", action, live.id if i < 2 else old.id, {"i": i}))
    finally:
        await s.close()
    return key, live


async def test_copy_sqlite_to_postgres_and_back_round_trips(
    tmp_path: Path, pg_server: PgServer, pg_dsn: str, make_sidecar: MakeSidecar, plex_upstream: TestServer
) -> None:
    src = tmp_path / "old.db"
    key, live = await installation(src)
    env = {"PGDSN": pg_dsn}
    done = cli("store", "copy", "--from", f"sqlite:{src}", "--to", "postgres:PGDSN", env=env)
    assert done.returncode == 0, done.stderr
    assert "copied 2 keys, 2 usage, 1 quota, 3 audit" in done.stdout
    assert pg_server.password not in done.stdout + done.stderr and f"127.0.0.1:{pg_server.port}" in done.stdout
    # Run again: the target is not empty, nothing is doubled.
    again = cli("store", "copy", "--from", f"sqlite:{src}", "--to", "postgres:PGDSN", env=env)
    assert again.returncode == 1 and "is not empty (2 keys, 2 usage, 1 quota, 3 audit)" in again.stderr
    assert pg_server.password not in again.stderr
    # And back into a fresh SQLite file: the same installation, to the audit trail's order.
    back = tmp_path / "back.db"
    done = cli("store", "copy", "--from", "postgres:PGDSN", "--to", f"sqlite:{back}", "--json", env=env)
    assert done.returncode == 0, done.stderr
    original, moved = await read_store(Endpoint("sqlite", str(src))), await read_store(Endpoint("sqlite", str(back)))
    via_pg = await read_store(Endpoint("postgres", pg_dsn))
    assert original == moved == via_pg
    assert original.keys[0].last_used_ip == "192.0.2.7" and original.keys[0].hash == live.hash
    # The client's key works against the fleet store: hashes moved, nothing re-issued.
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, store={"kind": "postgres"})
    r = await make_sidecar(cfg, extra_env={"SIDECAR_DATABASE_URL": pg_dsn})
    resp = await r.proxy.get("/library/sections", headers={"X-Plex-Token": key})
    assert resp.status == 200


def test_copy_refuses_bad_endpoints(tmp_path: Path) -> None:
    assert parse_endpoint("postgres:DB", {"DB": "postgresql://u:p@h/d"}) == Endpoint("postgres", "postgresql://u:p@h/d")
    assert parse_endpoint("sqlite:/x.db") == Endpoint("sqlite", "/x.db")
    for spec, msg in (("mysql:x", "expected sqlite:PATH"), ("postgres:UNSET_VAR_X", "UNSET_VAR_X is not set"),
                      ("postgres:not a name", "name of a variable")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            parse_endpoint(spec, {})
    done = cli("store", "copy", "--from", f"sqlite:{tmp_path / 'missing.db'}", "--to", f"sqlite:{tmp_path / 'x.db'}")
    assert done.returncode == 1 and "no such file" in done.stderr


def test_store_migrate_command(tmp_path: Path, pg_server: PgServer, pg_dsn: str) -> None:
    cfg = base_config("http://127.0.0.1:9", tmp_path, store={"kind": "postgres", "dsn_env": "PGDSN"})
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # Upstream secrets are not needed to migrate (PLEX_TOKEN unset here).
    first = cli("store", "migrate", "-c", str(path), env={"PGDSN": pg_dsn})
    assert first.returncode == 0, first.stderr
    every = ", ".join(map(str, range(1, SCHEMA_VERSION + 1)))
    assert first.stdout.strip() == f"migrated to schema version {SCHEMA_VERSION} (applied {every})"
    second = cli("store", "migrate", "-c", str(path), "--json", env={"PGDSN": pg_dsn})
    assert second.returncode == 0 and second.stdout.strip() == f'{{"version": {SCHEMA_VERSION}, "applied": []}}'
    down = cli("store", "migrate", "-c", str(path), env={"PGDSN": pg_dsn.replace(str(pg_server.port), "1")})
    assert down.returncode == 75 and "unreachable" in down.stderr and pg_server.password not in down.stderr
    check = cli("config", "check", "-c", str(path), env={"PGDSN": pg_dsn, "PLEX_TOKEN": "x"})
    assert check.returncode == 0 and f"store postgres postgres 127.0.0.1:{pg_server.port}/" in check.stdout
    assert pg_server.password not in check.stdout + check.stderr
    cfg["store"] = {"kind": "sqlite", "path": str(tmp_path / "s.db")}
    path.write_text(yaml.safe_dump(cfg))
    sqlite = cli("store", "migrate", "-c", str(path))
    assert sqlite.returncode == 1 and "for postgres" in sqlite.stderr


def test_key_commands_on_the_fleet_store(tmp_path: Path, pg_dsn: str) -> None:
    """``sidecar keys`` works on the fleet's store as on SQLite (no upstream secret needed either)."""
    cfg = base_config("http://127.0.0.1:9", tmp_path, store={"kind": "postgres", "dsn_env": "PGDSN"})
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    made = cli("keys", "create", "--name", "cli", "--json", "-c", str(path), env={"PGDSN": pg_dsn})
    assert made.returncode == 0, made.stderr
    kid = json.loads(made.stdout)["id"]
    gone = cli("keys", "revoke", kid, "--json", "-c", str(path), env={"PGDSN": pg_dsn})
    assert gone.returncode == 0 and json.loads(gone.stdout)["state"] == "revoked"
    listed = cli("keys", "list", "--json", "-c", str(path), env={"PGDSN": pg_dsn})
    assert [k["id"] for k in json.loads(listed.stdout)] == [kid]
