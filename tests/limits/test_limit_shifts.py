"""Attack: an edit that keeps a key's limits in one scope, but moves what they spent (invariant 10).

A bucket was the key's n-th limit in its scope (``gcra.RateRule``), and what it owes is kept as
*time* when its limit is edited. Two ways a delegate (``admin: true``) got requests back with
edits within its own reach, on a sibling key or itself, without leaving the scope:

- **shift the list**: ``["1/minute", "3/day"]`` spent, then ``["3/day"]`` — the day's limit is
  now the *first* bucket, the minute's, which is paid off: 3 more requests at once; the same
  moving between the global default and a list of the key's own (both scope ``*``);
- **stretch the period**: ``3/day`` spent (a day owed), then ``3/week`` — a day is less than a
  third of a week: 2 more requests at once.

Buckets are named by their limit's period now, and an edit carries what the old buckets owed, as
requests, into every bucket whose limit changed (``limits.carry.carry_rates``), as a move to
another scope always did."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar
from limits_support import Clock, hold_first_carry
from redis_support import RedisProc, redis_server
from test_limits_attacks import get, plex_cfg

__all__ = ["redis_server"]  # the fixture, re-exported for pytest


@pytest.mark.parametrize(("by", "backend"), [("delegate", "memory"), ("admin", "memory"), ("delegate", "redis")])
async def test_shifting_a_spent_limit_to_a_paid_off_bucket_buys_nothing(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis_server: RedisProc, by: str, backend: str
) -> None:
    rl: dict[str, Any] = {"backend": "redis", "redis_url": redis_server.url} if backend == "redis" else {}
    clock = Clock()
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path, **rl), clock=clock)
    mgr = {"upstreams": ["plex"], "admin": True}
    _, k_mgr = await r.create_key(owner="acme", permissions=mgr, rate_limits=["3/day"])
    own = ["1/minute", "3/day"]
    sib, k_sib = await r.create_key(owner="acme", permissions={"upstreams": ["plex"]}, rate_limits=own)
    for _ in range(3):
        assert (await get(r, k_sib)).status == 200
        clock.advance(60)  # the minute's bucket is paid off again; the day's owes a day
    assert (await get(r, k_sib)).status == 429
    auth = {"Authorization": f"Bearer {k_mgr}"} if by == "delegate" else r.admin_headers()
    resp = await r.admin.patch(f"/admin/keys/{sib.id}", json={"rate_limits": ["3/day"]}, headers=auth)
    assert resp.status == 200, await resp.text()
    await r.sc.verifier.refresh()
    refused = await get(r, k_sib)
    assert refused.status == 429 and (await refused.json())["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["RateLimit"].startswith('"day";r=0;')


async def test_the_global_default_and_a_shorter_list_of_the_keys_own_share_no_debt_by_position(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """The global default and a key's own limits are both scope ``*``: the same buckets by position."""
    clock = Clock()
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path, default=["1/minute", "3/day"]), clock=clock)
    sib, k_sib = await r.create_key(owner="acme", permissions={"upstreams": ["plex"]})
    for _ in range(3):
        assert (await get(r, k_sib)).status == 200
        clock.advance(60)
    assert (await get(r, k_sib)).status == 429
    resp = await r.admin.patch(f"/admin/keys/{sib.id}", json={"rate_limits": ["3/day"]}, headers=r.admin_headers())
    assert resp.status == 200, await resp.text()
    await r.sc.verifier.refresh()
    assert (await get(r, k_sib)).status == 429


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_stretching_a_spent_limits_period_buys_nothing(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis_server: RedisProc, backend: str
) -> None:
    rl: dict[str, Any] = {"backend": "redis", "redis_url": redis_server.url} if backend == "redis" else {}
    clock = Clock()
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path, **rl), clock=clock)
    mgr = {"upstreams": ["plex"], "admin": True}
    _, k_mgr = await r.create_key(owner="acme", permissions=mgr, rate_limits=["3/day"])
    assert [(await get(r, k_mgr)).status for _ in range(4)] == [200, 200, 200, 429]
    auth = {"Authorization": f"Bearer {k_mgr}"}  # the delegate edits itself, within its own reach
    me = await r.sc.verifier.verify(k_mgr, "127.0.0.1")
    resp = await r.admin.patch(f"/admin/keys/{me.id}", json={"rate_limits": ["3/week"]}, headers=auth)
    assert resp.status == 200, await resp.text()
    await r.sc.verifier.refresh()
    refused = await get(r, k_mgr)
    assert refused.status == 429 and refused.headers["RateLimit"].startswith('"week";r=0;')
    # Only what was owed is carried: a week's limit that owes 3 requests is free again after one of its intervals.
    clock.advance(7 * 86400 / 3)
    assert [(await get(r, k_mgr)).status for _ in range(2)] == [200, 429]


@pytest.mark.parametrize("edit", ["successor", "predecessor"])
async def test_keys_sharing_a_budget_during_a_rotations_grace_keep_the_same_limits(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, edit: str
) -> None:
    """Attack: rotate a key with a grace (both keys work, on one budget), then edit one of the two:
    two records on one budget with different limits. ``["3/day"]`` on the old key and ``["3/week"]``
    on the new one (within a delegate's reach of ``3/day``): two buckets, 3 a day and 3 a week
    more; a quota moved to another scope on one of them, two counters. An edit of the limits of
    a key that shares its budget with another working key is refused until the grace ends."""
    clock = Clock()
    cfg = plex_cfg(plex_upstream, tmp_path)
    cfg["upstreams"][0]["quota"] = "3/day"
    r = await make_sidecar(cfg, clock=clock)
    mgr = {"upstreams": ["plex"], "admin": True}
    _, k_mgr = await r.create_key(owner="acme", permissions=mgr, rate_limits=["3/day"])
    old, k_old = await r.create_key(owner="acme", permissions={"upstreams": ["plex"]}, rate_limits=["3/day"])
    auth = {"Authorization": f"Bearer {k_mgr}"}
    resp = await r.admin.post(f"/admin/keys/{old.id}/rotate", json={"grace": "1h"}, headers=auth)
    assert resp.status == 201, await resp.text()
    new_id, k_new = (await resp.json())["data"]["id"], (await resp.json())["data"]["key"]
    target = new_id if edit == "successor" else old.id
    for change in ({"rate_limits": ["3/week"]}, {"quota": "3/day"}, {"concurrency": 1}):
        resp = await r.admin.patch(f"/admin/keys/{target}", json=change, headers=auth)
        assert resp.status == 409, await resp.text()
        assert "shares its budget" in (await resp.json())["error"]["message"]
    resp = await r.admin.patch(f"/admin/keys/{target}", json={"description": "other fields still change"}, headers=auth)
    assert resp.status == 200, await resp.text()
    await r.sc.verifier.refresh()
    seen = []
    for _ in range(3):
        seen += [(await get(r, k_new)).status, (await get(r, k_old)).status]
        clock.advance(60)
    assert seen.count(200) == 3
    clock.advance(3600)  # the grace is over: the old key is revoked, the budget is the successor's alone
    resp = await r.admin.patch(f"/admin/keys/{new_id}", json={"rate_limits": ["3/week"]}, headers=auth)
    assert resp.status == 200, await resp.text()


async def test_one_jwt_subject_under_two_rules_shares_its_limits_by_period_not_by_place(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, aiohttp_server: Any
) -> None:
    """Attack: a JWT subject whose tokens can match either of two rules (ask the IdP for a token
    with or without a group or scope) with the same day's limit in another place:
    ``["1/minute", "3/day"]`` and ``["3/day"]``. One budget per subject, but a bucket was the n-th
    limit: the second rule's day read the first rule's paid-off minute, 3 more a day. Buckets are
    named by period now (``p86400``), so the day's limit is one bucket under both rules."""
    from conftest import base_config
    from jwt_support import IdP, bearer, provider

    clock = Clock(float(int(time.time())))
    idp = IdP(clock=clock)
    idp.add_key("k1", "RSA")
    await idp.start(aiohttp_server)
    rules = [
        {"when": {"group": "editors"}, "grant": {"upstreams": ["plex"], "rate_limits": ["1/minute", "3/day"]}},
        {"when": {}, "grant": {"upstreams": ["plex"], "rate_limits": ["3/day"]}},
    ]
    url = str(plex_upstream.make_url("")).rstrip("/")
    r = await make_sidecar(base_config(url, tmp_path, jwt=[provider(idp, rules)]), clock=clock)
    for _ in range(3):
        editor = idp.token(realm_access={"roles": ["editors"]})
        assert (await r.proxy.get("/library/sections", headers=bearer(editor))).status == 200
        clock.advance(60)
    plain = await r.proxy.get("/library/sections", headers=bearer(idp.token()))
    assert plain.status == 429 and plain.headers["RateLimit"].startswith('"day";r=0;')


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_two_edits_at_once_carry_every_debt(
    make_sidecar: MakeSidecar,
    plex_upstream: TestServer,
    tmp_path: Path,
    redis_server: RedisProc,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    """``3/day`` spent, then two edits at once: ``3/week`` and ``3/month``. The second carry read the week's
    bucket before the first had charged it, so the month's started empty: 3 more requests per pair of
    edits, as often as a delegate liked. Now one key's edits run one after another (``EditLocks``): the
    first carry is held until the second edit is queued, and the key is still refused after both."""
    import asyncio

    rl: dict[str, Any] = {"backend": "redis", "redis_url": redis_server.url} if backend == "redis" else {}
    clock = Clock()
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path, **rl), clock=clock)
    rec, key = await r.create_key(owner="acme", permissions={"upstreams": ["plex"]}, rate_limits=["3/day"])
    for _ in range(3):
        assert (await get(r, key)).status == 200
    assert (await get(r, key)).status == 429

    held, calls = hold_first_carry(monkeypatch)

    def edit(limits: list[str]) -> asyncio.Task[Any]:
        return asyncio.create_task(
            r.admin.patch(f"/admin/keys/{rec.id}", json={"rate_limits": limits}, headers=r.admin_headers())
        )

    week = edit(["3/week"])
    deadline = time.monotonic() + 5
    while not calls:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    month = edit(["3/month"])
    while len(calls) < 2 and r.sc.edit_locks.waiting(rec.id) < 2:  # raced past it, or queued behind it
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    held.set()
    for task in (week, month):
        resp = await task
        assert resp.status == 200, await resp.text()
    await r.sc.verifier.refresh()
    refused = await get(r, key)
    assert refused.status == 429 and refused.headers["RateLimit"].startswith('"month";r=0;')
