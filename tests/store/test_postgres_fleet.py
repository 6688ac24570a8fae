"""A fleet on one PostgreSQL database: what one replica's admin does, every replica enforces
within a second; a database restart mid-traffic leaves clients of loaded keys unharmed.

Figures (propagation times) are printed: run with ``-s`` to read them.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, base_config
from pg_support import PgServer, pg_dsn, pg_server
from redis_support import RedisProc, redis_server
from serve_support import sidecar_process

from sidecar.auth.keys import generate_key
from sidecar.store.postgres import PostgresStore

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PATH = "/library/sections"

__all__ = ["pg_dsn", "pg_server", "redis_server"]  # the fixtures, re-exported for pytest


def fleet_config(upstream: TestServer, tmp: Path, **store: Any) -> dict[str, Any]:
    tmp.mkdir(exist_ok=True)
    return base_config(
        str(upstream.make_url("")).rstrip("/"),
        tmp,
        store={"kind": "postgres", "dsn_env": "SIDECAR_DATABASE_URL", **store},
    )


async def status_of(http: aiohttp.ClientSession, url: str, key: str, path: str = PATH) -> tuple[int, str]:
    async with http.get(url + path, headers={"X-Plex-Token": key}) as r:
        body = await r.json() if r.content_type == "application/json" else {}
        return r.status, (body.get("error") or {}).get("code", "")


async def until_status(
    http: aiohttp.ClientSession, url: str, key: str, want: int, path: str = PATH, timeout: float = 3.0
) -> tuple[float, str]:
    """Seconds until ``url`` answers ``want`` for ``key`` (requests back to back), and the error code."""
    start = time.monotonic()
    while True:
        status, code = await status_of(http, url, key, path)
        if status == want:
            return time.monotonic() - start, code
        assert time.monotonic() - start < timeout, f"still {status} {code} after {timeout}s"


@pytest.mark.parametrize("poll", ["500ms", "100ms"])  # SQLite's default; the postgres default
async def test_two_sidecar_processes_one_database(
    plex_upstream: TestServer, tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, poll: str
) -> None:
    """Real processes A and B: create, revoke, permission and expiry changes made through A's
    admin API are enforced by B within a second (measured from A's answer to B's first changed answer)."""
    monkeypatch.setenv("SIDECAR_DATABASE_URL", pg_dsn)
    paths = []
    for name in ("a", "b"):
        path = tmp_path / name / "sidecar.yaml"
        cfg = fleet_config(plex_upstream, tmp_path / name)
        cfg["store"]["poll_interval"] = poll
        path.write_text(yaml.safe_dump(cfg))
        paths.append(path)
    async with sidecar_process(paths[0]) as a, sidecar_process(paths[1]) as b, aiohttp.ClientSession() as http:
        created, revoked = [], []
        for i in range(3):
            async with http.post(f"{a.admin}/admin/keys", json={"name": f"k{i}"}, headers=ADMIN) as r:
                assert r.status == 201, await r.text()
                key = (await r.json())["data"]
            took, _ = await until_status(http, b.proxy, key["key"], 200)
            created.append(took)
            async with http.delete(f"{a.admin}/admin/keys/{key['id']}", headers=ADMIN) as r:
                assert r.status == 200
            took, code = await until_status(http, b.proxy, key["key"], 401)
            assert code == "revoked_key"
            revoked.append(took)
        # A permission change: B answers 403 for a path the key lost.
        async with http.post(f"{a.admin}/admin/keys", json={"name": "perm"}, headers=ADMIN) as r:
            key = (await r.json())["data"]
        await until_status(http, b.proxy, key["key"], 200)
        body = {"permissions": {"upstreams": ["plex"], "paths": ["/identity"]}}
        async with http.patch(f"{a.admin}/admin/keys/{key['id']}", json=body, headers=ADMIN) as r:
            assert r.status == 200, await r.text()
        perm, code = await until_status(http, b.proxy, key["key"], 403)
        assert code == "insufficient_permissions"
        assert (await status_of(http, b.proxy, key["key"], "/identity"))[0] == 200
        # An expiry edit: expires 300 ms from now; B refuses it as expired.
        soon = datetime.fromtimestamp(time.time() + 0.3, UTC).isoformat()
        async with http.patch(f"{a.admin}/admin/keys/{key['id']}", json={"expires_at": soon}, headers=ADMIN) as r:
            assert r.status == 200, await r.text()
        expiry, code = await until_status(http, b.proxy, key["key"], 401, path="/identity")
        assert code == "expired_key"
    print(f"\nfleet propagation A->B (poll_interval {poll}): create {[f'{t * 1000:.0f}ms' for t in created]}, "
          f"revoke {[f'{t * 1000:.0f}ms' for t in revoked]} (median {statistics.median(revoked) * 1000:.0f}ms), "
          f"permission change {perm * 1000:.0f}ms, expiry edit (+300ms) {expiry * 1000:.0f}ms")  # fmt: skip
    assert max(revoked) < 1.0 and perm < 1.0 and expiry < 1.3


async def test_database_restart_mid_traffic(
    pg_server: PgServer,
    pg_dsn: str,  # before make_sidecar: the database outlives the sidecar at teardown
    make_sidecar: MakeSidecar,
    plex_upstream: TestServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What clients see while the database is down and after it restarts:

    - a loaded key keeps working (200): keys are verified from memory;
    - admin writes answer 503 service_unavailable (the JSON error), nothing crashes;
    - usage counted meanwhile is written once the database is back (none lost, none doubled);
    - afterwards the listener is back: a revoke made by another process is enforced again.
    """
    cfg = fleet_config(plex_upstream, tmp_path, usage_flush_interval="200ms")
    r = await make_sidecar(cfg, extra_env={"SIDECAR_DATABASE_URL": pg_dsn})
    store = r.sc.store
    assert isinstance(store, PostgresStore) and store.listener is not None
    rec, key = await r.create_key(name="loaded")
    other, _ = await r.create_key(name="other")
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            resp = await r.proxy.get(PATH, headers={"X-Plex-Token": key})
            statuses.append(resp.status)
            await resp.read()
            await asyncio.sleep(0.005)

    task = asyncio.create_task(traffic())
    try:
        await asyncio.sleep(0.1)
        await asyncio.to_thread(pg_server.restart)  # stop -m fast and start again, mid-traffic
        await asyncio.sleep(0.1)
        await asyncio.to_thread(pg_server.stop)  # and down for a while
        try:
            await asyncio.wait_for(_until(lambda: not store.listener.listening), 5)  # type: ignore[union-attr]
            during = len(statuses)
            resp = await r.admin.post("/admin/keys", json={"name": "while-down"}, headers=r.admin_headers())
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "service_unavailable"
            resp = await r.admin.delete(f"/admin/keys/{other.id}", headers=r.admin_headers())
            assert resp.status == 503
            # A key this replica never saw cannot be looked up: a plain 401, never a 500.
            unknown, _ = generate_key("pmcp_")
            resp = await r.proxy.get(PATH, headers={"X-Plex-Token": unknown})
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_key"
            # Still ready: the keys are in memory, the load balancer keeps sending traffic.
            assert (await r.admin.get("/readyz")).status == 200
            await _until(lambda: len(statuses) > during + 20)
        finally:
            await asyncio.to_thread(pg_server.start)
        await asyncio.wait_for(_until(lambda: store.listener.listening), 10)  # type: ignore[union-attr]
    finally:
        stop.set()
        await task
    assert statuses and set(statuses) == {200}, f"a loaded key failed during the outage: {set(statuses)}"
    # Usage counted while down is written once it is back: every request, exactly once.
    await r.sc.usage.flush()
    await _until_async(lambda: _requests(store, rec.id, len(statuses)))
    # Writes resume, and changes made by another process reach this one again.
    resp = await r.admin.post("/admin/keys", json={"name": "after"}, headers=r.admin_headers())
    assert resp.status == 201
    cli = PostgresStore(pg_dsn, listen=False)
    await cli.open()
    try:
        await cli.update(rec.with_changes(revoked_at=time.time()))
    finally:
        await cli.close()
    start = time.monotonic()
    while (await r.proxy.get(PATH, headers={"X-Plex-Token": key})).status != 401:
        assert time.monotonic() - start < 2
    assert store.listener.reconnects >= 1
    # The outage was logged (the database named by host and port), its password never.
    logging.getLogger("sidecar.test").warning("a line that quotes the DSN: %s", pg_dsn)
    assert "lost the LISTEN connection" in caplog.text and f"127.0.0.1:{pg_server.port}" in caplog.text
    assert pg_server.password not in caplog.text and "quotes the DSN: REDACTED" in caplog.text
    print(f"\nafter the restart, a revoke by another process took {(time.monotonic() - start) * 1000:.0f}ms; "
          f"{len(statuses)} requests during the restart and outage, all 200")  # fmt: skip


async def _requests(store: PostgresStore, key_id: str, want: int) -> bool:
    rows = await store.usage(key_id)
    got = sum(r["requests"] for r in rows)
    assert got <= want, f"usage written twice: {got} > {want}"
    return got == want


async def _until(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def _until_async(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_fleet_quota_is_exact_with_redis_and_usage_adds_up(
    pg_dsn: str, make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis_server: RedisProc
) -> None:
    """The deploy examples' combination: keys and usage in PostgreSQL, limits in Redis. Two
    replicas, a key with 10/day, 20 requests spread over both: exactly 10 pass, on either
    replica; each replica writes its own usage batch and the database holds the sum."""
    replicas = []
    for name in ("a", "b"):
        cfg = fleet_config(plex_upstream, tmp_path / name, usage_flush_interval="100ms")
        cfg["rate_limits"] = {"backend": "redis", "redis_url": redis_server.url}
        replicas.append(await make_sidecar(cfg, extra_env={"SIDECAR_DATABASE_URL": pg_dsn}))
    a, b = replicas
    rec, key = await a.create_key(name="metered", quota="10/day")
    statuses = []
    for i in range(20):
        r = (a, b)[i % 2]
        resp = await r.proxy.get(PATH, headers={"X-Plex-Token": key})
        statuses.append(resp.status)
    assert statuses.count(200) == 10 and statuses.count(429) == 10
    for r in replicas:
        await r.sc.usage.flush()
    rows = await a.sc.store.usage(rec.id)
    assert sum(x["requests"] for x in rows) == 20 and sum(x["rate_limited"] for x in rows) == 10
