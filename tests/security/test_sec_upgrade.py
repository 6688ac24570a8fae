"""Method confusion on websocket upgrade (issue 20.4, invariant 2).

A key allowed only ``POST /:/websockets/*`` sent ``POST`` with ``Upgrade: websocket`` and
got a 101 and the notification stream, while the upstream saw a ``GET`` (with a
``Content-Length`` and no body). The handshake the upstream receives is a GET, so only a
GET may be upgraded: anything else is a 400 before the upstream hears of it.
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

from aiohttp import web
from conftest import MakeSidecar, Running, base_config

WS_PATH = "/:/websockets/notifications"


def ws_upstream(seen: list[tuple[str, dict[str, str]]]) -> web.Application:
    """Answers any method on the notifications path with a websocket that says hello."""

    async def notifications(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, dict(request.headers)))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("notification for whoever got here")
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_route("*", WS_PATH, notifications)
    return app


async def raw(running: Running, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; the answer's head (and body, when it has a length)."""
    server = running.proxy.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(2.0):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            return head + await reader.readexactly(length)
    finally:
        writer.close()


def upgrade(method: str, key: str, extra: str = "", body: bytes = b"") -> bytes:
    nonce = base64.b64encode(os.urandom(16)).decode()
    return (
        f"{method} {WS_PATH}?X-Plex-Token={key} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {nonce}\r\n{extra}\r\n"
    ).encode() + body


async def start(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> tuple[Running, list[Any]]:
    seen: list[tuple[str, dict[str, str]]] = []
    up = await aiohttp_server(ws_upstream(seen))
    running = await make_sidecar(base_config(str(up.make_url("")).rstrip("/"), tmp_path))
    return running, seen


async def test_post_upgrade_by_a_post_only_key_is_refused(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    running, seen = await start(make_sidecar, aiohttp_server, tmp_path)
    _, post_only = await running.create_key(
        permissions={"upstreams": ["plex"], "methods": ["POST"], "paths": [WS_PATH]}
    )
    for extra, body in (("", b""), ("Content-Length: 0\r\n", b""), ("Content-Length: 5\r\n", b"hello")):
        answer = await raw(running, upgrade("POST", post_only, extra, body))
        assert answer.startswith(b"HTTP/1.1 400"), f"the client must get 400, not a stream: {answer[:200]!r}"
        assert b'"bad_request"' in answer and b"notification" not in answer
    assert seen == [], "the upstream must never see a handshake the key was not authorised for"


async def test_other_methods_and_bodies_cannot_be_upgraded(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    running, seen = await start(make_sidecar, aiohttp_server, tmp_path)
    _, key = await running.create_key()  # may do anything: the refusal is about the request's shape
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        answer = await raw(running, upgrade(method, key))
        assert answer.startswith(b"HTTP/1.1 400"), (method, answer[:200])
    answer = await raw(running, upgrade("GET", key, "Content-Length: 5\r\n", b"hello"))
    assert answer.startswith(b"HTTP/1.1 400"), f"a GET handshake with a body is refused: {answer[:200]!r}"
    assert seen == []


async def test_get_upgrade_still_works_and_sends_no_content_length(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    running, seen = await start(make_sidecar, aiohttp_server, tmp_path)
    _, get_only = await running.create_key(permissions={"upstreams": ["plex"], "methods": ["GET"], "paths": [WS_PATH]})
    answer = await raw(running, upgrade("GET", get_only, "Content-Length: 0\r\n"))
    assert answer.startswith(b"HTTP/1.1 101"), answer[:200]
    assert [m for m, _ in seen] == ["GET"]
    assert "Content-Length" not in seen[0][1], "a handshake carries no body, so no Content-Length goes up"
