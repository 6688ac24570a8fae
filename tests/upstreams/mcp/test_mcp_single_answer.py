"""A finished SSE stream of one answer goes out as that answer in JSON (issue 19 §4).

MCP lets a server answer a POST with an event stream or one JSON object. The SDK's client
stops reading an SSE answer at its result event and so loses its connection on every call;
a JSON body it reads to the end. When the stream has ended by the time its headers are in
(give or take ``WHOLE_WAIT``) and holds exactly one answer to the request, the client gets
that answer's bytes as ``application/json``. Anything else stays a stream, event by event.
Also: POST bodies read through orjson only where it reads what ``json.loads`` reads.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config
from mcp_server import MCP_TOKEN, McpUpstream

from sidecar.http import whole
from sidecar.http.listener import GuardedHandler
from sidecar.upstreams.mcp.response import single_answer

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
ANSWER = b'{"jsonrpc":"2.0","id":%s,"result":{"content":[],"big":123456789012345678901234567890}}'


def events(mode: str, rid: Any) -> list[bytes]:
    """What the upstream streams for ``mode`` (each element one write)."""
    answer = ANSWER % json.dumps(rid).encode()
    progress = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
    return {
        "one": [b"event: message\r\nid: 7\r\ndata: " + answer + b"\r\n\r\n"],
        "progress": [progress, b"event: message\ndata: " + answer + b"\n\n"],
        "other-id": [b"event: message\ndata: " + ANSWER % b'"elsewhere"' + b"\n\n"],
        "split-data": [b"event: message\ndata: " + answer[:10] + b"\ndata: " + answer[10:] + b"\n\n"],
        "other-event": [b"event: custom\ndata: " + answer + b"\n\n"],
    }[mode]


def upstream_app() -> web.Application:
    app = web.Application()

    async def post(request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in events(request.headers["X-Mode"], msg["id"]):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    app.router.add_post("/mcp", post)
    return app


@pytest.fixture
async def setup(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> tuple[Running, str]:
    up: TestServer = await aiohttp_server(upstream_app())
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/tools"}]
    gw = await make_sidecar(cfg)
    _, key = await gw.create_key(name="agent")
    return gw, key


async def post(gw: Running, key: str, mode: str, rid: Any = 3, accept: str | None = None) -> tuple[str, bytes]:
    body = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": "x", "arguments": {}}}
    headers = {**ACCEPT, "Authorization": f"Bearer {key}", "X-Mode": mode}
    if accept is not None:
        headers["Accept"] = accept
    async with aiohttp.ClientSession() as http, http.post(gw.proxy.make_url("/mcp/tools"), json=body,
                                                          headers=headers) as r:  # fmt: skip
        assert r.status == 200
        return r.content_type, await asyncio.wait_for(r.read(), 5)


@pytest.mark.parametrize("rid", [3, "req-3"])
async def test_a_finished_one_answer_stream_is_its_answer_byte_for_byte(setup: tuple[Running, str], rid: Any) -> None:
    gw, key = setup
    ctype, body = await post(gw, key, "one", rid)
    assert ctype == "application/json"
    assert body == ANSWER % json.dumps(rid).encode()  # not re-serialised: the big integer stays as sent


async def test_a_client_that_takes_only_event_streams_gets_one(setup: tuple[Running, str]) -> None:
    """The JSON form is only for a client whose Accept names application/json (MCP clients send both)."""
    gw, key = setup
    ctype, body = await post(gw, key, "one", accept="text/event-stream")
    assert ctype == "text/event-stream"
    lines = body.replace(b"\r\n", b"\n").split(b"\n")
    assert lines[1].startswith(b"id: ") and lines[1] != b"id: 7"  # the event id leaves sealed (eventids.py)
    del lines[1]
    assert lines == b"".join(events("one", 3)).replace(b"\r\n", b"\n").replace(b"id: 7\n", b"").split(b"\n")


@pytest.mark.parametrize("mode", ["progress", "other-id", "split-data", "other-event"])
async def test_anything_else_stays_an_event_stream(setup: tuple[Running, str], mode: str) -> None:
    gw, key = setup
    ctype, body = await post(gw, key, mode)
    assert ctype == "text/event-stream"
    assert body.replace(b"\r\n", b"\n") == b"".join(events(mode, 3)).replace(b"\r\n", b"\n")


def test_only_the_answer_to_the_request_is_taken() -> None:
    take = single_answer(1)
    assert take is not None and single_answer(None) is None
    assert take(b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n') == b'{"jsonrpc":"2.0","id":1,"result":{}}'
    assert take(b'data:{"jsonrpc":"2.0","id":1,"error":{"code":1}}\n\n') is not None
    assert take(b'data: {"jsonrpc":"2.0","id":"1","result":{}}\n\n') is None  # "1" is not 1
    assert take(b'data: {"jsonrpc":"2.0","id":1.0,"result":{}}\n\n') is None
    assert take(b'data: {"jsonrpc":"2.0","id":1,"method":"x","result":{}}\n\n') is None
    assert take(b'data: {"jsonrpc":"2.0","id":1}\n\n') is None
    assert take(b"data: [1]\n\n") is None and take(b"data: {nope\n\n") is None and take(b": ping\n\n") is None
    assert take(b'id: 1\ndata:\n\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n') is None  # a priming event too


def test_answers_in_any_spelling_are_checked_by_parsing() -> None:
    """The compact ``{"jsonrpc":"2.0","id":…,"result":`` start is the fast path; other spellings are parsed."""
    take = single_answer(5)
    assert take is not None
    spaced = b'{"jsonrpc": "2.0", "id": 5, "result": {}}'
    assert take(b"data: " + spaced + b"\n\n") == spaced
    assert take(b'data: {"id": 5, "jsonrpc": "2.0", "result": {}, "method": "x"}\n\n') is None
    huge = single_answer(2**70)  # read back as a float by orjson: the stream stays a stream
    assert huge is not None and huge(b'data: {"jsonrpc":"2.0","id":%d,"result":{}}\n\n' % 2**70) is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id":%d}' % 2**70, b'{"id":-9999999999999999999}', b'{"id":9223372036854775807}', b'{"a":NaN,"b":1e400}',
        b'{"a":"\\ud800"}', b"\xef\xbb\xbf{}", '{"a":"é"}'.encode("utf-16"), b'{"a":1,"a":2}',
        b"[" * 3000 + b"]" * 3000, b'{"a":0.1,"b":-0.0,"c":1E5}',
    ],
)  # fmt: skip
def test_bodies_are_read_as_the_standard_library_reads_them(raw: bytes) -> None:
    """What the gateway judges is the tree ``json.loads`` (and so the upstream) makes, orjson or not."""
    from sidecar.upstreams.mcp.jsonrpc import loads_exact

    try:
        want: Any = json.loads(raw)
    except (ValueError, RecursionError) as e:
        with pytest.raises(type(e)):
            loads_exact(raw)
        return
    got = loads_exact(raw)
    assert repr(got) == repr(want) and json.dumps(got) == json.dumps(want)


async def test_the_sdk_client_keeps_its_connection_to_the_sidecar(
    make_sidecar: MakeSidecar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten calls of the SDK's ClientSession through the sidecar to the SDK's server: a few connections, not ten."""
    import httpx2
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    accepted: list[object] = []
    made = GuardedHandler.connection_made

    def counting(self: GuardedHandler, transport: asyncio.BaseTransport) -> None:
        accepted.append(transport)
        made(self, transport)

    monkeypatch.setattr(GuardedHandler, "connection_made", counting)
    # This upstream is a thread of the test's own process: its stream's end waits for the GIL,
    # often longer than the 5 ms a separate server needs.
    monkeypatch.setattr(whole, "WHOLE_WAIT", 1.0)
    up = McpUpstream().start()
    try:
        cfg = base_config(up.url, tmp_path)
        cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"{up.url}/mcp", "path_prefix": "/mcp/tools",
                             "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}}]  # fmt: skip
        gw = await make_sidecar(cfg, extra_env={"MCP_TOKEN": MCP_TOKEN})
        _, key = await gw.create_key(name="agent")
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http,
            streamable_http_client(str(gw.proxy.make_url("/mcp/tools")), http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            before = len(accepted)
            for i in range(10):
                found = await session.call_tool("search", {"query": f"q{i}"})
                assert found.content[0].text == f"results for q{i}"  # type: ignore[union-attr]
            assert len(accepted) - before <= 2  # a stream still open after WHOLE_WAIT may cost one
    finally:
        await up.stop()
