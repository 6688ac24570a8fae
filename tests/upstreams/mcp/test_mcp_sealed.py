"""Sealed ``Mcp-Session-Id`` (issue 19 §3): sessions that move between replicas, and every way to misuse one.

Two (or three) real sidecars over one store in front of the SDK's own server
(``tests/mcp_server.py``): a session opened through one continues through another that
shares the sealing key, with nothing shared between them but the key. A stolen,
tampered, expired, foreign or raw upstream id is refused and never reaches the upstream.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeSidecar, Running, base_config
from mcp_server import MCP_TOKEN, McpUpstream

from sidecar.config import ConfigError, parse_config
from sidecar.core.errors import Forbidden, NotFound
from sidecar.upstreams.mcp.sealing import Sealer

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
TOOLS = {"upstreams": ["*"], "tools": {"*": ["search", "fetch"]}}


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


K1, K2 = new_key(), new_key()


def config(upstream: McpUpstream, tmp_path: Path, sessions: dict[str, Any] | None) -> dict[str, Any]:
    cfg = base_config(upstream.url, tmp_path)
    auth = {"Authorization": "Bearer ${MCP_TOKEN}"}
    cfg["upstreams"] = [
        {"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools", "headers": auth},
        {"id": "other", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/other", "headers": auth},
        {"id": "legacy", "kind": "mcp", "url": upstream.url, "path_prefix": "/mcp/legacy", "headers": auth},
    ]
    if sessions is not None:
        cfg["mcp_sessions"] = sessions
    return cfg


async def sidecar(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path, sessions: dict[str, Any] | None
) -> Running:
    env = {"MCP_TOKEN": MCP_TOKEN, "SEAL_K1": K1, "SEAL_K2": K2}
    return await make_sidecar(config(upstream, tmp_path, sessions), extra_env=env)


async def key_on(gws: list[Running], name: str) -> str:
    """A key created through the first sidecar, known to all (one store)."""
    _, key = await gws[0].create_key(name=name, permissions=TOOLS)
    for gw in gws[1:]:
        await gw.sc.verifier.refresh()
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(rid: Any, tool: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


def messages(text: str) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an answer: an SSE stream's events, or one JSON body (a finished
    one-answer stream goes out as JSON, ``mcp/response.py`` ``single_answer``)."""
    if text.lstrip().startswith("{"):
        return [json.loads(text)]
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip() for line in block.split("\n") if line.startswith("data:")]
        if data:
            out.append(json.loads("\n".join(data)))
    return out


async def open_session(gw: Running, key: str, prefix: str = "/mcp/tools") -> str:
    """initialize + initialized through ``gw``: the sealed id the client was given."""
    r = await gw.proxy.post(prefix, json=INIT, headers={**ACCEPT, **bearer(key)})
    assert r.status == 200, await r.text()
    await r.read()
    sid = r.headers["Mcp-Session-Id"]
    h = {**ACCEPT, **bearer(key), "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    r = await gw.proxy.post(prefix, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=h)
    assert r.status == 202, await r.text()
    return sid


async def search(gw: Running, key: str, sid: str, rid: int = 2, prefix: str = "/mcp/tools") -> Any:
    h = {**ACCEPT, **bearer(key), "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    return await gw.proxy.post(prefix, json=call(rid, "search", query="jazz"), headers=h)


def upstream_sids(upstream: McpUpstream) -> set[str]:
    return {v for r in upstream.rec.requests if (v := r.header("mcp-session-id"))}


async def test_a_session_opened_on_one_sidecar_continues_on_another(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """Nothing shared but the key: B has never seen the session, and serves it (and its GET stream, DELETE)."""
    a = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1"})
    b = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1"})
    key = await key_on([a, b], "agent")
    sid = await open_session(a, key)
    raw = upstream_sids(upstream)
    assert len(raw) == 1 and sid not in raw and next(iter(raw)) not in sid  # the client never sees the upstream's id
    assert sid.isascii() and all("\x21" <= c <= "\x7e" for c in sid) and "," not in sid
    for gw, rid in ((b, 2), (a, 3), (b, 4)):
        r = await search(gw, key, sid, rid)
        assert r.status == 200, await r.text()
        [answer] = messages(await r.text())
        assert answer["id"] == rid and answer["result"]["content"][0]["text"] == "results for jazz"
        assert r.headers["Mcp-Session-Id"] == sid  # the same sealed id back, not a new one
    assert upstream_sids(upstream) == raw  # the upstream saw its own id every time
    h = {**bearer(key), "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    r = await b.proxy.delete("/mcp/tools", headers=h)
    assert r.status == 200
    r = await search(a, key, sid, 5)  # ended upstream: the upstream's own 404, passed through
    assert r.status == 404


async def test_another_keys_session_is_refused_without_a_lookup(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """A stolen id on a replica that never saw it: 403 from the token alone, nothing upstream, budget intact."""
    a = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1"})
    b = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1"})
    victim = await key_on([a, b], "victim")
    _, thief = await b.create_key(name="thief", permissions=TOOLS, rate_limits=["2/minute"])
    sid = await open_session(a, victim)
    seen = len(upstream.rec.requests)
    assert len(b.sc.mcp.sessions) == 0  # type: ignore[union-attr]
    for _ in range(3):  # more refusals than the thief's budget: refusals are free
        r = await search(b, thief, sid)
        assert r.status == 403
        assert (await r.json())["error"] == {
            "code": "insufficient_permissions",
            "message": "this MCP session belongs to another key",
        }
    assert len(upstream.rec.requests) == seen
    r = await search(b, victim, sid)
    assert r.status == 200  # the victim's session is untouched


@pytest.mark.parametrize("how", ["flip", "truncate", "raw-upstream-id", "garbage", "other-upstream"])
async def test_ids_that_do_not_open_are_404(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path, how: str
) -> None:
    """404 tells an MCP client to start a new session; the upstream never sees the request."""
    gw = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1"})
    key = await key_on([gw], "agent")
    sid = await open_session(gw, key)
    prefix = "/mcp/tools"
    if how == "flip":
        i = len(sid) // 2
        bad = sid[:i] + ("A" if sid[i] != "A" else "B") + sid[i + 1 :]
    elif how == "truncate":
        bad = sid[:-4]
    elif how == "raw-upstream-id":
        bad = next(iter(upstream_sids(upstream)))  # guessing or learning the upstream's id is worth nothing
    elif how == "garbage":
        bad = "!" * 40
    else:
        bad, prefix = sid, "/mcp/other"  # sealed for upstream "tools": no session on "other"
    seen = len(upstream.rec.requests)
    r = await search(gw, key, bad, prefix=prefix)
    assert r.status == 404, await r.text()
    body = await r.json()
    assert body["error"]["code"] == "not_found" and "start a new session" in body["error"]["message"]
    assert len(upstream.rec.requests) == seen


async def test_an_expired_session_is_404(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path) -> None:
    gw = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1", "ttl": "10m"})
    key = await key_on([gw], "agent")
    sid = await open_session(gw, key)
    sealer = gw.sc.mcp.sealer  # type: ignore[union-attr]
    assert (await search(gw, key, sid)).status == 200
    real = sealer.clock
    sealer.clock = lambda: real() + 601  # the sealer's clock, injected: no waiting
    r = await search(gw, key, sid, 3)
    assert r.status == 404
    assert "expired" in (await r.json())["error"]["message"]


async def test_rotation_old_key_still_opens_new_sessions_use_the_new_key(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    old = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1"})
    rotated = await sidecar(
        make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K2", "previous_key_envs": ["SEAL_K1"]}
    )
    dropped = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K2"})
    key = await key_on([old, rotated, dropped], "agent")
    before = await open_session(old, key)
    assert (await search(rotated, key, before)).status == 200  # sealed before the rotation: still opens
    after = await open_session(rotated, key)
    k1 = Sealer([base64.b64decode(K1)])
    k2 = Sealer([base64.b64decode(K2)])
    assert k2.unseal("tools", after).owner and k1.unseal("tools", before).owner
    with pytest.raises(NotFound):
        k1.unseal("tools", after)  # the new session is sealed with the new key only
    assert (await search(dropped, key, after)).status == 200
    assert (await search(dropped, key, before)).status == 404  # the old key dropped: its sessions end


async def test_without_a_key_each_process_seals_with_its_own(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.mcp"):
        a = await sidecar(make_sidecar, upstream, tmp_path, None)
    assert any("do not survive a restart" in r.getMessage() for r in caplog.records)
    b = await sidecar(make_sidecar, upstream, tmp_path, None)
    key = await key_on([a, b], "agent")
    sid = await open_session(a, key)
    assert (await search(a, key, sid)).status == 200
    assert (await search(b, key, sid)).status == 404  # another process: the client starts a new session


async def test_legacy_sse_message_on_a_process_without_the_stream_is_a_clear_404(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """Legacy SSE answers travel down the stream one process holds: elsewhere, refuse and say why."""
    a = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1"})
    b = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1"})
    key = await key_on([a, b], "agent")
    async with a.proxy.get("/mcp/legacy/sse", headers={**bearer(key), "Accept": "text/event-stream"}) as stream:
        assert stream.status == 200
        first = b""
        while b"\n\n" not in first.replace(b"\r\n", b"\n"):
            first += await stream.content.readany()
        endpoint = next(x for x in first.decode().splitlines() if x.startswith("data:"))[5:].strip()
        assert endpoint.startswith("/mcp/legacy/messages/?session_id=")
        seen = len(upstream.rec.requests)
        r = await b.proxy.post(endpoint, json=INIT, headers={**ACCEPT, **bearer(key)})
        assert r.status == 404
        error = (await r.json())["error"]
        assert error["code"] == "no_route" and "holds its event stream" in error["message"]
        assert "affinity" in error["message"]
        assert len(upstream.rec.requests) == seen
        r = await a.proxy.post(endpoint, json=INIT, headers={**ACCEPT, **bearer(key)})
        assert r.status == 202  # where the stream is, the message is taken


def test_seal_round_trip_and_binding() -> None:
    s = Sealer([secrets.token_bytes(32)], ttl=60)
    token = s.seal("tools", "61157d8cc790", "3f9a" * 8)
    opened = s.open_for("tools", token, "61157d8cc790")
    assert opened.sid == "3f9a" * 8 and opened.owner == "61157d8cc790"
    assert "3f9a" not in token and "61157d8cc790" not in token
    with pytest.raises(Forbidden):
        s.open_for("tools", token, "someoneelse1")
    with pytest.raises(NotFound):
        s.unseal("other", token)
    assert s.seal("tools", "k", "x") != s.seal("tools", "k", "x")  # a fresh nonce each time


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "mcp_sessions.seal_key_env: environment variable SEAL_X is not set"),
        ("c2hvcnQ=", "mcp_sessions.seal_key_env: environment variable SEAL_X: expected 32 random bytes"),
        ("not base64 at all!", "mcp_sessions.seal_key_env: environment variable SEAL_X: expected 32 random bytes"),
    ],
)
def test_bad_sealing_keys_are_config_errors_that_never_show_the_value(
    tmp_path: Path, value: str | None, problem: str
) -> None:
    cfg = base_config("http://127.0.0.1:1", tmp_path, mcp_sessions={"seal_key_env": "SEAL_X"})
    env = {"PLEX_TOKEN": "p" * 20, **({"SEAL_X": value} if value is not None else {})}
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, env=env, base=tmp_path)
    text = str(e.value)
    assert problem in text
    if value:
        assert value not in text


def test_sealing_key_forms_and_options(tmp_path: Path) -> None:
    raw = secrets.token_bytes(32)
    for text in (raw.hex(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("=")):
        cfg = base_config("http://127.0.0.1:1", tmp_path, mcp_sessions={"seal_key_env": "S", "ttl": "2h"})
        c = parse_config(cfg, env={"PLEX_TOKEN": "p" * 20, "S": text}, base=tmp_path)
        assert c.mcp_sessions.keys == (raw,) and c.mcp_sessions.ttl == 7200
        assert raw.hex() not in repr(c.mcp_sessions)
    cfg = base_config("http://127.0.0.1:1", tmp_path, mcp_sessions={"seal_key": "x", "previous_key_envs": ["A"]})
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, env={"PLEX_TOKEN": "p" * 20}, base=tmp_path)
    assert "mcp_sessions.seal_key: unknown option" in str(e.value)


def test_a_get_stream_filters_lists_it_never_saw_asked_for() -> None:
    """After a resumption on another replica, a replayed tools/list answer has an id this process never saw."""
    from sidecar.upstreams.mcp.authz import McpAccess
    from sidecar.upstreams.mcp.filter import Policy, SseRewriter

    tools = [{"name": n, "inputSchema": {}} for n in ("search", "delete_everything")]
    replay = {"jsonrpc": "2.0", "id": 99, "result": {"tools": tools}}
    call_result = {"jsonrpc": "2.0", "id": 100, "result": {"content": [{"type": "text", "text": "x"}]}}
    event = b"".join(b"id: e%d\nevent: message\ndata: %s\n\n" % (i, json.dumps(m).encode())
                     for i, m in enumerate((replay, call_result)))  # fmt: skip
    out = SseRewriter(Policy(McpAccess(tools=("search",)), by_shape=True)).feed(event)
    got = messages(out.decode())
    assert [t["name"] for t in got[0]["result"]["tools"]] == ["search"]
    assert got[1] == call_result
    assert b"id: e0\n" in out  # the event ids (resumption points) are kept
    unrestricted = SseRewriter(Policy(McpAccess(), by_shape=True)).feed(event)
    assert unrestricted == event  # a key without MCP limits gets the stream byte for byte


async def test_the_sdk_client_through_a_round_robin_balancer(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path, aiohttp_server: Any
) -> None:
    """The SDK's ClientSession behind a balancer that alternates between two sidecars, request by request."""
    import aiohttp
    import httpx2
    from aiohttp import web
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    a = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1"})
    b = await sidecar(make_sidecar, upstream, tmp_path, {"seal_key_env": "SEAL_K1"})
    key = await key_on([a, b], "agent")
    targets = [a.proxy.make_url("/mcp/tools"), b.proxy.make_url("/mcp/tools")]
    served: list[int] = []
    http = aiohttp.ClientSession(auto_decompress=False)

    async def balance(request: web.Request) -> web.StreamResponse:
        i = len(served) % 2
        served.append(i)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with http.request(request.method, targets[i], headers=headers, data=await request.read()) as up:
            resp = web.StreamResponse(
                status=up.status,
                headers={
                    k: v for k, v in up.headers.items() if k.lower() not in ("content-length", "transfer-encoding")
                },
            )
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_route("*", "/mcp", balance)
    lb = await aiohttp_server(app)
    try:
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as hc,
            streamable_http_client(str(lb.make_url("/mcp")), http_client=hc) as (read, write),
            ClientSession(read, write) as s,
        ):
            await s.initialize()
            for i in range(4):
                found = await s.call_tool("search", {"query": f"q{i}"})
                assert found.content[0].text == f"results for q{i}"  # type: ignore[union-attr]
            assert [t.name for t in (await s.list_tools()).tools] == ["search", "fetch"]
    finally:
        await http.close()
    assert {0, 1} <= set(served) and len(upstream_sids(upstream)) == 1  # both sidecars, one upstream session
