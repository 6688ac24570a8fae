"""What a crash can cost the quotas (issue 20.9).

With the memory backend quota counts reach the store every ``rate_limits.quota_flush_interval``
(default 2 s): a crash forgets at most that long of counting, i.e. it is a partial quota reset.
The bound is configurable, and ``/metrics`` says from start-up what is at stake.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config

from sidecar.config import ConfigError, parse_config
from sidecar.limits.quota import window_bounds, window_id
from sidecar.store import SqliteStore


def sample(r: Running, name: str) -> float | None:
    return r.sc.metrics.registry.get_sample_value(name)


async def scrape(r: Running) -> str:
    resp = await r.admin.get("/metrics")
    return await resp.text()


def test_the_flush_interval_is_a_validated_option(tmp_path: Path) -> None:
    cfg = base_config("http://127.0.0.1:9", tmp_path)
    env = {"PLEX_TOKEN": "x"}
    assert parse_config(cfg, env=env, base=tmp_path).rate_limits.quota_flush_interval == 2.0  # the default
    cfg["rate_limits"] = {"quota_flush_interval": "250ms"}
    assert parse_config(cfg, env=env, base=tmp_path).rate_limits.quota_flush_interval == 0.25
    for bad in ("0s", "-1", "1h", "soon", True):
        cfg["rate_limits"] = {"quota_flush_interval": bad}
        with pytest.raises(ConfigError) as e:
            parse_config(cfg, env=env, base=tmp_path)
        assert any(p.startswith("rate_limits.quota_flush_interval") for p in e.value.problems), e.value.problems


async def test_metrics_show_the_crash_bound_from_start_up_and_what_is_unflushed(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Before any request /metrics says sidecar_quota_flush_interval_seconds 300 and nothing unflushed;
    after five counted requests sidecar_quota_unflushed is 5 (what a crash now would forget); after
    the flush it is 0 and sidecar_quota_unflushed_max remembers the 5."""
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["rate_limits"] = {"quota": "100/day", "quota_flush_interval": "5m"}
    r = await make_sidecar(cfg)
    text = await scrape(r)
    assert "sidecar_quota_flush_interval_seconds 300.0" in text
    assert "sidecar_quota_unflushed 0.0" in text and "sidecar_quota_unflushed_max 0.0" in text
    _, key = await r.create_key()
    for _ in range(5):
        assert (await r.proxy.get("/identity", headers={"X-Plex-Token": key})).status == 200
    assert sample(r, "sidecar_quota_unflushed") == 5
    await r.sc.limiter.book.flush()
    assert sample(r, "sidecar_quota_unflushed") == 0
    assert sample(r, "sidecar_quota_unflushed_max") == 5


async def test_counts_reach_the_store_within_the_configured_interval(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """With quota_flush_interval 200ms, another process reading the database (what a restart
    after a crash would see) has every count well within a second, without a clean shutdown."""
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["rate_limits"] = {"quota": "100/day", "quota_flush_interval": "200ms"}
    r = await make_sidecar(cfg)
    rec, key = await r.create_key()
    for _ in range(3):
        assert (await r.proxy.get("/identity", headers={"X-Plex-Token": key})).status == 200
    limit = r.config.rate_limits.quota
    assert limit is not None
    wid = window_id(limit, window_bounds(limit, time.time())[0])
    other = SqliteStore(tmp_path / "sidecar.db")
    await other.open()
    try:
        deadline = time.monotonic() + 1.0
        while await other.quota_used(rec.id, "*", wid) < 3:
            assert time.monotonic() < deadline, "counts were not flushed within the interval"
            await asyncio.sleep(0.05)
    finally:
        await other.close()


async def test_redis_backend_reports_nothing_at_stake(tmp_path: Path) -> None:
    """With Redis the quota is counted in Redis itself: the interval gauge is 0."""
    from prometheus_client import CollectorRegistry

    from sidecar.limits.ratelimit import RateLimiter

    cfg = parse_config(
        {**base_config("http://127.0.0.1:9", tmp_path), "rate_limits": {"backend": "redis",
                                                                       "redis_url": "redis://127.0.0.1:9/0"}},
        env={"PLEX_TOKEN": "x"},
        base=tmp_path,
    )  # fmt: skip
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    registry = CollectorRegistry()
    limiter = RateLimiter(cfg, store, registry=registry)
    try:
        assert registry.get_sample_value("sidecar_quota_flush_interval_seconds") == 0
        assert registry.get_sample_value("sidecar_quota_unflushed_max") == 0
    finally:
        if limiter.redis is not None:
            await limiter.redis.close()
        await store.close()
