"""Two replicas editing one key's limits at the same instant (DESIGN invariant 10, ``carry.EditLocks``).

Within one process a key's edits already ran one after the other; two sidecars sharing one store and
one ``redis-server`` did not: the second replica's carry read the first's new bucket before the first
had charged it. Each test plays the admin (or delegate) sending the two edits, one to each replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running
from limits_support import Clock, hold_first_carry
from redis_support import RedisProc, redis_server
from test_limits_attacks import get, plex_cfg

from sidecar.limits.gcra import REDIS_PREFIX

__all__ = ["redis_server"]  # the fixture, re-exported for pytest


async def _replicas(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis: RedisProc
) -> tuple[Running, Running, Any, str]:
    """Two sidecars on one store file and one Redis (one clock), and a key that spent its ``3/day``."""
    config = plex_cfg(plex_upstream, tmp_path, backend="redis", redis_url=redis.url)
    clock = Clock()
    a = await make_sidecar(config, clock=clock)
    b = await make_sidecar(config, clock=clock)
    rec, key = await a.create_key(owner="acme", permissions={"upstreams": ["plex"]}, rate_limits=["3/day"])
    await b.sc.verifier.refresh()
    for i in range(3):
        assert (await get(a if i % 2 else b, key)).status == 200
    assert (await get(a, key)).status == 429
    return a, b, rec, key


def _edit(r: Running, key_id: str, limits: list[str]) -> asyncio.Task[Any]:
    return asyncio.create_task(
        r.admin.patch(f"/admin/keys/{key_id}", json={"rate_limits": limits}, headers=r.admin_headers())
    )


async def test_two_replicas_editing_one_key_at_once_carry_every_debt(
    make_sidecar: MakeSidecar,
    plex_upstream: TestServer,
    tmp_path: Path,
    redis_server: RedisProc,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``3/day`` spent; replica A edits to ``3/week`` while replica B edits to ``3/month``. B's carry read
    the week's bucket before A had charged it, so the month's started empty: 3 more requests per pair
    of edits (any delegate of the owner, as often as it liked, with two replicas behind a balancer).
    Now A's first carry is held until B's edit waits for the replicas' lock in Redis, and the key is
    still refused on both replicas after both edits."""

    a, b, rec, key = await _replicas(make_sidecar, plex_upstream, tmp_path, redis_server)
    held, calls = hold_first_carry(monkeypatch)
    week = _edit(a, rec.id, ["3/week"])
    deadline = time.monotonic() + 5
    while not calls:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    month = _edit(b, rec.id, ["3/month"])
    while len(calls) < 2 and b.sc.edit_locks.waiting_elsewhere(rec.id) < 1:  # raced past A, or waits for it
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    held.set()
    for task in (week, month):
        resp = await task
        assert resp.status == 200, await resp.text()
    for r in (a, b):
        await r.sc.verifier.refresh()
        refused = await get(r, key)
        assert refused.status == 429 and refused.headers["RateLimit"].startswith('"month";r=0;')
    client = await redis_server.client()
    try:  # released by its holder, not left to expire
        assert await client.exists(f"{REDIS_PREFIX}:edit:{{{rec.id}}}") == 0
    finally:
        await client.aclose()


async def test_an_edit_with_redis_down_is_written_and_logged(
    make_sidecar: MakeSidecar,
    plex_upstream: TestServer,
    tmp_path: Path,
    redis_server: RedisProc,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The replicas' lock follows the carry's own rule when Redis is unreachable: the edit is written
    (the admin client sees its 200, never a 500), the missing lock is logged, and the key is limited
    as ``on_redis_error`` says (``allow``, the default: it passes without headers)."""
    a, b, rec, key = await _replicas(make_sidecar, plex_upstream, tmp_path, redis_server)
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="sidecar.ratelimit"):
        resp = await _edit(b, rec.id, ["3/week"])
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["rate_limits"] == ["3/week"]
    assert any("without the replicas' lock" in r.getMessage() for r in caplog.records)
    await a.sc.verifier.refresh()
    passed = await get(a, key)
    assert passed.status == 200 and "RateLimit" not in passed.headers
