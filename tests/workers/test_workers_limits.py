"""Exact limits across workers without Redis (issue 19): the supervisor's owner backend.

In process and real: a "supervisor" sidecar whose limiter owns the buckets, a
``LimitsOwner`` on a unix socket, and two "worker" sidecars whose limiters ask it
(``SharedLimits``), each with its own proxy listener. What a client sees must be what one
process would answer: one budget, one quota, the same headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import ADMIN_TOKEN, MakeSidecar, ProxyTestServer, base_config
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar, create_apps
from sidecar.config import parse_config
from sidecar.workers.limits import LimitsOwner, SharedLimits
from sidecar.workers.shm import ShmBuckets

Worker = TestClient[web.Request, web.Application]


@pytest.fixture
async def host(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, env: dict[str, str], aiohttp_client: Any
) -> AsyncIterator[Callable[..., Awaitable[tuple[Any, LimitsOwner, list[Worker]]]]]:
    started: list[Sidecar] = []
    owners: list[LimitsOwner] = []

    async def make(upstream: dict[str, Any] | None = None, **rate_limits: Any) -> tuple[Any, LimitsOwner, list[Worker]]:
        """The supervisor's sidecar, its owner, and two workers' proxies (their key tables follow the store)."""
        cfg_dict = base_config(
            str(plex_upstream.make_url("")), tmp_path, rate_limits={"backend": "memory", **rate_limits}
        )
        cfg_dict["upstreams"][0].update(upstream or {})
        sup = await make_sidecar(cfg_dict)
        table = ShmBuckets(str(tmp_path / "buckets"), create=True, slots=1024)
        owner = LimitsOwner(table, sup.sc.limiter.book, sup.sc.limiter.quota_levels)
        sup.sc.limiter.host_buckets = table  # as the supervisor does (sidecar.workers.supervisor)
        path = str(tmp_path / "limits.sock")
        await owner.start(path)
        owners.append(owner)
        workers = []
        for _ in range(2):
            sc = Sidecar(parse_config(cfg_dict, env=env, base=tmp_path), registry=CollectorRegistry(), env=env)
            sc.shared_limits = SharedLimits(path, ShmBuckets(str(tmp_path / "buckets")))
            await sc.start()
            started.append(sc)
            workers.append(await aiohttp_client(ProxyTestServer(create_apps(sc)[0])))
        sup.create_key = _creating(sup, started[-2:])
        return sup, owner, workers

    yield make
    for owner in owners:
        await owner.close()
    for sc in started:
        await sc.close()


def _creating(sup: Any, workers: list[Sidecar]) -> Callable[..., Awaitable[Any]]:
    """``create_key`` that also refreshes the workers' key tables (the store poll, without its wait)."""
    create = sup.create_key

    async def run(**fields: Any) -> Any:
        out = await create(**fields)
        for sc in workers:
            await sc.verifier.refresh()
        return out

    return run


async def test_one_budget_and_quota_across_workers(host: Any) -> None:
    sup, owner, (w0, w1) = await host()
    rec, k = await sup.create_key(rate_limits=["5/minute"], quota="100/day")
    seen = []
    for i in range(8):
        w = w0 if i % 2 == 0 else w1
        resp = await w.get("/library/sections", headers={"X-Plex-Token": k})
        seen.append((resp.status, resp.headers.get("X-RateLimit-Remaining")))
    assert seen == [(200, "4"), (200, "3"), (200, "2"), (200, "1"), (200, "0"), (429, "0"), (429, "0"), (429, "0")]
    # The quota is the host's: the supervisor's admin API reads the owner's live count.
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    shown = await (await sup.admin.get(f"/admin/keys/{rec.id}", headers=auth)).json()
    assert [(s["used"], s["remaining"]) for s in shown["data"]["quota_status"]] == [(5, 95)]
    assert owner.checks >= 8


async def test_exactly_the_limit_out_of_concurrent_requests(host: Any) -> None:
    sup, _, workers = await host()
    _, k = await sup.create_key(rate_limits=["10/minute"])

    async def one(i: int) -> int:
        resp = await workers[i % 2].get("/library/sections", headers={"X-Plex-Token": k})
        return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(30)))
    assert sorted(statuses) == [200] * 10 + [429] * 20


async def test_quota_refusal_spends_no_rate_and_admin_reset_reaches_workers(host: Any) -> None:
    sup, _, (w0, w1) = await host()
    rec, k = await sup.create_key(rate_limits=["100/minute"], quota="3/day")
    got = [(await w.get("/library/sections", headers={"X-Plex-Token": k})).status for w in (w0, w1, w0, w1)]
    assert got == [200, 200, 200, 429]
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    resp = await sup.admin.post(f"/admin/keys/{rec.id}/quota", json={"used": 0}, headers=auth)
    assert resp.status == 200
    resp = await w1.get("/library/sections", headers={"X-Plex-Token": k})
    assert resp.status == 200 and resp.headers["X-RateLimit-Remaining"] == "2"


async def test_rates_without_quota_need_no_round_trip(host: Any) -> None:
    sup, owner, (w0, w1) = await host(on_redis_error="deny")
    _, k = await sup.create_key(rate_limits=["3/minute"])
    await owner.close()  # the shared table alone holds the buckets: the owner is not asked
    got = [(await w.get("/library/sections", headers={"X-Plex-Token": k})).status for w in (w0, w1, w0, w1)]
    assert got == [200, 200, 200, 429]
    assert owner.checks == 0


async def test_a_slow_quota_read_is_waited_for_as_in_one_process(host: Any) -> None:
    """The supervisor's store takes longer than the worker's 0.5 s owner timeout to read a quota
    (a locked SQLite file waits up to ``store.busy_timeout``). The worker used to give up and let
    ``on_redis_error: allow`` pass the request, uncounted, though the stored quota was spent; it
    now waits as long as one process would wait for its store, and the spent quota is a 429."""
    sup, owner, (w0, _) = await host(on_redis_error="allow")
    _, k = await sup.create_key(rate_limits=["100/minute"], quota="5/day")
    read = owner.book.store.quota_used

    async def slow(*args: Any) -> int:
        await asyncio.sleep(1.0)  # twice the owner timeout; well within the store's busy_timeout
        await read(*args)
        return 5  # what another replica or an earlier run already spent today

    owner.book.store.quota_used = slow  # type: ignore[method-assign]
    resp = await w0.get("/library/sections", headers={"X-Plex-Token": k})
    body = await resp.json()
    assert resp.status == 429 and body["error"]["code"] == "quota_exceeded", body


async def test_owner_gone_applies_on_redis_error_to_quotas(host: Any) -> None:
    sup, owner, (w0, _) = await host(on_redis_error="deny")
    _, k = await sup.create_key(rate_limits=["100/minute"], quota="1000/day")
    assert (await w0.get("/library/sections", headers={"X-Plex-Token": k})).status == 200
    await owner.close()
    resp = await w0.get("/library/sections", headers={"X-Plex-Token": k})
    body = await resp.json()
    assert resp.status == 503, body
    assert body["error"]["code"] == "service_unavailable"


async def test_quota_store_down_fails_closed_as_in_one_process(host: Any) -> None:
    """A quota whose count cannot be read is not granted (503), as one process answers
    (``tests/limits/test_ratelimit.py::test_quota_fails_closed_when_the_store_cannot_be_read``),
    whatever ``on_redis_error`` says — that is for an owner that cannot be reached — and the
    owner stays in use for everything else (no back-off)."""
    sup, _, (w0, _) = await host(on_redis_error="allow")
    _, k = await sup.create_key(rate_limits=["100/minute"], quota="1000/day")
    _, other = await sup.create_key(rate_limits=["100/minute"], quota="1000/day")
    assert (await w0.get("/library/sections", headers={"X-Plex-Token": other})).status == 200  # its counter is read
    await sup.sc.store.close()  # every read of the supervisor's store now fails
    for _ in range(3):
        resp = await w0.get("/library/sections", headers={"X-Plex-Token": k})
        body = await resp.json()
        assert (resp.status, body["error"]["code"], resp.headers["Retry-After"]) == (503, "service_unavailable", "1")
        assert body["error"]["message"].startswith("the quota store is unavailable: ")
    resp = await w0.get("/library/sections", headers={"X-Plex-Token": other})
    assert resp.status == 200 and resp.headers["X-RateLimit-Remaining"] == "98"  # counted by the owner, not let by


async def test_a_quota_question_past_its_time_is_a_store_error_not_an_owner_down(tmp_path: Path) -> None:
    """An owner that takes a question and never answers: a rate question fails as the owner being
    down after ``TIMEOUT`` (``on_redis_error`` decides), a quota question as its store after its own,
    longer wait (a 503, as one process answers when its store does not)."""
    from sidecar.store import StoreError
    from sidecar.workers.limits import TIMEOUT, BackendDown, _ClientConn

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes every question, answers none

    path = str(tmp_path / "mute.sock")
    server = await asyncio.start_unix_server(mute, path)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_unix_connection(_ClientConn, path)
    try:
        started = loop.time()
        with pytest.raises(BackendDown):
            await conn.ask(["e", 1])
        assert TIMEOUT <= loop.time() - started < TIMEOUT + 1
        started = loop.time()
        with pytest.raises(StoreError, match="quota store"):
            await conn.ask(["e", 2], 1.0, StoreError)
        assert 1.0 <= loop.time() - started < 2.0
    finally:
        conn.close()
        server.close()
        await server.wait_closed()


async def test_moving_a_key_to_its_own_rate_limits_charges_the_hosts_buckets(host: Any) -> None:
    """The supervisor's admin API moves a key from its upstream's spent ``3/minute`` to a limit of its
    own: the workers' buckets (the host's table, not the supervisor's own memory) carry the debt."""
    sup, _, (w0, w1) = await host(upstream={"rate_limits": ["3/minute"]})
    rec, k = await sup.create_key()
    got = [(await w.get("/library/sections", headers={"X-Plex-Token": k})).status for w in (w0, w1, w0, w1)]
    assert got == [200, 200, 200, 429]
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    resp = await sup.admin.patch(f"/admin/keys/{rec.id}", json={"rate_limits": ["3/60seconds"]}, headers=auth)
    assert resp.status == 200, await resp.text()
    deadline = asyncio.get_running_loop().time() + 5
    seen: set[str] = set()
    while seen != {"own"}:  # both workers have polled the edit: their 429s name the key's own limit
        assert asyncio.get_running_loop().time() < deadline, seen
        seen = set()
        for w in (w0, w1):
            resp = await w.get("/library/sections", headers={"X-Plex-Token": k})
            assert resp.status == 429  # whichever scope the worker still reads
            seen.add("own" if '"60second"' in resp.headers["RateLimit-Policy"] else "upstream's")
        await asyncio.sleep(0.05)


async def test_a_question_the_owner_cannot_handle_is_answered_at_once(host: Any) -> None:
    """A malformed question (unknown plan, wrong shape, unknown operation, bad limit) gets an error
    reply at once, not silence until the asker's timeout (``QUOTA_TIMEOUT``, 6 s); the owner then
    goes on answering well-formed questions on the same connection."""
    from sidecar.store import StoreError
    from sidecar.workers.limits import BAD_QUESTION, QUOTA_TIMEOUT, _ClientConn

    sup, owner, (w0, _) = await host()
    _, k = await sup.create_key(rate_limits=["100/minute"], quota="1000/day")
    assert owner.server is not None
    path = owner.server.sockets[0].getsockname()
    _, conn = await asyncio.get_running_loop().create_unix_connection(_ClientConn, path)
    try:
        for bad in (
            ["e", 999, 1, 0, ["k", "quota", "w"], 0.0],  # a plan this connection never registered
            ["e", 1],  # the wrong shape
            ["zz", 1, 2],  # an operation nobody knows
            ["p", 5, "buckets", [["not a limit", 1, 1]], None],  # a plan that cannot be read
        ):
            reply = await asyncio.wait_for(conn.ask(bad, QUOTA_TIMEOUT, StoreError), 1.0)
            assert reply[0] is None and str(reply[1]).startswith(BAD_QUESTION), (bad, reply)
        assert await asyncio.wait_for(conn.ask(["ping"]), 1.0) == [1]
    finally:
        conn.close()
    resp = await w0.get("/library/sections", headers={"X-Plex-Token": k})
    assert resp.status == 200


async def test_a_worker_turns_the_owners_error_reply_into_a_503_at_once(host: Any) -> None:
    """The owner has lost the worker's plan (as after a bug): the worker's quota question is refused.
    The client gets the designed 503 within a second, not after the 6 s quota wait; the worker
    registers its plan again and the next request is counted and served."""
    sup, owner, (w0, _) = await host(on_redis_error="allow")
    _, k = await sup.create_key(rate_limits=["100/minute"], quota="1000/day")
    assert (await w0.get("/library/sections", headers={"X-Plex-Token": k})).status == 200
    for conn in owner.conns:
        conn.plans.clear()
    resp = await asyncio.wait_for(w0.get("/library/sections", headers={"X-Plex-Token": k}), 1.0)
    body = await resp.json()
    assert (resp.status, body["error"]["code"], resp.headers["Retry-After"]) == (503, "service_unavailable", "1")
    assert body["error"]["message"] == "the rate limiter could not check this request; try again shortly"
    resp = await w0.get("/library/sections", headers={"X-Plex-Token": k})
    assert resp.status == 200 and resp.headers["X-RateLimit-Remaining"] == "98", dict(resp.headers)
