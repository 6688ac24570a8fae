"""A full shared-memory bucket table (``workers: N``, memory backend) never lets a key pass unlimited.

The host's GCRA table (``sidecar.workers.shm``) is fixed; a bucket whose probe window holds only live
buckets has no slot. That was ``BackendDown``, the backend "unreachable", so ``on_redis_error: allow``
passed the request with no limit (and the worker's back-off then passed every key's for a while).
Now a spent slot is reclaimed first, and a genuinely full table refuses: ``503 service_unavailable``,
``Retry-After: 1``, whatever ``on_redis_error`` says. A 4-slot table makes "full" four live buckets.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import MakeSidecar, ProxyTestServer, base_config
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar, create_apps
from sidecar.config import parse_config
from sidecar.workers.limits import LimitsOwner, SharedLimits
from sidecar.workers.shm import ShmBuckets

Worker = TestClient[web.Request, web.Application]


class Steady:
    """The host's monotonic clock, which a test moves forward (the table's buckets expire on it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
async def small_host(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, env: dict[str, str], aiohttp_client: Any
) -> AsyncIterator[tuple[Any, Worker, Steady]]:
    """The supervisor's sidecar with its owner on a 4-slot table, and one worker's proxy, under ``allow``."""
    cfg = base_config(str(plex_upstream.make_url("")), tmp_path, rate_limits={"on_redis_error": "allow"})
    sup = await make_sidecar(cfg)
    steady = Steady()
    table = ShmBuckets(str(tmp_path / "buckets"), create=True, slots=4)
    owner = LimitsOwner(table, sup.sc.limiter.book, sup.sc.limiter.quota_levels, steady=steady)
    sup.sc.limiter.host_buckets = table
    path = str(tmp_path / "limits.sock")
    await owner.start(path)
    sc = Sidecar(parse_config(cfg, env=env, base=tmp_path), registry=CollectorRegistry(), env=env)
    sc.shared_limits = SharedLimits(path, ShmBuckets(str(tmp_path / "buckets")), steady=steady)
    await sc.start()
    try:
        worker = await aiohttp_client(ProxyTestServer(create_apps(sc)[0]))
        sup.worker_sc = sc
        yield sup, worker, steady
    finally:
        await owner.close()
        await sc.close()
        table.close()


async def _keys(sup: Any, n: int, **fields: Any) -> list[str]:
    out = []
    for _ in range(n):
        _, k = await sup.create_key(rate_limits=["1/minute"], **fields)
        out.append(k)
    await sup.worker_sc.verifier.refresh()
    return out


async def _get(worker: Worker, key: str) -> Any:
    return await worker.get("/library/sections", headers={"X-Plex-Token": key})


@pytest.mark.parametrize("quota", [None, "100/day"], ids=["worker", "supervisor"])
async def test_a_full_table_refuses_under_allow_and_reclaiming_lets_traffic_continue(
    small_host: Any, quota: str | None
) -> None:
    """Attack: fill the host's table with live buckets (here four keys, each one request), then use a key
    with no slot — with ``on_redis_error: allow`` it passed unlimited, every request. Now it is 503 (a key
    with a quota too, which the supervisor checks: on its first read from the store it was ``allow``); the
    keys that hold a slot are limited as before (no back-off deciding them by ``allow``); and once the
    buckets are full again, their slots are reclaimed and every key is served and limited again."""
    sup, worker, steady = small_host
    fillers = await _keys(sup, 4)
    (late,) = await _keys(sup, 1, **({"quota": quota} if quota else {}))
    for k in fillers:
        assert (await _get(worker, k)).status == 200
    for _ in range(3):  # never a request through, however often it asks
        refused = await _get(worker, late)
        assert refused.status == 503, await refused.text()
        assert refused.headers["Retry-After"] == "1"
        assert (await refused.json())["error"]["code"] == "service_unavailable"
    again = await _get(worker, fillers[0])  # its bucket has its slot: limited as ever, not by on_redis_error
    assert again.status == 429 and again.headers["RateLimit"].startswith('"minute";r=0;')

    steady.offset += 61  # every filler's bucket is full again: its slot is as good as empty
    for k in (late, fillers[0], fillers[1]):
        assert (await _get(worker, k)).status == 200
        limited = await _get(worker, k)
        assert limited.status == 429 and limited.headers["RateLimit"].startswith('"minute";r=0;')


async def test_an_edit_while_the_table_is_full_is_written_not_a_500(small_host: Any) -> None:
    """The supervisor's carry of an edited key's debt reads the host's table; a full table there is logged
    (as an unreachable backend is) and the edit is written: the admin client sees its 200."""
    sup, worker, _ = small_host
    for k in await _keys(sup, 4):
        assert (await _get(worker, k)).status == 200
    rec, _ = await sup.create_key(rate_limits=["1/minute"])
    resp = await sup.admin.patch(
        f"/admin/keys/{rec.id}", json={"rate_limits": ["2/minute"]}, headers=sup.admin_headers()
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["rate_limits"] == ["2/minute"]
