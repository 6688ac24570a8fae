"""Attack: move a key between limit scopes to spend its quota (or rate) twice in one window (invariant 10).

A quota set on the key counts it across all upstreams (scope ``*``); an upstream's quota counts
it on that upstream only (scope = the upstream's id). Each scope is a counter of its own, so a
delegate (``admin: true``) whose reach is an upstream's ``3/day`` could give a sibling key — or
itself — a quota of its own of ``3/day`` once the upstream's was spent (a fresh counter: 3
more), and take it away again (the upstream's counter). Moving a key's quota to another scope
now carries what the window has spent over to the counter that applies from then on; the same
holds for rate-limit buckets, which are named by scope too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar
from limits_support import Clock, utc
from redis_support import RedisProc, redis_server
from test_limits_attacks import get, plex_cfg

from sidecar.admin.manage import KeyManager
from sidecar.config import parse_config
from sidecar.limits.ratelimit import RateLimiter
from sidecar.store import open_store

__all__ = ["redis_server"]  # the fixture, re-exported for pytest


@pytest.mark.parametrize(("by", "backend"), [("delegate", "memory"), ("admin", "memory"), ("delegate", "redis")])
async def test_moving_a_key_between_quota_scopes_does_not_refill_its_quota(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis_server: RedisProc, by: str, backend: str
) -> None:
    rl: dict[str, Any] = {"backend": "redis", "redis_url": redis_server.url} if backend == "redis" else {}
    cfg = plex_cfg(plex_upstream, tmp_path, **rl)
    cfg["upstreams"][0]["quota"] = "3/day"  # scope "plex"
    r = await make_sidecar(cfg, clock=Clock())
    _, k_mgr = await r.create_key(owner="acme", permissions={"upstreams": ["plex"], "admin": True})
    sib, k_sib = await r.create_key(owner="acme", permissions={"upstreams": ["plex"]})
    auth = {"Authorization": f"Bearer {k_mgr}"} if by == "delegate" else r.admin_headers()

    async def move(quota: str | None) -> None:
        resp = await r.admin.patch(f"/admin/keys/{sib.id}", json={"quota": quota}, headers=auth)
        assert resp.status == 200, await resp.text()

    async def statuses(n: int) -> list[Any]:
        out: list[Any] = []
        for _ in range(n):
            resp = await get(r, k_sib)
            out.append(resp.status if resp.status == 200 else (resp.status, (await resp.json())["error"]["code"]))
        return out

    assert await statuses(2) == [200, 200]  # 2 of the upstream's 3/day
    await move("3/day")  # a quota of its own, within the delegate's reach: scope "*"
    assert await statuses(2) == [200, (429, "quota_exceeded")]  # 1 left, not 3
    await move(None)  # back to the upstream's counter
    assert await statuses(1) == [(429, "quota_exceeded")]
    resp = await r.admin.get(f"/admin/keys/{sib.id}", headers=r.admin_headers())
    assert [s["used"] for s in (await resp.json())["data"]["quota_status"]] == [3]


@pytest.mark.parametrize(("by", "backend"), [("delegate", "memory"), ("admin", "memory"), ("delegate", "redis")])
async def test_moving_a_key_between_rate_limit_scopes_does_not_refill_its_buckets(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis_server: RedisProc, by: str, backend: str
) -> None:
    """The same with rate limits: the upstream's ``2/minute`` (buckets of scope ``plex``) spent, then
    a ``2/minute`` of the key's own (scope ``*``), then the upstream's again: no request more."""
    rl: dict[str, Any] = {"backend": "redis", "redis_url": redis_server.url} if backend == "redis" else {}
    cfg = plex_cfg(plex_upstream, tmp_path, **rl)
    cfg["upstreams"][0]["rate_limits"] = ["2/minute", "100/day"]  # scope "plex"
    clock = Clock()
    r = await make_sidecar(cfg, clock=clock)
    _, k_mgr = await r.create_key(owner="acme", permissions={"upstreams": ["plex"], "admin": True})
    sib, k_sib = await r.create_key(owner="acme", permissions={"upstreams": ["plex"]})
    auth = {"Authorization": f"Bearer {k_mgr}"} if by == "delegate" else r.admin_headers()

    async def move(limits: list[str]) -> None:
        resp = await r.admin.patch(f"/admin/keys/{sib.id}", json={"rate_limits": limits}, headers=auth)
        assert resp.status == 200, await resp.text()

    assert [(await get(r, k_sib)).status for _ in range(3)] == [200, 200, 429]
    await move(["100/day", "2/minute"])  # its own, in another order: its first bucket is the day's
    assert (await get(r, k_sib)).status == 429
    await move([])
    assert (await get(r, k_sib)).status == 429
    clock.advance(30)  # one request's worth of the minute is back, on either scope
    assert [(await get(r, k_sib)).status for _ in range(2)] == [200, 429]


@pytest.fixture
async def two_upstreams(tmp_path: Path) -> AsyncIterator[tuple[RateLimiter, KeyManager]]:
    raw = {
        "store": {"kind": "sqlite", "path": str(tmp_path / "scope.db")},
        "upstreams": [
            {"id": "a", "kind": "mcp", "url": "http://127.0.0.1:9", "path_prefix": "/a", "quota": "10/day"},
            {"id": "b", "kind": "mcp", "url": "http://127.0.0.1:9", "path_prefix": "/b", "quota": "10/day"},
        ],
    }
    config = parse_config(raw, env={}, base=tmp_path)
    store = await open_store(config.store)
    clock = Clock(utc(2025, 6, 15))
    rl = RateLimiter(config, store, clock=clock)
    await rl.start()
    yield rl, KeyManager(config, store, clock=clock, limiter=rl)
    await rl.close()
    await store.close()


async def test_a_move_counts_what_every_scope_it_leaves_has_spent(
    two_upstreams: tuple[RateLimiter, KeyManager],
) -> None:
    """Upstream quotas (one counter per upstream) to a quota of the key's own (one counter for all):
    the new counter starts from the sum; and back: each upstream's counter from at least the whole
    (the sidecar cannot tell on which upstream the key's own quota was spent, so it assumes each)."""
    rl, mgr = two_upstreams
    rec, _ = await mgr.create({"name": "k"}, "test")
    a, b = rl.config.upstream("a"), rl.config.upstream("b")
    assert a is not None and b is not None
    for up, n in ((a, 4), (b, 3)):
        for _ in range(n):
            assert (await rl.check(rec, up)).allowed
    rec = await mgr.patch(rec.id, {"quota": "10/day"}, "test")
    status = await rl.quota_status(rec)
    assert status is not None and [(s["scope"], s["used"]) for s in status] == [("*", 7)]
    for _ in range(3):
        assert (await rl.check(rec, b)).allowed
    decision = await rl.check(rec, a)
    assert not decision.allowed and decision.error is not None and decision.error.code == "quota_exceeded"
    rec = await mgr.patch(rec.id, {"quota": None}, "test")
    status = await rl.quota_status(rec)
    assert status is not None and sorted((s["scope"], s["used"]) for s in status) == [("a", 10), ("b", 10)]
    assert not (await rl.check(rec, a)).allowed and not (await rl.check(rec, b)).allowed


async def test_a_move_while_redis_is_down_is_written_and_logged_never_a_500(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sidecar.demo import free_port

    cfg = plex_cfg(plex_upstream, tmp_path, backend="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    cfg["upstreams"][0].update(quota="3/day", rate_limits=["2/minute"])
    r = await make_sidecar(cfg, clock=Clock())
    sib, _ = await r.create_key(owner="acme", permissions={"upstreams": ["plex"]})
    move = {"quota": "3/day", "rate_limits": ["2/minute"]}
    resp = await r.admin.patch(f"/admin/keys/{sib.id}", json=move, headers=r.admin_headers())
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["rate_limits"] == ["2/minute"]
    quota, rates = [m for m in caplog.messages if "not carried over" in m]
    assert sib.id in quota and "quota spent in scope(s) plex" in quota
    assert sib.id in rates and "rate limits' debt" in rates
