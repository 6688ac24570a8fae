"""The MCP gateway end to end: the official SDK on both sides of a real sidecar.

Upstream: the SDK's ``MCPServer`` (``tests/mcp_server.py``) under uvicorn, Streamable
HTTP and legacy SSE, DNS-rebinding guard on, its own bearer token required. Clients:
the SDK's ``ClientSession`` over Streamable HTTP (2025-11-25 sessions), its
``Client(..., mode="auto")`` (negotiates 2026-07-28: no sessions, ``Mcp-*`` headers),
its legacy SSE client, and plain aiohttp where a test needs the bytes on the wire.
Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config
from mcp.client import Client
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_server import BATCH_SEEN, MCP_TOKEN, McpUpstream, batch_app
from mcp_support import answer_messages as sse_messages

from sidecar.upstreams.mcp.eventids import EVENT_SCOPE
from sidecar.upstreams.mcp.jsonrpc import HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, TOOL_FORBIDDEN

AGENT_TOOLS = {
    "tools": ["search", "fetch", "slow", "quiet"],
    "legacy": ["search", "fetch"],
    "batch": ["search", "fetch"],
}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def mcp_config(upstream: McpUpstream, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    cfg = base_config(upstream.url, tmp_path)
    auth = {"Authorization": "Bearer ${MCP_TOKEN}"}
    cfg["upstreams"] = [
        # The usual shape: url is the MCP endpoint itself; clients use http://sidecar/mcp/tools.
        {"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools", "headers": auth},
        # The server's root: legacy SSE at /mcp/legacy/sse, Streamable HTTP at /mcp/legacy/mcp.
        {"id": "legacy", "kind": "mcp", "url": upstream.url, "path_prefix": "/mcp/legacy", "headers": auth},
    ]
    cfg.update(overrides)
    return cfg


@pytest.fixture(params=[False, True], ids=["sse-answers", "json-answers"])
async def any_upstream(request: pytest.FixtureRequest) -> AsyncIterator[McpUpstream]:
    up = McpUpstream(json_response=request.param).start()
    yield up
    await up.stop()


async def start(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path, **overrides: Any) -> Running:
    return await make_sidecar(mcp_config(upstream, tmp_path, **overrides), extra_env={"MCP_TOKEN": MCP_TOKEN})


@pytest.fixture
async def gw(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path) -> Running:
    return await start(make_sidecar, upstream, tmp_path)


async def agent_key(gw: Running, name: str = "agent") -> str:
    ids = {u.id for u in gw.config.upstreams}
    tools = {up: names for up, names in AGENT_TOOLS.items() if up in ids}
    _, key = await gw.create_key(name=name, permissions={"upstreams": ["*"], "tools": tools})
    return key


def url(gw: Running, path: str) -> str:
    return str(gw.proxy.make_url(path))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def raw_session(gw: Running, key: str, prefix: str = "/mcp/tools") -> dict[str, str]:
    """Open a 2025-11-25 session by hand; the headers for its later requests."""
    r = await gw.proxy.post(prefix, json=INIT, headers={**ACCEPT, **bearer(key)})
    assert r.status == 200, await r.text()
    await r.read()
    headers = {
        **ACCEPT,
        **bearer(key),
        "Mcp-Session-Id": r.headers["Mcp-Session-Id"],
        "MCP-Protocol-Version": "2025-11-25",
    }
    r = await gw.proxy.post(prefix, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    assert r.status == 202
    return headers


def call(rid: Any, tool: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


# ----------------------------------------------------------------------------- the SDK's clients


async def test_session_client_sees_and_calls_only_its_tools(
    make_sidecar: MakeSidecar, any_upstream: McpUpstream, tmp_path: Path
) -> None:
    gw = await start(make_sidecar, any_upstream, tmp_path)
    key = await agent_key(gw)
    async with (
        httpx2.AsyncClient(headers=bearer(key)) as http,
        streamable_http_client(url(gw, "/mcp/tools"), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        assert init.protocol_version == "2025-11-25"
        listed = await session.list_tools()
        assert {t.name for t in listed.tools} == {"search", "fetch", "slow", "quiet"}
        found = await session.call_tool("search", {"query": "cats"})
        assert found.content[0].text == "results for cats"  # type: ignore[union-attr]
        with pytest.raises(MCPError) as refused:
            await session.call_tool("delete_everything", {})
        assert refused.value.code == TOOL_FORBIDDEN
        assert "delete_everything" in refused.value.message
        fetched = await session.call_tool("fetch", {"url": "doc"})  # the session survived the refusal
        assert fetched.content[0].text == "fetched doc"  # type: ignore[union-attr]

    rec = any_upstream.rec
    assert rec.calls == ["search", "fetch"]  # the forbidden tool never ran
    # One session throughout, ended with DELETE; the upstream saw its own token, never the key.
    assert len({r.header("mcp-session-id") for r in rec.requests if r.header("mcp-session-id")}) == 1
    assert any(r.method == "DELETE" for r in rec.requests)
    assert any(r.method == "GET" and r.header("mcp-session-id") for r in rec.requests)  # the server's stream
    for r in rec.requests:
        assert r.header("authorization") == f"Bearer {MCP_TOKEN}"
        assert all(key not in v for _, v in r.headers)
        assert key.encode() not in r.body
    # Counted and logged.
    sample = gw.sc.metrics.registry.get_sample_value
    labels = {"upstream": "tools", "tool": "delete_everything", "outcome": "denied"}
    key_id = next(iter(gw.sc.verifier.table))
    assert sample("sidecar_mcp_tool_calls_total", {"key": key_id, **labels}) == 1
    assert sample("sidecar_auth_failures_total", {"reason": "insufficient_permissions"}) == 1
    gw.sc.access_log.flush()
    lines = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    assert any(e.get("tool") == "delete_everything" and e.get("error") == "insufficient_permissions" for e in lines)
    assert any(e.get("tool") == "search" and e["status"] == 200 for e in lines)


async def test_auto_mode_client_negotiates_2026_through_the_sidecar(gw: Running, upstream: McpUpstream) -> None:
    key = await agent_key(gw)
    async with (
        httpx2.AsyncClient(headers=bearer(key)) as http,
        Client(streamable_http_client(url(gw, "/mcp/tools"), http_client=http), mode="auto") as client,
    ):
        assert client.protocol_version == "2026-07-28"
        listed = await client.list_tools()
        assert {t.name for t in listed.tools} == {"search", "fetch", "slow", "quiet"}
        found = await client.call_tool("search", {"query": "dogs"})
        assert found.content[0].text == "results for dogs"  # type: ignore[union-attr]
        with pytest.raises(MCPError) as refused:
            await client.call_tool("delete_everything", {})
        assert refused.value.code == TOOL_FORBIDDEN
        again = await client.call_tool("fetch", {"url": "x"})
        assert again.content[0].text == "fetched x"  # type: ignore[union-attr]

    rec = upstream.rec
    assert rec.calls == ["search", "fetch"]
    calls = [r for r in rec.requests if r.header("mcp-method") == "tools/call"]
    # The 2026-07-28 routing headers reach the upstream, and no session is ever made.
    assert [r.header("mcp-name") for r in calls] == ["search", "fetch"]
    assert all(r.header("mcp-protocol-version") == "2026-07-28" for r in calls)
    assert not any(r.header("mcp-session-id") for r in rec.requests)


async def test_legacy_sse_client_through_the_sidecar(gw: Running, upstream: McpUpstream) -> None:
    key = await agent_key(gw)
    async with (
        sse_client(url(gw, "/mcp/legacy/sse"), headers=bearer(key)) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        listed = await session.list_tools()
        assert {t.name for t in listed.tools} == {"search", "fetch"}
        found = await session.call_tool("search", {"query": "owls"})
        assert found.content[0].text == "results for owls"  # type: ignore[union-attr]
        with pytest.raises(MCPError) as refused:
            await session.call_tool("delete_everything", {})
        assert refused.value.code == TOOL_FORBIDDEN
        fetched = await session.call_tool("fetch", {"url": "a"})
        assert fetched.content[0].text == "fetched a"  # type: ignore[union-attr]

    rec = upstream.rec
    assert rec.calls == ["search", "fetch"]
    posts = [r for r in rec.requests if r.method == "POST"]
    # The endpoint event was rewritten under the prefix, so every message came back through the sidecar.
    assert posts and all(r.path == "/messages/" and "session_id=" in r.query for r in posts)
    assert "ping" in rec.methods()  # the forbidden call went up as a harmless ping, answered by the refusal
    assert all(r.header("authorization") == f"Bearer {MCP_TOKEN}" for r in rec.requests)


async def test_legacy_session_belongs_to_its_key(gw: Running, upstream: McpUpstream) -> None:
    key = await agent_key(gw)
    other = await agent_key(gw, "other")
    async with gw.proxy.get("/mcp/legacy/sse", headers={**bearer(key), "Accept": "text/event-stream"}) as stream:
        assert stream.status == 200
        endpoint = b""
        while b"\n\n" not in endpoint and b"\r\n\r\n" not in endpoint:
            endpoint += await stream.content.readany()
        text = endpoint.decode()
        assert "event: endpoint" in text
        post_to = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("data:"))
        assert post_to.startswith("/mcp/legacy/messages/?session_id=")
        stolen = await gw.proxy.post(post_to, json=INIT, headers={**ACCEPT, **bearer(other)})
        assert stolen.status == 403
        assert (await stolen.json())["error"]["code"] == "insufficient_permissions"
        mine = await gw.proxy.post(post_to, json=INIT, headers={**ACCEPT, **bearer(key)})
        assert mine.status == 202
    unknown = await gw.proxy.post("/mcp/legacy/messages/?session_id=00ff", json=INIT, headers={**ACCEPT, **bearer(key)})
    assert unknown.status == 404


async def test_streamable_session_belongs_to_its_key(gw: Running, upstream: McpUpstream) -> None:
    key = await agent_key(gw)
    other = await agent_key(gw, "other")
    headers = await raw_session(gw, key)
    r = await gw.proxy.post(
        "/mcp/tools", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers={**headers, **bearer(other)}
    )
    assert r.status == 403
    r = await gw.proxy.post("/mcp/tools", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=headers)
    assert r.status == 200
    names = {t["name"] for m in sse_messages(await r.text()) for t in m["result"]["tools"]}
    assert names == {"search", "fetch", "slow", "quiet"}
    # The session's GET stream, resumed: the upstream gets its own event id back. Clients only ever hold sealed
    # ones (eventids.py); the upstream's raw id is refused before it.
    raw = await gw.proxy.get("/mcp/tools", headers={**headers, "Accept": "text/event-stream", "Last-Event-ID": "ev-1"})
    assert raw.status == 404
    owner = next(r.id for r in gw.sc.verifier.table.values() if r.name == "agent")
    sealed = gw.sc.mcp.sealer.seal("tools" + EVENT_SCOPE, owner, "ev-1")
    async with gw.proxy.get("/mcp/tools", headers={**headers, "Accept": "text/event-stream", "Last-Event-ID": sealed}):
        pass
    assert upstream.rec.requests[-1].header("last-event-id") == "ev-1"
    r = await gw.proxy.delete("/mcp/tools", headers=headers)
    assert r.status == 200
    r = await gw.proxy.post("/mcp/tools", json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, headers=headers)
    assert r.status == 404  # the upstream ended the session; its 404 passes through


# ----------------------------------------------------------------------------- streaming


async def test_slow_tools_stream_past_the_idle_timeout(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    cfg = mcp_config(upstream, tmp_path)
    for up in cfg["upstreams"]:
        up["timeouts"] = {"read": "1s"}
    gw = await start(make_sidecar, upstream, tmp_path, upstreams=cfg["upstreams"])
    key = await agent_key(gw)
    progress: list[float] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async with (
        httpx2.AsyncClient(headers=bearer(key)) as http,
        streamable_http_client(url(gw, "/mcp/tools"), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        # Silent for 2.5 s on an SSE answer: an idle timeout of 1 s must not cut it (nor the 1 s
        # the headers are held while no event has come: sidecar.http.whole.FIRST_EVENT_WAIT).
        quiet = await session.call_tool("quiet", {"seconds": 2.5})
        assert quiet.content[0].text == "quiet for 2.5"  # type: ignore[union-attr]
        # 1.5 s in all, past the 1 s timeout, a progress event every quarter second.
        slow = await session.call_tool("slow", {"seconds": 1.5}, progress_callback=on_progress)
        assert slow.content[0].text == "slept 1.5"  # type: ignore[union-attr]
    assert progress == [float(i) for i in range(1, 7)]

    # 2026-07-28: the answer commits to SSE with the first progress event and streams on.
    progress.clear()
    async with (
        httpx2.AsyncClient(headers=bearer(key)) as http,
        Client(streamable_http_client(url(gw, "/mcp/tools"), http_client=http), mode="auto") as client,
    ):
        slow = await client.call_tool("slow", {"seconds": 1.5}, progress_callback=on_progress)
        assert slow.content[0].text == "slept 1.5"  # type: ignore[union-attr]
    assert len(progress) == 6


async def test_keepalive_pings_pass_unbuffered(gw: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    from sse_starlette.sse import EventSourceResponse

    monkeypatch.setattr(EventSourceResponse, "DEFAULT_PING_INTERVAL", 0.2)  # the upstream's keep-alive cadence
    key = await agent_key(gw)
    headers = await raw_session(gw, key)
    async with gw.proxy.post("/mcp/tools", json=call(5, "quiet", seconds=1.5), headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-Accel-Buffering"] == "no"
        first = b""
        while b": ping" not in first:  # keep-alives arrive while the tool still works, not at the end
            first += await asyncio.wait_for(r.content.readany(), 5)
        assert b'"result"' not in first
        rest = (first + await r.content.read()).decode()
    assert rest.count(": ping") >= 3
    assert sse_messages(rest)[-1]["result"]["content"][0]["text"] == "quiet for 1.5"


async def test_client_going_away_cancels_the_upstream_call(gw: Running, upstream: McpUpstream) -> None:
    key = await agent_key(gw)
    body = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "tools/call",
        "params": {"name": "slow", "arguments": {"seconds": 60}, "_meta": {**MODERN_META, "progressToken": "p"}},
    }
    headers = {
        **ACCEPT,
        **bearer(key),
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "slow",
    }
    resp = await gw.proxy.post("/mcp/tools", json=body, headers=headers)
    assert resp.status == 200
    while b"notifications/progress" not in (line := await asyncio.wait_for(resp.content.readline(), 10)):
        assert line
    resp.close()  # closing the response is cancellation (2026-07-28)
    assert await asyncio.to_thread(upstream.rec.cancelled.wait, 10)
    assert "slow" not in upstream.rec.calls


# ----------------------------------------------------------------------------- bodies and headers


@pytest.mark.parametrize(
    ("body", "code", "rid"),
    [
        (b"{not json", PARSE_ERROR, None),
        (b"", PARSE_ERROR, None),
        (b"[]", INVALID_REQUEST, None),
        (b"42", INVALID_REQUEST, None),
        (b'{"jsonrpc": "2.0"}', INVALID_REQUEST, None),
        (b'{"jsonrpc": "1.0", "id": 3, "method": "tools/list"}', INVALID_REQUEST, 3),
        (b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {}}', INVALID_PARAMS, 7),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, 5]', INVALID_REQUEST, None),
    ],
)
async def test_malformed_json_rpc_is_a_clean_400(
    gw: Running, upstream: McpUpstream, body: bytes, code: int, rid: Any
) -> None:
    key = await agent_key(gw)
    seen = len(upstream.rec.requests)
    r = await gw.proxy.post("/mcp/tools", data=body, headers={**ACCEPT, **bearer(key)})
    assert r.status == 400
    answer = await r.json()
    assert answer["jsonrpc"] == "2.0" and answer["id"] == rid
    assert answer["error"]["code"] == code
    assert answer["error"]["data"] == {"code": "bad_request"}
    assert len(upstream.rec.requests) == seen  # never forwarded
    ok = await gw.proxy.post("/mcp/tools", json=INIT, headers={**ACCEPT, **bearer(key)})
    assert ok.status == 200  # and nothing broke


async def test_body_over_mcp_max_body_is_413(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path) -> None:
    cfg = mcp_config(upstream, tmp_path)
    cfg["upstreams"][0]["mcp"] = {"max_body": "1KiB"}
    gw = await start(make_sidecar, upstream, tmp_path, upstreams=cfg["upstreams"])
    key = await agent_key(gw)
    r = await gw.proxy.post("/mcp/tools", json=call(1, "search", query="x" * 2000), headers={**ACCEPT, **bearer(key)})
    assert r.status == 413
    assert (await r.json())["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Mcp-Method": "tools/list"}, call(4, "search", query="q")),
        ({"Mcp-Method": "tools/call", "Mcp-Name": "search"}, call(4, "delete_everything")),
        ({"Mcp-Name": "search"}, {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}),
        ({"Mcp-Method": "tools/call"}, [call(4, "search", query="q"), {"jsonrpc": "2.0", "id": 5, "method": "ping"}]),
    ],
    ids=["method", "name", "name-without-tool", "batch-element"],
)
async def test_headers_that_disagree_with_the_body_are_refused(
    gw: Running, upstream: McpUpstream, headers: dict[str, str], body: Any
) -> None:
    key = await agent_key(gw)
    seen = len(upstream.rec.requests)
    r = await gw.proxy.post(
        "/mcp/tools", json=body, headers={**ACCEPT, **bearer(key), "MCP-Protocol-Version": "2026-07-28", **headers}
    )
    assert r.status == 400
    answer = await r.json()
    assert answer["error"]["code"] == HEADER_MISMATCH
    assert answer["id"] == (4 if isinstance(body, dict) else None)
    assert len(upstream.rec.requests) == seen


async def test_duplicated_routing_header_is_refused(gw: Running) -> None:
    key = await agent_key(gw)
    headers = [*ACCEPT.items(), *bearer(key).items(), ("Mcp-Name", "search"), ("Mcp-Name", "delete_everything")]
    r = await gw.proxy.post("/mcp/tools", data=json.dumps(call(1, "search", query="q")), headers=headers)
    assert r.status == 400
    assert (await r.json())["error"]["code"] == HEADER_MISMATCH


# ----------------------------------------------------------------------------- batches


async def test_a_batch_of_forbidden_calls_never_reaches_the_upstream(gw: Running, upstream: McpUpstream) -> None:
    key = await agent_key(gw)
    seen = len(upstream.rec.requests)
    batch = [
        call(1, "delete_everything"),
        call("two", "delete_everything"),
        {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_everything"}},
    ]
    r = await gw.proxy.post("/mcp/tools", json=batch, headers={**ACCEPT, **bearer(key)})
    assert r.status == 200
    answers = await r.json()
    assert [a["id"] for a in answers] == [1, "two"]  # the notification gets no answer
    assert {a["error"]["code"] for a in answers} == {TOOL_FORBIDDEN}
    assert len(upstream.rec.requests) == seen


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_mixed_batch_forwards_the_allowed_and_merges_the_refusals(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, answer: str
) -> None:
    batch_upstream: TestServer = await aiohttp_server(batch_app())
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [
        {"id": "batch", "kind": "mcp", "url": str(batch_upstream.make_url("/mcp")), "path_prefix": "/mcp/batch"}
    ]
    gw = await make_sidecar(cfg)
    key = await agent_key(gw)
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        call(2, "search", query="q"),
        call(3, "delete_everything"),
        {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_everything"}},
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}},
    ]
    r = await gw.proxy.post("/mcp/batch", json=batch, headers={**ACCEPT, **bearer(key), "X-Answer": answer})
    assert r.status == 200
    if answer == "sse":
        text = await r.text()
        assert ": ping" in text
        answers = sse_messages(text)
    else:
        answers = await r.json()
    by_id = {a["id"]: a for a in answers}
    assert set(by_id) == {1, 2, 3}
    assert [t["name"] for t in by_id[1]["result"]["tools"]] == ["search", "fetch"]
    assert by_id[2]["result"]["content"][0]["text"] == "called search"
    assert by_id[3]["error"]["code"] == TOOL_FORBIDDEN
    forwarded = batch_upstream.app[BATCH_SEEN]
    assert forwarded == [[batch[0], batch[1], batch[4]]]

    # Only notifications left after the refusals: they still go up, the refusal still comes back.
    r = await gw.proxy.post(
        "/mcp/batch", json=[batch[4], call(7, "delete_everything")], headers={**ACCEPT, **bearer(key)}
    )
    assert r.status == 200
    assert [a["id"] for a in await r.json()] == [7]
    assert forwarded[-1] == [batch[4]]


# ----------------------------------------------------------------------------- the REST tool call


async def test_rest_tool_call(gw: Running, upstream: McpUpstream) -> None:
    key = await agent_key(gw)
    apikey = {"Authorization": f"ApiKey {key}"}
    r = await gw.proxy.post(
        "/mcp", json={"mcp_id": "tools", "tool": "search", "arguments": {"query": "q"}}, headers=apikey
    )
    assert r.status == 200, await r.text()
    answer = await r.json()
    assert answer["success"] is True
    assert answer["data"]["content"][0]["text"] == "results for q"
    assert answer["data"]["isError"] is False

    # The pooled session expires upstream: the next call initialises a new one and succeeds.
    owner = next(k for u, k in gw.sc.mcp.rest._pool if u == "tools")  # type: ignore[union-attr]  # the key's
    pooled = gw.sc.mcp.rest.pooled("tools", owner)  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as direct:
        gone = await direct.delete(
            f"{upstream.url}/mcp",
            headers={
                "Authorization": f"Bearer {MCP_TOKEN}",
                "Mcp-Session-Id": pooled.session_id,
                "MCP-Protocol-Version": pooled.version,
            },
        )
        assert gone.status == 200
    r = await gw.proxy.post(
        "/mcp", json={"mcp_id": "tools", "tool": "fetch", "arguments": {"url": "u"}}, headers=apikey
    )
    assert r.status == 200
    assert (await r.json())["data"]["content"][0]["text"] == "fetched u"
    assert upstream.rec.methods().count("initialize") == 2
    assert upstream.rec.calls == ["search", "fetch"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({"mcp_id": "tools", "tool": "delete_everything"}, True, 403, "insufficient_permissions"),
        ({"mcp_id": "nope", "tool": "search"}, True, 404, "no_route"),
        ({"mcp_id": "tools"}, True, 400, "bad_request"),
        ({"mcp_id": "tools", "tool": "search", "arguments": [1]}, True, 400, "bad_request"),
        ("not an object", True, 400, "bad_request"),
        ({"mcp_id": "tools", "tool": "search"}, False, 401, "unauthorized"),
    ],
)
async def test_rest_tool_call_refusals(
    gw: Running, upstream: McpUpstream, body: Any, headers: bool, status: int, code: str
) -> None:
    key = await agent_key(gw)
    r = await gw.proxy.post("/mcp", json=body, headers={"Authorization": f"ApiKey {key}"} if headers else {})
    assert r.status == status
    assert (await r.json())["error"]["code"] == code
    assert upstream.rec.calls == []


# ----------------------------------------------------------------------------- the sidecar is the resource


async def test_upstream_401_is_a_502_without_its_challenge(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    cfg = mcp_config(upstream, tmp_path)
    for up in cfg["upstreams"]:
        up["headers"] = {"Authorization": "Bearer wrong-token"}
    gw = await start(make_sidecar, upstream, tmp_path, upstreams=cfg["upstreams"])
    key = await agent_key(gw)
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**ACCEPT, **bearer(key)})
    assert r.status == 502
    assert "WWW-Authenticate" not in r.headers
    assert await r.json() == {
        "success": False,
        "error": {"code": "upstream_unavailable", "message": "upstream rejected the sidecar's credential"},
    }
    r = await gw.proxy.post(
        "/mcp", json={"mcp_id": "tools", "tool": "search", "arguments": {"query": "q"}}, headers=bearer(key)
    )
    assert r.status == 502
    # The upstream's own OAuth metadata is never relayed.
    r = await gw.proxy.get("/mcp/legacy/.well-known/oauth-protected-resource", headers=bearer(key))
    assert r.status == 404
    assert not any(x.path.startswith("/.well-known") for x in upstream.rec.requests)


async def test_401_points_at_the_sidecars_resource_metadata(gw: Running) -> None:
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers=ACCEPT)
    assert r.status == 401
    assert (await r.json())["error"]["code"] == "unauthorized"
    challenge = r.headers["WWW-Authenticate"]
    base = str(gw.proxy.make_url("")).rstrip("/")
    meta_url = f"{base}/.well-known/oauth-protected-resource/mcp/tools"
    assert f'resource_metadata="{meta_url}"' in challenge
    assert challenge.startswith("Bearer ")
    meta = await (await gw.proxy.get("/.well-known/oauth-protected-resource/mcp/tools")).json()
    assert meta["resource"] == f"{base}/mcp/tools"
    assert meta["bearer_methods_supported"] == ["header"]
    assert "authorization_servers" not in meta  # keys are issued out of band
    root = await (await gw.proxy.get("/.well-known/oauth-protected-resource")).json()
    assert root["resource"] == base
    missing = await gw.proxy.get("/.well-known/oauth-protected-resource/nope")
    assert missing.status == 404


async def test_every_key_401_at_an_mcp_route_carries_the_challenge(gw: Running) -> None:
    """A wrong, revoked or expired key is a 401 too (RFC 6750): the client is told where the
    resource metadata is, as for a missing credential, and never which key it was."""
    base = str(gw.proxy.make_url("")).rstrip("/")
    key = await agent_key(gw)
    wrong = key[:-9] + ("0" if key[-9] != "0" else "1") + key[-8:]
    for credential, code in ((wrong, "invalid_key"), ("pmcp_nope", "invalid_key")):
        r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**ACCEPT, **bearer(credential)})
        assert r.status == 401
        assert (await r.json())["error"]["code"] == code
        challenge = r.headers["WWW-Authenticate"]
        assert f'resource_metadata="{base}/.well-known/oauth-protected-resource/mcp/tools"' in challenge
        assert credential not in challenge


async def test_upstream_gets_its_own_host_despite_the_dns_rebinding_guard(gw: Running, upstream: McpUpstream) -> None:
    key = await agent_key(gw)
    async with aiohttp.ClientSession() as direct:
        refused = await direct.post(
            f"{upstream.url}/mcp",
            json=INIT,
            headers={**ACCEPT, "Authorization": f"Bearer {MCP_TOKEN}", "Host": "evil.example"},
        )
        assert refused.status == 421  # the SDK's guard is really on
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**ACCEPT, **bearer(key), "Host": "evil.example"})
    assert r.status == 200
    assert upstream.rec.requests[-1].header("host") == f"127.0.0.1:{upstream.port}"


async def test_trailing_slash_redirect_is_passed_on_inside_the_prefix(gw: Running, upstream: McpUpstream) -> None:
    key = await agent_key(gw)
    r = await gw.proxy.post("/mcp/legacy/mcp/", json=INIT, headers={**ACCEPT, **bearer(key)}, allow_redirects=False)
    assert r.status == 307
    assert r.headers["Location"] == "/mcp/legacy/mcp"
    assert sum(1 for x in upstream.rec.requests if x.method == "POST") == 1  # not followed by the sidecar
    r = await gw.proxy.post("/mcp/legacy/mcp", json=INIT, headers={**ACCEPT, **bearer(key)}, allow_redirects=False)
    assert r.status == 200


async def test_cors_for_browser_clients(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path) -> None:
    gw = await start(make_sidecar, upstream, tmp_path, cors={"enabled": True, "origins": ["https://app.example"]})
    key = await agent_key(gw)
    pre = await gw.proxy.options(
        "/mcp/tools",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, mcp-protocol-version, mcp-param-region",
        },
    )
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    allow = {h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")}
    assert {
        "authorization",
        "mcp-protocol-version",
        "last-event-id",
        "mcp-session-id",
        "mcp-method",
        "mcp-name",
        "mcp-param-region",
    } <= allow
    assert "DELETE" in pre.headers["Access-Control-Allow-Methods"]

    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**ACCEPT, **bearer(key), "Origin": "https://app.example"})
    assert r.status == 200  # the SDK's origin check would refuse a browser origin: the sidecar vetted it
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Mcp-Session-Id" in r.headers["Access-Control-Expose-Headers"]
    assert upstream.rec.requests[-1].header("origin") is None
    unauth = await gw.proxy.post("/mcp/tools", json=INIT, headers={**ACCEPT, "Origin": "https://app.example"})
    assert unauth.status == 401 and unauth.headers["Access-Control-Allow-Origin"] == "https://app.example"

    foreign = await gw.proxy.options(
        "/mcp/tools", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert foreign.status == 403
    assert "Access-Control-Allow-Origin" not in foreign.headers


async def test_key_without_tool_limits_gets_the_upstreams_list_untouched(gw: Running) -> None:
    _, key = await gw.create_key(name="admin-agent", permissions={"upstreams": ["tools"]})
    headers = await raw_session(gw, key)
    r = await gw.proxy.post("/mcp/tools", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=headers)
    assert r.status == 200
    names = {t["name"] for m in sse_messages(await r.text()) for t in m["result"]["tools"]}
    assert names == {"search", "fetch", "delete_everything", "slow", "quiet"}
    r = await gw.proxy.post("/mcp/tools", json=call(3, "delete_everything"), headers=headers)
    assert sse_messages(await r.text())[-1]["result"]["content"][0]["text"] == "deleted"
    # Another upstream is not this key's to use at all.
    r = await gw.proxy.post("/mcp/legacy/mcp", json=INIT, headers={**ACCEPT, **bearer(key)})
    assert r.status == 403


async def test_mcp_upstream_at_the_root_keeps_its_own_mcp_endpoint(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    root = {"id": "root", "kind": "mcp", "url": upstream.url, "path_prefix": "/",
            "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}}  # fmt: skip
    gw = await start(make_sidecar, upstream, tmp_path, upstreams=[root])
    _, key = await gw.create_key(name="root-agent", permissions={"upstreams": ["root"], "tools": {"root": ["search"]}})
    r = await gw.proxy.post("/mcp", json=INIT, headers={**ACCEPT, **bearer(key)})
    assert r.status == 200 and "Mcp-Session-Id" in r.headers  # not taken for a REST tool call
    r = await gw.proxy.post("/mcp", json=INIT, headers=ACCEPT)
    assert r.status == 401
    assert (
        f'resource_metadata="{str(gw.proxy.make_url("")).rstrip("/")}/.well-known/oauth-protected-resource"'
        in (r.headers["WWW-Authenticate"])
    )
