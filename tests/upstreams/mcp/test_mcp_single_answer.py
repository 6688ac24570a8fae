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
import contextlib
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
        "big": [b"event: message\ndata: " + b"x" * 200_000, b"\n\n"],  # past SMALL_BODY before its event ends
    }[mode]


GATE = web.AppKey("gate", asyncio.Event)  # a "gated-" mode's last event waits for it
ARRIVED = web.AppKey("arrived", list[web.Request])  # the requests the upstream got, in order


def upstream_app() -> web.Application:
    """``X-Mode``: one of ``events``' modes; ``slow-M``: M after 50 ms at work (its headers sent at
    once, as the SDK's server does); ``gated-M``: M's last event only once the test opens the gate."""
    app = web.Application()
    app[GATE] = asyncio.Event()
    app[ARRIVED] = []

    async def post(request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        request.app[ARRIVED].append(request)
        mode = request.headers["X-Mode"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)  # a StreamResponse sends its headers now
        chunks = events(mode.removeprefix("slow-").removeprefix("gated-"), msg["id"])
        if mode.startswith("slow-"):
            await asyncio.sleep(0.05)  # the tool at work
        for i, chunk in enumerate(chunks):
            if mode.startswith("gated-") and i == len(chunks) - 1:
                await request.app[GATE].wait()
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    app.router.add_post("/mcp", post)
    return app


@pytest.fixture
async def upstream(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(upstream_app())
    return server


@pytest.fixture
async def setup(make_sidecar: MakeSidecar, upstream: TestServer, tmp_path: Path) -> tuple[Running, str]:
    up = upstream
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


async def test_an_answer_that_comes_after_its_headers_still_goes_out_whole(setup: tuple[Running, str]) -> None:
    """A tool at work: the server sends its stream's headers at once and the answer 50 ms later. The
    client gets that answer as JSON with a length (it was a stream when the wait ended after 5 ms)."""
    gw, key = setup
    ctype, body = await post(gw, key, "slow-one")
    assert ctype == "application/json"
    assert body == ANSWER % b"3"


def _headers(key: str, mode: str) -> dict[str, str]:
    return {**ACCEPT, "Authorization": f"Bearer {key}", "X-Mode": mode}


CALL = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "x", "arguments": {}}}


async def test_progress_goes_out_while_the_answer_is_still_awaited(
    setup: tuple[Running, str], upstream: TestServer
) -> None:
    """Holding the headers for the answer never holds an event: the progress notification reaches the
    client while the server has not even sent the answer (the gate is still closed)."""
    gw, key = setup
    gate = upstream.app[GATE]
    async with aiohttp.ClientSession() as http:
        r = await http.post(gw.proxy.make_url("/mcp/tools"), json=CALL, headers=_headers(key, "gated-progress"))
        assert r.status == 200 and r.content_type == "text/event-stream"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert b"notifications/progress" in first and not gate.is_set()
        gate.set()
        rest = await asyncio.wait_for(r.read(), 5)
        assert (ANSWER % b"3") in rest


async def test_headers_are_held_for_the_first_event_a_bounded_time(
    setup: tuple[Running, str], upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool that takes longer than ``FIRST_EVENT_WAIT``: the stream's headers go out then (so the
    stream is watched for revocation), and the answer follows as an event when it comes."""
    monkeypatch.setattr(whole, "FIRST_EVENT_WAIT", 0.05)
    gw, key = setup
    gate = upstream.app[GATE]
    async with aiohttp.ClientSession() as http:
        r = await asyncio.wait_for(
            http.post(gw.proxy.make_url("/mcp/tools"), json=CALL, headers=_headers(key, "gated-one")), 5
        )
        assert r.status == 200 and r.content_type == "text/event-stream" and not gate.is_set()
        gate.set()
        body = await asyncio.wait_for(r.read(), 5)
        assert (ANSWER % b"3") in body


async def test_a_client_that_leaves_while_the_answer_is_awaited_closes_the_upstream_request(
    setup: tuple[Running, str], upstream: TestServer
) -> None:
    """Closing the response is cancellation (DESIGN, MCP), also while the headers are held: the
    client gives up on its call, and the upstream's connection for it is closed at once."""
    gw, key = setup
    arrived = upstream.app[ARRIVED]
    async with aiohttp.ClientSession() as http:
        call = asyncio.create_task(
            http.post(gw.proxy.make_url("/mcp/tools"), json=CALL, headers=_headers(key, "gated-one"))
        )
        deadline = asyncio.get_running_loop().time() + 5
        while not arrived:
            assert asyncio.get_running_loop().time() < deadline, "the call never reached the upstream"
            await asyncio.sleep(0.01)
        call.cancel()  # the client's connection is closed with it
        with contextlib.suppress(asyncio.CancelledError):
            await call
    transport = arrived[0].transport
    while transport is not None and not transport.is_closing():
        assert asyncio.get_running_loop().time() < deadline + 1, "the upstream request was left open"
        await asyncio.sleep(0.01)
    assert not upstream.app[GATE].is_set()  # well before the tool would have answered


async def test_a_first_event_past_the_small_body_size_is_streamed_not_held(
    setup: tuple[Running, str], upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile or chatty upstream sends 200 KB of one unfinished event: the wait for a whole answer
    stops at ``SMALL_BODY`` bytes (memory stays bounded) and the stream goes out, however long the
    event takes to end (``FIRST_EVENT_WAIT`` raised so that only the size can end the wait)."""
    monkeypatch.setattr(whole, "FIRST_EVENT_WAIT", 60.0)
    gw, key = setup
    gate = upstream.app[GATE]
    async with aiohttp.ClientSession() as http:
        r = await asyncio.wait_for(
            http.post(gw.proxy.make_url("/mcp/tools"), json=CALL, headers=_headers(key, "gated-big")), 5
        )
        assert r.status == 200 and r.content_type == "text/event-stream" and not gate.is_set()
        gate.set()
        body = await asyncio.wait_for(r.read(), 5)
        assert body.endswith(b"x" * 1000 + b"\n\n")


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
