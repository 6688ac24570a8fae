"""Rate limits and quotas shared through a real ``redis-server`` (issue 4).

A fixture runs redis-server on a free port (no persistence), waits for it with a
bounded PING loop and kills it at the end; tests stop and restart it on the same port
to see ``on_redis_error`` and the recovery. Two sidecars sharing one Redis and one key
store hold one combined budget per key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar
from limits_support import T0, Clock, key
from redis_support import RedisProc, cfg, get, redis_server

from sidecar.config import parse_config
from sidecar.limits.ratelimit import RateLimiter
from sidecar.store import Store, open_store

__all__ = ["redis_server"]  # the fixture, re-exported for pytest


async def test_two_replicas_share_one_budget(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis_server: RedisProc
) -> None:
    config = cfg(plex_upstream, tmp_path, redis_server)  # one store file, one Redis: two replicas
    a = await make_sidecar(config)
    rec, k = await a.create_key(rate_limits=["5/minute"], quota="100/day")
    b = await make_sidecar(config)
    seen = []
    for i in range(8):
        resp = await get(a if i % 2 == 0 else b, k)
        seen.append((resp.status, resp.headers.get("X-RateLimit-Remaining")))
    assert seen == [(200, "4"), (200, "3"), (200, "2"), (200, "1"), (200, "0"), (429, "0"), (429, "0"), (429, "0")]
    # The quota is shared too, and the admin API of either replica sees it live.
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    shown = await (await b.admin.get(f"/admin/keys/{rec.id}", headers=auth)).json()
    assert [(s["used"], s["remaining"]) for s in shown["data"]["quota_status"]] == [(5, 95)]
    resp = await a.admin.post(f"/admin/keys/{rec.id}/quota", json={"add": -10}, headers=auth)
    assert [(s["used"], s["remaining"]) for s in (await resp.json())["data"]["quota_status"]] == [(-5, 105)]
    shown = await (await b.admin.get(f"/admin/keys/{rec.id}", headers=auth)).json()
    assert shown["data"]["quota_status"][0]["used"] == -5
    # `sidecar keys show` (a process that is not serving) reads Redis too.
    status = await a.sc.manager().quota_status(rec)
    assert status is not None and status[0]["used"] == -5


async def test_one_round_trip_per_request(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis_server: RedisProc
) -> None:
    r = await make_sidecar(cfg(plex_upstream, tmp_path, redis_server, default=["100/minute"], quota="1000/day"))
    _, k = await r.create_key()
    assert (await get(r, k)).status == 200  # loads the script
    client = await redis_server.client()
    try:
        await client.config_resetstat()
        for _ in range(10):
            assert (await get(r, k)).status == 200
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    assert stats["cmdstat_evalsha"]["calls"] == 10
    # Everything else Redis counted ran inside the script (or is this test's own INFO / CONFIG).
    inside = {"get", "set", "del", "time", "incrby", "expire"}
    assert {name.removeprefix("cmdstat_") for name in stats} <= inside | {"evalsha", "info", "config|resetstat"}


async def test_redis_down_allow_then_recovery(
    make_sidecar: MakeSidecar,
    plex_upstream: TestServer,
    tmp_path: Path,
    redis_server: RedisProc,
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = await make_sidecar(cfg(plex_upstream, tmp_path, redis_server, default=["3/minute"], on_redis_error="allow"))
    _, k = await r.create_key()
    assert [(await get(r, k)).status for _ in range(4)] == [200, 200, 200, 429]
    redis_server.stop()
    caplog.set_level(logging.WARNING, logger="sidecar.ratelimit")
    outage = [await get(r, k) for _ in range(12)]
    assert [resp.status for resp in outage] == [200] * 12  # allow: fail open, without headers
    assert not [h for h in outage[-1].headers if "ratelimit" in h.lower()]
    errors = r.sc.metrics.registry.get_sample_value("sidecar_ratelimit_backend_errors_total", {"backend": "redis"})
    assert errors == 12
    unreachable = [rec for rec in caplog.records if "unreachable" in rec.getMessage()]
    assert len(unreachable) == 1  # once per outage, not per request
    await redis_server.start()  # same port, empty (no persistence)
    deadline = time.monotonic() + 10
    while True:
        resp = await get(r, k)
        if "RateLimit" in resp.headers:
            break
        assert time.monotonic() < deadline, "the limiter never went back to Redis"
        await asyncio.sleep(0.05)
    assert resp.headers["RateLimit"].startswith('"minute";r=2;')  # a fresh Redis: a fresh budget
    assert [(await get(r, k)).status for _ in range(3)] == [200, 200, 429]
    assert any("is back" in rec.getMessage() for rec in caplog.records)


async def test_redis_down_deny_is_503_then_recovery(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis_server: RedisProc
) -> None:
    r = await make_sidecar(cfg(plex_upstream, tmp_path, redis_server, default=["100/minute"], on_redis_error="deny"))
    rec, k = await r.create_key(quota="100/day")
    assert (await get(r, k)).status == 200
    redis_server.stop()
    resp = await get(r, k)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert await resp.json() == {
        "success": False,
        "error": {"code": "service_unavailable", "message": "the rate-limit backend is unreachable; try again shortly"},
    }
    # The admin API still shows the key; the quota it cannot read is marked, not a 500.
    shown = await r.admin.get(f"/admin/keys/{rec.id}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert shown.status == 200
    (status,) = (await shown.json())["data"]["quota_status"]
    assert status["used"] is None and status["error"].startswith("rate-limit backend unreachable")
    await redis_server.start()
    deadline = time.monotonic() + 10
    while (resp := await get(r, k)).status != 200:
        assert resp.status == 503
        assert time.monotonic() < deadline, "never recovered"
        await asyncio.sleep(0.05)


async def test_sidecar_starts_while_redis_is_down(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis_server: RedisProc
) -> None:
    redis_server.stop()
    r = await make_sidecar(cfg(plex_upstream, tmp_path, redis_server, default=["100/minute"]))
    _, k = await r.create_key()
    assert (await get(r, k)).status == 200  # allow (the default) while it is down
    await redis_server.start()
    deadline = time.monotonic() + 10
    while "RateLimit" not in (await get(r, k)).headers:
        assert time.monotonic() < deadline, "never used Redis"
        await asyncio.sleep(0.05)


# ------------------------------------------------------ the same arithmetic as memory


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    raw = {
        "upstreams": [{"id": "api", "kind": "mcp", "url": "http://127.0.0.1:9"}],
        "store": {"path": str(tmp_path / "s.db")},
    }
    s = await open_store(parse_config(raw, env={}, base=tmp_path).store)
    yield s
    await s.close()


async def redis_limiter(store: Store, tmp_path: Path, redis: RedisProc, clock: Clock, **rl: Any) -> RateLimiter:
    raw = {
        "upstreams": [{"id": "api", "kind": "mcp", "url": "http://127.0.0.1:9"}],
        "store": {"path": str(tmp_path / "s.db")},
        "rate_limits": {"backend": "redis", "redis_url": redis.url, **rl},
    }
    limiter = RateLimiter(parse_config(raw, env={}, base=tmp_path), store, clock=clock)
    await limiter.start()
    return limiter


async def test_redis_gcra_exact_with_a_controlled_clock(store: Store, tmp_path: Path, redis_server: RedisProc) -> None:
    clock = Clock(T0 + 59.9)
    rl = await redis_limiter(store, tmp_path, redis_server, clock, default=["10/minute"], quota="12/day")
    try:
        k, up = key(), rl.config.upstreams[0]
        d = await rl.check(k, up)
        assert d.headers == {
            "RateLimit-Policy": '"minute";q=10;w=60, "quota";q=12;w=86400',
            "RateLimit": '"minute";r=9;t=6',
            "X-RateLimit-Limit": "10",
            "X-RateLimit-Remaining": "9",
            "X-RateLimit-Reset": "6",
        }
        assert [(await rl.check(k, up)).allowed for _ in range(9)] == [True] * 9
        clock.t = T0 + 60.1  # across the minute edge: no second burst
        refused = await rl.check(k, up)
        assert not refused.allowed and refused.error is not None
        assert refused.error.headers["Retry-After"] == "6"  # 5.8 s, rounded up
        assert refused.headers["RateLimit"] == '"minute";r=0;t=60'
        clock.t = T0 + 59.9 + 6.0
        assert [(await rl.check(k, up)).allowed for _ in range(2)] == [True, False]
        clock.advance(12.0)
        assert [(await rl.check(k, up)).allowed for _ in range(2)] == [True, False]  # 12/day quota
        refused = await rl.check(k, up)
        assert refused.error is not None and refused.error.code == "quota_exceeded"
        await rl.served_from_cache(k, up)  # count_cache_hits is on: nothing given back
        status = await rl.quota_status(k)
        assert status is not None and status[0]["used"] == 12
    finally:
        await rl.close()


async def test_redis_refund_when_cache_hits_are_free(store: Store, tmp_path: Path, redis_server: RedisProc) -> None:
    clock = Clock()
    rl = await redis_limiter(
        store, tmp_path, redis_server, clock, default=["3/minute"], quota="10/day", count_cache_hits=False
    )
    try:
        k, up = key(), rl.config.upstreams[0]
        for _ in range(5):
            assert (await rl.check(k, up)).allowed
            await rl.served_from_cache(k, up)
        assert (await rl.check(k, up)).headers["RateLimit"] == '"minute";r=2;t=20'
        status = await rl.quota_status(k)
        assert status is not None and status[0]["used"] == 1
    finally:
        await rl.close()
