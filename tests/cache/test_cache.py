"""The response cache end to end: a real sidecar in front of a real upstream that counts.

The upstream here accepts two Plex tokens (the owner's and a managed user's), says
which one it saw, echoes it in XML the way Plex does, and counts requests per path,
so every test asserts at the upstream how many requests really got through. TTLs run
on a controllable clock passed to ``Sidecar``; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, PLEX_TOKEN, MakeSidecar, Running, base_config
from multidict import CIMultiDictProxy

USER_TOKEN = "managed-user-token-9876543210"
TOKENS = {PLEX_TOKEN: "owner", USER_TOKEN: "managed-user"}
BLOB = 1000


class Clock:
    """Wall time that only moves when a test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Upstream:
    hits: Counter[str] = field(default_factory=Counter)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    fail: bool = False


STATE: web.AppKey[Upstream] = web.AppKey("state", Upstream)


def cache_upstream() -> web.Application:
    @web.middleware
    async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        if request.headers.get("X-Plex-Token") not in TOKENS:
            return web.Response(status=401, text="401 Unauthorized")
        request.app[STATE].hits[request.path] += 1
        return await handler(request)

    app = web.Application(middlewares=[auth])
    app[STATE] = Upstream()

    def n(request: web.Request) -> int:
        return request.app[STATE].hits[request.path]

    async def sections(request: web.Request) -> web.Response:
        token = request.headers["X-Plex-Token"]
        xml = (
            f'<MediaContainer n="{n(request)}" user="{TOKENS[token]}">'
            f'<Directory key="1" title="Movies" thumb="/library/sections/1/thumb?X-Plex-Token={token}"/>'
            "</MediaContainer>"
        )
        return web.Response(text=xml, content_type="text/xml")

    async def cache_control(request: web.Request) -> web.Response:
        headers = {"Cache-Control": request.query["cc"]} if "cc" in request.query else {}
        if "cookie" in request.query:
            headers["Set-Cookie"] = "session=1"
        if "vary" in request.query:
            headers["Vary"] = request.query["vary"]
        return web.Response(text=f"n={n(request)}", headers=headers)

    async def negotiate(request: web.Request) -> web.Response:
        if "json" in request.headers.get("Accept", ""):
            return web.json_response({"n": n(request), "kind": "json"}, headers={"Vary": "Accept"})
        return web.Response(
            text=f'<MediaContainer n="{n(request)}"/>', content_type="text/xml", headers={"Vary": "Accept"}
        )

    async def blob(request: web.Request) -> web.Response:
        name = request.match_info["name"].encode()
        headers = {"ETag": f'"{name.decode()}-1"'}
        return web.Response(body=(name * BLOB)[:BLOB], content_type="application/octet-stream", headers=headers)

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"a" * 4096)
        await request.app[STATE].resume.wait()  # the client must have the first bytes before the rest exists
        for _ in range(15):
            await resp.write(b"b" * 4096)
        await resp.write_eof()
        return resp

    async def gated(request: web.Request) -> web.Response:
        await request.app[STATE].gate.wait()
        cc = request.query.get("cc")
        return web.Response(text=f"n={n(request)}", headers={"Cache-Control": cc} if cc else {})

    async def flaky(request: web.Request) -> web.Response:
        if request.app[STATE].fail:
            return web.Response(status=503, text="down for maintenance")
        return web.Response(text=f"n={n(request)}")

    app.router.add_get("/library/sections", sections)
    app.router.add_get("/library/cc", cache_control)
    app.router.add_get("/library/negotiate", negotiate)
    app.router.add_get("/library/blob/{name}", blob)
    app.router.add_get("/library/big", big)
    app.router.add_get("/library/gated", gated)
    app.router.add_get("/library/flaky", flaky)
    app.router.add_get("/hubs/home", sections)
    return app


RULES: list[dict[str, Any]] = [
    {"upstream": "plex", "path": "/library/*", "ttl": "60s", "max_object_bytes": "16KiB",
     "stale_while_revalidate": "10s", "stale_if_error": "1h"},
    {"upstream": "plex", "path": "/hubs/*", "ttl": "60s"},
]  # fmt: skip


@dataclass
class Env:
    up: TestServer
    run: Running
    clock: Clock

    @property
    def hits(self) -> Counter[str]:
        return self.up.app[STATE].hits

    @property
    def state(self) -> Upstream:
        return self.up.app[STATE]

    async def get(
        self, path: str, key: str, method: str = "GET", **headers: str
    ) -> tuple[int, str, CIMultiDictProxy[str]]:
        resp = await self.run.proxy.request(method, path, headers={"X-Plex-Token": key, **headers})
        body = await resp.text()
        return resp.status, body, resp.headers

    def cache_count(self, result: str) -> float:
        labels = {"upstream": "plex", "result": result}
        return self.run.sc.metrics.registry.get_sample_value("sidecar_cache_requests_total", labels) or 0.0


async def start(
    aiohttp_server: Any, make_sidecar: MakeSidecar, tmp_path: Path, rules: list[dict[str, Any]] | None = None,
    max_bytes: str = "1MiB",
) -> Env:  # fmt: skip
    up = await aiohttp_server(cache_upstream())
    clock = Clock()
    config = base_config(
        str(up.make_url("")).rstrip("/"),
        tmp_path,
        cache={"max_bytes": max_bytes, "rules": rules or RULES},
        keys={"argon2": "cheapest", "upstream_token_envs": ["USER_TOKEN"]},
    )
    run = await make_sidecar(config, extra_env={"USER_TOKEN": USER_TOKEN}, clock=clock)
    return Env(up=up, run=run, clock=clock)


@pytest.fixture
async def cached(aiohttp_server: Any, make_sidecar: MakeSidecar, tmp_path: Path) -> Env:
    return await start(aiohttp_server, make_sidecar, tmp_path)


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition (never a fixed sleep): the loop turns until it holds or time runs out."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.002)


# ---------------------------------------------------------------------------- hit, miss, expiry


async def test_miss_then_hit_then_expired(cached: Env) -> None:
    _, key = await cached.run.create_key()
    status, body, headers = await cached.get("/library/sections", key)
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    assert 'n="1"' in body
    cached.clock.advance(10)
    status, body, headers = await cached.get("/library/sections", key)
    assert (status, headers["X-Cache-Status"], headers["Age"]) == (200, "HIT", "10")
    assert 'n="1"' in body
    assert cached.hits["/library/sections"] == 1

    cached.clock.advance(51 + 10)  # past the 60 s TTL and the 10 s stale-while-revalidate window
    status, body, headers = await cached.get("/library/sections", key)
    assert (status, headers["X-Cache-Status"]) == (200, "EXPIRED")
    assert 'n="2"' in body and cached.hits["/library/sections"] == 2
    _, body, headers = await cached.get("/library/sections", key)
    assert headers["X-Cache-Status"] == "HIT" and 'n="2"' in body
    assert (cached.cache_count("miss"), cached.cache_count("hit"), cached.cache_count("expired")) == (1, 2, 1)


async def test_head_is_served_from_the_get_entry(cached: Env) -> None:
    _, key = await cached.run.create_key()
    status, _, headers = await cached.get("/library/sections", key, method="HEAD")
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")  # a HEAD never fills
    _, body, _ = await cached.get("/library/sections", key)
    resp = await cached.run.proxy.head("/library/sections", headers={"X-Plex-Token": key})
    assert resp.headers["X-Cache-Status"] == "HIT"
    assert resp.headers["Content-Length"] == str(len(body.encode()))
    assert await resp.read() == b""
    assert cached.hits["/library/sections"] == 2  # the HEAD miss and the GET


async def test_query_credentials_do_not_split_entries_but_parameters_do(cached: Env) -> None:
    _, key = await cached.run.create_key()
    _, _, h1 = await cached.get("/library/cc?b=2&a=1", key)
    resp = await cached.run.proxy.get(f"/library/cc?a=1&X-Plex-Token={key}&b=2")
    assert (h1["X-Cache-Status"], resp.headers["X-Cache-Status"]) == ("MISS", "HIT")
    _, _, h3 = await cached.get("/library/cc?a=1&b=3", key)
    assert h3["X-Cache-Status"] == "MISS"


async def test_a_key_nested_in_a_query_value_does_not_split_entries(cached: Env) -> None:
    """Plex nests the key in ``/photo/:/transcode?url=…``: the upstream sees the identity's token
    there for either key, so both keys share one entry."""
    _, key_a = await cached.run.create_key(name="a")
    _, key_b = await cached.run.create_key(name="b")
    nested = "/library/cc?url=/library/metadata/1/thumb%3FX-Plex-Token%3D{}"
    _, body_a, ha = await cached.get(nested.format(key_a), key_a)
    _, body_b, hb = await cached.get(nested.format(key_b), key_b)
    assert (ha["X-Cache-Status"], hb["X-Cache-Status"]) == ("MISS", "HIT")
    assert body_a == body_b == "n=1" and cached.hits["/library/cc"] == 1


async def test_vary_on_the_credential_is_the_identity_and_vary_on_the_client_address_is_not_stored(
    cached: Env,
) -> None:
    _, key_a = await cached.run.create_key(name="a")
    _, key_b = await cached.run.create_key(name="b")
    # The upstream saw the same token for both keys (their identity), so they share the entry.
    _, _, ha = await cached.get("/library/cc?vary=X-Plex-Token", key_a)
    _, _, hb = await cached.get("/library/cc?vary=X-Plex-Token", key_b)
    assert (ha["X-Cache-Status"], hb["X-Cache-Status"]) == ("MISS", "HIT")
    # X-Forwarded-For is the sidecar's, per client: such an answer is never stored.
    for _ in range(2):
        _, _, h = await cached.get("/library/cc?vary=Accept,%20X-Forwarded-For", key_a)
        assert h["X-Cache-Status"] == "MISS"
    assert cached.hits["/library/cc"] == 3


async def test_rate_limit_headers_ride_on_hits(cached: Env) -> None:
    _, key = await cached.run.create_key()
    _, _, miss = await cached.get("/library/sections", key)
    _, _, hit = await cached.get("/library/sections", key)
    assert {k for k in miss if k.lower().startswith(("ratelimit", "x-ratelimit"))} == {
        k for k in hit if k.lower().startswith(("ratelimit", "x-ratelimit"))
    }


async def test_not_cached_without_a_rule(cached: Env) -> None:
    _, key = await cached.run.create_key()
    for _ in range(2):
        resp = await cached.run.proxy.get("/identity", headers={"X-Plex-Token": key})
        assert "X-Cache-Status" not in resp.headers
    assert cached.cache_count("miss") == 0 and cached.cache_count("bypass") == 0


async def test_conditional_requests_fill_in_full_and_hits_answer_304(cached: Env) -> None:
    _, key = await cached.run.create_key()
    status, body, headers = await cached.get("/library/blob/e", key, **{"If-None-Match": '"e-1"'})
    assert (status, len(body), headers["X-Cache-Status"]) == (200, BLOB, "MISS")  # the fill asked in full
    status, body, headers = await cached.get("/library/blob/e", key, **{"If-None-Match": 'W/"e-1"'})
    assert (status, body, headers["X-Cache-Status"], headers["ETag"]) == (304, "", "HIT", '"e-1"')
    status, body, _ = await cached.get("/library/blob/e", key, **{"If-None-Match": '"e-0"'})
    assert (status, len(body)) == (200, BLOB)


# ---------------------------------------------------------------------------- what is never cached


@pytest.mark.parametrize("query", ["cc=no-store", "cc=private", "cc=no-cache", "cc=max-age=0", "cookie=1"])
async def test_upstream_says_do_not_store(cached: Env, query: str) -> None:
    _, key = await cached.run.create_key()
    statuses = [(await cached.get(f"/library/cc?{query}", key))[2]["X-Cache-Status"] for _ in range(2)]
    assert statuses == ["MISS", "MISS"]
    assert cached.hits["/library/cc"] == 2


async def test_max_age_below_the_rule_ttl_wins(cached: Env) -> None:
    _, key = await cached.run.create_key()
    await cached.get("/library/cc?cc=max-age=5", key)
    cached.clock.advance(4)
    assert (await cached.get("/library/cc?cc=max-age=5", key))[2]["X-Cache-Status"] == "HIT"
    cached.clock.advance(2 + 10)
    assert (await cached.get("/library/cc?cc=max-age=5", key))[2]["X-Cache-Status"] == "EXPIRED"


async def test_range_requests_bypass(cached: Env) -> None:
    _, key = await cached.run.create_key()
    await cached.get("/library/blob/r", key)
    _, _, headers = await cached.get("/library/blob/r", key, Range="bytes=0-9")
    assert headers["X-Cache-Status"] == "BYPASS" and cached.hits["/library/blob/r"] == 2
    assert cached.cache_count("bypass") == 1


async def test_body_over_the_limit_streams_through_and_is_not_stored(cached: Env) -> None:
    _, key = await cached.run.create_key()
    for expected_hits in (1, 2):
        cached.state.resume.clear()
        resp = await cached.run.proxy.get("/library/big", headers={"X-Plex-Token": key})
        assert resp.headers["X-Cache-Status"] == "MISS"
        first = await resp.content.readexactly(4096)  # arrives while the upstream is still holding the rest
        assert first == b"a" * 4096
        cached.state.resume.set()
        rest = await resp.read()
        assert rest == b"b" * 4096 * 15  # complete, although over the rule's 16 KiB
        assert cached.hits["/library/big"] == expected_hits
    assert len(cached.run.sc.cache) == 0


# ---------------------------------------------------------------------------- Vary and identities


async def test_vary_accept_keeps_xml_and_json_apart(cached: Env) -> None:
    _, key = await cached.run.create_key()
    xml = {"Accept": "application/xml"}
    js = {"Accept": "application/json"}
    assert (await cached.get("/library/negotiate", key, **xml))[2]["X-Cache-Status"] == "MISS"
    assert (await cached.get("/library/negotiate", key, **js))[2]["X-Cache-Status"] == "MISS"
    _, body, headers = await cached.get("/library/negotiate", key, **xml)
    assert headers["X-Cache-Status"] == "HIT" and body.startswith("<MediaContainer")
    _, body, headers = await cached.get("/library/negotiate", key, **js)
    assert headers["X-Cache-Status"] == "HIT" and json.loads(body)["kind"] == "json"
    assert cached.hits["/library/negotiate"] == 2


async def test_different_upstream_identities_never_share(cached: Env) -> None:
    _, owner_key = await cached.run.create_key(name="owner")
    _, user_key = await cached.run.create_key(name="kid", upstream_token_env={"plex": "USER_TOKEN"})
    _, body, headers = await cached.get("/library/sections", owner_key)
    assert headers["X-Cache-Status"] == "MISS" and 'user="owner"' in body
    _, body, headers = await cached.get("/library/sections", user_key)
    assert headers["X-Cache-Status"] == "MISS" and 'user="managed-user"' in body
    _, body, headers = await cached.get("/library/sections", user_key)
    assert headers["X-Cache-Status"] == "HIT" and 'user="managed-user"' in body
    _, body, headers = await cached.get("/library/sections", owner_key)
    assert headers["X-Cache-Status"] == "HIT" and 'user="owner"' in body
    assert cached.hits["/library/sections"] == 2


async def test_a_key_never_reaches_another_keys_body(cached: Env) -> None:
    """Plex echoes the token in bodies; the sidecar swaps in the client's own key, per client."""
    _, key_a = await cached.run.create_key(name="a")
    _, key_b = await cached.run.create_key(name="b")
    _, body_a, headers = await cached.get("/library/sections", key_a)
    assert headers["X-Cache-Status"] == "MISS"
    assert f"X-Plex-Token={key_a}" in body_a and PLEX_TOKEN not in body_a
    _, body_b, headers = await cached.get("/library/sections", key_b)
    assert headers["X-Cache-Status"] == "HIT"
    assert f"X-Plex-Token={key_b}" in body_b
    assert key_a not in body_b and PLEX_TOKEN not in body_b
    # The stored copy holds no client key at all.
    stored = [e.body for e in cached.run.sc.cache._entries.values()]
    assert stored and not any(key_a.encode() in b or key_b.encode() in b for b in stored)


# ---------------------------------------------------------------------------- authorization first


async def test_unauthenticated_and_out_of_scope_requests_never_see_cached_bodies(cached: Env) -> None:
    _, key = await cached.run.create_key()
    _, narrow = await cached.run.create_key(name="narrow", permissions={"upstreams": ["plex"], "paths": ["/hubs/*"]})
    _, body, headers = await cached.get("/library/sections", key)
    assert headers["X-Cache-Status"] == "MISS" and "Movies" in body

    resp = await cached.run.proxy.get("/library/sections")
    assert resp.status == 401 and "Movies" not in await resp.text() and "X-Cache-Status" not in resp.headers
    resp = await cached.run.proxy.get("/library/sections", headers={"X-Plex-Token": "pmcp_not-a-real-key"})
    assert resp.status == 401 and "Movies" not in await resp.text()
    status, body, headers = await cached.get("/library/sections", narrow)
    assert status == 403 and "Movies" not in body and "X-Cache-Status" not in headers
    # The narrow key may see /hubs/*: that works, and is its own entry.
    status, _, headers = await cached.get("/hubs/home", narrow)
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    assert cached.cache_count("hit") == 0


# ---------------------------------------------------------------------------- repeat hits


async def test_repeat_hits_skip_the_decided_stages_but_no_decision(cached: Env) -> None:
    """The second hit is served from the memo; every change to the key is seen at once."""
    run = cached.run
    memo = run.sc.hit_memo
    assert memo is not None
    rec, key = await run.create_key(name="memo")
    for want in ("MISS", "HIT", "HIT", "HIT"):
        status, body, headers = await cached.get("/library/cc?a=1", key)
        assert (status, headers["X-Cache-Status"], body) == (200, want, "n=1")
    assert memo.served == 2  # the third and fourth, with the same answer and log line as the full path
    run.sc.access_log.flush()
    last = json.loads(Path(run.config.log.access).read_text().splitlines()[-1])
    assert (last["key"], last["cache"], last["credential"], last["path"], last["status"]) == (
        rec.id, "HIT", "plex_header", "/library/cc?a=1", 200,
    )  # fmt: skip
    # An entry the client's ScrubFilter must rewrite (it echoes the token) always goes the whole way.
    for _ in range(3):
        _, body, _ = await cached.get("/library/sections", key)
        assert f"X-Plex-Token={key}" in body and PLEX_TOKEN not in body
    assert memo.served == 2

    # A second, different credential: 400 as always, never the remembered answer.
    resp = await run.proxy.get("/library/cc?a=1", headers={"X-Plex-Token": key, "x-api-key": "pmcp_other"})
    assert resp.status == 400
    # Narrowed permissions apply at once (the record is replaced) ...
    await run.sc.manager().patch(rec.id, {"permissions": {"upstreams": ["plex"], "paths": ["/hubs/*"]}}, "test")
    await run.sc.verifier.refresh()
    status, body, _ = await cached.get("/library/cc?a=1", key)
    assert status == 403 and "n=1" not in body
    # ... and so does a revocation.
    await run.sc.manager().revoke(rec.id, "test")
    await run.sc.verifier.refresh()
    resp = await run.proxy.get("/library/cc?a=1", headers={"X-Plex-Token": key})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "revoked_key"
    assert memo.served == 2 and cached.hits["/library/cc"] == 1


async def test_repeat_hits_honour_expiry_and_rate_limits(
    aiohttp_server: Any, make_sidecar: MakeSidecar, tmp_path: Path
) -> None:
    env = await start(aiohttp_server, make_sidecar, tmp_path)
    _, key = await env.run.create_key(name="short", expires_at=env.clock.now + 30)
    for want in ("MISS", "HIT", "HIT"):
        assert (await env.get("/library/cc", key))[2]["X-Cache-Status"] == want
    assert env.run.sc.hit_memo is not None and env.run.sc.hit_memo.served == 1
    env.clock.advance(31)  # the entry (60 s) is still fresh; the key is not
    resp = await env.run.proxy.get("/library/cc", headers={"X-Plex-Token": key})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "expired_key"

    limited = base_config(
        str(env.up.make_url("")).rstrip("/"), tmp_path / "b", cache={"rules": RULES},
        rate_limits={"default": ["2/minute"], "count_cache_hits": True},
    )  # fmt: skip
    (tmp_path / "b").mkdir()
    run = await make_sidecar(limited)
    _, key = await run.create_key()
    statuses = [(await run.proxy.get("/library/cc", headers={"X-Plex-Token": key})).status for _ in range(4)]
    assert statuses == [200, 200, 429, 429]  # repeat hits are refused like any other request
    assert run.sc.hit_memo is not None and run.sc.hit_memo.served == 0


# ---------------------------------------------------------------------------- coalescing


async def test_fifty_concurrent_misses_make_one_upstream_request(cached: Env) -> None:
    _, key = await cached.run.create_key()
    tasks = [asyncio.create_task(cached.get("/library/gated", key)) for _ in range(50)]
    await wait_until(lambda: cached.hits["/library/gated"] == 1 and cached.run.sc.cache.waiting == 49)
    cached.state.gate.set()
    results = await asyncio.gather(*tasks)
    assert cached.hits["/library/gated"] == 1
    assert all(status == 200 and body == "n=1" for status, body, _ in results)
    assert Counter(h["X-Cache-Status"] for _, _, h in results) == {"MISS": 1, "HIT": 49}


async def test_followers_go_alone_when_the_leaders_answer_is_not_storable(cached: Env) -> None:
    _, key = await cached.run.create_key()
    tasks = [asyncio.create_task(cached.get("/library/gated?cc=no-store", key)) for _ in range(5)]
    await wait_until(lambda: cached.hits["/library/gated"] == 1 and cached.run.sc.cache.waiting == 4)
    cached.state.gate.set()
    results = await asyncio.gather(*tasks)
    assert cached.hits["/library/gated"] == 5
    assert sorted(body for _, body, _ in results) == [f"n={i}" for i in range(1, 6)]
    assert {h["X-Cache-Status"] for _, _, h in results} == {"MISS"}


async def test_when_the_leaders_client_leaves_one_follower_leads(cached: Env) -> None:
    _, key = await cached.run.create_key()
    leader = asyncio.create_task(cached.get("/library/gated", key))
    await wait_until(lambda: cached.hits["/library/gated"] == 1)
    followers = [asyncio.create_task(cached.get("/library/gated", key)) for _ in range(5)]
    await wait_until(lambda: cached.run.sc.cache.waiting == 5)
    leader.cancel()  # the client hangs up: the sidecar cancels the leader's request
    await wait_until(lambda: cached.hits["/library/gated"] == 2 and cached.run.sc.cache.waiting == 4)
    cached.state.gate.set()
    results = await asyncio.gather(*followers)
    assert cached.hits["/library/gated"] == 2
    assert Counter(h["X-Cache-Status"] for _, _, h in results) == {"MISS": 1, "HIT": 4}
    assert {body for _, body, _ in results} == {"n=2"}


# ---------------------------------------------------------------------------- bounded by bytes


async def test_byte_bound_evicts_the_least_recently_used(aiohttp_server: Any, make_sidecar: MakeSidecar,
                                                          tmp_path: Path) -> None:  # fmt: skip
    # Room for two 1 000-byte entries (with their headers), not three.
    e = await start(aiohttp_server, make_sidecar, tmp_path, max_bytes="3000")
    _, key = await e.run.create_key()

    async def status(name: str) -> str:
        return (await e.get(f"/library/blob/{name}", key))[2]["X-Cache-Status"]

    assert [await status("a"), await status("b"), await status("a")] == ["MISS", "MISS", "HIT"]
    assert await status("c") == "MISS"  # evicts b, the least recently used
    assert await status("a") == "HIT"
    assert await status("b") == "MISS"
    assert e.run.sc.cache.size <= 3000 and len(e.run.sc.cache) == 2


# ---------------------------------------------------------------------------- staleness


async def test_stale_while_revalidate_refreshes_once_in_the_background(cached: Env) -> None:
    _, key = await cached.run.create_key()
    await cached.get("/library/flaky", key)
    cached.clock.advance(65)  # expired, inside the 10 s stale-while-revalidate window
    results = await asyncio.gather(*(cached.get("/library/flaky", key) for _ in range(5)))
    assert {(body, h["X-Cache-Status"]) for _, body, h in results} == {("n=1", "STALE")}
    await wait_until(lambda: cached.hits["/library/flaky"] == 2 and not cached.run.sc.cache._refreshing)
    _, body, headers = await cached.get("/library/flaky", key)
    assert (body, headers["X-Cache-Status"]) == ("n=2", "HIT")
    assert cached.hits["/library/flaky"] == 2  # one refresh for five stale answers


async def test_stale_if_error_serves_when_the_upstream_answers_5xx(cached: Env) -> None:
    _, key = await cached.run.create_key()
    await cached.get("/library/flaky", key)
    cached.clock.advance(600)
    cached.state.fail = True
    status, body, headers = await cached.get("/library/flaky", key)
    assert (status, body, headers["X-Cache-Status"]) == (200, "n=1", "STALE")
    cached.state.fail = False
    status, body, headers = await cached.get("/library/flaky", key)
    assert (status, body, headers["X-Cache-Status"]) == (200, "n=3", "EXPIRED")


async def test_stale_if_error_serves_when_the_upstream_is_down(cached: Env) -> None:
    _, key = await cached.run.create_key()
    await cached.get("/library/flaky", key)
    await cached.get("/library/sections", key)
    await cached.up.close()
    status, body, headers = await cached.get("/library/sections", key)
    assert (status, headers["X-Cache-Status"]) == (200, "HIT")  # a hit never needs the upstream
    cached.clock.advance(600)
    status, body, headers = await cached.get("/library/flaky", key)
    assert (status, body, headers["X-Cache-Status"]) == (200, "n=1", "STALE")
    cached.clock.advance(3600)  # past stale_if_error too: the truth is a 502
    status, body, _ = await cached.get("/library/flaky", key)
    assert status == 502 and json.loads(body)["error"]["code"] == "upstream_unavailable"


# ---------------------------------------------------------------------------- purge, metrics, log


async def test_delete_admin_cache_purges(cached: Env) -> None:
    _, key = await cached.run.create_key()
    for path in ("/library/sections", "/library/blob/x", "/hubs/home"):
        await cached.get(path, key)
    admin = cached.run.admin
    resp = await admin.delete("/admin/cache", params={"path": "/library/blob/*"}, headers=cached.run.admin_headers())
    assert resp.status == 200 and (await resp.json())["data"]["purged"] == 1
    assert (await cached.get("/library/blob/x", key))[2]["X-Cache-Status"] == "MISS"
    assert (await cached.get("/library/sections", key))[2]["X-Cache-Status"] == "HIT"
    resp = await admin.delete("/admin/cache", params={"upstream": "other"}, headers=cached.run.admin_headers())
    assert (await resp.json())["data"]["purged"] == 0
    resp = await admin.delete("/admin/cache", headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401
    resp = await admin.delete("/admin/cache", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert (await resp.json())["data"]["purged"] == 3
    assert (await cached.get("/library/sections", key))[2]["X-Cache-Status"] == "MISS"
    purges = [(e.actor, e.detail) for e in await cached.run.sc.store.audit_log() if e.action == "cache_purged"]
    assert purges == [  # newest first: who emptied what, and how much
        ("admin", {"purged": 3}),
        ("admin", {"upstream": "other", "purged": 0}),
        ("admin", {"path": "/library/blob/*", "purged": 1}),
    ]
    assert cached.run.sc.cache.purge(upstream="plex") == 1  # what a config reload calls per changed upstream
    assert cached.run.sc.cache.size == 0


async def test_a_purge_voids_a_fill_in_flight(cached: Env) -> None:
    _, key = await cached.run.create_key()
    task = asyncio.create_task(cached.get("/library/gated", key))
    await wait_until(lambda: cached.hits["/library/gated"] == 1)
    cached.run.sc.cache.purge()
    cached.state.gate.set()
    assert (await task)[1] == "n=1"
    assert (await cached.get("/library/gated", key))[1] == "n=2"


async def test_cache_status_in_metrics_and_access_log(cached: Env, tmp_path: Path) -> None:
    _, key = await cached.run.create_key()
    await cached.get("/library/sections", key)
    await cached.get("/library/sections", key)
    assert (cached.cache_count("miss"), cached.cache_count("hit")) == (1, 1)
    text = await (await cached.run.admin.get("/metrics")).text()
    hit = [line for line in text.splitlines() if line.startswith("sidecar_cache_requests_total{")
           and 'upstream="plex"' in line and 'result="hit"' in line]  # fmt: skip
    assert len(hit) == 1 and float(hit[0].rsplit(" ", 1)[1]) == 1.0
    cached.run.sc.access_log.flush()
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert [line.get("cache") for line in lines if line["path"] == "/library/sections"] == ["MISS", "HIT"]
