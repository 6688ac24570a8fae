"""MCP attacks: session ids in two forms, huge bodies, resources and prompts, refusals that cost budget.

Issue 14 items 1 and 13, issue 20 items 6 and 8. The upstream is the official SDK's
server (``tests/mcp_server.py``: Streamable HTTP and legacy SSE, with a ``secret://vault``
resource and an ``admin_override`` prompt no test key may reach); the clients are the
SDK's own and raw aiohttp where the attack needs exact bytes on the wire.
"""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from pathlib import Path
from typing import Any

import httpx2
import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config
from mcp import types
from mcp.client import Client
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_server import MCP_TOKEN, SECRET, McpUpstream, batch_app
from mcp_support import (  # SCOPED: the resource/prompt tests' key
    ACCEPT,
    SCOPED,
    bearer,
    call,
    legacy_stream,
    mcp_config,
)
from multidict import CIMultiDict

from sidecar.auth.models import Permissions
from sidecar.cli import main as cli_main
from sidecar.core.errors import BadRequest
from sidecar.upstreams.mcp.authz import McpAccess, judge
from sidecar.upstreams.mcp.jsonrpc import TOOL_FORBIDDEN
from sidecar.upstreams.mcp.sessions import SessionIds, SessionTable, presented_ids

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
BIG_BODIES = 8


@pytest.fixture
async def gw(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path) -> Running:
    return await make_sidecar(mcp_config(upstream, tmp_path), extra_env={"MCP_TOKEN": MCP_TOKEN})


async def tool_key(gw: Running, name: str, **fields: Any) -> str:
    fields.setdefault("permissions", {"upstreams": ["*"], "tools": {"*": ["search", "fetch"]}})
    _, key = await gw.create_key(name=name, **fields)
    return key


# ----------------------------------------------------------------------------- legacy SSE by hand


def messages_posted(upstream: McpUpstream) -> int:
    return sum(1 for r in upstream.rec.requests if r.method == "POST" and r.path.startswith("/messages"))


@pytest.mark.parametrize(
    "query",
    [
        "session_id={mine}&session_id={theirs}",
        "session_id={theirs}&session_id={mine}",
        "session_id=&session_id={theirs}",
        "session_id={mine}&sessionId={theirs}",
        "session_id={mine}&SESSION_ID={theirs}",
        "session_id={mine}&session%5Fid={theirs}",
        "session_id={mine};session_id={theirs}",
        "x=1;session_id={theirs}",
        "session_id=",
        "session_id=+",
    ],
)
async def test_ambiguous_legacy_session_ids_are_refused(gw: Running, upstream: McpUpstream, query: str) -> None:
    """aiohttp reads the first copy, Starlette the last: the client sees 400 bad_request, nothing goes up."""
    victim, attacker = await tool_key(gw, "victim"), await tool_key(gw, "attacker")
    async with legacy_stream(gw, victim) as theirs, legacy_stream(gw, attacker) as mine:
        before = messages_posted(upstream)
        target = "/mcp/legacy/messages/?" + query.format(mine=mine.sid, theirs=theirs.sid)
        body = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
        r = await gw.proxy.post(target, json=body, headers={**ACCEPT, **bearer(attacker)})
        assert r.status == 400, await r.text()
        assert (await r.json())["error"]["code"] == "bad_request"
        assert messages_posted(upstream) == before


async def test_session_header_never_skips_the_legacy_ownership_check(gw: Running, upstream: McpUpstream) -> None:
    """Any Mcp-Session-Id used to bypass the check: now a header naming another id is 400, the victim's 403."""
    victim, attacker = await tool_key(gw, "victim"), await tool_key(gw, "attacker")
    async with legacy_stream(gw, victim) as theirs:
        before = messages_posted(upstream)
        body = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
        target = theirs.endpoint  # /mcp/legacy/messages/?session_id=THEIRS
        for header, status in (("made-up-id", 400), (theirs.sid, 403)):
            r = await gw.proxy.post(target, json=body, headers={**ACCEPT, **bearer(attacker), "Mcp-Session-Id": header})
            assert r.status == status, (header, await r.text())
        # The header form alone, naming the victim's legacy session: still theirs.
        r = await gw.proxy.post(
            "/mcp/legacy/messages/", json=body, headers={**ACCEPT, **bearer(attacker), "Mcp-Session-Id": theirs.sid}
        )
        assert r.status == 403
        two = [*ACCEPT.items(), *bearer(attacker).items(), ("Mcp-Session-Id", "a"), ("Mcp-Session-Id", "b")]
        r = await gw.proxy.post("/mcp/tools", data=json.dumps(body), headers=two)
        assert r.status == 400  # a repeated header is as ambiguous as a repeated parameter
        assert messages_posted(upstream) == before


async def test_filtering_does_not_depend_on_the_form_of_the_session_id(gw: Running) -> None:
    """Header and query naming the same (own) legacy session: the tool list on the stream is still filtered."""
    _, key = await gw.create_key(name="agent", permissions={"upstreams": ["*"], "tools": {"*": ["search"]}})
    async with legacy_stream(gw, key) as mine:
        body = {"jsonrpc": "2.0", "id": 9, "method": "tools/list"}
        r = await gw.proxy.post(mine.endpoint, json=body, headers={**ACCEPT, **bearer(key), "Mcp-Session-Id": mine.sid})
        assert r.status == 202
        listed = await mine.answer(9)
        assert [t["name"] for t in listed["result"]["tools"]] == ["search"]
        forbidden = await gw.proxy.post(
            mine.endpoint,
            json=call(10, "delete_everything"),
            headers={**ACCEPT, **bearer(key), "Mcp-Session-Id": mine.sid},
        )
        assert forbidden.status == 202
        assert (await mine.answer(10))["error"]["code"] == TOOL_FORBIDDEN


def test_presented_ids_reads_every_form() -> None:
    h = CIMultiDict({"Mcp-Session-Id": "abc"})
    assert presented_ids(h, "") == SessionIds("abc", None)
    assert presented_ids(CIMultiDict(), "session_id=abc&x=1") == SessionIds(None, "abc")
    assert presented_ids(h, "sessionId=abc") == SessionIds("abc", "abc")
    for headers, query in [
        (CIMultiDict([("Mcp-Session-Id", "a"), ("mcp-session-id", "a")]), ""),
        (CIMultiDict({"Mcp-Session-Id": ""}), ""),
        (CIMultiDict({"Mcp-Session-Id": "a, b"}), ""),
        (CIMultiDict({"Mcp-Session-Id": "a"}), "session_id=b"),
        (CIMultiDict(), "session_id=a%20b"),
        (CIMultiDict(), "Session_ID=a&sessionid=a"),
    ]:
        with pytest.raises(BadRequest):
            presented_ids(headers, query)


def test_one_key_cannot_evict_another_keys_sessions() -> None:
    """The table is bounded per key: a flood of the attacker's sessions drops only the attacker's own."""
    table = SessionTable(limit=10_000, per_key=50)
    table.bind("up", "http", "victim-session", "victim")
    for i in range(5_000):
        table.bind("up", "http", f"junk-{i}", "attacker")
    s = table.get("up", "http", "victim-session")
    assert s is not None and s.owner == "victim"
    assert len(table) == 51
    assert table.bind("up", "http", "victim-session", "attacker") is None  # ownership never moves


# ----------------------------------------------------------------------------- bodies


async def test_default_mcp_body_limit_refuses_4_mib(gw: Running, upstream: McpUpstream) -> None:
    """A 4 MiB tools/call is over the default 1 MiB MCP limit: the client sees 413 payload_too_large."""
    key = await tool_key(gw, "agent")
    body = json.dumps(call(1, "search", query="x" * (4 * 1024 * 1024 - 200))).encode()
    seen = len(upstream.rec.requests)
    r = await gw.proxy.post("/mcp/tools", data=body, headers={**ACCEPT, **bearer(key)})
    assert r.status == 413
    assert (await r.json())["error"]["code"] == "payload_too_large"
    assert len(upstream.rec.requests) == seen


async def test_large_bodies_do_not_stall_other_clients(make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    """Eight bodies just under the 1 MiB MCP limit, made of tiny JSON values (the costliest to parse), at
    once: the event loop keeps ticking (each body is parsed off the loop, never all of them back to back
    on it) and a small request sent meanwhile is answered."""
    sink = web.Application(client_max_size=16 * 1024 * 1024)

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})

    sink.router.add_post("/mcp", answer)
    runner = web.AppRunner(sink)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        cfg = base_config("http://unused", tmp_path)
        cfg["upstreams"] = [{"id": "sink", "kind": "mcp", "url": f"http://127.0.0.1:{port}/mcp",
                             "path_prefix": "/mcp/sink"}]  # fmt: skip
        gw = await make_sidecar(cfg)
        key = await tool_key(gw, "agent")
        heavy = json.dumps(call(1, "search", q=[{}] * (1024 * 1024 // 3 - 40)), separators=(",", ":")).encode()
        assert 1024 * 1024 - 200 < len(heavy) <= 1024 * 1024

        # The loop thread's own CPU between two ticks, not the wall clock: a busy machine stretches
        # wall time (a 0.2 s wall bound failed under CI load, and passed with the parse on the
        # loop), but only work done on the loop thread counts here. Off the loop: ~9 ms at most;
        # parsed on the loop: ~190 ms.
        busy = 0.0
        done = False

        async def ticker() -> None:
            nonlocal busy
            last = time.thread_time()
            while not done:
                await asyncio.sleep(0.005)
                now = time.thread_time()
                busy = max(busy, now - last)
                last = now

        async def post(data: bytes) -> int:
            r = await gw.proxy.post("/mcp/sink", data=data, headers={**ACCEPT, **bearer(key)})
            await r.read()
            return r.status

        # The key's first use: all the requests wait for its one verification, then reach their
        # (already received) bodies at the same moment — the worst case for the loop.
        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        big = [asyncio.create_task(post(heavy)) for _ in range(BIG_BODIES)]
        await asyncio.sleep(0.05)
        small_status = await post(json.dumps(call(2, "search", q="x")).encode())
        results = await asyncio.gather(*big)
        done = True
        await tick
        assert results == [200] * BIG_BODIES
        assert small_status == 200
        assert busy < 0.05, f"the event loop's thread worked {busy * 1000:.0f} ms without a tick"
    finally:
        await runner.cleanup()


async def test_rest_tool_call_with_deeply_nested_json_is_a_400(gw: Running, upstream: McpUpstream) -> None:
    """``POST /mcp`` with 100 000 nested arrays: 400 bad_request (json's RecursionError was a 500)."""
    key = await tool_key(gw, "agent")
    for body in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"mcp_id": "tools", "tool": "search", "arguments": ' + b"[" * 20_000,
    ):
        r = await gw.proxy.post("/mcp", data=body, headers={**bearer(key), "Content-Type": "application/json"})
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "bad_request"
    assert upstream.rec.calls == []


def test_judge_forwards_exactly_what_it_judged() -> None:
    """The decision carries exactly what goes upstream: the original bytes when nothing was refused."""
    access = McpAccess.of(Permissions(tools={"*": ("search",)}), "up")
    raw = json.dumps([call(1, "search", q="a"), {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}]).encode()
    d = judge(raw, [], access, legacy=False)
    assert d.forward is raw and d.lists == [(2, "tools/list")] and not d.denied
    d = judge(json.dumps([call(1, "search"), call(2, "delete_everything")]).encode(), [], access, legacy=False)
    assert json.loads(d.forward or b"") == [call(1, "search")] and d.refused[0]["id"] == 2 and d.kept == 1
    d = judge(json.dumps(call(3, "delete_everything")).encode(), [], access, legacy=True)
    assert json.loads(d.forward or b"") == {"jsonrpc": "2.0", "id": 3, "method": "ping"} and d.kept == 0


# ----------------------------------------------------------------------------- resources and prompts


async def exercise(session: ClientSession, upstream: McpUpstream) -> None:
    """What SCOPED may and may not do, through the SDK's client (any transport)."""
    resources = await session.list_resources()
    assert [str(r.uri) for r in resources.resources] == ["docs://public/readme"]
    templates = await session.list_resource_templates()
    assert [t.uri_template for t in templates.resource_templates] == ["docs://public/{name}"]
    prompts = await session.list_prompts()
    assert [p.name for p in prompts.prompts] == ["greet"]

    readme = await session.read_resource("docs://public/readme")
    assert readme.contents[0].text == "read me"  # type: ignore[union-attr]
    page = await session.read_resource("docs://public/faq")
    assert page.contents[0].text == "public faq"  # type: ignore[union-attr]
    hello = await session.get_prompt("greet", {"name": "ann"})
    assert "Hello, ann!" in str(hello.messages[0].content)
    with warnings.catch_warnings():  # sessions-era subscriptions: deprecated by 2026-07-28, still served
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        await session.subscribe_resource("docs://public/readme")
        attempts = (
            session.read_resource("secret://vault"),
            session.read_resource("secret://other"),
            session.subscribe_resource("secret://vault"),
            session.unsubscribe_resource("secret://vault"),
            session.get_prompt("admin_override"),
            session.complete(
                types.PromptReference(type="ref/prompt", name="admin_override"), {"name": "x", "value": ""}
            ),
            session.complete(
                types.ResourceTemplateReference(type="ref/resource", uri="secret://{name}"),
                {"name": "name", "value": ""},
            ),
        )
    for attempt in attempts:
        with pytest.raises(MCPError) as refused:
            await attempt
        assert refused.value.code == TOOL_FORBIDDEN, refused.value
    found = await session.call_tool("search", {"query": "q"})  # the session survived every refusal
    assert found.content[0].text == "results for q"  # type: ignore[union-attr]
    assert not [c for c in upstream.rec.calls if "secret" in c or "admin_override" in c]


async def test_resources_and_prompts_over_streamable_http(gw: Running, upstream: McpUpstream) -> None:
    _, key = await gw.create_key(name="scoped", permissions=SCOPED)
    async with (
        httpx2.AsyncClient(headers=bearer(key)) as http,
        streamable_http_client(str(gw.proxy.make_url("/mcp/tools")), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        await exercise(session, upstream)
    assert "subscribe:docs://public/readme" in upstream.rec.calls


async def test_resources_and_prompts_over_legacy_sse(gw: Running, upstream: McpUpstream) -> None:
    _, key = await gw.create_key(name="scoped", permissions=SCOPED)
    async with (
        sse_client(str(gw.proxy.make_url("/mcp/legacy/sse")), headers=bearer(key)) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        await exercise(session, upstream)
    assert "ping" in upstream.rec.methods()  # refusals went up as pings, answered by the refusal


async def test_resources_and_prompts_with_the_2026_client(gw: Running, upstream: McpUpstream) -> None:
    """``Client(mode="auto")`` (2026-07-28: no sessions, ``Mcp-Name`` carries the URI or prompt name)."""
    _, key = await gw.create_key(name="scoped", permissions=SCOPED)
    async with (
        httpx2.AsyncClient(headers=bearer(key)) as http,
        Client(streamable_http_client(str(gw.proxy.make_url("/mcp/tools")), http_client=http), mode="auto") as client,
    ):
        assert client.protocol_version == "2026-07-28"
        assert [str(r.uri) for r in (await client.list_resources()).resources] == ["docs://public/readme"]
        assert [p.name for p in (await client.list_prompts()).prompts] == ["greet"]
        readme = await client.read_resource("docs://public/readme")
        assert readme.contents[0].text == "read me"  # type: ignore[union-attr]
        for attempt in (client.read_resource("secret://vault"), client.get_prompt("admin_override")):
            with pytest.raises(MCPError) as refused:
                await attempt
            assert refused.value.code == TOOL_FORBIDDEN
    names = [r.header("mcp-name") for r in upstream.rec.requests if r.header("mcp-method") == "resources/read"]
    assert names == ["docs://public/readme"]  # the refused read never went up
    assert not [c for c in upstream.rec.calls if "secret" in c or "admin_override" in c]


async def test_naming_tools_only_denies_resources_and_prompts(gw: Running, upstream: McpUpstream) -> None:
    """The safe default: a key limited to tool `search` reads no resource and gets no prompt (it did before)."""
    key = await tool_key(gw, "tools-only")
    async with (
        httpx2.AsyncClient(headers=bearer(key)) as http,
        streamable_http_client(str(gw.proxy.make_url("/mcp/tools")), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert (await session.list_resources()).resources == []
        assert (await session.list_prompts()).prompts == []
        for attempt in (session.read_resource("secret://vault"), session.get_prompt("greet", {"name": "x"})):
            with pytest.raises(MCPError) as refused:
                await attempt
            assert refused.value.code == TOOL_FORBIDDEN
    assert not [c for c in upstream.rec.calls if c.startswith(("read:", "prompt:"))]


async def test_key_without_mcp_limits_keeps_full_access(gw: Running) -> None:
    _, key = await gw.create_key(name="full", permissions={"upstreams": ["tools"]})
    async with (
        httpx2.AsyncClient(headers=bearer(key)) as http,
        streamable_http_client(str(gw.proxy.make_url("/mcp/tools")), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert len((await session.list_resources()).resources) == 2
        vault = await session.read_resource("secret://vault")
        assert vault.contents[0].text == SECRET  # type: ignore[union-attr]
        assert {p.name for p in (await session.list_prompts()).prompts} == {"greet", "admin_override"}


async def test_resources_and_prompts_through_the_admin_api(gw: Running) -> None:
    body = {"name": "api", "permissions": SCOPED}
    r = await gw.admin.post("/admin/keys", json=body, headers=gw.admin_headers())
    assert r.status == 201, await r.text()
    perms = (await r.json())["data"]["permissions"]
    assert perms["resources"] == {"*": ["docs://public/*"]} and perms["prompts"] == {"*": ["greet"]}
    bad = {"name": "x", "permissions": {"resources": {"nope": ["a://*"]}}}
    r = await gw.admin.post("/admin/keys", json=bad, headers=gw.admin_headers())
    assert r.status == 400 and "permissions.resources" in (await r.json())["error"]["message"]
    spec = await (await gw.admin.get("/admin/openapi.json", headers=gw.admin_headers())).json()
    props = spec["components"]["schemas"]["KeyInput"]["properties"]["permissions"]["properties"]
    assert {"tools", "resources", "prompts"} <= set(props)


@pytest.mark.parametrize(
    ("perms", "up", "expect"),
    [
        ({}, "a", {"tools": True, "resources": True, "prompts": True}),  # no MCP limit: everything
        ({"tools": {"a": ["search"]}}, "a", {"tools": True, "resources": False, "prompts": False}),
        ({"tools": {"a": ["search"]}}, "b", {"tools": True, "resources": True, "prompts": True}),
        ({"tools": {"*": ["search"]}}, "b", {"tools": True, "resources": False, "prompts": False}),
        ({"resources": {"a": ["docs://*"]}}, "a", {"tools": False, "resources": True, "prompts": False}),
        ({"prompts": {"a": []}}, "a", {"tools": False, "resources": False, "prompts": False}),
        (
            {"tools": {"*": ["*"]}, "resources": {"a": ["secret://*"]}},
            "a",
            {"tools": True, "resources": False, "prompts": False},
        ),
    ],
)
def test_naming_any_mcp_kind_limits_all_three(perms: dict[str, Any], up: str, expect: dict[str, bool]) -> None:
    """What `search`, `docs://public/readme` and `greet` are to a key, per the rule in docs/mcp.md."""
    access = McpAccess.of(Permissions.from_dict(perms), up)
    names = {"tools": "search", "resources": "docs://public/readme", "prompts": "greet"}
    assert {kind: access.allows(kind, name) for kind, name in names.items()} == expect


def test_permissions_round_trip_through_every_stored_form() -> None:
    perms = Permissions.from_dict(SCOPED)
    assert perms.resources == {"*": ("docs://public/*",)} and perms.prompts == {"*": ("greet",)}
    assert Permissions.from_dict(perms.to_dict()) == perms
    from sidecar.auth.models import KeyRecord

    rec = KeyRecord(id="abcdefabcdef", name="n", hash="$argon2id$x", permissions=perms)
    assert KeyRecord.from_stored(json.loads(json.dumps(rec.to_stored()))).permissions == perms
    assert KeyRecord.from_dict(rec.to_dict()).permissions == perms
    with pytest.raises(ValueError, match=r"permissions\.prompts"):
        Permissions.from_dict({"prompts": ["greet"]})


def test_cli_carries_resources_and_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--resource UPSTREAM:URI_GLOB`` and ``--prompt UPSTREAM:NAME`` beside ``--tool`` (the URI keeps its colons)."""
    cfg = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "store": {"kind": "sqlite", "path": "sidecar.db"},
        "keys": {"argon2": "cheapest"},
        "upstreams": [{"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:8000", "path_prefix": "/mcp"}],
        "log": {"access": "off"},
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(json.dumps(cfg))
    argv = ["keys", "create", "-c", str(path), "--name", "n", "--tool", "tools:search",
            "--resource", "tools:docs://public/*", "--prompt", "tools:greet", "--json"]  # fmt: skip
    assert cli_main(argv) == 0
    perms = json.loads(capsys.readouterr().out)["permissions"]
    assert perms["tools"] == {"tools": ["search"]}
    assert perms["resources"] == {"tools": ["docs://public/*"]} and perms["prompts"] == {"tools": ["greet"]}
    assert cli_main(["keys", "create", "-c", str(path), "--name", "x", "--prompt", "greet"]) == 1
    assert "UPSTREAM:PROMPT" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refusals are free


@pytest.mark.parametrize("limit", [{"rate_limits": ["2/hour"]}, {"quota": "2/day"}], ids=["rate", "quota"])
async def test_refused_json_rpc_calls_spend_nothing(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, limit: dict[str, Any]
) -> None:
    """A key allowed 2 requests: 5 refused calls (tool, resource, prompt) first, then its 2 calls still succeed."""
    batch_upstream = await aiohttp_server(batch_app())
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [
        {"id": "batch", "kind": "mcp", "url": str(batch_upstream.make_url("/mcp")), "path_prefix": "/mcp/batch"}
    ]
    gw = await make_sidecar(cfg)
    key = await tool_key(gw, "limited", **limit)
    headers = {**ACCEPT, **bearer(key)}
    refused = [
        call(1, "delete_everything"),
        {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "secret://vault"}},
        {"jsonrpc": "2.0", "id": 3, "method": "prompts/get", "params": {"name": "admin_override"}},
        [call(4, "delete_everything"), call(5, "delete_everything")],
        call(6, "delete_everything"),
    ]
    for body in refused:
        r = await gw.proxy.post("/mcp/batch", json=body, headers=headers)
        assert r.status == 200
        answers = await r.json()
        assert all(a["error"]["code"] == TOOL_FORBIDDEN for a in (answers if isinstance(answers, list) else [answers]))
    for rid in (7, 8):
        r = await gw.proxy.post("/mcp/batch", json=call(rid, "search"), headers=headers)
        assert r.status == 200, await r.text()
        assert (await r.json())["result"]["content"][0]["text"] == "called search"
    r = await gw.proxy.post("/mcp/batch", json=call(9, "search"), headers=headers)
    assert r.status == 429  # the budget was real: it is now spent


async def test_another_keys_session_costs_the_caller_nothing(gw: Running) -> None:
    owner = await tool_key(gw, "owner")
    thief = await tool_key(gw, "thief", rate_limits=["3/hour"])
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**ACCEPT, **bearer(owner)})
    sid = r.headers["Mcp-Session-Id"]
    await r.read()
    for _ in range(5):
        r = await gw.proxy.post(
            "/mcp/tools", json=call(2, "search", query="q"), headers={**ACCEPT, **bearer(thief), "Mcp-Session-Id": sid}
        )
        assert r.status == 403
    for _ in range(3):
        r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**ACCEPT, **bearer(thief)})
        assert r.status == 200
        await r.read()
