"""Revocation and expiry end open streams (issue 14.8, invariant 5).

A revoked key's websocket kept relaying. Now every open websocket, event stream and
long download of a key ends within a sweep (``keys.stream_check_interval``, 1 s by
default, 0.1 s here) of the revocation reaching the key table: websockets with close code
1008, streams and downloads by cutting the connection before the body is complete. Each
ending is logged (``sidecar.streams``), counted in ``sidecar_streams_closed_total{reason}``
and marked ``key_revoked``/``key_expired`` in the request's access-log line. The bound
asserted is the contract's 5 s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config, log_lines

BOUND = 5.0  # DESIGN invariant 5
TOTAL = 64 * 1024 * 1024
ENDLESS = 1 << 40  # more than any buffer on the way holds (loopback buffers alone take tens of MiB)


def streaming_upstream() -> web.Application:
    """A websocket, an SSE stream and a slow 64 MiB download that never end by themselves."""

    async def ws(request: web.Request) -> web.StreamResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        n = 0
        while not sock.closed:
            await sock.send_str(f"tick {n}")
            n += 1
            try:
                msg = await sock.receive(timeout=0.05)
            except TimeoutError:
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                break
        return sock

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n in range(10_000):
            await resp.write(f"data: {n}\n\n".encode())
            await asyncio.sleep(0.05)
        return resp

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4", "Content-Length": str(TOTAL)})
        await resp.prepare(request)
        chunk = b"\0" * 65536
        for _ in range(TOTAL // len(chunk)):
            await resp.write(chunk)
            await asyncio.sleep(0.02)
        return resp

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4", "Content-Length": str(ENDLESS)})
        await resp.prepare(request)
        chunk = b"\0" * 65536
        for _ in range(ENDLESS // len(chunk)):
            await resp.write(chunk)  # as fast as it goes: blocks once every buffer on the way is full
        return resp

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/events", events)
    app.router.add_get("/download", download)
    app.router.add_get("/endless", endless)
    app.router.add_get("/:/websockets/notifications", ws)  # the same two at Plex's own paths
    app.router.add_get("/:/eventsource/notifications", events)
    return app


class Clock:
    """Real time plus an offset the test can move forward (for expiry)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def rig(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> tuple[Running, Clock]:
    up = await aiohttp_server(streaming_upstream())
    cfg = base_config(
        str(up.make_url("")).rstrip("/"), tmp_path, keys={"argon2": "cheapest", "stream_check_interval": "100ms"}
    )
    clock = Clock()
    return await make_sidecar(cfg, clock=clock), clock


async def revoke(running: Running, key_id: str) -> float:
    resp = await running.admin.delete(f"/admin/keys/{key_id}", headers=running.admin_headers())
    assert resp.status == 200, await resp.text()
    return time.monotonic()


async def closed_metric(running: Running, reason: str) -> float:
    text = await (await running.admin.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(f'sidecar_streams_closed_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_revoked_keys_websocket_is_closed_with_1008(
    rig: tuple[Running, Clock], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running, _ = rig
    caplog.set_level(logging.INFO, logger="sidecar.streams")
    rec, key = await running.create_key(name="revoked")
    _, other = await running.create_key(name="stays")
    ws = await running.proxy.ws_connect("/ws", headers={"X-Plex-Token": key})
    ws_other = await running.proxy.ws_connect("/ws", headers={"X-Plex-Token": other})
    assert (await ws.receive(timeout=2)).type == aiohttp.WSMsgType.TEXT
    start = await revoke(running, rec.id)
    while True:
        msg = await ws.receive(timeout=BOUND)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
    elapsed = time.monotonic() - start
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008, f"the client sees close 1008, got {msg}"
    assert elapsed < BOUND
    # The other key's websocket is untouched.
    for _ in range(3):
        assert (await ws_other.receive(timeout=2)).type == aiohttp.WSMsgType.TEXT
    await ws_other.close()
    assert await closed_metric(running, "revoked") == 1.0
    assert any(rec.id in r.getMessage() and "revoked" in r.getMessage() for r in caplog.records)
    lines = await log_lines(tmp_path / "access.log", want=1)
    assert any(line["key"] == rec.id and line.get("error") == "key_revoked" for line in lines), lines


async def test_revoked_keys_event_stream_is_cut(rig: tuple[Running, Clock], tmp_path: Path) -> None:
    running, _ = rig
    rec, key = await running.create_key()
    resp = await running.proxy.get("/events", headers={"X-Plex-Token": key})
    assert resp.status == 200
    await resp.content.readline()
    start = await revoke(running, rec.id)
    with pytest.raises(aiohttp.ClientPayloadError):  # cut: no final chunk, never a clean end
        async with asyncio.timeout(BOUND):
            while await resp.content.readline():
                pass
    assert time.monotonic() - start < BOUND
    assert await closed_metric(running, "revoked") == 1.0
    lines = await log_lines(tmp_path / "access.log", want=1)
    assert [line.get("error") for line in lines if line["key"] == rec.id] == ["key_revoked"], lines


async def test_revoked_keys_slow_download_is_cut(rig: tuple[Running, Clock], tmp_path: Path) -> None:
    running, _ = rig
    rec, key = await running.create_key()
    resp = await running.proxy.get("/download", headers={"X-Plex-Token": key})
    assert resp.status == 200 and resp.headers["Content-Length"] == str(TOTAL)
    got = len(await resp.content.readany())
    start = await revoke(running, rec.id)
    with pytest.raises(aiohttp.ClientPayloadError):  # fewer bytes than Content-Length, then the connection ends
        async with asyncio.timeout(BOUND):
            while chunk := await resp.content.readany():
                got += len(chunk)
    assert time.monotonic() - start < BOUND and got < TOTAL
    lines = await log_lines(tmp_path / "access.log", want=1)
    assert [line.get("error") for line in lines if line["key"] == rec.id] == ["key_revoked"], lines


async def test_a_client_that_stopped_reading_is_cut_too(rig: tuple[Running, Clock]) -> None:
    """The relay is stuck writing to a client that reads nothing: closing the upstream alone
    would not free it, so the client's connection is cut."""
    running, _ = rig
    rec, key = await running.create_key()
    server = running.proxy.server
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a client that holds little
    sock.connect((server.host, server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(f"GET /endless HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.3)  # buffers on both sides fill up; the relay now waits on us
        assert running.sc.streams.open_streams(rec.id) == 1
        start = await revoke(running, rec.id)
        got = 0
        async with asyncio.timeout(BOUND):
            while True:
                try:
                    chunk = await reader.read(1 << 20)
                except ConnectionError:
                    break
                if not chunk:
                    break
                got += len(chunk)
        assert time.monotonic() - start < BOUND and got < ENDLESS
    finally:
        writer.close()


async def test_expiry_ends_streams_like_revocation(rig: tuple[Running, Clock]) -> None:
    running, clock = rig
    rec, key = await running.create_key(expires="1h")
    ws = await running.proxy.ws_connect("/ws", headers={"X-Plex-Token": key})
    assert (await ws.receive(timeout=2)).type == aiohttp.WSMsgType.TEXT
    start = time.monotonic()
    clock.offset = 7200.0  # two hours later: the key has expired, nobody revoked it
    while (msg := await ws.receive(timeout=BOUND)).type == aiohttp.WSMsgType.TEXT:
        pass
    assert msg.data == 1008 and time.monotonic() - start < BOUND
    assert await closed_metric(running, "expired") == 1.0
    assert running.sc.streams.open_streams(rec.id) == 0


async def test_revoked_keys_mcp_event_stream_is_cut(make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    """The legacy SSE transport of an MCP upstream (the official SDK's server): the stream that
    carries every answer of the session ends too."""
    from mcp_server import MCP_TOKEN, McpUpstream

    up = McpUpstream().start()
    try:
        cfg = base_config(up.url, tmp_path, keys={"argon2": "cheapest", "stream_check_interval": "100ms"})
        cfg["upstreams"] = [{"id": "legacy", "kind": "mcp", "url": up.url, "path_prefix": "/mcp/legacy",
                             "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}}]  # fmt: skip
        running = await make_sidecar(cfg, extra_env={"MCP_TOKEN": MCP_TOKEN})
        rec, key = await running.create_key()
        headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
        async with running.proxy.get("/mcp/legacy/sse", headers=headers) as stream:
            assert stream.status == 200
            first = b""
            while b"endpoint" not in first:
                first += await stream.content.readany()
            start = await revoke(running, rec.id)
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(BOUND):
                    while await stream.content.readany():
                        pass
            assert time.monotonic() - start < BOUND
        assert await closed_metric(running, "revoked") == 1.0
    finally:
        await up.stop()
