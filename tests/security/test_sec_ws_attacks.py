"""Attacks on the websocket relay by a client holding a valid, restricted key (invariants 1, 2, 8).

On an MCP route, a websocket's frames (and a body on any method but POST) went up unjudged:
a key allowed tool ``search`` only called any tool through them. Such requests are now
refused for a key with MCP limits (403, refunded).

A handshake the sidecar's own websocket server then refuses (no ``Connection: Upgrade``, an
unknown ``Sec-WebSocket-Version``, no ``Sec-WebSocket-Key``) used to be connected upstream
first and then answered with aiohttp's plain-text 400 ("No CONNECTION upgrade hdr"): the
upstream heard a handshake nobody completed, and the client got an undesigned error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config
from test_sec_upgrade import raw

WS_PATH = "/:/websockets/notifications"


def ws_upstream(seen: list[dict[str, str]]) -> web.Application:
    """A notifications websocket that offers subprotocol ``chat`` and leaks its token in every frame kind."""

    async def notifications(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        ws = web.WebSocketResponse(protocols=("chat",), autoping=False)
        await ws.prepare(request)
        await ws.send_str(f"token {PLEX_TOKEN}")
        await ws.send_bytes(b"\x00" + PLEX_TOKEN.encode() + b"\x01")
        await ws.ping(PLEX_TOKEN.encode())
        await ws.close(code=4000, message=PLEX_TOKEN.encode())
        return ws

    app = web.Application()
    app.router.add_route("GET", WS_PATH, notifications)
    return app


def handshake(key: str, conn: str = "Connection: Upgrade\r\n", version: str = "13", extra: str = "") -> bytes:
    nonce = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {WS_PATH}?X-Plex-Token={key} HTTP/1.1\r\nHost: x\r\n{conn}Upgrade: websocket\r\n"
        f"Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {nonce}\r\n{extra}\r\n"
    ).encode()


async def start(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> tuple[Running, list[dict[str, str]]]:
    seen: list[dict[str, str]] = []
    up = await aiohttp_server(ws_upstream(seen))
    return await make_sidecar(base_config(str(up.make_url("")).rstrip("/"), tmp_path)), seen


async def test_a_malformed_handshake_is_a_designed_400_before_the_upstream(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """No ``Connection: Upgrade``, version 99, no nonce: the client gets the JSON ``bad_request``, the upstream
    nothing."""
    running, seen = await start(make_sidecar, aiohttp_server, tmp_path)
    _, key = await running.create_key()
    no_nonce = handshake(key).replace(b"Sec-WebSocket-Key:", b"X-Nothing:")
    for request in (handshake(key, conn=""), handshake(key, version="99"), no_nonce):
        answer = await raw(running, request)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "bad_request", body
    assert seen == [], "the upstream must not hear a handshake the sidecar then refuses"


async def test_connection_keep_alive_upgrade_and_a_second_upgrade_header_still_relay_scrubbed(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """``Connection: keep-alive, Upgrade`` (Firefox) and ``Upgrade: h2c`` added: a 101 whose frames carry the key,
    never the token, in text, binary, ping and close (same-length mask in control frames)."""
    running, seen = await start(make_sidecar, aiohttp_server, tmp_path)
    _, key = await running.create_key()
    for request in (
        handshake(key, conn="Connection: keep-alive, Upgrade\r\n"),
        handshake(key, extra="Upgrade: h2c\r\n"),
    ):
        answer = await raw(running, request)
        assert answer.startswith(b"HTTP/1.1 101"), answer[:300]
    async with running.proxy.ws_connect(WS_PATH, headers={"X-Plex-Token": key}, autoping=False) as ws:
        frames = [await ws.receive() for _ in range(4)]
    assert [f.type for f in frames] == [
        aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.PING, aiohttp.WSMsgType.CLOSE,
    ]  # fmt: skip
    assert frames[0].data == f"token {key}"
    assert PLEX_TOKEN.encode() not in frames[1].data and PLEX_TOKEN.encode() not in frames[2].data
    assert frames[2].data == b"*" * len(PLEX_TOKEN)
    assert frames[3].data == 4000 and frames[3].extra == "*" * len(PLEX_TOKEN)
    assert len(seen) == 3


async def test_a_subprotocol_carrying_the_key_never_reaches_the_upstream(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """``Sec-WebSocket-Protocol: chat, <key>``: the header is dropped going up (never rewritten to the token)."""
    running, seen = await start(make_sidecar, aiohttp_server, tmp_path)
    _, key = await running.create_key()
    answer = await raw(running, handshake(key, extra=f"Sec-WebSocket-Protocol: chat, {key}\r\n"))
    assert answer.startswith(b"HTTP/1.1 101"), answer[:300]
    assert key.encode() not in answer.partition(b"\r\n\r\n")[0]
    assert len(seen) == 1 and "Sec-WebSocket-Protocol" not in seen[0]
    assert key not in json.dumps(seen[0])


async def test_a_key_without_the_websocket_path_is_refused_before_the_upgrade(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A key allowed ``/library*`` only: 403 ``insufficient_permissions``, never a 101; the upstream hears nothing."""
    running, seen = await start(make_sidecar, aiohttp_server, tmp_path)
    _, key = await running.create_key(permissions={"upstreams": ["plex"], "paths": ["/library*"]})
    answer = await raw(running, handshake(key))
    assert answer.startswith(b"HTTP/1.1 403"), answer[:300]
    assert b'"insufficient_permissions"' in answer
    assert seen == []


async def test_an_upstream_that_never_completes_the_handshake_is_a_504_and_frees_the_slot(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The upstream takes the handshake and never answers: the client gets 504 ``upstream_timeout`` after the
    read timeout, and a key limited to one connection at a time can connect again at once."""
    stalled = asyncio.Event()

    async def never(request: web.Request) -> web.StreamResponse:
        stalled.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get(WS_PATH, never)
    up = await aiohttp_server(app)
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"][0]["timeouts"] = {"read": "300ms"}
    running = await make_sidecar(cfg)
    _, key = await running.create_key(concurrency=1)
    for _ in range(2):
        answer = await raw(running, handshake(key))
        assert answer.startswith(b"HTTP/1.1 504"), answer[:300]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "upstream_timeout"
    assert stalled.is_set()


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One unmasked server frame (payloads under 126 bytes)."""
    assert len(payload) < 126
    return bytes([(0x80 if fin else 0) | opcode, len(payload)]) + payload


async def test_a_token_split_across_fragments_is_scrubbed(
    make_sidecar: MakeSidecar, unused_tcp_port_factory: Any, tmp_path: Path
) -> None:
    """A raw upstream splits its token across a text message's fragments (a ping between them) and across a
    binary message's: the client sees the key in the text, no token bytes in the binary, a masked ping."""
    half = len(PLEX_TOKEN) // 2
    head, tail = PLEX_TOKEN[:half].encode(), PLEX_TOKEN[half:].encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        lines = request.split(b"\r\n")
        nonce = next(line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(nonce + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip
        writer.write(_frame(0x1, b"token " + head, fin=False) + _frame(0x9, PLEX_TOKEN.encode())
                     + _frame(0x0, tail + b" end"))  # fmt: skip
        writer.write(_frame(0x2, b"\x00" + head, fin=False) + _frame(0x0, tail + b"\x01"))
        writer.write(_frame(0x8, b"\x03\xe8"))
        await writer.drain()
        with contextlib.suppress(Exception):
            await reader.read(1024)
        writer.close()

    port = unused_tcp_port_factory()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        running = await make_sidecar(base_config(f"http://127.0.0.1:{port}", tmp_path))
        _, key = await running.create_key()
        async with running.proxy.ws_connect(WS_PATH, headers={"X-Plex-Token": key}, autoping=False) as ws:
            frames = [await ws.receive(timeout=5) for _ in range(3)]
    finally:
        server.close()
        await server.wait_closed()
    kinds = [f.type for f in frames]
    ping = frames[kinds.index(aiohttp.WSMsgType.PING)]
    text = frames[kinds.index(aiohttp.WSMsgType.TEXT)]
    binary = frames[kinds.index(aiohttp.WSMsgType.BINARY)]
    assert ping.data == b"*" * len(PLEX_TOKEN)
    assert text.data == f"token {key} end"
    assert PLEX_TOKEN.encode() not in binary.data and head not in binary.data


def mcp_ws_app(calls: list[str]) -> web.Application:
    """An MCP server that also speaks JSON-RPC over a websocket (as the SDK's websocket transport does)."""

    async def ws(request: web.Request) -> web.StreamResponse:
        sock = web.WebSocketResponse(protocols=("mcp",))
        await sock.prepare(request)
        async for msg in sock:
            rpc = json.loads(msg.data)
            if rpc.get("method") == "tools/call":
                calls.append(rpc["params"]["name"])
            await sock.send_str(json.dumps({"jsonrpc": "2.0", "id": rpc.get("id"), "result": {"content": []}}))
        return sock

    app = web.Application()
    app.router.add_get("/mcp/ws", ws)
    return app


async def test_a_websocket_cannot_carry_mcp_calls_past_a_keys_tool_list(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A key allowed tool ``search`` only opens a websocket on the MCP route and sends ``tools/call delete``:
    frames going up are never judged, so the upgrade is refused (403, spending nothing) for a key whose tools,
    resources or prompts are restricted. A key without such limits still gets its websocket."""
    calls: list[str] = []
    up = await aiohttp_server(mcp_ws_app(calls))
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/tools"}]
    running = await make_sidecar(cfg)
    _, limited = await running.create_key(permissions={"upstreams": ["tools"], "tools": {"tools": ["search"]}},
                                          rate_limits=["1/hour"])  # fmt: skip
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete", "arguments": {}}}
    for _ in range(3):
        with contextlib.suppress(aiohttp.WSServerHandshakeError):
            async with running.proxy.ws_connect("/mcp/tools/ws", headers={"Authorization": f"Bearer {limited}"}) as ws:
                await ws.send_str(json.dumps(call))
                await ws.receive(timeout=5)
    assert calls == [], "a restricted key's tools/call went up a websocket unjudged"
    r = await running.proxy.get("/mcp/tools/ws", headers={"Authorization": f"Bearer {limited}", "Upgrade": "websocket",
                                                          "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                                                          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})  # fmt: skip
    assert r.status == 403 and (await r.json())["error"]["code"] == "insufficient_permissions"
    _, free = await running.create_key(permissions={"upstreams": ["tools"]})
    async with running.proxy.ws_connect("/mcp/tools/ws", headers={"Authorization": f"Bearer {free}"}) as ws:
        await ws.send_str(json.dumps(call))
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT
    assert calls == ["delete"]


def mcp_any_method_app(calls: list[tuple[str, str]]) -> web.Application:
    """An MCP server that takes a JSON-RPC body on any method (``app.all("/mcp")`` in an express server)."""

    async def any_method(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        rpc = json.loads(raw) if raw else {}
        if rpc.get("method") == "tools/call":
            calls.append((request.method, rpc["params"]["name"]))
        return web.json_response({"jsonrpc": "2.0", "id": rpc.get("id"), "result": {"content": []}})

    app = web.Application()
    app.router.add_route("*", "/mcp", any_method)
    return app


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_a_body_on_another_method_cannot_carry_mcp_calls_past_a_keys_tool_list(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, method: str
) -> None:
    """The same key sends ``tools/call delete`` as the body of a PUT, PATCH or DELETE: only POST bodies are judged,
    so for a restricted key a body on any other method is refused (403) and never reaches the upstream."""
    calls: list[tuple[str, str]] = []
    up = await aiohttp_server(mcp_any_method_app(calls))
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/tools"}]
    running = await make_sidecar(cfg)
    _, limited = await running.create_key(permissions={"upstreams": ["tools"], "tools": {"tools": ["search"]}})
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete", "arguments": {}}}
    headers = {"Authorization": f"Bearer {limited}", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}  # fmt: skip
    r = await running.proxy.request(method, "/mcp/tools", data=json.dumps(call), headers=headers)
    assert r.status in (400, 403, 405), (r.status, await r.text())
    assert "code" in (await r.json())["error"]
    assert calls == [], "a restricted key's tools/call went up unjudged"
    r = await running.proxy.request(method, "/mcp/tools", headers=headers)  # no body: nothing to judge, passes
    assert r.status == 200
