"""Attacks on the limiter: ways a key could get more than its rate limits, quota or concurrency
cap allow, or be charged for a request it was refused (DESIGN invariants 10 and 12).

Each test plays the client that tries it, against the real limiter (real SQLite store, real
``redis-server``) or a real sidecar, and asserts what it sees and what was spent.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config
from limits_support import Clock, key, utc
from redis_support import RedisProc, redis_server

from sidecar.config import parse_config, parse_limit
from sidecar.core.errors import RateLimited
from sidecar.limits.quota import window_id
from sidecar.limits.ratelimit import RateLimiter
from sidecar.store import Store, open_store

__all__ = ["redis_server"]  # the fixture, re-exported for pytest


def limiter_config(tmp_path: Path, redis: RedisProc | None = None, **rate_limits: Any) -> Any:
    if redis is not None:
        rate_limits = {"backend": "redis", "redis_url": redis.url, **rate_limits}
    raw = {
        "store": {"kind": "sqlite", "path": str(tmp_path / "attacks.db")},
        "upstreams": [{"id": "api", "kind": "mcp", "url": "http://127.0.0.1:9"}],
        "rate_limits": rate_limits,
    }
    return parse_config(raw, env={}, base=tmp_path)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(limiter_config(tmp_path).store)
    yield s
    await s.close()


@pytest.fixture
async def limiter_for(store: Store, tmp_path: Path) -> AsyncIterator[Any]:
    made: list[RateLimiter] = []

    async def make(redis: RedisProc | None = None, clock: Clock | None = None, **rate_limits: Any) -> RateLimiter:
        rl = RateLimiter(limiter_config(tmp_path, redis, **rate_limits), store, clock=clock or Clock())
        await rl.start()
        made.append(rl)
        return rl

    yield make
    for rl in made:
        await rl.close()


async def used(rl: RateLimiter, k: Any) -> int:
    status = await rl.quota_status(k)
    assert status is not None
    return int(status[0]["used"])


# ------------------------------------------------------------------- quota flushes


async def test_quota_holds_while_a_flush_is_writing(limiter_for: Any) -> None:
    """Attack: keep requesting while the background flush writes the counts to the store.

    Before the fix the flush zeroed the in-memory count before its write and re-read the
    total only after it, so during the write the key looked unspent: a quota of 5 let
    5 more requests through every flush (10 of 5 here; unbounded over many flushes)."""
    rl = await limiter_for(quota="5/day")
    k, up = key(), rl.config.upstreams[0]
    assert [(await rl.check(k, up)).allowed for _ in range(5)] == [True] * 5
    flushing = asyncio.create_task(rl.book.flush())
    for _ in range(10_000):  # until the flush has taken its batch and waits on the store
        if rl.book.unflushed == 0:
            break
        await asyncio.sleep(0)
    assert rl.book.unflushed == 0 and not flushing.done()
    during = [(await rl.check(k, up)) for _ in range(5)]  # no await suspends here: all inside the write
    assert not flushing.done()
    assert [d.allowed for d in during] == [False] * 5
    assert {d.error.code for d in during if d.error is not None} == {"quota_exceeded"}
    assert during[0].headers["RateLimit"].startswith('"quota";r=0;')
    await flushing
    assert not (await rl.check(k, up)).allowed
    assert await used(rl, k) == 5
    assert await rl.store.quota_used(k.id, "*", window_id(parse_limit("5/day"), utc(2025, 6, 15))) == 5


# ------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_concurrency_refusal_after_the_check_spends_nothing(
    limiter_for: Any, redis_server: RedisProc, backend: str
) -> None:
    """Attack (on oneself, but a refusal must be free): two requests pass the pre-check together,
    both are counted, one takes the last slot and the other is refused — was it charged?

    With Redis (every check is a round trip) and with workers (another process takes the slot)
    this is the normal course of a burst, not a rare race; in memory it happens whenever the
    check awaits (a quota counter's first read). The refused one's unit is given back."""
    rl = await limiter_for(redis_server if backend == "redis" else None, default=["10/minute"], quota="100/day")
    k, up = key(concurrency=1), rl.config.upstreams[0]
    first, second = await asyncio.gather(rl.check(k, up), rl.check(k, up))
    assert first.allowed and second.allowed
    async with rl.slot(k, up):
        with pytest.raises(RateLimited) as refused:
            async with rl.slot(k, up):
                pytest.fail("two slots for concurrency 1")
        assert refused.value.code == "rate_limit_exceeded"
        assert refused.value.headers["Retry-After"] == "1"
        assert refused.value.headers["RateLimit"] == '"concurrency";r=0;t=1'
    assert await used(rl, k) == 1
    d = await rl.check(k, up)
    assert d.headers["RateLimit"] == '"minute";r=8;t=12'  # two counted (the served one and this), not three


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_every_limit_holds_and_a_refusal_spends_none(
    limiter_for: Any, redis_server: RedisProc, backend: str
) -> None:
    """Attack: hammer a key with several limits (1/second, 3/minute, 1/hour, a quota) hoping the
    ones that pass are charged when another refuses — then wait out the short ones. Exactly
    what every limit allows passes, in memory and in Redis (one script, all or nothing)."""
    clock = Clock()
    redis = redis_server if backend == "redis" else None
    rl = await limiter_for(redis, clock, default=["1/second", "3/minute"], quota="50/day")
    k, up = key(), rl.config.upstreams[0]
    passed = 0
    for _ in range(40):  # 40 s, 20 tries a second
        for _ in range(20):
            passed += (await rl.check(k, up)).allowed
            clock.advance(0.05)
    assert passed == 4  # t = 0, 1, 2 s (the minute's burst, 1/second apart), then t = 20 s
    assert await used(rl, k) == passed
    hourly = await limiter_for(redis, clock, default=["1/hour"])
    h = key("k2")
    assert (await hourly.check(h, up)).allowed
    clock.advance(3599.999)
    refused = await hourly.check(h, up)
    assert refused.error is not None and refused.error.headers["Retry-After"] == "1"
    assert refused.headers["RateLimit"] == '"hour";r=0;t=1'
    clock.advance(0.001)
    assert [(await hourly.check(h, up)).allowed for _ in range(2)] == [True, False]


# ------------------------------------------------------------------- identity


async def get(r: Running, k: str, path: str = "/library/sections", **headers: str) -> Any:
    return await r.proxy.get(path, headers={"X-Plex-Token": k, **headers} if k else headers)


def plex_cfg(upstream: TestServer, tmp_path: Path, **rate_limits: Any) -> dict[str, Any]:
    return base_config(str(upstream.make_url("")).rstrip("/"), tmp_path, rate_limits=rate_limits)


@pytest.mark.parametrize("grace", ["1h", 0])
async def test_rotation_continues_the_same_budget(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, grace: str | int
) -> None:
    """Attack: rotate a key (the admin API; a delegate may rotate keys of its owner, itself included)
    to get a fresh budget — a spent quota back, or, with a grace period, two live keys with a
    budget each (and a chain of rotations, one more live budget per rotation).

    The successor continues its predecessor's rate limits, quota and concurrency, and during
    the grace both keys draw on that one budget."""
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path), clock=Clock())
    _, k_old = await r.create_key(rate_limits=["3/minute"], quota="5/day", owner="acme")
    assert [(await get(r, k_old)).status for _ in range(2)] == [200, 200]
    auth = r.admin_headers()
    keys = [k_old]
    for _ in range(2):  # a chain: A -> B -> C (A and B still in their grace with "1h")
        rid = await _id(r, keys[-1])
        resp = await r.admin.post(f"/admin/keys/{rid}/rotate", json={"grace": grace}, headers=auth)
        assert resp.status == 201, await resp.text()
        keys.append((await resp.json())["data"]["key"])
    await r.sc.verifier.refresh()
    live = keys if grace else keys[-1:]
    seen = [(await get(r, k)).status for k in live for _ in range(2)]
    assert seen.count(200) == 1  # one unit was left of the minute's 3, whichever key asks
    refused = await get(r, keys[-1])
    assert refused.status == 429 and (await refused.json())["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["RateLimit"] == '"minute";r=0;t=60'
    status = await r.sc.limiter.quota_status(await _rec(r, keys[-1]))
    assert status is not None and status[0]["used"] == 3


async def _rec(r: Running, k: str) -> Any:
    return await r.sc.verifier.verify(k, "127.0.0.1")


async def _id(r: Running, k: str) -> str:
    return str((await _rec(r, k)).id)


@pytest.mark.parametrize(("by", "backend"), [("delegate", "memory"), ("admin", "memory"), ("delegate", "redis")])
async def test_editing_a_spent_limit_does_not_refill_it(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, redis_server: RedisProc, by: str, backend: str
) -> None:
    """Attack: a delegate (``admin: true``) edits a sibling key's spent limit to another one within
    its own reach (``2/minute`` -> ``1/30seconds`` -> ``1/31seconds`` … -> ``2/minute``): before, each
    distinct limit text was a fresh bucket, so every edit bought a request, without end.

    The bucket is the key's limit of a period in its scope; what was spent carries over as time owed,
    never more than the new limit's burst (so raising a limit helps at once, lowering it never
    refills it)."""
    clock = Clock()
    rl: dict[str, Any] = {"backend": "redis", "redis_url": redis_server.url} if backend == "redis" else {}
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path, **rl), clock=clock)
    mgr = {"upstreams": ["plex"], "admin": True}
    _, k_mgr = await r.create_key(owner="acme", permissions=mgr, rate_limits=["2/minute"])
    sib, k_sib = await r.create_key(owner="acme", permissions={"upstreams": ["plex"]}, rate_limits=["2/minute"])
    assert [(await get(r, k_sib)).status for _ in range(3)] == [200, 200, 429]
    auth = {"Authorization": f"Bearer {k_mgr}"} if by == "delegate" else r.admin_headers()
    seen = []
    for limit in ["1/30seconds", "1/31seconds", "1/32seconds", "2/minute", "1/minute"]:
        resp = await r.admin.patch(f"/admin/keys/{sib.id}", json={"rate_limits": [limit]}, headers=auth)
        assert resp.status == 200, await resp.text()
        await r.sc.verifier.refresh()
        got = await get(r, k_sib)
        seen.append(got.status)
    assert seen == [429] * 5
    assert got.headers["RateLimit"] == '"minute";r=0;t=60'
    # Raising the limit helps within one interval of the new limit: the 60 s owed fill 10/minute too,
    # and 6 s later one passes (2/minute would need 30 s).
    resp = await r.admin.patch(f"/admin/keys/{sib.id}", json={"rate_limits": ["10/minute"]}, headers=r.admin_headers())
    await r.sc.verifier.refresh()
    assert (await get(r, k_sib)).status == 429
    clock.advance(6)
    got = await get(r, k_sib)
    assert got.status == 200 and got.headers["RateLimit"] == '"minute";r=0;t=60'


# ------------------------------------------------------------------- slots and abnormal ends


def ending_app(release: asyncio.Event) -> web.Application:
    """Streams that end abnormally on either side: ``release`` makes the upstream drop its side."""

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        await sock.send_str("hello")
        await asyncio.wait_for(release.wait(), 10)
        assert request.transport is not None
        request.transport.abort()  # no close frame: the upstream vanishes
        return sock

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": request.query.get("type", "application/octet-stream")})
        await resp.prepare(request)
        await resp.write(b"data: x\n\n")
        await asyncio.wait_for(release.wait(), 10)
        assert request.transport is not None
        request.transport.abort()  # mid-body: the download is cut
        return resp

    async def hang(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 10)  # never answers while the test runs
        return web.Response(text="late")

    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/stream", stream)
    app.router.add_get("/hang", hang)
    app.router.add_get("/quick", quick)
    return app


WS_UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


@pytest.mark.parametrize(
    ("path", "upgrade", "who_ends"),
    [
        ("/ws", True, "client"),
        ("/ws", True, "upstream"),
        ("/stream?type=text/event-stream", False, "client"),
        ("/stream", False, "upstream"),
        ("/hang", False, "client"),  # gone before the upstream answered at all
    ],
)
async def test_concurrency_slot_comes_back_after_any_abnormal_end(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, path: str, upgrade: bool, who_ends: str
) -> None:
    """Attack: end streams abnormally (a websocket or SSE client that vanishes without a close, an
    upstream that drops mid-body, a client gone before any answer) hoping to leak slots until the
    key is locked out — or to have a slot given back twice and hold more than the cap."""
    release = asyncio.Event()
    server = await aiohttp_server(ending_app(release))
    r = await make_sidecar(plex_cfg(server, tmp_path, default=["1000/second"]), clock=Clock())
    rec, k = await r.create_key(concurrency=1)
    port = r.proxy.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = WS_UPGRADE if upgrade else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {k}\r\n{extra}\r\n".encode())
    await writer.drain()
    if path != "/hang":
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.split(b" ", 2)[1] == (b"101" if upgrade else b"200")
    await poll(lambda: r.sc.limiter.in_flight(rec.id) == 1)
    busy = await get(r, k, "/quick")
    assert busy.status == 429 and busy.headers["RateLimit"] == '"concurrency";r=0;t=1'
    if who_ends == "client":
        writer.transport.abort()
    else:
        release.set()
        if upgrade:  # the sidecar passes the upstream's loss on as a close (1014); the client answers it
            seen = b""
            while b"\x88" not in seen:
                seen += await asyncio.wait_for(reader.read(1024), 5)
            writer.write(b"\x88\x80\x00\x00\x00\x00")  # a masked, empty close frame
    await poll(lambda: r.sc.limiter.in_flight(rec.id) == 0)
    release.set()
    writer.close()
    statuses = [(await get(r, k, "/quick")).status for _ in range(3)]
    assert statuses == [200] * 3
    assert r.sc.limiter.in_flight(rec.id) == 0  # given back once each, never below zero


async def poll(cond: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_every_credential_form_draws_on_one_budget(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Attack: present one key in each form DESIGN accepts (and two forms at once), hoping each
    form is a budget of its own: one key, one budget, one unit per request."""
    r = await make_sidecar(plex_cfg(plex_upstream, tmp_path), clock=Clock())
    _, k = await r.create_key(rate_limits=["7/minute"], quota="7/day")
    basic = base64.b64encode(f"anyone:{k}".encode()).decode()
    forms: list[tuple[str, dict[str, str]]] = [
        ("/library/sections", {"Authorization": f"ApiKey {k}"}),
        ("/library/sections", {"Authorization": f"Bearer {k}"}),
        ("/library/sections", {"x-api-key": k}),
        ("/library/sections", {"X-Plex-Token": k}),
        (f"/library/sections?X-Plex-Token={k}", {}),
        ("/library/sections", {"Authorization": f"Basic {basic}"}),
        (f"/library/sections?X-Plex-Token={k}", {"X-Plex-Token": k, "x-api-key": k}),  # three forms, one request
    ]
    remaining = []
    for path, headers in forms:
        resp = await r.proxy.get(path, headers=headers)
        assert resp.status == 200, (headers, await resp.text())
        remaining.append(resp.headers["X-RateLimit-Remaining"])
    assert remaining == ["6", "5", "4", "3", "2", "1", "0"]
    for path, headers in forms:
        resp = await r.proxy.get(path, headers=headers)
        assert resp.status == 429 and resp.headers["RateLimit"].startswith('"quota";r=0;')


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_burst_at_the_caps_spends_exactly_what_was_served(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, redis_server: RedisProc, backend: str
) -> None:
    """Attack: 12 requests at once at a key with concurrency 3, 5/minute and 8/day, its quota not
    yet read this window (the first check awaits the store, or Redis, so they all pass the
    pre-check together). Exactly 3 are served; the 9 refusals spend nothing."""
    release = asyncio.Event()
    server = await aiohttp_server(ending_app(release))
    rl: dict[str, Any] = {"backend": "redis", "redis_url": redis_server.url} if backend == "redis" else {}
    r = await make_sidecar(plex_cfg(server, tmp_path, **rl), clock=Clock())
    rec, k = await r.create_key(rate_limits=["5/minute"], quota="8/day", concurrency=3)
    burst = [asyncio.create_task(get(r, k, "/hang")) for _ in range(12)]
    await poll(lambda: sum(t.done() for t in burst) == 9)
    refused = [t.result() for t in burst if t.done()]
    assert {x.status for x in refused} == {429}
    assert {(await x.json())["error"]["code"] for x in refused} == {"rate_limit_exceeded"}
    assert r.sc.limiter.in_flight(rec.id) == 3
    release.set()
    assert [x.status for x in await asyncio.gather(*burst)].count(200) == 3
    await poll(lambda: r.sc.limiter.in_flight(rec.id) == 0)
    status = await r.sc.limiter.quota_status(rec)
    assert status is not None and status[0]["used"] == 3
    after = await get(r, k, "/quick")  # the fourth unit of 5/minute, the fourth of 8/day
    assert after.status == 200 and after.headers["RateLimit"] == '"minute";r=1;t=48'
