"""Attacks on the REST tool call (``POST /mcp``) by a key allowed tool ``search`` only.

The upstream here is a small real JSON-RPC server that records every message it is sent, so
each test asserts both what the client sees and what reached the upstream. Holes found:

- An answer of any size was read whole (``resp.read()``), parsed and re-serialised: one call of
  an allowed tool returning a huge result held several times its size in the sidecar's
  memory. Now an answer over ``RestClient.max_answer`` is a 502 and is never buffered past it.
- A call whose answer streams (SSE, with progress or keep-alive comments) outlived the
  revocation of its key: the result was delivered minutes later to a revoked key. Now the call
  is registered with the open streams and ends within the contract's 5 s (401 ``revoked_key``).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config, log_lines

TOKEN = "mcp-upstream-secret-0123456789"
BOUND = 5.0  # DESIGN invariant 5


def recording_app(calls: list[dict[str, Any]]) -> web.Application:
    """An MCP server (session-era) whose tools misbehave on demand; ``calls`` gets every tools/call."""

    async def post(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.Response(status=401)
        msg = json.loads(await request.read())
        if msg.get("method") == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "r"}}
            return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": result},
                                     headers={"Mcp-Session-Id": f"upstream-session-{len(calls)}"})  # fmt: skip
        if "id" not in msg:
            return web.Response(status=202)
        calls.append(msg)
        name, args = msg["params"]["name"], msg["params"].get("arguments", {})
        if name == "deep":  # a result nested deeper than any JSON parser's recursion allows
            depth = int(args["depth"])
            body = b'{"jsonrpc": "2.0", "id": %d, "result": ' % msg["id"] + b"[" * depth + b"]" * depth + b"}"
            if args.get("sse"):
                body = b"event: message\ndata: " + body + b"\n\n"
            return web.Response(body=body, content_type="text/event-stream" if args.get("sse") else "application/json")
        if name == "big":
            text = "x" * int(args["n"])
        elif name == "slow":  # keep-alive comments for a long while, then the answer
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for _ in range(int(args.get("ticks", 200))):
                await resp.write(b": ping\n\n")
                await asyncio.sleep(0.05)
            answer = {"jsonrpc": "2.0", "id": msg["id"], "result": {"content": [{"type": "text", "text": "late"}]}}
            await resp.write(b"event: message\ndata: " + json.dumps(answer).encode() + b"\n\n")
            return resp
        else:  # echoes what it got, the credential included
            text = json.dumps({"name": name, "args": args, "auth": request.headers.get("Authorization")})
        result = {"content": [{"type": "text", "text": text}]}
        return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": result},
                                 headers={"Mcp-Session-Id": request.headers.get("Mcp-Session-Id", "")})  # fmt: skip

    app = web.Application()
    app.router.add_post("/mcp", post)
    return app


@pytest.fixture
async def rig(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> tuple[Running, list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []
    up = await aiohttp_server(recording_app(calls))
    cfg = base_config("http://unused", tmp_path, keys={"argon2": "cheapest", "stream_check_interval": "100ms"})
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/tools",
                         "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}}]  # fmt: skip
    return await make_sidecar(cfg, extra_env={"MCP_TOKEN": TOKEN}), calls


async def rest(run: Running, key: str, body: bytes | dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await run.proxy.post("/mcp", data=data, headers={"Authorization": f"Bearer {key}", **headers})
    raw = await r.read()
    assert TOKEN.encode() not in raw and "Mcp-Session-Id" not in r.headers, (r.headers, raw[:300])
    return r.status, json.loads(raw)


SEARCH_ONLY = {"upstreams": ["tools"], "tools": {"tools": ["search"]}}


async def test_other_tool_names_are_refused_and_never_reach_the_upstream(rig: tuple[Running, list[Any]]) -> None:
    """Case, spaces, NUL, encodings, path tricks, lists, objects: 403 or 400, never a call upstream."""
    run, calls = rig
    _, key = await run.create_key(permissions=SEARCH_ONLY)
    for tool in ("Search", "search ", " search", "search\x00x", "search%00x", "search/../delete", "..%2Fdelete",
                 "ｓearch", "search\n", "*", "search*", "delete"):  # fmt: skip
        status, body = await rest(run, key, {"mcp_id": "tools", "tool": tool})
        assert (status, body["error"]["code"]) == (403, "insufficient_permissions"), (tool, body)
    for body in ({"mcp_id": "tools", "tool": ["search", "delete"]}, {"mcp_id": "tools", "tool": {"name": "delete"}},
                 [{"mcp_id": "tools", "tool": "delete"}], {"mcp_id": "tools", "tool": "search", "name": "delete"},
                 {"mcp_id": "tools", "tool": "search", "params": {"name": "delete"}}, {"mcp_id": "tools"}):  # fmt: skip
        status, got = await rest(run, key, body)
        assert (status, got["error"]["code"]) == (400, "bad_request"), (body, got)
    assert calls == []


async def test_what_the_sidecar_judged_is_exactly_what_goes_up(rig: tuple[Running, list[Any]]) -> None:
    """Duplicate ``tool`` keys (the last wins for the sidecar): the upstream is sent that same name, in a
    message the sidecar wrote itself; ``_meta`` or ``name`` inside arguments stay arguments."""
    run, calls = rig
    _, key = await run.create_key(permissions=SEARCH_ONLY)
    raw = b'{"mcp_id": "tools", "tool": "delete", "tool": "search", "arguments": {"_meta": {"x": 1}, "name": "delete"}}'
    status, body = await rest(run, key, raw, **{"Content-Type": "text/plain"})
    assert status == 200, body
    assert [c["params"]["name"] for c in calls] == ["search"]
    assert calls[0]["params"]["arguments"] == {"_meta": {"x": 1}, "name": "delete"}
    status, body = await rest(run, key, b'{"mcp_id": "tools", "tool": "search", "tool": "delete"}')
    assert status == 403 and len(calls) == 1
    echoed = json.loads(body["data"]["content"][0]["text"]) if "data" in body else None
    assert echoed is None


async def test_refusals_are_free_and_the_upstream_credential_is_scrubbed(rig: tuple[Running, list[Any]]) -> None:
    """A key with 2 calls a minute: ten refused calls of other tools spend nothing; the two allowed calls
    answer with the upstream's echo of its credential as REDACTED; the third is 429."""
    run, _ = rig
    _, key = await run.create_key(permissions=SEARCH_ONLY, rate_limits=["2/minute"])
    for _ in range(10):
        status, _body = await rest(run, key, {"mcp_id": "tools", "tool": "delete"})
        assert status == 403
    for _ in range(2):
        status, body = await rest(run, key, {"mcp_id": "tools", "tool": "search", "arguments": {"q": "a"}})
        assert status == 200, body
        assert json.loads(body["data"]["content"][0]["text"])["auth"] == "REDACTED"
    status, body = await rest(run, key, {"mcp_id": "tools", "tool": "search"})
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")


async def test_each_key_has_its_own_upstream_session_never_shown(rig: tuple[Running, list[Any]]) -> None:
    """Two keys' calls run on two upstream sessions; neither answer carries an ``Mcp-Session-Id``."""
    run, _ = rig
    _, a = await run.create_key(permissions=SEARCH_ONLY)
    _, b = await run.create_key(permissions=SEARCH_ONLY)
    for key in (a, b, a):
        status, _body = await rest(run, key, {"mcp_id": "tools", "tool": "search"})
        assert status == 200
    pooled = run.sc.mcp.rest._pool if run.sc.mcp is not None else {}
    assert len({p.session_id for p in pooled.values()}) == 2


async def test_an_enormous_answer_is_refused_not_buffered(rig: tuple[Running, list[Any]]) -> None:
    """An allowed tool answering 2 MiB where the sidecar holds at most 1 MiB: 502, not 200."""
    run, _ = rig
    assert run.sc.mcp is not None
    run.sc.mcp.rest.max_answer = 1 << 20
    _, key = await run.create_key(permissions={"upstreams": ["tools"], "tools": {"tools": ["big"]}})
    status, body = await rest(run, key, {"mcp_id": "tools", "tool": "big", "arguments": {"n": 100}})
    assert status == 200 and body["data"]["content"][0]["text"] == "x" * 100
    status, body = await rest(run, key, {"mcp_id": "tools", "tool": "big", "arguments": {"n": 2 << 20}})
    assert (status, body["error"]["code"]) == (502, "upstream_unavailable"), body


async def test_revocation_ends_a_call_whose_answer_streams(rig: tuple[Running, list[Any]]) -> None:
    """A tool that keeps its SSE answer open (keep-alive comments) for 10 s: the key is revoked after the
    call started, and the client gets 401 ``revoked_key`` within 5 s, not the tool's late result."""
    run, calls = rig
    rec, key = await run.create_key(permissions={"upstreams": ["tools"], "tools": {"tools": ["slow"]}})
    call = asyncio.create_task(rest(run, key, {"mcp_id": "tools", "tool": "slow", "arguments": {"ticks": 200}}))
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert calls, "the call reached the upstream"
    resp = await run.admin.delete(f"/admin/keys/{rec.id}", headers=run.admin_headers())
    assert resp.status == 200
    start = time.monotonic()
    async with asyncio.timeout(BOUND + 1):
        status, body = await call
    assert time.monotonic() - start < BOUND
    assert (status, body["error"]["code"]) == (401, "revoked_key"), body


async def test_other_methods_and_query_tricks_get_designed_errors(rig: tuple[Running, list[Any]]) -> None:
    """GET/PUT/DELETE/PATCH ``/mcp``, a ``?tool=`` beside the body, an empty body, non-JSON, JSON null:
    a designed JSON error every time (never a 500), and nothing reaches the upstream."""
    run, calls = rig
    _, key = await run.create_key(permissions=SEARCH_ONLY)
    auth = {"Authorization": f"Bearer {key}"}
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = await run.proxy.request(method, "/mcp", headers=auth, data=b'{"mcp_id": "tools", "tool": "delete"}')
        body = await r.json()
        assert r.status in (400, 404, 405) and "code" in body["error"], (method, r.status, body)
    r = await run.proxy.post("/mcp?tool=delete&mcp_id=tools", headers=auth, data=b'{"mcp_id": "tools", "tool": "del"}')
    assert r.status == 403
    for raw in (b"", b"null", b"not json", b"\xff\xfe", b'{"mcp_id": "tools", "tool": "search"'):
        status, body = await rest(run, key, raw)
        assert (status, body["error"]["code"]) == (400, "bad_request"), (raw, body)
    assert calls == []


async def test_a_per_tool_refusal_spends_neither_the_rate_limit_nor_the_quota(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """``search`` limited to 1 call an hour, the key to 3 calls a minute and a quota of 3 a day: after one
    search, five refused searches (429) leave the key's budget whole — two other calls still go through."""
    calls: list[dict[str, Any]] = []
    up = await aiohttp_server(recording_app(calls))
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/tools",
                         "headers": {"Authorization": "Bearer ${MCP_TOKEN}"},
                         "mcp": {"tool_limits": {"search": "1/hour"}}}]  # fmt: skip
    run = await make_sidecar(cfg, extra_env={"MCP_TOKEN": TOKEN})
    perms = {"upstreams": ["tools"], "tools": {"tools": ["search", "other"]}}
    _, key = await run.create_key(permissions=perms, rate_limits=["3/minute"], quota="3/day")
    assert (await rest(run, key, {"mcp_id": "tools", "tool": "search"}))[0] == 200
    for _ in range(5):
        status, body = await rest(run, key, {"mcp_id": "tools", "tool": "search"})
        assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded"), body
    for _ in range(2):
        status, body = await rest(run, key, {"mcp_id": "tools", "tool": "other"})
        assert status == 200, body
    status, body = await rest(run, key, {"mcp_id": "tools", "tool": "other"})
    assert status == 429, body
    assert [c["params"]["name"] for c in calls] == ["search", "other", "other"]


async def test_an_upstream_handshake_with_a_broken_protocol_version_is_not_a_500(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The upstream's ``initialize`` answers a ``protocolVersion`` holding CR LF (it would become a header of the
    next request): the call still goes through, on the sidecar's own version, and the upstream never sees the
    injected header."""
    seen: list[dict[str, str]] = []

    async def post(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        msg = json.loads(await request.read())
        if msg.get("method") == "initialize":
            result = {"protocolVersion": "2025-11-25\r\nX-Injected: 1", "capabilities": {}, "serverInfo": {"name": "r"}}
            return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": result})
        if "id" not in msg:
            return web.Response(status=202)
        return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": {"content": []}})

    app = web.Application()
    app.router.add_post("/mcp", post)
    up = await aiohttp_server(app)
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/tools"}]
    run = await make_sidecar(cfg)
    _, key = await run.create_key(permissions=SEARCH_ONLY)
    status, body = await rest(run, key, {"mcp_id": "tools", "tool": "search"})
    assert status == 200, body
    assert all("X-Injected" not in h for h in seen)


@pytest.mark.parametrize("sse", [False, True])
@pytest.mark.parametrize("depth", [950, 100_000])
async def test_a_result_nested_too_deeply_is_a_502_not_a_500(
    rig: tuple[Running, list[Any]], sse: bool, depth: int
) -> None:
    """An allowed tool whose answer (JSON or SSE) nests ``depth`` arrays: the client gets 502
    ``upstream_unavailable`` (before: Python's RecursionError, a 500 ``internal_error``)."""
    run, _ = rig
    _, key = await run.create_key(permissions={"upstreams": ["tools"], "tools": {"tools": ["deep"]}})
    status, body = await rest(run, key, {"mcp_id": "tools", "tool": "deep", "arguments": {"depth": depth, "sse": sse}})
    assert (status, body["error"]["code"]) == (502, "upstream_unavailable"), body


async def test_a_key_in_the_query_never_reaches_the_access_log(rig: tuple[Running, list[Any]], tmp_path: Path) -> None:
    """``POST /mcp?X-Plex-Token=<key>&note=<key>``: the call is authorised, and the access-log line holds neither
    the key nor the upstream's credential."""
    run, _ = rig
    _, key = await run.create_key(permissions=SEARCH_ONLY)
    r = await run.proxy.post(f"/mcp?X-Plex-Token={key}&note={key}", json={"mcp_id": "tools", "tool": "search"})
    assert r.status == 200, await r.text()
    lines = await log_lines(tmp_path / "access.log", want=1)
    assert lines and key not in json.dumps(lines) and TOKEN not in json.dumps(lines), lines


@pytest.mark.parametrize("ctype", ["application/json", "text/event-stream"])
async def test_a_list_nested_too_deeply_to_filter_is_a_502_on_the_proxied_route_too(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, ctype: str
) -> None:
    """The same upstream fault through ``POST /mcp/t`` (Streamable HTTP): a ``tools/list`` answer nested 5 000 deep
    cannot be filtered for a restricted key, so it is a 502 (fail closed, nothing relayed), not a 500."""

    async def post(request: web.Request) -> web.StreamResponse:
        msg = json.loads(await request.read())
        deep = b"[" * 5000 + b"]" * 5000
        body = b'{"jsonrpc": "2.0", "id": %d, "result": {"tools": [{"name": "delete", "x": %s}]}}' % (msg["id"], deep)
        if ctype == "text/event-stream":
            body = b"event: message\ndata: " + body + b"\n\n"
        return web.Response(body=body, content_type=ctype)

    app = web.Application()
    app.router.add_post("/mcp", post)
    up = await aiohttp_server(app)
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "t", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/t"}]
    run = await make_sidecar(cfg)
    _, key = await run.create_key(permissions={"upstreams": ["t"], "tools": {"t": ["search"]}})
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
    r = await run.proxy.post("/mcp/t", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers=headers)
    raw = await r.read()
    assert r.status == 502, raw[:200]
    assert json.loads(raw)["error"]["code"] == "upstream_unavailable" and b"delete" not in raw
