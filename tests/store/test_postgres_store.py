"""The PostgreSQL store against a real server: the store contract (side by side with SQLite),
versioned migrations, propagation through LISTEN/NOTIFY and its safety nets, the owner limit
under concurrent writers, and a DSN whose password never shows."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pg_support import PgServer, pg_dsn, pg_server

from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord, Permissions
from sidecar.auth.verify import password_hasher
from sidecar.config import ConfigError, parse_config
from sidecar.store import SqliteStore, Store, StoreError
from sidecar.store.base import AuditEvent, GrantLimitReached, KeyMissing, OwnerLimitReached, UsageRow
from sidecar.store.postgres import PostgresStore
from sidecar.store.postgres_schema import SCHEMA_VERSION, migrate, version

HASH = password_hasher("cheapest").hash("x" * 48)

__all__ = ["pg_dsn", "pg_server"]  # the fixtures, re-exported for pytest


def record(name: str = "k", **kw: Any) -> KeyRecord:
    key, parts = generate_key("pmcp_")
    kw.setdefault("created_at", 1_700_000_000.0)
    return KeyRecord(id=parts.key_id, name=name, hash=HASH, display=display_form("pmcp_", parts.key_id, key), **kw)


RECORDS = [
    record("alpha", owner="ann", permissions=Permissions(upstreams=("plex",), paths=("plex:read",))),
    record("beta", owner="ann", rate_limits=("60/minute",), quota="1000/month", expires_at=2_000_000_000.0),
    record("gamma", revoked_at=1_700_000_100.0, upstream_token_env={"plex": "PLEX_TOKEN_KIDS"}),
]


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The same contract, both backends: what passes for SQLite passes for Postgres."""
    s: Store
    server: PgServer | None = None
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "keys.db")
    else:
        server = request.getfixturevalue("pg_server")
        dsn = await server.new_database()
        s = PostgresStore(dsn, resync_interval=3600)
    await s.open()
    await s.insert(RECORDS)
    yield s
    await s.close()
    if server is not None:
        await server.drop_database(dsn)


async def opened(dsn: str, **kw: Any) -> PostgresStore:
    s = PostgresStore(dsn, **kw)
    await s.open()
    return s


async def until(pred: Any, timeout: float = 3.0) -> float:
    """Poll ``pred`` (async) until true; the seconds it took."""
    start = time.monotonic()
    while not await pred():
        assert time.monotonic() - start < timeout, "timed out"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


# ------------------------------------------------------------------ the contract, both backends


async def test_load_get_list_round_trip(store: Store) -> None:
    table = await store.load_all()
    assert set(table) == {r.id for r in RECORDS}
    for r in RECORDS:
        assert await store.get(r.id) == r == table[r.id]
    assert [r.id for r in await store.list_keys()] == [r.id for r in RECORDS]
    assert await store.get("000000000000") is None
    assert await store.get("x' OR '1'='1") is None  # parameters, never SQL text
    odd = record("Robert'); DROP TABLE keys;--", owner="o'hara", description='{"$ne": null} \\ \u2603')
    await store.insert([odd])
    assert await store.get(odd.id) == odd and await store.count_active("o'hara") == 1
    with pytest.raises(StoreError, match="already exists"):
        await store.insert([RECORDS[0]])


async def test_state_last_used_usage_quota_audit(store: Store) -> None:
    kid = RECORDS[0].id
    await store.record_last_used({kid: (1_700_000_500.0, "192.0.2.7")})
    await store.record_last_used({kid: (1_700_000_400.0, "192.0.2.8")})  # older: ignored
    await store.add_usage({(kid, "2026-01-01"): UsageRow(requests=3, errors=1, bytes=100, rate_limited=1)})
    await store.add_usage({(kid, "2026-01-01"): UsageRow(requests=2, bytes=50), (kid, "2026-01-02"): UsageRow(1)})
    assert await store.usage(kid) == [
        {"day": "2026-01-01", "requests": 5, "errors": 1, "bytes": 150, "rate_limited": 1},
        {"day": "2026-01-02", "requests": 1, "errors": 0, "bytes": 0, "rate_limited": 0},
    ]
    assert await store.usage(kid, days=1) == [
        {"day": "2026-01-02", "requests": 1, "errors": 0, "bytes": 0, "rate_limited": 0}
    ]
    await store.add_quota({(kid, "plex", "w1"): 7})
    await store.add_quota({(kid, "plex", "w1"): 3})
    assert await store.quota_used(kid, "plex", "w1") == 10
    await store.set_quota(kid, "plex", "w1", 0)
    assert await store.quota_used(kid, "plex", "w1") == 0
    assert await store.quota_used(kid, "plex", "other") == 0
    await store.audit(AuditEvent(1.0, "cli", "created", kid, {"name": "alpha"}))
    await store.audit(AuditEvent(2.0, "admin", "revoked", kid, {}))
    await store.audit(AuditEvent(3.0, "admin", "created", RECORDS[1].id, {}))
    assert [(e.actor, e.action) for e in await store.audit_log(kid)] == [("admin", "revoked"), ("cli", "created")]
    assert [e.at for e in await store.audit_log(limit=2)] == [3.0, 2.0]
    assert (await store.audit_log(kid))[1].detail == {"name": "alpha"}
    got = await store.get(kid)
    assert got is not None and (got.last_used_at, got.last_used_ip) == (1_700_000_500.0, "192.0.2.7")


async def test_owner_limit_and_read_modify_write(store: Store) -> None:
    now = 1_800_000_000.0
    assert await store.count_active("ann", now=now) == 2
    with pytest.raises(OwnerLimitReached):
        await store.create_key(record("third", owner="ann"), max_per_owner=2, now=now)
    await store.create_key(record("third", owner="bob"), max_per_owner=2, now=now)
    before, after = await store.update_key(
        RECORDS[0].id, lambda r: r.with_changes(revoked_at=now - 1), max_per_owner=2, now=now
    )
    assert before.state(now) == "active" and after.state(now) == "revoked"
    assert (await store.get(RECORDS[0].id)) == after
    assert await store.count_active("ann", now=now) == 1
    with pytest.raises(KeyMissing):
        await store.update_key("000000000000", lambda r: r, max_per_owner=None, now=now)
    # ``change`` raising aborts the write and is not turned into a store error.
    with pytest.raises(ZeroDivisionError):
        await store.update_key(RECORDS[1].id, lambda r: r.with_changes(name=str(1 / 0)), max_per_owner=None, now=now)


async def test_grant_limit_counts_the_parents_active_grants(store: Store) -> None:
    """``max_grants``: a parent's active children, read in the write's transaction; revoked and
    expired ones free a place, other parents' do not count, and a plain key is never capped."""
    now = 1_800_000_000.0
    parent, other = RECORDS[0].id, RECORDS[1].id
    await store.create_key(record("g1", parent_id=parent), max_per_owner=None, now=now, max_grants=2)
    await store.create_key(record("g2", parent_id=parent), max_per_owner=None, now=now, max_grants=2)
    await store.create_key(record("o1", parent_id=other), max_per_owner=None, now=now, max_grants=2)
    with pytest.raises(GrantLimitReached) as refused:
        await store.create_key(record("g3", parent_id=parent), max_per_owner=None, now=now, max_grants=2)
    assert "maximum of 2 active OAuth grants" in str(refused.value)
    await store.create_key(record("g3", parent_id=parent, expires_at=now + 60), max_per_owner=None, now=now)  # uncapped
    await store.create_key(record("plain"), max_per_owner=None, now=now, max_grants=0)  # not a grant: no cap
    assert len([r for r in await store.list_keys() if r.parent_id == parent]) == 3
    # Two of the three end (revoked, expired): one place is free again, and only one.
    g = [r for r in await store.list_keys() if r.parent_id == parent]
    await store.update_key(g[0].id, lambda r: r.with_changes(revoked_at=now - 1), max_per_owner=None, now=now)
    later = now + 120  # g3 expired at now + 60
    await store.create_key(record("g4", parent_id=parent), max_per_owner=None, now=later, max_grants=2)
    with pytest.raises(GrantLimitReached):
        await store.create_key(record("g5", parent_id=parent), max_per_owner=None, now=later, max_grants=2)


async def test_poll_sees_another_writer_and_force_reloads_all(store: Store, tmp_path: Path) -> None:
    await store.load_all()
    assert await store.poll() is None
    if isinstance(store, PostgresStore):
        other: Store = PostgresStore(store._dsn, listen=False)
    else:
        other = SqliteStore(tmp_path / "keys.db")
    await other.open()
    try:
        revoked = RECORDS[0].with_changes(revoked_at=time.time())
        added = record("delta")
        await other.update(revoked)
        await other.insert([added])
    finally:
        await other.close()
    seen: dict[str, KeyRecord] = {}

    async def both() -> bool:
        changes = await store.poll()
        seen.update({r.id: r for r in (changes.records if changes else [])})
        return {revoked.id, added.id} <= set(seen)

    await until(both)
    assert seen[revoked.id].state() == "revoked" and seen[added.id].name == "delta"
    assert await store.poll() is None
    forced = await store.poll(force=True)
    assert forced is not None and forced.full and len(forced.records) == 4


# ------------------------------------------------------------------ Postgres only


async def test_parent_and_grant_are_columns(pg_dsn: str) -> None:
    s = await opened(pg_dsn)
    try:
        parent = record("parent")
        child = record("child", parent_id=parent.id, grant={"client_id": "app", "scope": ["mcp:read"]})
        await s.insert([parent, child])
        assert await s.get(child.id) == child
        conn = await asyncpg.connect(pg_dsn)
        try:
            row = await conn.fetchrow('SELECT parent_id, "grant", data::text FROM sidecar_keys WHERE id = $1', child.id)
        finally:
            await conn.close()
        assert row["parent_id"] == parent.id and '"client_id": "app"' in row["grant"]
        assert "grant" not in row["data"] and "parent_id" not in row["data"]
    finally:
        await s.close()


async def test_migrations_are_versioned_idempotent_and_safe_to_race(pg_dsn: str) -> None:
    conns = [await asyncpg.connect(pg_dsn) for _ in range(4)]
    try:
        assert await version(conns[0]) == 0
        applied = await asyncio.gather(*(migrate(c) for c in conns))  # four processes starting at once
        assert sorted(map(tuple, applied)) == [(), (), (), tuple(range(1, SCHEMA_VERSION + 1))]
        assert await migrate(conns[0]) == []
        rows = await conns[0].fetch("SELECT version, description FROM sidecar_schema ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, SCHEMA_VERSION + 1)) and rows[0]["description"]
        await conns[0].execute("INSERT INTO sidecar_schema (version, description) VALUES (99, 'from the future')")
    finally:
        for c in conns:
            await c.close()
    with pytest.raises(StoreError, match=r"schema version 99.*upgrade this one"):
        await opened(pg_dsn)


async def test_without_auto_migrate_an_old_schema_is_refused_with_the_command_to_run(pg_dsn: str) -> None:
    with pytest.raises(StoreError, match="run `sidecar store migrate`"):
        await opened(pg_dsn, auto_migrate=False)
    await (await opened(pg_dsn)).close()  # auto_migrate (the default) brings it up to date
    s = await opened(pg_dsn, auto_migrate=False)
    await s.close()


async def test_notify_reaches_another_store_without_a_poll_query(pg_dsn: str) -> None:
    """A listening store answers polls from memory until a NOTIFY arrives; then it reads the change."""
    a = await opened(pg_dsn)
    b = await opened(pg_dsn)
    try:
        await a.insert(RECORDS)
        await b.load_all()
        assert b.listener is not None
        await asyncio.wait_for(b.listener.connected.wait(), 5)
        await until(lambda: _none(b))  # the catch-up after connecting is done
        rec = RECORDS[1].with_changes(revoked_at=time.time())
        started = time.monotonic()
        await a.update(rec)
        got: list[KeyRecord] = []

        async def seen() -> bool:
            ch = await b.poll()
            got.extend(ch.records if ch else [])
            return bool(got)

        await until(seen)
        took = time.monotonic() - started
        assert [r.id for r in got] == [rec.id] and got[0].state() == "revoked"
        assert took < 0.5, f"NOTIFY took {took:.3f}s"
        # Anyone may NOTIFY the channel: a notification is only a hint to read, its payload is ignored.
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'NOTIFY sidecar_keys, \'{{"revoke": "{RECORDS[0].id}"}}\'')
        finally:
            await conn.close()
        await asyncio.sleep(0.1)
        assert await b.poll() is None
    finally:
        await a.close()
        await b.close()


async def _none(s: PostgresStore) -> bool:
    return await s.poll() is None


async def test_resync_finds_a_change_no_notification_announced(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    s = await opened(pg_dsn, resync_interval=0.3)
    try:
        await s.insert(RECORDS)
        await s.load_all()
        assert s.listener is not None
        await asyncio.wait_for(s.listener.connected.wait(), 5)
        await until(lambda: _none(s))
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("ALTER TABLE sidecar_keys DISABLE TRIGGER sidecar_keys_notify")
            await conn.execute("UPDATE sidecar_keys SET data = jsonb_set(data, '{name}', '\"renamed\"') WHERE id = $1",
                               RECORDS[2].id)  # fmt: skip
        finally:
            await conn.close()
        found: list[KeyRecord] = []

        async def seen() -> bool:
            ch = await s.poll()
            found.extend(ch.records if ch else [])
            return bool(found)

        with caplog.at_level(logging.WARNING, "sidecar.store"):
            await until(seen, timeout=3)
        assert found[0].name == "renamed" and not (await s.poll() if False else None)
        assert s.resync_repairs == 1 and "no notification announced" in caplog.text
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("DELETE FROM sidecar_keys WHERE id = $1", RECORDS[0].id)
        finally:
            await conn.close()
        full: list[Any] = []

        async def reloaded() -> bool:
            ch = await s.poll()
            if ch is not None:
                full.append(ch)
            return bool(full)

        await until(reloaded, timeout=3)
        assert full[0].full and {r.id for r in full[0].records} == {RECORDS[1].id, RECORDS[2].id}
    finally:
        await s.close()


async def test_owner_limit_holds_across_processes_writing_at_once(pg_dsn: str) -> None:
    """Ten stores (ten replicas) create a key for one owner at once with a limit of 3: exactly 3 win."""
    stores = [await opened(pg_dsn, listen=False) for _ in range(10)]
    try:
        results = await asyncio.gather(
            *(
                s.create_key(record(f"k{i}", owner="ann"), max_per_owner=3, now=time.time())
                for i, s in enumerate(stores)
            ),
            return_exceptions=True,
        )
        assert sum(r is None for r in results) == 3
        assert all(isinstance(r, OwnerLimitReached) for r in results if r is not None)
        assert await stores[0].count_active("ann") == 3
    finally:
        for s in stores:
            await s.close()


async def test_grant_limit_holds_across_processes_writing_at_once(pg_dsn: str) -> None:
    """Ten replicas turn ten codes of one key into grants at once, with a cap of 3: exactly 3 win."""
    stores = [await opened(pg_dsn, listen=False) for _ in range(10)]
    try:
        parent = record("parent")
        await stores[0].insert([parent])
        results = await asyncio.gather(
            *(
                s.create_key(record(f"g{i}", parent_id=parent.id), max_per_owner=None, now=time.time(), max_grants=3)
                for i, s in enumerate(stores)
            ),
            return_exceptions=True,
        )
        assert sum(r is None for r in results) == 3, results
        assert all(isinstance(r, GrantLimitReached) for r in results if r is not None), results
        assert len(await stores[0].list_grants(parent.id)) == 3
    finally:
        for s in stores:
            await s.close()


async def test_quota_additions_from_many_replicas_are_exact(pg_dsn: str) -> None:
    stores = [await opened(pg_dsn, listen=False) for _ in range(5)]
    try:
        await asyncio.gather(*(s.add_quota({("k", "plex", "w"): 1}) for s in stores for _ in range(20)))
        assert await stores[0].quota_used("k", "plex", "w") == 100
    finally:
        for s in stores:
            await s.close()


async def test_the_dsn_password_never_shows(pg_server: PgServer, pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    wrong = pg_dsn.replace(pg_server.password, "not-the-password-" + pg_server.password[::-1])
    with pytest.raises(StoreError) as e:
        await opened(wrong)
    assert "not-the-password" not in str(e.value) and pg_server.password not in str(e.value)
    assert f"127.0.0.1:{pg_server.port}" in str(e.value)
    down = pg_dsn.replace(str(pg_server.port), str(pg_server.port + 1))  # nobody listens there
    with pytest.raises(StoreError) as e:
        await opened(down)
    assert e.value.reason == "unavailable" and pg_server.password not in str(e.value)
    # The config: the DSN comes from the named variable; a bad one is named, never quoted.
    up = [{"id": "p", "kind": "plex", "url": "http://127.0.0.1:9", "token_env": "T"}]
    with pytest.raises(ConfigError) as ce:
        parse_config({"upstreams": up, "store": {"kind": "postgres"}}, env={"T": "x"})
    assert "store.dsn_env: environment variable SIDECAR_DATABASE_URL is not set" in ce.value.problems
    with pytest.raises(ConfigError) as ce:
        bad = "mysql://u:" + pg_server.password + "@h/db"
        parse_config({"upstreams": up, "store": {"kind": "postgres", "dsn_env": "DB"}}, env={"T": "x", "DB": bad})
    assert pg_server.password not in str(ce.value.problems) and "store.dsn_env: DB: expected a postgresql://" in str(
        ce.value.problems
    )
    with pytest.raises(ConfigError) as ce:
        parse_config({"upstreams": up, "store": {"kind": "sqlite", "dsn_env": "DB"}}, env={"T": "x"})
    assert "store.dsn_env: only used with kind: postgres" in ce.value.problems
    cfg = parse_config({"upstreams": up, "store": {"kind": "postgres", "dsn_env": "DB", "resync_interval": "10s"}},
                       env={"T": "x", "DB": pg_dsn})  # fmt: skip
    assert cfg.store.dsn == pg_dsn and cfg.store.postgres is not None and cfg.store.postgres.resync_interval == 10
    assert cfg.store.poll_interval == 0.1  # postgres: polls are free until a NOTIFY, so 100ms by default
    assert pg_server.password not in repr(cfg)
    assert pg_server.password not in caplog.text


async def test_concurrent_writers_never_leave_a_poller_behind(pg_dsn: str) -> None:
    """Eight writers (replicas, CLIs) changing keys at once: seq order is commit order (the keys
    lock), so a poller reading "past the last seq" ends with exactly the database's records."""
    watcher = await opened(pg_dsn, resync_interval=3600)
    writers = [await opened(pg_dsn, listen=False) for _ in range(8)]
    try:
        await writers[0].insert(RECORDS)
        view = await watcher.load_all()

        async def churn(w: PostgresStore, n: int) -> None:
            for i in range(15):
                rec = RECORDS[(n + i) % len(RECORDS)]
                await w.update(rec.with_changes(description=f"w{n} #{i}"))
                await w.insert([record(f"w{n}-{i}")])

        async def follow() -> None:
            while True:
                ch = await watcher.poll()
                view.update({r.id: r for r in (ch.records if ch else [])})
                await asyncio.sleep(0.002)

        poller = asyncio.create_task(follow())
        try:
            await asyncio.gather(*(churn(w, n) for n, w in enumerate(writers)))
            truth = {r.id: r for r in await writers[0].list_keys()}

            async def caught_up() -> bool:
                return view == truth

            await until(caught_up)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        assert len(view) == len(RECORDS) + 8 * 15 and watcher.resync_repairs == 0
    finally:
        for s in (watcher, *writers):
            await s.close()
