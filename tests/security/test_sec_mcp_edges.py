"""MCP edges: every way a request under an MCP route could reach the upstream past the JSON-RPC judgement.

The attacker holds a key limited to tool ``search``, resources ``docs://public/*`` and prompt
``greet`` (``SCOPED``) on the official SDK's server (``tests/mcp_server.py``), and looks for what
the upstream acts on that the gateway does not judge: headers the SDK reads (``Last-Event-ID``),
other paths and methods under the prefix, bodies the SDK parses whatever their ``Content-Type``.
The victim is another key of the same sidecar: the upstream sees one credential for both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config
from mcp_server import MCP_TOKEN, SECRET, McpUpstream
from mcp_support import ACCEPT, SCOPED, bearer, call, legacy_stream, mcp_config, session
from raw_http import read_response
from test_sec_mcp_bypass import resumable

from sidecar.upstreams.mcp.eventids import MAX_ID_LINE, EventIdSealer

__all__ = ["resumable"]  # the fixture, test_sec_mcp_bypass's, re-exported for pytest

READ_VAULT = {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "secret://vault"}}


@pytest.fixture
async def upstream() -> AsyncIterator[McpUpstream]:
    up = McpUpstream().start()
    yield up
    await up.stop()


async def two_keys(make_sidecar: MakeSidecar, up: McpUpstream, tmp_path: Path) -> tuple[Running, str, str]:
    """A sidecar, the limited attacker's key and an unlimited victim's key."""
    gw = await make_sidecar(mcp_config(up, tmp_path), extra_env={"MCP_TOKEN": MCP_TOKEN})
    _, attacker = await gw.create_key(name="attacker", permissions=SCOPED)
    _, victim = await gw.create_key(name="victim", permissions={"upstreams": ["*"]})
    return gw, attacker, victim


def event_ids(text: str) -> list[str]:
    return [line[3:].strip() for line in text.splitlines() if line.startswith("id:")]


async def first_event(gw: Running, headers: dict[str, str]) -> tuple[int, str]:
    async with gw.proxy.get("/mcp/tools", headers=headers) as g:
        if g.status != 200:
            return g.status, await g.text()
        return g.status, (await asyncio.wait_for(g.content.readuntil(b"\r\n\r\n"), 5)).decode()


# ----------------------------------------------------------------------------- Last-Event-ID


async def test_last_event_id_never_replays_another_keys_stream(
    make_sidecar: MakeSidecar, resumable: McpUpstream, tmp_path: Path
) -> None:
    """The victim reads ``secret://vault``; its answer stream carries event ids. The attacker resumes with the
    victim's event id on its own session: the SDK replays from its event store whatever stream the id names.

    Before: ``GET`` + ``Last-Event-ID: ev-3`` (the SDK example stores' ids are often sequential) replayed the
    victim's ``resources/read`` answer, the vault's contents, to the limited key. Now event ids leave the
    sidecar sealed to the key whose stream carried them: another key's is a 403, one the sidecar did not
    seal (the raw ``ev-3``, a guess) a 404, and neither reaches the upstream.
    """
    gw, attacker, victim = await two_keys(make_sidecar, resumable, tmp_path)
    hv = await session(gw, victim)
    r = await gw.proxy.post("/mcp/tools", json=READ_VAULT, headers=hv)
    text = await r.text()
    assert SECRET in text
    victims = event_ids(text)
    assert victims and not any(i.startswith("ev-") for i in victims), "the upstream's own event ids got out"
    ha = await session(gw, attacker)
    seen = len(resumable.rec.requests)
    for guess in (victims[0], "ev-1", "ev-2", "ev-3", "ev-4"):
        status, body = await first_event(gw, {**ha, "Accept": "text/event-stream", "Last-Event-ID": guess})
        assert SECRET not in body
        assert status in (403, 404), (guess, status, body)
        assert json.loads(body)["error"]["code"] == ("insufficient_permissions" if guess in victims else "not_found")
    assert len(resumable.rec.requests) == seen, "a refused resumption reached the upstream"
    # The victim resumes its own stream with the id it was given: the replay is its answer.
    status, body = await first_event(gw, {**hv, "Accept": "text/event-stream", "Last-Event-ID": victims[0]})
    assert status == 200 and SECRET in body
    assert not any(i.startswith("ev-") for i in event_ids(body))


async def test_a_repeated_last_event_id_is_refused(
    make_sidecar: MakeSidecar, resumable: McpUpstream, tmp_path: Path
) -> None:
    """Two ``Last-Event-ID`` headers: Starlette reads the first, another server the last. A 400, never forwarded."""
    gw, attacker, _ = await two_keys(make_sidecar, resumable, tmp_path)
    ha = await session(gw, attacker)
    r = await gw.proxy.post("/mcp/tools", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=ha)
    own = event_ids(await r.text())[0]
    seen = len(resumable.rec.requests)
    headers = [*ha.items(), ("Accept", "text/event-stream"), ("Last-Event-ID", own), ("Last-Event-ID", "ev-1")]
    async with gw.proxy.get("/mcp/tools", headers=headers) as g:
        assert g.status == 400 and (await g.json())["error"]["code"] == "bad_request"
    assert len(resumable.rec.requests) == seen


# ----------------------------------------------------------------------------- what held (kept as regressions)


async def test_legacy_session_ids_in_every_spelling_the_sdk_reads(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """The SDK reads a legacy ``session_id`` with ``UUID(hex=…)``: upper case, dashes, braces and ``urn:uuid:``
    name the same session. The attacker posts ``tools/call delete_everything`` to the victim's session under
    each: an id this sidecar did not open a stream for is ``404``, never forwarded."""
    gw, attacker, victim = await two_keys(make_sidecar, upstream, tmp_path)
    async with legacy_stream(gw, victim) as s:
        sid = s.sid
        dashed = f"{sid[:8]}-{sid[8:12]}-{sid[12:16]}-{sid[16:20]}-{sid[20:]}"
        for form in (sid.upper(), "{" + sid + "}", f"urn:uuid:{sid}", dashed):
            for key in (attacker, victim):
                r = await gw.proxy.post(f"/mcp/legacy/messages/?session_id={form}", json=call(9, "delete_everything"),
                                        headers={**ACCEPT, **bearer(key)})  # fmt: skip
                assert r.status == 404, (form, await r.text())
    assert "delete_everything" not in upstream.rec.calls


@pytest.mark.parametrize(
    "path", ["/mcp/tools/", "/mcp/tools//", "/mcp/tools/../tools", "/mcp/legacy/mcp", "/mcp/tools/%2e%2e/sse"]
)
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_a_post_on_any_path_with_any_content_type_is_judged(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path, path: str, ctype: str | None
) -> None:
    """The SDK's legacy message endpoint parses a body as JSON whatever its ``Content-Type``; other paths under
    the prefix reach the other transport. Whatever the path and type, the forbidden call never runs."""
    gw, attacker, _ = await two_keys(make_sidecar, upstream, tmp_path)
    h = await session(gw, attacker)
    headers = {k: v for k, v in h.items() if k != "Content-Type"}
    if ctype:
        headers["Content-Type"] = ctype
    r = await gw.proxy.post(path, data=json.dumps(call(5, "delete_everything")).encode(), headers=headers)
    assert r.status in (200, 400, 404), r.status
    assert "code" in json.dumps(await r.json())
    assert "delete_everything" not in upstream.rec.calls


STREAM = (
    b"id: ev-1\r\ndata: \r\n\r\n"  # the SDK's priming event
    b'event: message\nid:ev-2\ndata: {"id":2}\n\n'
    b"data: no id\r\rid: ev-3\rdata: x\r\r"
    b": comment id: ev-9\n"  # not a field: kept
    b"data: id: ev-8\n\n"  # inside data: kept
    b"id:\n\n"  # an empty id resets the client's: kept
)


@pytest.mark.parametrize("step", [1, 2, 3, 7, len(STREAM)])
def test_every_event_id_is_sealed_wherever_the_chunks_are_cut(step: int) -> None:
    """Ids split across chunks, after ``\\r``, ``\\n`` or ``\\r\\n``, with or without the space: all sealed, nothing
    else touched, and no raw id gets out."""
    sealer = EventIdSealer(lambda raw: f"S<{raw}>")
    out = b"".join(sealer.feed(STREAM[i : i + step]) for i in range(0, len(STREAM), step)) + sealer.flush()
    assert out == (
        b"id: S<ev-1>\r\ndata: \r\n\r\n"
        b'event: message\nid: S<ev-2>\ndata: {"id":2}\n\n'
        b"data: no id\r\rid: S<ev-3>\rdata: x\r\r"
        b": comment id: ev-9\n"
        b"data: id: ev-8\n\n"
        b"id:\n\n"
    )


def test_an_id_line_too_long_to_seal_is_dropped_and_a_cut_one_still_sealed() -> None:
    sealer = EventIdSealer(lambda raw: "S")
    long = b"id: " + b"x" * (MAX_ID_LINE + 10)
    out = sealer.feed(long[:100]) + sealer.feed(long[100:]) + sealer.feed(b"\ndata: y\n\n") + sealer.flush()
    assert out == b"\ndata: y\n\n"
    cut = EventIdSealer(lambda raw: f"S<{raw}>")
    assert cut.feed(b"data: y\n\nid: ev-") + cut.flush() == b"data: y\n\nid: S<ev->"


def sessionless_resumable_app() -> web.Application:
    """A stateless MCP server with an event store (the TypeScript SDK allows both): every answer event gets an id,
    and a ``GET`` with ``Last-Event-ID`` and no session replays what followed it."""
    events: list[bytes] = []
    tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("search", "delete_everything")]

    async def post(request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        events.append(b"event: message\nid: %d\ndata: %s\n\n" % (len(events) + 1, json.dumps(
            {"jsonrpc": "2.0", "id": msg["id"], "result": {"tools": tools}}).encode()))  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"id: 0\ndata: \n\n" + events[-1])
        await resp.write_eof()
        return resp

    async def get(request: web.Request) -> web.StreamResponse:
        after = int(request.headers.get("Last-Event-ID", "-1"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in events[max(after, 0) :]:
            await resp.write(ev)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/mcp", post)
    app.router.add_get("/mcp", get)
    return app


async def test_a_sessionless_resumption_replays_lists_filtered(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The limited key lists tools (filtered: ``search``), then resumes from its own priming event with no
    ``Mcp-Session-Id``: the upstream replays its ``tools/list`` answer as it first sent it.

    Before: a GET stream without a session filtered only the ids this request asked about (none), so the replay
    listed ``delete_everything``. Every GET stream now finds a limited key's lists by their shape."""
    up = await aiohttp_server(sessionless_resumable_app())
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/tools"}]
    gw = await make_sidecar(cfg)
    _, key = await gw.create_key(name="attacker", permissions=SCOPED)
    r = await gw.proxy.post("/mcp/tools", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                            headers={**ACCEPT, **bearer(key)})  # fmt: skip
    text = await r.text()
    assert "delete_everything" not in text and "search" in text
    priming = event_ids(text)[0]
    async with gw.proxy.get("/mcp/tools", headers={**bearer(key), "Accept": "text/event-stream",
                                                   "Last-Event-ID": priming}) as g:  # fmt: skip
        assert g.status == 200
        replayed = (await asyncio.wait_for(g.read(), 5)).decode()
    assert "search" in replayed and "delete_everything" not in replayed


async def test_framings_and_methods_never_carry_a_call_past_the_judge(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """Byte for byte, on one connection each: a body after ``Content-Length: 0``, a chunked body, ``Expect:
    100-continue``, and a body on GET (chunked or not), HEAD and OPTIONS. The forbidden call never runs: a POST
    body is judged however it is framed, a body on any other method is refused for a limited key."""
    gw, attacker, _ = await two_keys(make_sidecar, upstream, tmp_path)
    h = await session(gw, attacker)
    body = json.dumps(call(7, "delete_everything")).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in h.items()).encode()
    host = f"Host: {gw.proxy.host}:{gw.proxy.port}\r\n".encode()
    chunked = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    sized = b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    cases = [  # (request bytes, the statuses the client may see, in order)
        (b"POST /mcp/tools HTTP/1.1\r\n" + host + head + b"Content-Length: 0\r\n\r\n" + body, (400,)),
        (b"POST /mcp/tools HTTP/1.1\r\n" + host + head + chunked, (200,)),
        (b"POST /mcp/tools HTTP/1.1\r\n" + host + head + b"Expect: 100-continue\r\n" + sized, (100, 200)),
        (b"GET /mcp/tools HTTP/1.1\r\n" + host + head + chunked, (403,)),
        (b"GET /mcp/tools HTTP/1.1\r\n" + host + head + sized, (403,)),
        (b"HEAD /mcp/tools HTTP/1.1\r\n" + host + head + sized, (403,)),
        (b"OPTIONS /mcp/tools HTTP/1.1\r\n" + host + head + sized, (403,)),
    ]
    for raw, statuses in cases:
        reader, writer = await asyncio.open_connection(gw.proxy.host, gw.proxy.port)
        try:
            writer.write(raw)
            await writer.drain()
            for want in statuses:
                if want == 100 or raw.startswith(b"HEAD"):  # a status line and headers, no body
                    line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    assert line.startswith(b"HTTP/1.1 %d" % want), line
                    continue
                status, _, answer = await asyncio.wait_for(read_response(reader, to_eof=False), 5)
                assert status == want, (raw[:40], status, answer)
                if status == 200:
                    assert json.loads(answer)["error"]["code"] == -32010
        finally:
            writer.close()
    assert "delete_everything" not in upstream.rec.calls


async def test_cancelling_another_sessions_request_id_cancels_nothing(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """The victim's ``slow`` call runs as request 5; the attacker posts ``notifications/cancelled`` for request 5
    (and ``notifications/roots/list_changed``) on its own session: the SDK scopes request ids to a session,
    so the victim's call finishes."""
    gw, attacker, victim = await two_keys(make_sidecar, upstream, tmp_path)
    hv, ha = await session(gw, victim), await session(gw, attacker)
    running = asyncio.ensure_future(gw.proxy.post("/mcp/tools", json=call(5, "slow", seconds=0.5), headers=hv))
    assert await asyncio.to_thread(upstream.rec.started.wait, 5)
    for note in ({"method": "notifications/cancelled", "params": {"requestId": 5, "reason": "x"}},
                 {"method": "notifications/roots/list_changed"}):  # fmt: skip
        r = await gw.proxy.post("/mcp/tools", json={"jsonrpc": "2.0", **note}, headers=ha)
        assert r.status == 202
    r = await asyncio.wait_for(running, 10)
    assert "slept 0.5" in await r.text()
    assert not upstream.rec.cancelled.is_set()


# ----------------------------------------------------------------------------- tasks (2025-11-25)


def task_server_app(seen: list[str]) -> web.Application:
    """A task-capable server behind one credential: one task store for every caller (it cannot tell keys apart)."""
    results: dict[str, dict[str, Any]] = {}

    async def post(request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        method, params, rid = msg.get("method"), msg.get("params") or {}, msg.get("id")
        seen.append(method)
        if rid is None:
            return web.Response(status=202)
        if method == "tools/call" and "task" in params:
            tid = f"t-{len(results) + 1}"
            results[tid] = {"content": [{"type": "text", "text": f"{params['name']}: {SECRET}"}]}
            result: dict[str, Any] = {"task": {"taskId": tid, "status": "completed"}}
        elif method == "tasks/result":
            result = results.get(params.get("taskId"), {})
        elif method == "tasks/list":
            result = {"tasks": [{"taskId": t, "status": "completed"} for t in results]}
        else:
            result = {}
        return web.json_response({"jsonrpc": "2.0", "id": rid, "result": result})

    app = web.Application()
    app.router.add_post("/mcp", post)
    return app


async def test_a_limited_key_never_reads_another_keys_task(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """MCP 2025-11-25 tasks: a task-augmented ``tools/call`` answers with a task id; ``tasks/get``, ``tasks/result``,
    ``tasks/cancel`` and ``tasks/list`` act on ids the upstream cannot bind to a key (one credential for all).

    Before: the limited key's ``tasks/result`` for the victim's ``t-1`` (and ``tasks/list`` to find it) went up
    unjudged and returned the victim's result. Now a key whose MCP access is limited may not use tasks (a refusal,
    nothing goes up); a key without limits still does."""
    seen: list[str] = []
    up = await aiohttp_server(task_server_app(seen))
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/tools"}]
    gw = await make_sidecar(cfg)
    _, attacker = await gw.create_key(name="attacker", permissions=SCOPED)
    _, victim = await gw.create_key(name="victim", permissions={"upstreams": ["*"]})
    task_call = {**call(1, "fetch", url="x"), "params": {"name": "fetch", "arguments": {}, "task": {"ttl": 60000}}}
    r = await gw.proxy.post("/mcp/tools", json=task_call, headers={**ACCEPT, **bearer(victim)})
    assert (await r.json())["result"]["task"]["taskId"] == "t-1"
    del seen[:]
    asks = [
        {"jsonrpc": "2.0", "id": 2, "method": "tasks/result", "params": {"taskId": "t-1"}},
        {"jsonrpc": "2.0", "id": 3, "method": "tasks/list"},
        {"jsonrpc": "2.0", "id": 4, "method": "tasks/get", "params": {"taskId": "t-1"}},
        {"jsonrpc": "2.0", "id": 5, "method": "tasks/cancel", "params": {"taskId": "t-1"}},
        {**task_call, "id": 6, "params": {"name": "search", "arguments": {}, "task": {}}},
    ]
    for ask in asks:
        r = await gw.proxy.post("/mcp/tools", json=ask, headers={**ACCEPT, **bearer(attacker)})
        answer = await r.json()
        assert SECRET not in json.dumps(answer) and "t-1" not in json.dumps(answer.get("result", {}))
        assert answer["error"]["code"] == -32010, answer
    assert seen == [], "a limited key's task request reached the upstream"
    r = await gw.proxy.post("/mcp/tools", json=asks[0], headers={**ACCEPT, **bearer(victim)})
    assert SECRET in await r.text()  # the victim's own tasks still work
