"""A client that hangs up right after its answer costs no upstream connection (issue 19 §4).

The SDK's client closes each POST's SSE answer as soon as the result event is in, before
the end of the body. Closing is cancellation (MCP 2026-07-28) — but once the answer is
out there is nothing left to cancel, so the sidecar lets the upstream end its stream
and keeps the connection. A client that leaves *before* its answer still closes the
upstream request at once. A stream of one answer goes out as JSON as soon as that answer
is in, without waiting for the stream's end, which is read afterwards.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config, log_lines

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
PEERS = web.AppKey("peers", list)
GONE = web.AppKey("gone", list)
HOLD = web.AppKey("hold", asyncio.Event)  # set: the streams may end
ENDED = web.AppKey("ended", list)


def upstream_app() -> web.Application:
    """Answers each POST with one SSE event, then ends the stream a moment later (``X-Delay`` before the answer,
    ``X-Progress``: a notification first, ``X-Hold``: the end waits for ``HOLD``)."""
    app = web.Application()
    app[PEERS], app[GONE], app[ENDED] = [], [], []
    app[HOLD] = asyncio.Event()

    async def post(request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        assert request.transport is not None
        request.app[PEERS].append(request.transport.get_extra_info("peername")[1])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await asyncio.sleep(float(request.headers.get("X-Delay", "0")))
            if request.headers.get("X-Progress"):
                note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}}
                await resp.write(b"event: message\ndata: " + json.dumps(note).encode() + b"\n\n")
            answer = {"jsonrpc": "2.0", "id": msg["id"], "result": {"content": []}}
            await resp.write(b"event: message\ndata: " + json.dumps(answer, separators=(",", ":")).encode() + b"\n\n")
            if request.headers.get("X-Hold"):
                await request.app[HOLD].wait()
            else:
                await asyncio.sleep(0.02)  # the end comes after the answer, as the SDK's server sends it
            await resp.write(b": after the answer\n\n")  # read and dropped once the answer is out
            request.app[ENDED].append(msg["id"])
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            request.app[GONE].append(msg["id"])
            raise
        return resp

    app.router.add_post("/mcp", post)
    return app


async def setup(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> tuple[Running, TestServer, str]:
    up: TestServer = await aiohttp_server(upstream_app())  # handler_cancellation is on in test servers
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/tools"}]
    gw = await make_sidecar(cfg)
    _, key = await gw.create_key(name="agent")
    return gw, up, key


async def hang_up_after_answer(gw: Running, key: str, rid: int, delay: float = 0) -> None:
    """Read until the answer event is in, then close the connection (what the SDK's client does)."""
    url = gw.proxy.make_url("/mcp/tools")
    body = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": "x", "arguments": {}}}
    headers = {**ACCEPT, "Authorization": f"Bearer {key}", "X-Delay": str(delay), "X-Progress": "1"}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"  # two events: streamed as they come
        got = b""
        while got.count(b"\n\n") < 2:
            got += await r.content.readany()
        assert json.loads(got.split(b"data: ")[2])["id"] == rid
        r.close()  # before the end of the body


async def ended(gw: Running) -> None:
    """Poll (with a deadline) until the answered stream's end is read and its connection back in the pool."""
    deadline = asyncio.get_running_loop().time() + 2
    while len(gw.sc.pools["tools"]._idle) != 1:
        assert asyncio.get_running_loop().time() < deadline, "an answered stream never ended"
        await asyncio.sleep(0.005)


async def test_the_upstream_connection_outlives_a_client_that_left_after_its_answer(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    gw, up, key = await setup(make_sidecar, aiohttp_server, tmp_path)
    for rid in range(1, 6):
        await hang_up_after_answer(gw, key, rid)
        await log_lines(Path(gw.config.log.access or ""), want=rid)  # the sidecar is done with the request
        await ended(gw)  # the stream's end (20 ms behind its answer) was read and the connection kept
    assert up.app[GONE] == []  # no answered stream was cut
    assert len(set(up.app[PEERS])) == 1  # one upstream connection served every call


async def test_a_client_that_leaves_before_its_answer_still_cancels_at_once(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    gw, up, key = await setup(make_sidecar, aiohttp_server, tmp_path)
    url = gw.proxy.make_url("/mcp/tools")
    body = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "x", "arguments": {}}}
    headers = {**ACCEPT, "Authorization": f"Bearer {key}", "X-Delay": "5"}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as r:
        assert r.status == 200
        r.close()  # the tool is still running: this is cancellation
    deadline = asyncio.get_running_loop().time() + 2
    while up.app[GONE] != [9]:
        assert asyncio.get_running_loop().time() < deadline, "the upstream request was not closed"
        await asyncio.sleep(0.01)


async def test_a_one_answer_stream_goes_out_as_json_before_its_end_and_keeps_the_connection(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    gw, up, key = await setup(make_sidecar, aiohttp_server, tmp_path)
    url = gw.proxy.make_url("/mcp/tools")
    headers = {**ACCEPT, "Authorization": f"Bearer {key}", "X-Hold": "1"}
    async with aiohttp.ClientSession() as http:
        for rid in range(1, 4):
            up.app[HOLD].clear()
            body = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": "x", "arguments": {}}}
            async with http.post(url, json=body, headers=headers) as r:
                assert r.status == 200 and r.content_type == "application/json"
                assert await r.json() == {"jsonrpc": "2.0", "id": rid, "result": {"content": []}}
            assert up.app[ENDED] == list(range(1, rid))  # the client had its answer; the stream is still open
            up.app[HOLD].set()
            deadline = asyncio.get_running_loop().time() + 2
            while len(gw.sc.pools["tools"]._idle) != 1:  # the end is read, the connection back in the pool
                assert asyncio.get_running_loop().time() < deadline, "the answered stream's connection was not kept"
                await asyncio.sleep(0.005)
    assert up.app[ENDED] == [1, 2, 3]
    assert up.app[GONE] == []  # no answered stream was cut
    assert len(set(up.app[PEERS])) == 1  # one upstream connection served every call


async def test_an_answered_stream_that_does_not_end_is_closed(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    gw, up, key = await setup(make_sidecar, aiohttp_server, tmp_path)
    url = gw.proxy.make_url("/mcp/tools")
    headers = {**ACCEPT, "Authorization": f"Bearer {key}", "X-Hold": "1"}
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "x", "arguments": {}}}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as r:
        assert await r.json() == {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}
    deadline = asyncio.get_running_loop().time() + 2
    while up.app[GONE] != [7]:  # END_WAIT (0.1 s) later the upstream request is closed
        assert asyncio.get_running_loop().time() < deadline, "an answered stream that never ends was kept open"
        await asyncio.sleep(0.01)
    assert not gw.sc.pools["tools"]._idle  # and its connection not reused
