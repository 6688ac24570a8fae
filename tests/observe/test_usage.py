"""Per-key usage history: daily buckets written in batches, kept when a flush fails,
flushed on shutdown, and served by ``GET /admin/keys/{id}/usage`` and ``sidecar keys usage``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config

from sidecar.core.scope import RequestScope
from sidecar.observe.usage import UsageRecorder, day_of, report
from sidecar.store.base import UsageRow
from sidecar.store.sqlite import SqliteStore

DAY = 86400.0


def scope(key_id: str, status: int = 200, **kw: Any) -> RequestScope:
    s = RequestScope(method="GET", path="/", client_ip="10.0.0.7", key_id=key_id, status=status)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def open_store(path: Path) -> SqliteStore:
    store = SqliteStore(path)
    await store.open()
    return store


# ---------------------------------------------------------------- UsageRecorder


async def test_buckets_by_day_and_what_counts(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    clock = Clock(1_767_225_600.0)  # 2026-01-01T00:00:00Z
    rec = UsageRecorder(store, clock=clock, interval=3600)
    try:
        rec.record(scope("k1", bytes_sent=100))
        rec.record(scope("k1", 404, bytes_sent=20))  # an error answer
        rec.record(scope("k1", 200, bytes_sent=5, error="upstream_unavailable"))  # cut by the upstream: error
        rec.record(scope("k1", 200, bytes_sent=7, error="client_disconnected"))  # the client left: not an error
        rec.record(scope("k1", 499, error="client_disconnected"))  # left before the answer: not an error
        rec.record(scope("k1", 429, error="rate_limit_exceeded", rate_limited=True))
        rec.record(scope("", 401, error="unauthorized"))  # no key: nothing to charge
        clock.now += DAY
        rec.record(scope("k1", bytes_sent=1))
        rec.record(scope("k2"))
        assert rec.pending == 8
        await rec.flush()
        assert rec.pending == 0
        assert await store.usage("k1") == [
            {"day": "2026-01-01", "requests": 6, "errors": 3, "bytes": 132, "rate_limited": 1},
            {"day": "2026-01-02", "requests": 1, "errors": 0, "bytes": 1, "rate_limited": 0},
        ]
        assert await store.usage("k2") == [
            {"day": "2026-01-02", "requests": 1, "errors": 0, "bytes": 0, "rate_limited": 0}
        ]
        # Batches add up; they never overwrite.
        rec.record(scope("k2", bytes_sent=10))
        await rec.flush()
        assert (await store.usage("k2"))[0]["requests"] == 2
        k1 = await store.get("k1")
        assert k1 is None  # no such key record: usage is kept by id all the same
    finally:
        await rec.close()
        await store.close()


async def test_failed_flush_keeps_counts_for_the_next(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await open_store(path)
    rec = UsageRecorder(store, interval=3600)
    rec.record(scope("k1", bytes_sent=10))
    await rec.flush()
    rec.record(scope("k1", 500, bytes_sent=1))
    rec.record(scope("k1", bytes_sent=1))
    await store.close()  # the database goes away: the flush fails, loudly but harmlessly
    await rec.flush()
    assert rec.pending == 2
    rec.record(scope("k1", bytes_sent=1))
    rec.store = store = await open_store(path)
    try:
        await rec.flush()
        assert rec.pending == 0
        [row] = await store.usage("k1")
        assert (row["requests"], row["errors"], row["bytes"]) == (4, 1, 13)  # nothing lost, nothing twice
    finally:
        await rec.close()
        await store.close()


async def test_background_flush_and_close(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    rec = UsageRecorder(store, interval=0.05)
    rec.start()
    try:
        rec.record(scope("k1"))
        deadline = time.monotonic() + 10
        while not await store.usage("k1") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert (await store.usage("k1"))[0]["requests"] == 1  # written by the loop, no explicit flush
        rec.record(scope("k1"))
        rec.record(scope("k1"))
    finally:
        await rec.close()  # stops the loop between writes and flushes the rest
    assert (await store.usage("k1"))[0]["requests"] == 3
    await store.close()


async def test_report_window_and_totals(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    now = 1_767_225_600.0 + 12 * 3600  # 2026-01-01 noon
    try:
        await store.add_usage(
            {
                ("k1", day_of(now - 40 * DAY)): UsageRow(100, 1, 1000, 0),
                ("k1", day_of(now - 2 * DAY)): UsageRow(5, 1, 50, 1),
                ("k1", day_of(now)): UsageRow(2, 0, 20, 0),
            }
        )
        week = await report(store, "k1", 7, now)
        assert (week["from"], week["to"]) == ("2025-12-26", "2026-01-01")
        assert [d["day"] for d in week["days"]] == ["2025-12-30", "2026-01-01"]  # only days with traffic
        assert week["total"] == {"requests": 7, "errors": 1, "bytes": 70, "rate_limited": 1}
        assert (await report(store, "k1", 1, now))["total"]["requests"] == 2
        assert (await report(store, "k1", 60, now))["total"]["requests"] == 107
        for bad in (0, -1, 100_000):
            try:
                await report(store, "k1", bad, now)
            except ValueError as e:
                assert "days" in str(e)
            else:
                raise AssertionError(f"days={bad} accepted")
    finally:
        await store.close()


# -------------------------------------------------------------- through a sidecar


async def traffic(r: Running, key: str) -> int:
    """Known traffic for one key: 3 OK, 1 upstream 404. Returns the body bytes received."""
    sent = 0
    for path in ("/library/sections", "/identity", "/identity", "/no-such-page"):
        resp = await r.proxy.get(path, headers={"X-Plex-Token": key})
        sent += len(await resp.read())
    return sent


async def test_admin_usage_endpoint(plex_sidecar: Running) -> None:
    r = plex_sidecar
    rec, key = await r.create_key(name="dana")
    sent = await traffic(r, key)
    assert (await r.proxy.get("/identity")).status == 401  # no key: not in anyone's usage

    resp = await r.admin.get(f"/admin/keys/{rec.id}/usage", headers=r.admin_headers())
    assert resp.status == 200
    data = (await resp.json())["data"]
    today = day_of(time.time())
    assert data["id"] == rec.id and data["name"] == "dana"
    assert data["days"] == [{"day": today, "requests": 4, "errors": 1, "bytes": sent, "rate_limited": 0}]
    assert data["total"] == {"requests": 4, "errors": 1, "bytes": sent, "rate_limited": 0}
    assert data["to"] == today
    assert data["last_used_at"] is not None  # flushed before the record was read
    assert data["last_used_ip"] == "127.0.0.1"

    for bad in ("abc", "0", "-3"):
        resp = await r.admin.get(f"/admin/keys/{rec.id}/usage?days={bad}", headers=r.admin_headers())
        assert resp.status == 400
        assert (await resp.json())["error"]["message"].startswith("days:")
    resp = await r.admin.get("/admin/keys/000000000000/usage", headers=r.admin_headers())
    assert resp.status == 404
    assert (await r.admin.get(f"/admin/keys/{rec.id}/usage")).status == 401


async def cli(config: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args, "-c", str(config),
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_usage_survives_a_restart(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, env: dict[str, str]
) -> None:
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    first = await make_sidecar(cfg)
    rec, key = await first.create_key(name="erin")
    sent = await traffic(first, key)
    assert first.sc.usage.pending == 4  # counted in memory; the flush interval has not passed
    await first.sc.close()  # shutdown flushes

    second = await make_sidecar(cfg)
    resp = await second.admin.get(f"/admin/keys/{rec.id}/usage", headers=second.admin_headers())
    days = (await resp.json())["data"]["days"]
    assert [(d["requests"], d["errors"], d["bytes"]) for d in days] == [(4, 1, sent)]
    sent += len(await (await second.proxy.get("/identity", headers={"X-Plex-Token": key})).read())
    await second.sc.close()

    # The command line reads the same store (no server needed).
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump(cfg))
    code, out, err = await cli(config, env, "keys", "usage", rec.id, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["id"] == rec.id
    assert data["total"] == {"requests": 5, "errors": 1, "bytes": sent, "rate_limited": 0}
    code, out, err = await cli(config, env, "keys", "usage", rec.id, "--days", "7")
    assert code == 0, err
    assert "erin" in out and "TOTAL" in out and f"{sent}" in out
    code, out, err = await cli(config, env, "keys", "usage", rec.id, "--days", "0")
    assert code != 0 and "days" in err
