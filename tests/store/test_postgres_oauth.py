"""OAuth state in the PostgreSQL store: the ``oauth_*`` contract side by side with SQLite,
single use under a real race between replicas, migration of an older database, ``store
copy`` both ways, and the whole flow through sidecars on one database — a grant made
through replica A works on replica B, and revoking its parent on A ends it on B within 1 s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import Running
from mcp_server import McpUpstream
from mcp_support import answer_messages
from oauth.oauth_support import code_for, exchange, free_port, oauth_config, register, start_sidecar
from pg_support import PgServer, pg_dsn, pg_server

from sidecar.app import Sidecar
from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord
from sidecar.auth.verify import password_hasher
from sidecar.config import parse_config
from sidecar.store import SqliteStore, Store, StoreError
from sidecar.store.base import OAuthToken, OwnerLimitReached
from sidecar.store.copy import Endpoint, copy_store, read_store
from sidecar.store.postgres import PostgresStore
from sidecar.store.postgres_schema import MIGRATIONS, SCHEMA_VERSION

HASH = password_hasher("cheapest").hash("x" * 48)
NOW = 1_800_000_000.0
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}  # fmt: skip
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
PERMS = {"upstreams": ["*"], "tools": {"tools": ["search", "fetch"]}}

__all__ = ["pg_dsn", "pg_server"]  # the fixtures, re-exported for pytest


def record(name: str, **kw: Any) -> KeyRecord:
    key, parts = generate_key("pmcp_")
    kw.setdefault("created_at", NOW - 100)
    return KeyRecord(id=parts.key_id, name=name, hash=HASH, display=display_form("pmcp_", parts.key_id, key), **kw)


def token(digest: str, kind: str = "code", key_id: str = "g1", **kw: Any) -> OAuthToken:
    kw.setdefault("expires_at", NOW + 600)
    kw.setdefault("data", {"redirect_uri": "http://127.0.0.1/cb", "nested": {"tools": ["a", "b"]}})
    return OAuthToken(digest, kind, key_id, kw.pop("client_id", "dcr_1"), kw.pop("resource", "tools"), **kw)


async def open_store(kind: str, tmp_path: Path, dsn: str) -> Store:
    s: Store = SqliteStore(tmp_path / "keys.db") if kind == "sqlite" else PostgresStore(dsn, resync_interval=3600)
    await s.open()
    return s


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The same contract, both backends: what passes for SQLite passes for Postgres."""
    server: PgServer | None = None
    dsn = ""
    if request.param == "postgres":
        server = request.getfixturevalue("pg_server")
        dsn = await server.new_database()
    s = await open_store(request.param, tmp_path, dsn)
    yield s
    await s.close()
    if server is not None:
        await server.drop_database(dsn)


# ------------------------------------------------------------------ the contract, both backends


async def test_tokens_are_kept_by_digest_and_read_back_whole(store: Store) -> None:
    t = token("a" * 64, used_at=None)
    await store.oauth_save(t)
    assert await store.oauth_get("a" * 64) == t
    assert await store.oauth_get("b" * 64) is None
    with pytest.raises(StoreError):  # a digest is stored once: a second save is refused, never merged
        await store.oauth_save(token("a" * 64, kind="access"))
    assert await store.oauth_get("a" * 64) == t


async def test_use_is_once_and_returns_the_row_as_it_was(store: Store) -> None:
    await store.oauth_save(token("c" * 64))
    first = await store.oauth_use("c" * 64, NOW)
    assert first is not None and first.used_at is None and first.data["nested"] == {"tools": ["a", "b"]}
    again = await store.oauth_use("c" * 64, NOW + 5)
    assert again is not None and again.used_at == NOW  # a replay: the first use's time, not overwritten
    assert (await store.oauth_get("c" * 64)).used_at == NOW  # type: ignore[union-attr]
    assert await store.oauth_use("d" * 64, NOW) is None


async def test_forget_drops_a_grants_tokens_and_long_expired_ones(store: Store) -> None:
    await store.oauth_save(token("1" * 64, "access", "g1"))
    await store.oauth_save(token("2" * 64, "refresh", "g1"))
    await store.oauth_save(token("3" * 64, "access", "g2"))
    await store.oauth_save(token("4" * 64, "code", "g3", expires_at=NOW - 86400 - 1))  # expired over a day ago
    await store.oauth_save(token("5" * 64, "code", "g3", expires_at=NOW - 60))  # expired just now: kept a day
    await store.oauth_forget("g1", NOW)
    kept = [d for d in ("1", "2", "3", "4", "5") if await store.oauth_get(d * 64) is not None]
    assert kept == ["3", "5"]
    await store.oauth_forget("", NOW + 86400)
    assert await store.oauth_get("5" * 64) is None and await store.oauth_get("3" * 64) is not None


async def test_clients_register_replace_list_and_delete(store: Store) -> None:
    await store.oauth_save_client("dcr_b", {"client_id": "dcr_b", "redirect_uris": ["https://b/cb"]}, NOW)
    await store.oauth_save_client("dcr_a", {"client_id": "dcr_a", "client_name": "A"}, NOW + 1)
    await store.oauth_save_client("dcr_b", {"client_id": "dcr_b", "client_name": "B2"}, NOW + 2)  # replaced
    assert await store.oauth_client("dcr_b") == {"client_id": "dcr_b", "client_name": "B2"}
    assert await store.oauth_client("nope") is None
    assert [c["client_id"] for c in await store.oauth_clients()] == ["dcr_b", "dcr_a"]  # oldest first, kept
    assert await store.oauth_client_count() == 2
    assert await store.oauth_delete_client("dcr_b") is True
    assert await store.oauth_delete_client("dcr_b") is False
    assert [c["client_id"] for c in await store.oauth_clients()] == ["dcr_a"]
    assert await store.oauth_client_count() == 1


async def test_grants_are_listed_by_parent_and_never_count_toward_the_owner_limit(store: Store) -> None:
    parent, other = record("parent", owner="ann"), record("other", owner="ann")
    await store.insert([parent, other])
    grants = [record(f"g{i}", owner="ann", parent_id=parent.id, grant={"client_id": f"c{i % 2}"}) for i in range(3)]
    for g in grants:
        await store.create_key(g, max_per_owner=None, now=NOW)
    assert await store.count_active("ann", NOW) == 2
    # ann has 2 keys and 3 grants; a limit of 3 leaves room for exactly one more key.
    third = record("third", owner="ann")
    await store.create_key(third, max_per_owner=3, now=NOW)
    with pytest.raises(OwnerLimitReached):
        await store.create_key(record("fourth", owner="ann"), max_per_owner=3, now=NOW)
    # A change to a grant under the limit is not refused either (it does not count).
    await store.update_key(grants[0].id, lambda r: r.with_changes(name="renamed"), max_per_owner=3, now=NOW)
    assert {r.id for r in await store.list_grants()} == {g.id for g in grants}
    assert {r.id for r in await store.list_grants(parent.id)} == {g.id for g in grants}
    assert await store.list_grants(other.id) == []
    assert {r.id for r in await store.list_grants(parent.id, "c0")} == {grants[0].id, grants[2].id}
    assert (await store.list_grants(client_id="c1"))[0].grant == {"client_id": "c1"}


# ------------------------------------------------------------------ replicas racing


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_two_replicas_racing_for_one_code_exactly_one_wins(kind: str, tmp_path: Path, request: Any) -> None:
    """Two stores (two replicas: separate connections) use each of 30 codes at the same moment."""
    server: PgServer | None = request.getfixturevalue("pg_server") if kind == "postgres" else None
    dsn = await server.new_database() if server is not None else ""
    a, b = await open_store(kind, tmp_path, dsn), await open_store(kind, tmp_path, dsn)
    try:
        digests = [f"{i:064x}" for i in range(30)]
        for d in digests:
            await a.oauth_save(token(d))
        for d in digests:
            got = await asyncio.gather(a.oauth_use(d, NOW + 1), b.oauth_use(d, NOW + 2), a.oauth_use(d, NOW + 3))
            assert [t is not None and t.used_at is None for t in got].count(True) == 1, got
            winner = next(t for t in got if t is not None and t.used_at is None)
            assert winner.digest == d
            # Every loser saw the winner's mark, which nobody overwrote.
            stamp = (await b.oauth_get(d)).used_at  # type: ignore[union-attr]
            assert all(t is not None and t.used_at == stamp for t in got if t is not winner)
    finally:
        await a.close()
        await b.close()
        if server is not None:
            await server.drop_database(dsn)


async def test_a_version_1_database_is_migrated_with_its_keys(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "CREATE TABLE sidecar_schema (version integer PRIMARY KEY, description text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(MIGRATIONS[0][1])
        await conn.execute("INSERT INTO sidecar_schema (version, description) VALUES (1, 'v1')")
    finally:
        await conn.close()
    rec = record("old", owner="ann")
    s = PostgresStore(pg_dsn, auto_migrate=False)
    with pytest.raises(StoreError, match="run `sidecar store migrate`"):
        await s.open()
    s = PostgresStore(pg_dsn)
    await s.open()
    try:
        await s.insert([rec])
        await s.oauth_save(token("e" * 64))
        assert await s.oauth_get("e" * 64) is not None and (await s.get(rec.id)) == rec
    finally:
        await s.close()
    assert SCHEMA_VERSION == 3


# ------------------------------------------------------------------ store copy


async def test_copy_moves_clients_and_live_tokens_both_ways(tmp_path: Path, pg_dsn: str) -> None:
    src = SqliteStore(tmp_path / "src.db")
    await src.open()
    parent = record("parent", owner="ann")
    grant = record("grant", owner="ann", parent_id=parent.id, grant={"client_id": "dcr_x", "resource": "tools"})
    now = time.time()
    try:
        await src.insert([parent, grant])
        await src.oauth_save_client("dcr_x", {"client_id": "dcr_x", "client_name": "X"}, now - 10)
        await src.oauth_save_client("dcr_y", {"client_id": "dcr_y"}, now - 5)
        await src.oauth_save(token("a" * 64, "access", grant.id, expires_at=now + 3600))
        await src.oauth_save(token("b" * 64, "refresh", grant.id, expires_at=now + 86400, used_at=now - 1))
        await src.oauth_save(token("c" * 64, "code", grant.id, expires_at=now - 1))  # expired: not moved
    finally:
        await src.close()
    counts = await copy_store(Endpoint("sqlite", str(tmp_path / "src.db")), Endpoint("postgres", pg_dsn))
    assert counts["oauth_clients"] == 2 and counts["oauth_tokens"] == 2 and counts["keys"] == 2
    pg = PostgresStore(pg_dsn, listen=False)
    await pg.open()
    try:
        assert (await pg.oauth_get("a" * 64)) == token("a" * 64, "access", grant.id, expires_at=now + 3600)
        assert (await pg.oauth_get("b" * 64)).used_at == now - 1  # type: ignore[union-attr]
        assert await pg.oauth_get("c" * 64) is None
        assert [c["client_id"] for c in await pg.oauth_clients()] == ["dcr_x", "dcr_y"]
        assert [r.id for r in await pg.list_grants(parent.id)] == [grant.id]
    finally:
        await pg.close()
    back = Endpoint("sqlite", str(tmp_path / "back.db"))
    await copy_store(Endpoint("postgres", pg_dsn), back)
    moved, via_pg = await read_store(back), await read_store(Endpoint("postgres", pg_dsn))
    assert moved == via_pg and len(moved.oauth_tokens) == 2 and moved.oauth_clients[0][1]["client_name"] == "X"
    with pytest.raises(StoreError, match=r"is not empty \(2 keys, 2 oauth_clients, 2 oauth_tokens\)"):
        await copy_store(Endpoint("postgres", pg_dsn), back)


def test_oauth_is_accepted_on_the_postgres_store() -> None:
    mcp = {"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:9/mcp", "path_prefix": "/mcp/tools"}
    cfg = parse_config(
        {
            "upstreams": [mcp],
            "store": {"kind": "postgres"},
            "oauth": {"enabled": True, "public_url": "https://x.example"},
        },
        env={"SIDECAR_DATABASE_URL": "postgresql://u:p@127.0.0.1:5432/d"},
    )
    assert cfg.oauth.enabled and cfg.store.kind == "postgres"


# ------------------------------------------------------------------ the flow, on a fleet


async def replica(
    aiohttp_client: Any, upstream: McpUpstream, tmp: Path, dsn: str, started: list[Sidecar], poll: str = "100ms"
) -> Running:
    tmp.mkdir(exist_ok=True)
    cfg = oauth_config(upstream, tmp, free_port())
    cfg["store"] = {"kind": "postgres", "poll_interval": poll}
    return await start_sidecar(aiohttp_client, cfg, tmp, started, extra_env={"SIDECAR_DATABASE_URL": dsn})


async def mcp(gw: Running, access: str, body: dict[str, Any], session: str = "") -> Any:
    headers = {**ACCEPT, "Authorization": f"Bearer {access}", **({"Mcp-Session-Id": session} if session else {})}
    return await gw.proxy.post("/mcp/tools", json=body, headers=headers)


async def tools_list(gw: Running, access: str) -> set[str]:
    r = await mcp(gw, access, INIT)
    assert r.status == 200, await r.text()
    session = r.headers.get("Mcp-Session-Id", "")
    await r.read()
    r = await mcp(gw, access, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    assert r.status == 202, await r.text()
    r = await mcp(gw, access, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session)
    assert r.status == 200, await r.text()
    text = await r.text()
    data = answer_messages(text)[0]
    return {t["name"] for t in data["result"]["tools"]}


async def until_status(gw: Running, access: str, want: int, timeout: float = 3.0) -> tuple[float, Any]:
    start = time.monotonic()
    while True:
        r = await mcp(gw, access, INIT)
        body = await r.json() if r.content_type == "application/json" else {}
        if r.status == want:
            return time.monotonic() - start, body
        assert time.monotonic() - start < timeout, f"still {r.status} after {timeout}s"
        await asyncio.sleep(0.01)


async def test_flow_on_a_fleet_grant_from_a_works_on_b_and_ends_with_its_parent(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, pg_dsn: str, started: list[Sidecar]
) -> None:
    a = await replica(aiohttp_client, upstream, tmp_path / "a", pg_dsn, started)
    b = await replica(aiohttp_client, upstream, tmp_path / "b", pg_dsn, started)
    parent, key = await a.create_key(name="person", owner="ann", permissions=PERMS)
    client = (await register(a))["client_id"]
    code, verifier = await code_for(a, key, client, tools="search")
    status, answer = await exchange(a, client, code, verifier)
    assert status == 200, answer
    # At once on B, which never saw the client, the code or the token, and may not have polled the
    # grant yet: it reads what it lacks from the database rather than refusing a token just issued.
    assert await tools_list(b, answer["access_token"]) == {"search"}  # the grant's tools, not the parent's two
    assert await tools_list(a, answer["access_token"]) == {"search"}
    # The code was used on A: B refuses it (single use across replicas); the refresh token rotates on B.
    status, again = await exchange(b, client, code, verifier)
    assert status == 400 and again["error"] == "invalid_grant"
    await until_status(b, answer["access_token"], 401)  # ... and the replay revoked the grant everywhere
    rows = await b.sc.store.list_grants(parent.id)
    assert len(rows) == 1 and rows[0].revoked_at is not None

    # A second grant; its parent revoked on A: B refuses its token within a second.
    code, verifier = await code_for(a, key, client)
    status, answer = await exchange(a, client, code, verifier)
    assert status == 200
    await until_status(b, answer["access_token"], 200)
    form = {"grant_type": "refresh_token", "client_id": client, "refresh_token": answer["refresh_token"]}
    r = await b.proxy.post("/oauth/token", data=form)
    assert r.status == 200
    fresh = await r.json()
    r = await a.proxy.post("/oauth/token", data=form)  # the old refresh token, replayed on A
    assert r.status == 400
    await until_status(b, fresh["access_token"], 401)  # reuse revoked the grant: B refuses the new token
    code, verifier = await code_for(a, key, client)
    status, answer = await exchange(a, client, code, verifier)
    await until_status(b, answer["access_token"], 200)
    await a.sc.manager().revoke(parent.id, "test")
    took, body = await until_status(b, answer["access_token"], 401, timeout=1.0)
    assert body["error"]["code"] == "revoked_key"
    print(f"\nparent revoked on A -> grant's token refused on B after {took * 1000:.0f} ms")


async def test_a_token_from_a_works_on_b_before_b_has_polled(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, pg_dsn: str, started: list[Sidecar]
) -> None:
    """A client gets its token from A and its next request lands on B, whose poll has not run since
    the parent key and the grant were made: B reads them from the database (as it does for a key
    made on another replica), it does not answer "revoked"."""
    a = await replica(aiohttp_client, upstream, tmp_path / "a", pg_dsn, started)
    b = await replica(aiohttp_client, upstream, tmp_path / "b", pg_dsn, started, poll="1h")
    _, key = await a.create_key(name="person", owner="ann", permissions=PERMS)
    client = (await register(a))["client_id"]
    code, verifier = await code_for(a, key, client, tools="search")
    status, answer = await exchange(a, client, code, verifier)
    assert status == 200, answer
    assert b.sc.verifier.table == {}  # B has not polled since it started
    assert await tools_list(b, answer["access_token"]) == {"search"}
