"""A client that hangs up right after its answer costs no upstream connection (issue 19 §4).

The SDK's client closes each POST's SSE answer as soon as the result event is in, before
the end of the body. Closing is cancellation (MCP 2026-07-28) — but once the answer is
out there is nothing left to cancel, so the sidecar lets the upstream end its stream
and keeps the connection. A client that leaves *before* its answer still closes the
upstream request at once.
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


def upstream_app() -> web.Application:
    """Answers each POST with one SSE event, then ends the stream a moment later (``X-Delay`` before the answer)."""
    app = web.Application()
    app[PEERS], app[GONE] = [], []

    async def post(request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        assert request.transport is not None
        request.app[PEERS].append(request.transport.get_extra_info("peername")[1])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await asyncio.sleep(float(request.headers.get("X-Delay", "0")))
            answer = {"jsonrpc": "2.0", "id": msg["id"], "result": {"content": []}}
            await resp.write(b"event: message\ndata: " + json.dumps(answer, separators=(",", ":")).encode() + b"\n\n")
            await asyncio.sleep(0.02)  # the end comes after the answer, as the SDK's server sends it
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
    headers = {**ACCEPT, "Authorization": f"Bearer {key}", "X-Delay": str(delay)}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as r:
        assert r.status == 200
        got = b""
        while b"\n\n" not in got:
            got += await r.content.readany()
        assert json.loads(got.split(b"data: ", 1)[1])["id"] == rid
        r.close()  # before the end of the body


async def ended(gw: Running) -> None:
    """Poll (with a deadline) until the sidecar holds no answered stream waiting for its end."""
    deadline = asyncio.get_running_loop().time() + 2
    await asyncio.sleep(0)
    while gw.sc.forwarder._ending:
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
