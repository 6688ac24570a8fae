"""Quota windows at their edges: a request charged in one window and handed back in the next.

Refusals are free (invariant 12), so a request the MCP gateway refuses once it has read the body,
or one answered from the cache, gets its unit back. The body can arrive after the window's end:
the unit must go back to the window it was charged in, or a client moves budget across the edge
and gets more than its quota in the next window. Memory and Redis backends alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from limits_support import Clock, key, utc
from redis_support import RedisProc, redis_server

from sidecar.config import parse_config
from sidecar.limits.ratelimit import RateLimiter
from sidecar.store import open_store

__all__ = ["redis_server"]  # the fixture, re-exported for pytest


@pytest.fixture
async def limiter(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Any] = []

    async def make(redis: RedisProc | None, clock: Clock, **rate_limits: Any) -> RateLimiter:
        if redis is not None:
            rate_limits = {"backend": "redis", "redis_url": redis.url, **rate_limits}
        raw = {
            "store": {"kind": "sqlite", "path": str(tmp_path / "edges.db")},
            "upstreams": [{"id": "api", "kind": "mcp", "url": "http://127.0.0.1:9"}],
            "rate_limits": rate_limits,
        }
        config = parse_config(raw, env={}, base=tmp_path)
        store = await open_store(config.store)
        rl = RateLimiter(config, store, clock=clock)
        await rl.start()
        made.append((rl, store))
        return rl

    yield make
    for rl, store in made:
        await rl.close()
        await store.close()


async def test_a_refund_after_the_edge_goes_back_to_the_window_it_was_charged_in(limiter: Any) -> None:
    await refunds_across_the_edge(limiter, None)


async def test_a_refund_after_the_edge_goes_back_to_its_window_in_redis(limiter: Any, redis_server: RedisProc) -> None:
    await refunds_across_the_edge(limiter, redis_server)


async def test_a_refund_in_the_same_window_still_frees_its_unit(limiter: Any, redis_server: RedisProc) -> None:
    for redis in (None, redis_server):
        clock = Clock(utc(2025, 6, 15, 12, 0, 0))
        rl = await limiter(redis, clock, quota="2/day")
        k, up = key("same-" + ("redis" if redis else "memory")), rl.config.upstreams[0]
        assert (await rl.check(k, up)).allowed
        await rl.refund(k, up)
        assert [(await rl.check(k, up)).allowed for _ in range(3)] == [True, True, False]


async def refunds_across_the_edge(limiter: Any, redis: RedisProc | None) -> None:
    """Three requests charged at 23:59:59 whose bodies arrive after midnight and are refused: before,
    each refund went to the new day, which then let 6 requests through on a quota of 3."""
    clock = Clock(utc(2025, 6, 15, 23, 59, 59))
    rl = await limiter(redis, clock, quota="3/day")
    k, up = key(), rl.config.upstreams[0]
    crossed = asyncio.Event()
    charged = 0

    async def refused_after_its_body(n: int) -> None:  # one request, in its own task as a handler is
        nonlocal charged
        assert (await rl.check(k, up)).allowed
        charged += 1
        await crossed.wait()  # the body trickles in past midnight; then the gateway refuses the call
        await rl.refund(k, up)

    tasks = [asyncio.create_task(refused_after_its_body(n)) for n in range(3)]
    async with asyncio.timeout(2):
        while charged < 3:
            await asyncio.sleep(0)
    clock.advance(2)  # 00:00:01, the next day
    crossed.set()
    await asyncio.gather(*tasks)
    got = [(await rl.check(k, up)).allowed for _ in range(4)]
    assert got == [True, True, True, False], "the new day grants its quota, no more"
    clock.advance(-2)  # what the old day says: its three refused requests were given back
    status = await rl.quota_status(k)
    assert status is not None and int(status[0]["used"]) == 0, status
