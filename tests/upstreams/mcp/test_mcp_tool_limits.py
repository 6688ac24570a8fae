"""Per-tool rate limits (issue 19 §3): ``tools/call`` counted per (key, upstream, tool), memory and Redis.

The upstream is the SDK's own server (``tests/mcp_server.py``), which records every tool
that ran: a refused call must never reach it, and the JSON-RPC refusal must carry what
the rate-limit headers would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest
from conftest import MakeSidecar, Running, base_config, log_lines
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_server import MCP_TOKEN, McpUpstream
from mcp_support import ACCEPT, INIT, bearer, call, session
from redis_support import RedisProc, redis_server  # noqa: F401 - the fixture

from sidecar.config import ConfigError, parse_config
from sidecar.upstreams.mcp.jsonrpc import TOOL_RATE_LIMITED

LIMITS = {"search": ["3/minute"], "delete_*": "1/hour", "*": ["100/minute"]}
PERMS = {"upstreams": ["*"], "tools": {"*": ["search", "fetch", "delete_everything"]}}


def config(upstream: McpUpstream, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    cfg = base_config(upstream.url, tmp_path, **extra)
    auth = {"Authorization": "Bearer ${MCP_TOKEN}"}
    mcp = {"tool_limits": LIMITS}
    cfg["upstreams"] = [
        {"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools", "headers": auth,
         "mcp": mcp},
        {"id": "legacy", "kind": "mcp", "url": upstream.url, "path_prefix": "/mcp/legacy", "headers": auth, "mcp": mcp},
    ]  # fmt: skip
    return cfg


@pytest.fixture
async def gw(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path) -> Running:
    return await make_sidecar(config(upstream, tmp_path), extra_env={"MCP_TOKEN": MCP_TOKEN})


def answer(text: str) -> dict[str, Any]:
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip() for line in block.split("\n") if line.startswith("data:")]
        if data:
            return json.loads("\n".join(data))  # type: ignore[no-any-return]
    return json.loads(text)  # type: ignore[no-any-return]


async def tool(gw: Running, h: dict[str, str], rid: int, name: str) -> dict[str, Any]:
    args = {"query": "q"} if name == "search" else {"url": "u"} if name == "fetch" else {}
    r = await gw.proxy.post("/mcp/tools", json=call(rid, name, **args), headers=h)
    assert r.status == 200, await r.text()
    return answer(await r.text())


async def test_exact_counts_globs_and_the_refusal_data(gw: Running, upstream: McpUpstream) -> None:
    _, key = await gw.create_key(name="agent", permissions=PERMS)
    h = await session(gw, key)
    for rid in range(3):
        assert "result" in await tool(gw, h, 10 + rid, "search")
    refused = await tool(gw, h, 13, "search")
    assert refused["id"] == 13
    err = refused["error"]
    assert err["code"] == TOOL_RATE_LIMITED
    assert "3/minute" in err["message"] and "'search'" in err["message"]
    data = err["data"]
    assert data["code"] == "rate_limit_exceeded" and data["tool"] == "search"
    assert data["limit"] == 3 and data["remaining"] == 0
    assert 1 <= data["retry_after"] <= 20 and 1 <= data["reset"] <= 60
    assert data["policy"] == '"minute";q=3;w=60'
    assert data["ratelimit"].startswith('"minute";r=0;t=')
    assert upstream.rec.calls.count("search") == 3  # the fourth never reached the upstream
    for rid in range(5):  # another tool, under the catch-all: its own budget
        assert "result" in await tool(gw, h, 20 + rid, "fetch")
    assert "result" in await tool(gw, h, 30, "delete_everything")
    again = await tool(gw, h, 31, "delete_everything")
    assert again["error"]["code"] == TOOL_RATE_LIMITED and again["error"]["data"]["policy"] == '"hour";q=1;w=3600'
    assert upstream.rec.calls.count("delete_everything") == 1
    _, other = await gw.create_key(name="other", permissions=PERMS)
    h2 = await session(gw, other)
    assert "result" in await tool(gw, h2, 40, "search")  # every key has its own budget per tool
    lines = await log_lines(Path(gw.config.log.access or ""), want=15)
    assert any(line.get("tool") == "search" and line.get("error") == "rate_limit_exceeded" for line in lines)
    metrics = await (await gw.admin.get("/metrics", headers=gw.admin_headers())).text()
    assert 'tool="search",outcome="rate_limited"' in metrics.replace(", ", ",")


async def test_a_refused_call_spends_nothing(gw: Running, upstream: McpUpstream) -> None:
    """The key's own 5/minute: 3 searches + 2 refused searches + fetches up to its budget (DESIGN invariant 12)."""
    _, key = await gw.create_key(name="agent", permissions=PERMS, rate_limits=["6/minute"])
    h = await session(gw, key)  # initialize + initialized: two requests of the six
    for rid in range(3):
        assert "result" in await tool(gw, h, rid, "search")
    for rid in range(3, 6):
        assert (await tool(gw, h, rid, "search"))["error"]["code"] == TOOL_RATE_LIMITED
    assert "result" in await tool(gw, h, 7, "fetch")  # the refusals were given back: budget left for one
    r = await gw.proxy.post("/mcp/tools", json=call(8, "fetch", url="u"), headers=h)
    assert r.status == 429  # and now the key's own limit is spent


async def test_rotating_a_key_does_not_refill_its_tool_budgets(gw: Running, upstream: McpUpstream) -> None:
    """Attack: spend ``delete_*: 1/hour``, rotate the key (with a grace: two live keys) and call again
    with either. The successor continues its predecessor's per-tool budget, as for the key's own
    limits (docs/ratelimits.md): both keys are refused, and the tool ran once."""
    rec, key = await gw.create_key(name="agent", permissions=PERMS)
    h = await session(gw, key)
    assert "result" in await tool(gw, h, 1, "delete_everything")
    resp = await gw.admin.post(f"/admin/keys/{rec.id}/rotate", json={"grace": "1h"}, headers=gw.admin_headers())
    assert resp.status == 201, await resp.text()
    successor = (await resp.json())["data"]["key"]
    await gw.sc.verifier.refresh()
    h2 = await session(gw, successor)
    for headers, rid in ((h2, 2), (h, 3)):
        refused = await tool(gw, headers, rid, "delete_everything")
        assert refused["error"]["code"] == TOOL_RATE_LIMITED, refused
    assert upstream.rec.calls.count("delete_everything") == 1


async def test_the_sdk_client_sees_an_error_and_its_session_goes_on(gw: Running) -> None:
    _, key = await gw.create_key(name="agent", permissions=PERMS)
    async with (
        httpx2.AsyncClient(headers=bearer(key)) as http,
        streamable_http_client(str(gw.proxy.make_url("/mcp/tools")), http_client=http) as (read, write),
        ClientSession(read, write) as s,
    ):
        await s.initialize()
        for _ in range(3):
            await s.call_tool("search", {"query": "q"})
        with pytest.raises(MCPError) as e:
            await s.call_tool("search", {"query": "q"})
        assert e.value.error.code == TOOL_RATE_LIMITED
        assert e.value.error.data["remaining"] == 0
        assert (await s.call_tool("fetch", {"url": "u"})).content  # the session lives on


async def test_legacy_sse_refusal_comes_down_the_stream(gw: Running, upstream: McpUpstream) -> None:
    _, key = await gw.create_key(name="agent", permissions=PERMS)
    async with gw.proxy.get("/mcp/legacy/sse", headers={**bearer(key), "Accept": "text/event-stream"}) as stream:
        buf = ""

        async def event() -> dict[str, Any] | str:
            nonlocal buf
            while "\n\n" not in buf:
                buf += (await stream.content.readany()).decode().replace("\r\n", "\n")
            raw, buf = buf.split("\n\n", 1)
            data = "\n".join(x[5:].strip() for x in raw.split("\n") if x.startswith("data:"))
            return data if raw.startswith("event: endpoint") else json.loads(data)

        endpoint = await event()
        assert isinstance(endpoint, str)
        h = {**ACCEPT, **bearer(key)}
        assert (await gw.proxy.post(endpoint, json=INIT, headers=h)).status == 202
        await event()
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await gw.proxy.post(endpoint, json=note, headers=h)).status == 202
        for rid in range(2, 6):
            assert (await gw.proxy.post(endpoint, json=call(rid, "search", query="q"), headers=h)).status == 202
            got = await event()
            assert isinstance(got, dict) and got["id"] == rid
            if rid < 5:
                assert "result" in got
            else:
                assert got["error"]["code"] == TOOL_RATE_LIMITED and got["error"]["data"]["tool"] == "search"
    assert upstream.rec.calls.count("search") == 3


async def test_rest_tool_call_is_a_429_with_the_headers(gw: Running, upstream: McpUpstream) -> None:
    _, key = await gw.create_key(name="agent", permissions=PERMS)
    body = {"mcp_id": "tools", "tool": "delete_everything"}
    assert (await gw.proxy.post("/mcp", json=body, headers=bearer(key))).status == 200
    r = await gw.proxy.post("/mcp", json=body, headers=bearer(key))
    assert r.status == 429
    assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["Retry-After"]) > 3000 and r.headers["RateLimit-Policy"] == '"hour";q=1;w=3600'
    assert r.headers["X-RateLimit-Remaining"] == "0"
    assert upstream.rec.calls.count("delete_everything") == 1


async def test_tool_limits_shared_through_redis(
    make_sidecar: MakeSidecar,
    upstream: McpUpstream,
    tmp_path: Path,
    redis_server: RedisProc,  # noqa: F811
) -> None:
    """Two sidecars on one Redis: one budget per (key, tool), whichever sidecar the calls go through."""
    rl = {"backend": "redis", "redis_url": redis_server.url}
    a = await make_sidecar(config(upstream, tmp_path, rate_limits=rl), extra_env={"MCP_TOKEN": MCP_TOKEN})
    b = await make_sidecar(config(upstream, tmp_path, rate_limits=rl), extra_env={"MCP_TOKEN": MCP_TOKEN})
    _, key = await a.create_key(name="agent", permissions=PERMS)
    await b.sc.verifier.refresh()
    ha, hb = await session(a, key), await session(b, key)
    assert "result" in await tool(a, ha, 1, "search")
    assert "result" in await tool(b, hb, 2, "search")
    assert "result" in await tool(a, ha, 3, "search")
    refused = await tool(b, hb, 4, "search")
    assert refused["error"]["code"] == TOOL_RATE_LIMITED
    assert upstream.rec.calls.count("search") == 3


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        ({"search": "lots"}, "upstreams[0].mcp.tool_limits.search:"),
        ({"search": ["60/minute", "x"]}, "upstreams[0].mcp.tool_limits.search[1]:"),
        ({"search": []}, "upstreams[0].mcp.tool_limits.search: expected a limit"),
        (["search"], "upstreams[0].mcp.tool_limits: expected a mapping"),
    ],
)
def test_bad_tool_limits_name_their_path(tmp_path: Path, limits: Any, problem: str) -> None:
    cfg = base_config("http://127.0.0.1:1", tmp_path)
    cfg["upstreams"] = [{"id": "t", "kind": "mcp", "url": "http://127.0.0.1:1/mcp", "mcp": {"tool_limits": limits}}]
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, env={}, base=tmp_path)
    assert problem in str(e.value)


def test_first_matching_glob_decides(tmp_path: Path) -> None:
    cfg = base_config("http://127.0.0.1:1", tmp_path)
    limits = {"delete_all": ["1/day"], "delete_*": ["1/hour"], "*": ["100/minute"]}
    cfg["upstreams"] = [{"id": "t", "kind": "mcp", "url": "http://127.0.0.1:1/mcp", "mcp": {"tool_limits": limits}}]
    tl = parse_config(cfg, env={}, base=tmp_path).upstreams[0].mcp_tool_limits
    assert [(g, [x.text for x in lim]) for g, lim in [tl.for_tool(t) or ("", ()) for t in ("delete_all", "delete_x",
            "search", "Delete_x")]] == [("delete_all", ["1/day"]), ("delete_*", ["1/hour"]), ("*", ["100/minute"]),
                                         ("*", ["100/minute"])]  # fmt: skip


def test_in_a_batch_only_the_calls_over_their_limit_are_refused() -> None:
    """judge() with the limiter's verdict: the other messages go up byte-exact, the refusal keeps its id."""
    from sidecar.upstreams.mcp.authz import McpAccess, judge

    batch = [call(1, "search", query="a"), call(2, "search", query="b"), {"jsonrpc": "2.0", "method": "ping", "id": 3}]
    raw = json.dumps(batch).encode()
    first = judge(raw, [], McpAccess(), legacy=False)
    assert first.calls == [(0, "search"), (1, "search")]
    over = {1: ("rate limit of 1/minute exceeded for tool 'search' and this key", {"code": "rate_limit_exceeded"})}
    d = judge(raw, [], McpAccess(), legacy=False, limited=over)
    assert d.refused == [{"jsonrpc": "2.0", "id": 2, "error": {"code": TOOL_RATE_LIMITED, "message": over[1][0],
                                                               "data": {"code": "rate_limit_exceeded"}}}]  # fmt: skip
    assert d.forward is not None and [m["id"] for m in json.loads(d.forward)] == [1, 3]
    legacy = judge(raw, [], McpAccess(), legacy=True, limited=over)
    assert json.loads(legacy.forward or b"")[1] == {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "ping",
    }  # answered on the stream
