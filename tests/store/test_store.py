"""Key stores: SQLite and YAML behind one interface, run through the same tests.

SQLite: WAL, versioned schema (older files migrate, newer ones are refused), several
processes at once, a bulk insert path for 100 000 keys. YAML: hashes only, reloaded on
change, a broken edit keeps the last good set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord, Permissions
from sidecar.auth.verify import password_hasher
from sidecar.store import ReadOnlyStore, SqliteStore, Store, StoreError, YamlStore
from sidecar.store.base import AuditEvent, UsageRow
from sidecar.store.sqlite import SCHEMA_VERSION
from sidecar.store.yamlfile import entry_yaml, parse_keys_file

HASHER = password_hasher("cheapest")
HASH = HASHER.hash("x" * 48)


def record(name: str = "k", **kw: Any) -> KeyRecord:
    key, parts = generate_key("pmcp_")
    kw.setdefault("created_at", 1_700_000_000.0)
    return KeyRecord(
        id=parts.key_id,
        name=name,
        hash=HASHER.hash(parts.secret),
        display=display_form("pmcp_", parts.key_id, key),
        **kw,
    )


def write_yaml(path: Path, records: list[KeyRecord]) -> None:
    path.write_text(yaml.safe_dump({"keys": [r.to_dict() for r in records]}, sort_keys=False))


class Backend:
    """Puts keys into a store the way its operator would, and changes them from 'another process'."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.tmp = tmp
        self.records: list[KeyRecord] = []

    async def open(self, records: list[KeyRecord]) -> Store:
        self.records = list(records)
        if self.kind == "sqlite":
            seed = SqliteStore(self.tmp / "keys.db")
            await seed.open()
            await seed.insert(records)
            await seed.close()
            store: Store = SqliteStore(self.tmp / "keys.db")
        else:
            write_yaml(self.tmp / "keys.yaml", records)
            store = YamlStore(self.tmp / "keys.yaml", SqliteStore(self.tmp / "state.db"))
        await store.open()
        return store

    async def change(self, rec: KeyRecord) -> None:
        """Replace or add one record, as the CLI (SQLite) or an editor (YAML) would."""
        self.records = [r for r in self.records if r.id != rec.id] + [rec]
        if self.kind == "sqlite":
            other = SqliteStore(self.tmp / "keys.db")
            await other.open()
            try:
                if await other.get(rec.id) is None:
                    await other.insert([rec])
                else:
                    await other.update(rec)
            finally:
                await other.close()
        else:
            write_yaml(self.tmp / "keys.yaml", self.records)


@pytest.fixture(params=["sqlite", "yaml"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return Backend(request.param, tmp_path)


@pytest.fixture
async def opened(backend: Backend) -> AsyncIterator[tuple[Store, list[KeyRecord]]]:
    recs = [
        record("alpha", owner="ann", permissions=Permissions(upstreams=("plex",), paths=("plex:read",))),
        record("beta", owner="ann", rate_limits=("60/minute",), quota="1000/month", expires_at=2_000_000_000.0),
        record("gamma", revoked_at=1_700_000_100.0, upstream_token_env={"plex": "PLEX_TOKEN_KIDS"}),
    ]
    store = await backend.open(recs)
    yield store, recs
    await store.close()


# ---------------------------------------------------------------------------- both backends


async def test_load_get_and_list_round_trip(opened: tuple[Store, list[KeyRecord]]) -> None:
    store, recs = opened
    table = await store.load_all()
    assert set(table) == {r.id for r in recs}
    for r in recs:
        got = await store.get(r.id)
        assert got == r == table[r.id]
    assert [r.id for r in await store.list_keys()] == [r.id for r in recs]
    assert await store.get("000000000000") is None


async def test_poll_sees_changes_made_by_another_process(
    backend: Backend, opened: tuple[Store, list[KeyRecord]]
) -> None:
    store, recs = opened
    await store.load_all()
    assert await store.poll() is None
    revoked = recs[0].with_changes(revoked_at=time.time())
    added = record("delta")
    await backend.change(revoked)
    await backend.change(added)
    deadline = time.monotonic() + 3
    seen: dict[str, KeyRecord] = {}
    while time.monotonic() < deadline and not {revoked.id, added.id} <= set(seen):
        changes = await store.poll()
        for r in changes.records if changes else []:
            seen[r.id] = r
        await asyncio.sleep(0.02)
    assert seen[revoked.id].state() == "revoked"
    assert seen[added.id].name == "delta"
    forced = await store.poll(force=True)
    assert forced is not None and forced.full and {r.id for r in forced.records} == {*(r.id for r in recs), added.id}


async def test_count_active_per_owner(opened: tuple[Store, list[KeyRecord]]) -> None:
    store, _ = opened
    assert await store.count_active("ann", now=1_800_000_000.0) == 2
    assert await store.count_active("ann", now=2_100_000_000.0) == 1  # beta expired by then
    assert await store.count_active("nobody") == 0


async def test_state_lives_in_sqlite_for_both(opened: tuple[Store, list[KeyRecord]]) -> None:
    store, recs = opened
    kid = recs[0].id
    await store.record_last_used({kid: (1_700_000_500.0, "192.0.2.7")})
    await store.record_last_used({kid: (1_700_000_400.0, "192.0.2.8")})  # older: ignored
    await store.add_usage({(kid, "2026-01-01"): UsageRow(requests=3, errors=1, bytes=100, rate_limited=1)})
    await store.add_usage({(kid, "2026-01-01"): UsageRow(requests=2, bytes=50)})
    assert await store.usage(kid) == [
        {"day": "2026-01-01", "requests": 5, "errors": 1, "bytes": 150, "rate_limited": 1}
    ]
    await store.add_quota({(kid, "plex", "w1"): 7})
    await store.add_quota({(kid, "plex", "w1"): 3})
    assert await store.quota_used(kid, "plex", "w1") == 10
    await store.set_quota(kid, "plex", "w1", 0)
    assert await store.quota_used(kid, "plex", "w1") == 0
    await store.audit(AuditEvent(1.0, "cli", "created", kid, {"name": "alpha"}))
    await store.audit(AuditEvent(2.0, "admin", "revoked", kid, {}))
    log = await store.audit_log(kid)
    assert [(e.actor, e.action) for e in log] == [("admin", "revoked"), ("cli", "created")]
    if isinstance(store, SqliteStore):  # the YAML store's keys come from its file; state joins on get()
        got = await store.get(kid)
        assert got is not None and (got.last_used_at, got.last_used_ip) == (1_700_000_500.0, "192.0.2.7")


async def test_hash_is_stored_never_the_key(backend: Backend, opened: tuple[Store, list[KeyRecord]]) -> None:
    key, parts = generate_key("pmcp_")
    rec = KeyRecord(id=parts.key_id, name="secret", hash=HASHER.hash(parts.secret), display=key[:9])
    await backend.change(rec)
    files = [p for p in backend.tmp.iterdir() if p.is_file()]
    blob = b"".join(p.read_bytes() for p in files)
    assert rec.hash.encode() in blob
    assert key.encode() not in blob and parts.secret.encode() not in blob


# ---------------------------------------------------------------------------- SQLite


async def test_sqlite_is_wal_and_current_schema(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    await store.close()
    con = sqlite3.connect(tmp_path / "s.db")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        cols = {row[1] for row in con.execute("PRAGMA table_info(keys)")}
        assert {"id", "data", "seq", "owner"} <= cols
    finally:
        con.close()


async def test_sqlite_migrates_a_version_1_file_keeping_its_keys(tmp_path: Path) -> None:
    """A database written by the first release (user_version 1, no owner column) opens and keeps its data."""
    path = tmp_path / "old.db"
    rec = record("legacy", owner="olga")
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE keys (id TEXT PRIMARY KEY, data TEXT NOT NULL, seq INTEGER NOT NULL);
        CREATE INDEX keys_seq ON keys(seq);
        CREATE TABLE last_used (id TEXT PRIMARY KEY, at REAL NOT NULL, ip TEXT);
        CREATE TABLE usage (key_id TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
            errors INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0,
            rate_limited INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (key_id, day));
        CREATE TABLE quota (key_id TEXT NOT NULL, scope TEXT NOT NULL, window TEXT NOT NULL,
            used INTEGER NOT NULL, PRIMARY KEY (key_id, scope, window));
        CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
            action TEXT NOT NULL, key_id TEXT, detail TEXT NOT NULL DEFAULT '{}');
        PRAGMA user_version = 1;
        """
    )
    # Version 1 rows hold the ISO-time form (to_dict), not today's epoch numbers.
    con.execute("INSERT INTO keys (id, data, seq) VALUES (?, ?, 1)", (rec.id, json.dumps(rec.to_dict())))
    con.commit()
    con.close()

    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.get(rec.id) == rec
        assert await store.count_active("olga") == 1  # the migration filled the new owner column
    finally:
        await store.close()
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert con.execute("SELECT owner FROM keys").fetchone()[0] == "olga"
    finally:
        con.close()


async def test_sqlite_refuses_a_newer_schema_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    con.close()
    store = SqliteStore(path)
    with pytest.raises(StoreError) as e:
        await store.open()
    msg = str(e.value)
    assert f"schema version {SCHEMA_VERSION + 5}" in msg and "newer sidecar" in msg and "upgrade" in msg
    with pytest.raises(StoreError):
        await store.load_all()  # closed, not half-open


async def test_two_processes_opening_a_fresh_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    stores = [SqliteStore(tmp_path / "race.db") for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await stores[0].insert([record("a", owner="o")])
        assert await stores[3].count_active("o") == 1
    finally:
        for s in stores:
            await s.close()


async def test_sqlite_duplicate_id_is_a_store_error(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "d.db")
    await store.open()
    try:
        rec = record()
        await store.insert([rec])
        with pytest.raises(StoreError, match="already exists"):
            await store.insert([rec])
        assert len(await store.load_all()) == 1  # the failed insert left nothing behind
    finally:
        await store.close()


async def test_sqlite_concurrent_writes_on_one_connection_do_not_collide(tmp_path: Path) -> None:
    """The server's tasks share one connection: a usage flush and an admin revoke at the same moment."""
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    try:
        recs = [record(f"k{i}") for i in range(20)]
        await store.insert(recs)
        await asyncio.gather(
            *(store.update(r.with_changes(revoked_at=1.0)) for r in recs),
            *(store.record_last_used({r.id: (2.0, "ip")}) for r in recs),
            *(store.audit(AuditEvent(3.0, "t", "revoked", r.id)) for r in recs),
        )
        assert all(r.state() == "revoked" for r in (await store.load_all()).values())
    finally:
        await store.close()


async def test_sqlite_bulk_insert_and_load_100k(tmp_path: Path) -> None:
    """The bulk path the benchmark uses. Timings are measured in bench/, not asserted here."""
    now = time.time()
    recs = []
    for i in range(100_000):
        key, parts = generate_key("pmcp_")
        recs.append(KeyRecord(id=parts.key_id, name=f"k{i}", hash=HASH, display=key[:9], created_at=now))
    store = SqliteStore(tmp_path / "big.db")
    await store.open()
    try:
        await store.insert(recs)
        table = await store.load_all()
        assert len(table) == 100_000
        assert table[recs[54_321].id] == recs[54_321]
        assert await store.poll() is None  # the poll after a load is one index lookup with nothing new
    finally:
        await store.close()


# ---------------------------------------------------------------------------- YAML


async def test_yaml_store_is_read_only(tmp_path: Path) -> None:
    write_yaml(tmp_path / "keys.yaml", [record()])
    store = YamlStore(tmp_path / "keys.yaml", SqliteStore(tmp_path / "state.db"))
    await store.open()
    try:
        with pytest.raises(ReadOnlyStore):
            await store.insert([record()])
        with pytest.raises(ReadOnlyStore):
            await store.update(record())
    finally:
        await store.close()


async def test_yaml_broken_edit_keeps_the_last_good_set_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = [record("one"), record("two")]
    path = tmp_path / "keys.yaml"
    write_yaml(path, good)
    store = YamlStore(path, SqliteStore(tmp_path / "state.db"))
    await store.open()
    try:
        path.write_text(path.read_text().replace("name: two", "name: [two"))
        with caplog.at_level(logging.ERROR, logger="sidecar.store"):
            assert await store.poll() is None
        assert "keeping the last good set of 2 keys" in caplog.text and "not valid YAML" in caplog.text
        assert set(await store.load_all()) == {r.id for r in good}
        caplog.clear()
        # A well-formed file with a bad entry: the message names the entry and the field.
        bad = good[0].to_dict()
        bad["hash"] = "pmcp_not_a_hash"
        path.write_text(yaml.safe_dump({"keys": [bad]}))
        with caplog.at_level(logging.ERROR, logger="sidecar.store"):
            assert await store.poll() is None
        assert "keys[0].hash: not an argon2id hash" in caplog.text
        assert store.last_error is not None
        # Fixed: reloaded.
        write_yaml(path, good[:1])
        changes = await store.poll()
        assert changes is not None and changes.full and [r.id for r in changes.records] == [good[0].id]
        assert store.last_error is None
    finally:
        await store.close()


async def test_yaml_sees_an_atomic_replace_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    """Editors and Kubernetes ConfigMaps replace the file; size and mtime may not change."""
    a = record("aaaa")
    path = tmp_path / "keys.yaml"
    write_yaml(path, [a])
    store = YamlStore(path, SqliteStore(tmp_path / "state.db"))
    await store.open()
    try:
        st = os.stat(path)
        tmp = tmp_path / "keys.yaml.new"
        tmp.write_text(path.read_text().replace("name: aaaa", "name: bbbb"))
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, path)
        changes = await store.poll()
        assert changes is not None and changes.records[0].name == "bbbb"
        # SIGHUP path: an in-place edit that keeps size and mtime is picked up by a forced poll.
        path.write_text(path.read_text().replace("name: bbbb", "name: cccc"))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert await store.poll() is None
        forced = await store.poll(force=True)
        assert forced is not None and forced.records[0].name == "cccc"
    finally:
        await store.close()


def test_keys_file_validation_names_entry_and_field() -> None:
    a, b = record("a"), record("b")
    cases = {
        "keys: 3": "keys: expected a list",
        "other: 1": "expected a mapping with a single 'keys:' list",
        yaml.safe_dump({"keys": [a.to_dict(), a.to_dict()]}): "keys[1].id: duplicate id",
        yaml.safe_dump({"keys": [b.to_dict(), {**a.to_dict(), "rate_limits": ["lots"]}]}): "keys[1].",
        yaml.safe_dump({"keys": [{**a.to_dict(), "colour": "red"}]}): "keys[0].unknown field(s) colour",
        yaml.safe_dump({"keys": [{k: v for k, v in a.to_dict().items() if k != "name"}]}): "keys[0].name: required",
    }
    for text, needle in cases.items():
        with pytest.raises(StoreError) as e:
            parse_keys_file(text, "keys.yaml")
        assert needle in str(e.value), (text, str(e.value))
    assert parse_keys_file("", "keys.yaml") == {}


def test_entry_yaml_round_trips_through_the_keys_file() -> None:
    rec = record("pasted", owner="o", permissions=Permissions(upstreams=("plex",), paths=("plex:playback",)))
    text = "keys:\n" + entry_yaml(rec)
    assert parse_keys_file(text)[rec.id] == rec


def test_stored_form_round_trips_and_is_cheap_to_load() -> None:
    rec = record(
        "full",
        description="d",
        owner="o",
        permissions=Permissions(upstreams=("plex", "mcp"), methods=("GET",), paths=("/a*",), tools={"mcp": ("x*",)}),
        rate_limits=("60/minute", "1000/day"),
        quota="10000/month",
        concurrency=3,
        upstream_token_env={"plex": "KIDS"},
        expires_at=1_900_000_000.5,
        revoked_at=1_800_000_000.25,
        rotated_to="abcdefabcdef",
    )
    assert KeyRecord.from_stored(json.loads(json.dumps(rec.to_stored()))) == rec
    assert KeyRecord.from_stored(json.loads(json.dumps(rec.to_dict()))) == rec  # older rows: ISO times
    assert KeyRecord.from_dict(rec.to_dict()) == rec
