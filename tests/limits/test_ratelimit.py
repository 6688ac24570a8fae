"""Rate limits, quotas and concurrency with the memory backend (issue 4).

The limiter alone (GCRA exactness, window edges, all-or-nothing, refunds, calendar
windows) and end to end through a real sidecar in front of a real upstream: the
exact headers on 200 and 429, precedence and scopes, 401/403 spending nothing,
concurrency slots released by a client that walks away mid-stream, quotas that survive
a restart, and the admin reset / top-up. Time is a controllable clock, never a sleep.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, Running, base_config
from limits_support import T0, Clock, key, utc

from sidecar.config import Config, parse_config, parse_limit
from sidecar.limits.quota import window_bounds, window_id
from sidecar.limits.ratelimit import RateLimiter, resolve_plan
from sidecar.store import Store, open_store


def config(tmp_path: Path, rate_limits: dict[str, Any] | None = None, **upstream: Any) -> Config:
    raw: dict[str, Any] = {
        "store": {"kind": "sqlite", "path": str(tmp_path / "limits.db")},
        "upstreams": [{"id": "api", "kind": "mcp", "url": "http://127.0.0.1:9", **upstream}],
        "rate_limits": rate_limits or {},
    }
    return parse_config(raw, env={}, base=tmp_path)


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s: Store = await open_store(config(tmp_path).store)
    yield s
    await s.close()


@pytest.fixture
async def limiter_for(store: Store, tmp_path: Path) -> Any:
    made: list[RateLimiter] = []

    async def make(rate_limits: dict[str, Any] | None = None, clock: Clock | None = None, **up: Any) -> RateLimiter:
        rl = RateLimiter(config(tmp_path, rate_limits, **up), store, clock=clock or Clock())
        await rl.start()
        made.append(rl)
        return rl

    yield make
    for rl in made:
        await rl.close()


# ------------------------------------------------------------------- the algorithm


async def test_burst_up_to_the_limit_then_one_per_interval(limiter_for: Any) -> None:
    clock = Clock()
    rl = await limiter_for({"default": ["10/second"]}, clock)
    k, up = key(), rl.config.upstreams[0]
    for i in range(10):
        d = await rl.check(k, up)
        assert d.allowed, i
        assert d.headers["RateLimit"] == f'"second";r={9 - i};t=1'
    refused = await rl.check(k, up)
    assert not refused.allowed and refused.error is not None
    assert refused.error.code == "rate_limit_exceeded"
    assert refused.error.retry_after == pytest.approx(0.1)  # type: ignore[attr-defined]
    clock.advance(0.1)
    assert (await rl.check(k, up)).allowed
    assert not (await rl.check(k, up)).allowed
    clock.advance(1.0)  # a full period idle: the whole burst is back
    assert [(await rl.check(k, up)).allowed for _ in range(11)] == [True] * 10 + [False]


@pytest.mark.parametrize("limit", ["10/second", "3/minute", "7/2hours"])
async def test_single_limit_fast_path_answers_as_the_general_path(limiter_for: Any, limit: str) -> None:
    """``check`` takes a shortcut for one limit in memory; its headers and verdicts must not differ."""
    clock = Clock()
    fast = await limiter_for({"default": [limit]}, clock)
    k, up = key(), fast.config.upstreams[0]
    general = await limiter_for({"default": [limit]}, clock)
    plan = general.plan(k, up)
    for step in range(14):
        got = await fast.check(k, up)
        want = await general._evaluate(k, plan, clock(), 1)
        assert (got.allowed, got.headers) == (want.allowed, want.headers), step
        clock.advance(0.05)


async def test_no_double_burst_across_a_window_edge(limiter_for: Any) -> None:
    """A fixed window would let 10 through at 59.9 s and 10 more at 60.1 s; GCRA lets none."""
    clock = Clock(T0 + 59.9)
    rl = await limiter_for({"default": ["10/minute"]}, clock)
    k, up = key(), rl.config.upstreams[0]
    assert [(await rl.check(k, up)).allowed for _ in range(10)] == [True] * 10
    clock.t = T0 + 60.1  # a new calendar minute
    assert [(await rl.check(k, up)).allowed for _ in range(10)] == [False] * 10
    clock.t = T0 + 59.9 + 6.0  # one emission interval (60/10 s) later: exactly one more
    assert [(await rl.check(k, up)).allowed for _ in range(3)] == [True, False, False]


async def test_any_interval_admits_at_most_burst_plus_rate(limiter_for: Any) -> None:
    """GCRA's guarantee: in any span of d seconds at most N + d/T requests pass (N = burst, T = period/N)."""
    clock = Clock()
    rl = await limiter_for({"default": ["20/minute"]}, clock)
    k, up = key(), rl.config.upstreams[0]
    rnd = random.Random(4)
    passed: list[float] = []
    for _ in range(3000):  # ~25 simulated minutes of bursty traffic
        clock.advance(rnd.expovariate(2.0))
        if (await rl.check(k, up)).allowed:
            passed.append(clock.t - T0)
    interval = 3.0
    for i in range(len(passed)):
        for j in range(i, min(len(passed), i + 60)):
            assert j - i + 1 <= 20 + (passed[j] - passed[i]) / interval + 1e-9
    span = clock.t - T0
    assert len(passed) <= 20 + span / interval
    assert len(passed) >= span / interval - 1  # and the budget is really available: ~ the full rate


async def test_all_or_nothing_across_limits_and_quota(limiter_for: Any) -> None:
    """A request refused by one limit is counted by no other limit and not by the quota."""
    clock = Clock()
    rl = await limiter_for({"default": ["1/second", "3/minute"], "quota": "50/day"}, clock)
    k, up = key(), rl.config.upstreams[0]
    assert [(await rl.check(k, up)).allowed for _ in range(6)] == [True] + [False] * 5
    status = await rl.quota_status(k)
    assert status is not None and status[0]["used"] == 1
    clock.advance(1.0)
    assert (await rl.check(k, up)).headers["RateLimit"] == '"second";r=0;t=1'
    clock.advance(1.0)
    d = await rl.check(k, up)  # the third counted request fills the minute bucket (3 x 20 s, 2 s refilled)
    assert d.allowed and d.headers["RateLimit"] == '"minute";r=0;t=58'
    assert not (await rl.check(k, up)).allowed


async def test_most_restrictive_policy_is_reported(limiter_for: Any) -> None:
    clock = Clock()
    rl = await limiter_for({"default": ["10/second", "12/minute"]}, clock)
    k, up = key(), rl.config.upstreams[0]
    d = await rl.check(k, up)
    assert d.headers["RateLimit-Policy"] == '"second";q=10;w=1, "minute";q=12;w=60'
    assert d.headers["RateLimit"] == '"second";r=9;t=1'
    for _ in range(10):
        clock.advance(1.0)
        d = await rl.check(k, up)
    # minute bucket: 11 requests x 5 s, 10 s of refill = 45 s of debt -> 3 left, full in 45 s.
    assert d.headers["RateLimit"] == '"minute";r=3;t=45'
    assert (d.headers["X-RateLimit-Limit"], d.headers["X-RateLimit-Remaining"], d.headers["X-RateLimit-Reset"]) == (
        "12", "3", "45",
    )  # fmt: skip


async def test_refund_for_cache_hits_only_when_configured(limiter_for: Any) -> None:
    clock = Clock()
    counted = await limiter_for({"default": ["3/minute"], "quota": "10/day"}, clock)
    free = await limiter_for({"default": ["3/minute"], "quota": "10/day", "count_cache_hits": False}, clock)
    k = key()
    for rl in (counted, free):
        up = rl.config.upstreams[0]
        for _ in range(5):
            assert (await rl.check(k, up)).allowed
            await rl.served_from_cache(k, up)
            if rl is counted:
                break
    up = counted.config.upstreams[0]
    assert (await counted.check(k, up)).headers["RateLimit"] == '"minute";r=1;t=40'
    assert (await free.check(k, up)).headers["RateLimit"] == '"minute";r=2;t=20'
    status = await free.quota_status(k)
    assert status is not None and status[0]["used"] == 1


async def test_idle_buckets_are_swept(limiter_for: Any) -> None:
    clock = Clock()
    rl = await limiter_for({"default": ["10/second"]}, clock)
    await rl.check(key(), rl.config.upstreams[0])
    assert rl.memory.tats
    clock.advance(0.2)
    rl.memory.sweep(int(clock() * 1_000_000))
    assert not rl.memory.tats


def test_precedence_key_then_upstream_then_global(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "store": {"path": str(tmp_path / "x.db")},
            "upstreams": [
                {"id": "a", "kind": "mcp", "url": "http://127.0.0.1:9", "path_prefix": "/a",
                 "rate_limits": ["5/second"], "quota": "100/day", "concurrency": 3},
                {"id": "b", "kind": "mcp", "url": "http://127.0.0.1:9", "path_prefix": "/b"},
                {"id": "c", "kind": "mcp", "url": "http://127.0.0.1:9", "path_prefix": "/c", "rate_limits": []},
            ],
            "rate_limits": {"default": ["100/minute"], "quota": "1000/month", "concurrency": 8},
        },
        env={}, base=tmp_path,
    )  # fmt: skip
    a, b, c = cfg.upstreams
    plain = key()
    pa, pb, pc = (resolve_plan(cfg, plain, u) for u in (a, b, c))
    assert [(r.limit.text, r.scope) for r in pa.rates] == [("5/second", "a")]
    assert pa.quota is not None and (pa.quota.limit.text, pa.quota.scope) == ("100/day", "a")
    assert (pa.concurrency, pa.concurrency_scope) == (3, "a")
    assert [(r.limit.text, r.scope) for r in pb.rates] == [("100/minute", "*")]
    assert pb.quota is not None and (pb.quota.limit.text, pb.quota.scope) == ("1000/month", "*")
    assert (pb.concurrency, pb.concurrency_scope) == (8, "*")
    assert pc.rates == ()  # an explicit empty list turns the global default off for that upstream
    own = key(rate_limits=("2/second", "30/minute"), quota="10/day", concurrency=1)
    for u in (a, b, c):
        p = resolve_plan(cfg, own, u)
        assert [(r.limit.text, r.scope) for r in p.rates] == [("2/second", "*"), ("30/minute", "*")]
        assert p.quota is not None and (p.quota.limit.text, p.quota.scope) == ("10/day", "*")
        assert (p.concurrency, p.concurrency_scope) == (1, "*")


@pytest.mark.parametrize(
    ("limit", "now", "start", "end"),
    [
        ("5/day", utc(2025, 6, 15, 23, 59, 59), utc(2025, 6, 15, 0, 0, 0), utc(2025, 6, 16, 0, 0, 0)),
        ("5/hour", utc(2025, 6, 15, 10, 30, 0), utc(2025, 6, 15, 10, 0, 0), utc(2025, 6, 15, 11, 0, 0)),
        ("5/15minutes", utc(2025, 6, 15, 10, 44, 0), utc(2025, 6, 15, 10, 30, 0), utc(2025, 6, 15, 10, 45, 0)),
        ("5/week", utc(2025, 6, 15, 12, 0, 0), utc(2025, 6, 9, 0, 0, 0), utc(2025, 6, 16, 0, 0, 0)),  # Sun -> Mon
        ("5/week", utc(2025, 6, 16, 0, 0, 0), utc(2025, 6, 16, 0, 0, 0), utc(2025, 6, 23, 0, 0, 0)),
        ("5/month", utc(2024, 2, 29, 23, 0, 0), utc(2024, 2, 1, 0, 0, 0), utc(2024, 3, 1, 0, 0, 0)),  # leap Feb
        ("5/month", utc(2025, 12, 31, 23, 0, 0), utc(2025, 12, 1, 0, 0, 0), utc(2026, 1, 1, 0, 0, 0)),
        ("5/3months", utc(2025, 5, 20, 0, 0, 0), utc(2025, 4, 1, 0, 0, 0), utc(2025, 7, 1, 0, 0, 0)),  # quarters
    ],
)
def test_quota_windows_follow_the_utc_calendar(limit: str, now: float, start: float, end: float) -> None:
    lim = parse_limit(limit)
    assert window_bounds(lim, now) == (start, end)
    assert window_id(lim, start).startswith(f"{lim.name}:")


async def test_quota_counts_are_flushed_in_batches(limiter_for: Any, store: Store) -> None:
    clock = Clock()
    rl = await limiter_for({"quota": "100/day"}, clock)
    k, up = key(), rl.config.upstreams[0]
    for _ in range(7):
        assert (await rl.check(k, up)).allowed
    wid = window_id(parse_limit("100/day"), utc(2025, 6, 15, 0, 0, 0))
    assert await store.quota_used("k1", "*", wid) == 0  # nothing written per request
    await rl.book.flush()
    assert await store.quota_used("k1", "*", wid) == 7
    # A change made elsewhere (another process, the CLI) is picked up at the next flush.
    await store.add_quota({("k1", "*", wid): 10})
    assert (await rl.check(k, up)).allowed
    await rl.book.flush()
    status = await rl.quota_status(k)
    assert status is not None and status[0]["used"] == 18


async def test_quota_fails_closed_when_the_store_cannot_be_read(tmp_path: Path) -> None:
    store = await open_store(config(tmp_path).store)
    rl = RateLimiter(config(tmp_path, {"quota": "100/day"}), store, clock=Clock())
    await store.close()  # every read now raises StoreError
    d = await rl.check(key(), rl.config.upstreams[0])
    assert not d.allowed and d.error is not None
    assert (d.error.status, d.error.code, d.error.headers["Retry-After"]) == (503, "service_unavailable", "1")


# ------------------------------------------------------------------- end to end


def plex_cfg(upstream: TestServer, tmp_path: Path, **rate_limits: Any) -> dict[str, Any]:
    return base_config(str(upstream.make_url("")).rstrip("/"), tmp_path, rate_limits=rate_limits)


async def get(r: Running, key: str, path: str = "/library/sections") -> Any:
    return await r.proxy.get(path, headers={"X-Plex-Token": key})


async def test_headers_on_success_exact(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> None:
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path), clock=Clock())
    _, k = await r.create_key(rate_limits=["60/minute"])
    resp = await get(r, k)
    assert resp.status == 200
    assert resp.headers["RateLimit-Policy"] == '"minute";q=60;w=60'
    assert resp.headers["RateLimit"] == '"minute";r=59;t=1'
    assert resp.headers["X-RateLimit-Limit"] == "60"
    assert resp.headers["X-RateLimit-Remaining"] == "59"
    assert resp.headers["X-RateLimit-Reset"] == "1"
    await get(r, k)
    resp = await get(r, k)
    assert resp.headers["RateLimit"] == '"minute";r=57;t=3'
    # Upstream errors carry them too: they are proxied responses.
    resp = await get(r, k, "/no/such/path")
    assert resp.status == 404 and resp.headers["RateLimit"] == '"minute";r=56;t=4'


async def test_429_exact_and_recovery(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> None:
    clock = Clock()
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path), clock=clock)
    _, k = await r.create_key(rate_limits=["2/minute"])
    assert [(await get(r, k)).status for _ in range(2)] == [200, 200]
    resp = await get(r, k)
    assert resp.status == 429
    assert await resp.json() == {
        "success": False,
        "error": {"code": "rate_limit_exceeded", "message": "rate limit of 2/minute exceeded for this key"},
    }
    assert resp.headers["Retry-After"] == "30"
    assert resp.headers["RateLimit-Policy"] == '"minute";q=2;w=60'
    assert resp.headers["RateLimit"] == '"minute";r=0;t=60'
    assert (resp.headers["X-RateLimit-Remaining"], resp.headers["X-RateLimit-Reset"]) == ("0", "60")
    clock.advance(29.9)
    assert (await get(r, k)).status == 429
    clock.advance(0.1)
    resp = await get(r, k)
    assert resp.status == 200 and resp.headers["RateLimit"] == '"minute";r=0;t=60'
    metric = r.sc.metrics.registry.get_sample_value
    assert metric("sidecar_ratelimit_backend_errors_total", {"backend": "memory"}) == 0


async def test_headers_off(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> None:
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path, default=["1/minute"], headers=False), clock=Clock())
    _, k = await r.create_key()
    ok = await get(r, k)
    assert ok.status == 200
    assert not [h for h in ok.headers if "ratelimit" in h.lower()]
    refused = await get(r, k)
    assert refused.status == 429 and refused.headers["Retry-After"] == "60"
    assert not [h for h in refused.headers if "ratelimit" in h.lower()]


async def test_refused_401_and_403_spend_nothing(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path), clock=Clock())
    rec, k = await r.create_key(rate_limits=["3/minute"], quota="5/day", permissions={"paths": ["/library/*"]})
    for _ in range(5):
        assert (await get(r, k, "/identity")).status == 403  # authenticated, not allowed this path
        assert (await get(r, k + "0")).status == 401  # a mistyped key
        assert (await r.proxy.get("/library/sections")).status == 401
    resp = await get(r, k)
    assert resp.status == 200
    assert resp.headers["RateLimit"] == '"minute";r=2;t=20'
    assert await r.sc.limiter.quota_status(rec) == [
        {"scope": "*", "quota": "5/day", "used": 1, "remaining": 4,
         "window_start": "2025-06-15T00:00:00Z", "resets_at": "2025-06-16T00:00:00Z"},
    ]  # fmt: skip


async def test_scopes_per_upstream_and_per_key(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    cfg = plex_cfg(plex_upstream, tmp_path, default=["5/minute"])
    cfg["upstreams"][0]["rate_limits"] = ["3/minute"]
    cfg["upstreams"].append(dict(cfg["upstreams"][0], id="other", path_prefix="/other", rate_limits=None))
    r = await make_sidecar(cfg, clock=Clock())
    _, plain = await r.create_key()
    _, own = await r.create_key(rate_limits=["4/minute"])
    # No limits of its own: 3/minute on plex (that upstream's), 5/minute on other (the global default).
    assert [(await get(r, plain)).status for _ in range(4)] == [200, 200, 200, 429]
    resp = await get(r, plain, "/other/library/sections")
    assert resp.status == 200 and resp.headers["RateLimit-Policy"] == '"minute";q=5;w=60'
    # Its own limit counts the key across both upstreams together.
    statuses = [(await get(r, own, p)).status for p in ("/library/sections", "/other/library/sections") * 3]
    assert statuses == [200, 200, 200, 200, 429, 429]


def streaming_app() -> web.Application:
    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        for _ in range(1200):  # bounded: the test aborts long before
            await resp.write(b"x" * 1024)
            await asyncio.sleep(0.02)
        return resp

    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/quick", quick)
    return app


async def test_concurrency_slot_released_when_client_aborts(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    server = await aiohttp_server(streaming_app())
    r = await make_sidecar(plex_cfg(server, tmp_path), clock=Clock())
    rec, k = await r.create_key(concurrency=1, rate_limits=["1000/second"])
    assert [(await get(r, k, "/quick")).status for _ in range(3)] == [200] * 3  # sequential: slots come back
    stream = await get(r, k, "/slow")
    assert stream.status == 200
    assert await stream.content.readany()
    assert r.sc.limiter.in_flight(rec.id) == 1
    refused = await get(r, k, "/quick")
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["RateLimit-Policy"] == '"concurrency";q=1;qu="concurrent-requests"'
    assert refused.headers["RateLimit"] == '"concurrency";r=0;t=1'
    # A refused concurrent request spends none of the rate budget.
    stream.close()  # the client walks away mid-body
    deadline = time.monotonic() + 10
    while True:
        resp = await get(r, k, "/quick")
        if resp.status == 200:
            break
        assert time.monotonic() < deadline, "the slot was never released"
        await asyncio.sleep(0.02)
    assert r.sc.limiter.in_flight(rec.id) == 0
    assert resp.headers["RateLimit"] == '"second";r=995;t=1'  # 3 + the stream + this one; no 429 counted


async def test_concurrency_from_global_config(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> None:
    server = await aiohttp_server(streaming_app())
    r = await make_sidecar(plex_cfg(server, tmp_path, concurrency=2))
    rec, k = await r.create_key()
    streams = [await get(r, k, "/slow") for _ in range(2)]
    assert [s.status for s in streams] == [200, 200]
    assert (await get(r, k, "/quick")).status == 429
    _, other = await r.create_key()
    assert (await get(r, other, "/quick")).status == 200  # per key, not per sidecar
    for s in streams:
        s.close()
    deadline = time.monotonic() + 10
    while r.sc.limiter.in_flight(rec.id):
        assert time.monotonic() < deadline, "slots were never released"
        await asyncio.sleep(0.02)


async def test_quota_exact_calendar_reset(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> None:
    clock = Clock(utc(2025, 6, 15, 23, 59, 50))
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path, quota="3/day"), clock=clock)
    _, k = await r.create_key()
    first = await get(r, k)
    assert first.headers["RateLimit-Policy"] == '"quota";q=3;w=86400'
    assert first.headers["RateLimit"] == '"quota";r=2;t=10'
    assert [(await get(r, k)).status for _ in range(2)] == [200, 200]
    resp = await get(r, k)
    assert resp.status == 429
    body = await resp.json()
    assert body["error"]["code"] == "quota_exceeded"
    assert body["error"]["message"] == "the quota of 3/day for this key is used up until 2025-06-16T00:00:00Z"
    assert resp.headers["Retry-After"] == "10"
    assert resp.headers["RateLimit"] == '"quota";r=0;t=10'
    clock.advance(10)  # midnight UTC: a new day
    resp = await get(r, k)
    assert resp.status == 200 and resp.headers["RateLimit"] == '"quota";r=2;t=86400'


async def test_quota_survives_a_restart(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> None:
    cfg = plex_cfg(plex_upstream, tmp_path)
    first = await make_sidecar(cfg, clock=Clock())
    rec, k = await first.create_key(quota="5/day")
    assert [(await get(first, k)).status for _ in range(3)] == [200] * 3
    await first.proxy.close()
    await first.sc.close()  # flushes what the background task has not written yet
    second = await make_sidecar(cfg, clock=Clock(T0 + 60))
    assert [(await get(second, k)).status for _ in range(3)] == [200, 200, 429]
    status = await second.sc.manager().quota_status(rec)  # what `sidecar keys show` prints
    assert status is not None and status[0]["used"] == 3  # the store: last flush (5 once flushed)
    await second.sc.limiter.book.flush()
    status = await second.sc.manager().quota_status(rec)
    assert status is not None and (status[0]["used"], status[0]["remaining"]) == (5, 0)


async def test_admin_shows_resets_and_tops_up_quota(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path), clock=Clock())
    rec, k = await r.create_key(quota="2/day")
    assert [(await get(r, k)).status for _ in range(3)] == [200, 200, 429]
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    shown = await (await r.admin.get(f"/admin/keys/{rec.id}", headers=auth)).json()
    assert shown["data"]["quota_status"] == [
        {"scope": "*", "quota": "2/day", "used": 2, "remaining": 0,
         "window_start": "2025-06-15T00:00:00Z", "resets_at": "2025-06-16T00:00:00Z"},
    ]  # fmt: skip
    resp = await r.admin.post(f"/admin/keys/{rec.id}/quota", json={"add": -3}, headers=auth)
    assert resp.status == 200
    assert (await resp.json())["data"]["quota_status"][0] | {} == {
        "scope": "*", "quota": "2/day", "used": -1, "remaining": 3,
        "window_start": "2025-06-15T00:00:00Z", "resets_at": "2025-06-16T00:00:00Z",
    }  # fmt: skip
    assert [(await get(r, k)).status for _ in range(4)] == [200, 200, 200, 429]
    resp = await r.admin.post(f"/admin/keys/{rec.id}/quota", json={"used": 0}, headers=auth)
    assert (await resp.json())["data"]["quota_status"][0]["remaining"] == 2
    assert [(await get(r, k)).status for _ in range(3)] == [200, 200, 429]
    wid = window_id(parse_limit("2/day"), utc(2025, 6, 15, 0, 0, 0))
    await r.sc.limiter.book.flush()
    assert await r.sc.store.quota_used(rec.id, "*", wid) == 2
    for bad in ({}, {"used": -1}, {"used": 1, "add": 1}, {"add": "5"}, {"used": 0, "extra": 1},
                {"used": 0, "upstream": "nope"}):  # fmt: skip
        resp = await r.admin.post(f"/admin/keys/{rec.id}/quota", json=bad, headers=auth)
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["code"] == "bad_request"
    no_quota, _ = await r.create_key()
    resp = await r.admin.post(f"/admin/keys/{no_quota.id}/quota", json={"used": 0}, headers=auth)
    assert resp.status == 409
    assert (await (await r.admin.get(f"/admin/keys/{no_quota.id}", headers=auth)).json())["data"][
        "quota_status"
    ] is None
    assert (await r.admin.post("/admin/keys/nope/quota", json={"used": 0}, headers=auth)).status == 404
    assert (await r.admin.post(f"/admin/keys/{rec.id}/quota", json={"used": 0})).status == 401
    audit = await (await r.admin.get(f"/admin/audit?key={rec.id}", headers=auth)).json()
    assert [e["action"] for e in audit["data"]][:2] == ["quota_adjusted", "quota_adjusted"]


async def test_cache_hits_spend_budget_unless_configured(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    rules = {"rules": [{"upstream": "plex", "path": "/library/sections", "ttl": "60s"}]}
    counted = await make_sidecar(dict(plex_cfg(plex_upstream, tmp_path, default=["2/minute"]), cache=rules))
    _, k = await counted.create_key()
    statuses = [(await get(counted, k)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    free_cfg = dict(plex_cfg(plex_upstream, tmp_path / "b", default=["2/minute"], count_cache_hits=False), cache=rules)
    (tmp_path / "b").mkdir()
    free = await make_sidecar(free_cfg)
    _, k2 = await free.create_key()
    seen = []
    for _ in range(5):
        resp = await get(free, k2)
        seen.append((resp.status, resp.headers.get("X-Cache-Status")))
    assert seen[0] == (200, "MISS")
    assert seen[1:] == [(200, "HIT")] * 4  # hits give their unit back
