"""A raw upstream that writes exact bytes, and a sidecar in front of it: for the pool's tests.

``tests/http/test_pool.py`` and ``test_pool_streams.py`` attack the lean upstream client
(``sidecar.http.pool``) through a real Sidecar; the upstream's answer is the attacker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import MakeSidecar, Running, base_config

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
WAIT = 3.0  # seconds any awaited event may take before the test fails (never a sleep)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body off the upstream's socket, or None once the sidecar closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def rpc_id(body: bytes) -> Any:
    return json.loads(body)["id"]


def answer(rid: Any, extra: bytes = b"", *, close: bool = False, note: str = "ok") -> bytes:
    """A whole JSON-RPC answer with a Content-Length (``Connection: close`` if ``close``)."""
    body = json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"note": note}}).encode()
    conn = b"Connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + conn + extra
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


class RawUpstream:
    """A raw TCP upstream: ``handler(reader, writer, n)`` for the n-th accepted connection (from 0)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.closed: list[asyncio.Event] = []  # set when the sidecar's end of connection n closed
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            first = await reader.read(65536)
        except ConnectionError:
            first = b""
        if not first:  # a readiness probe (``upstreams.health.check``): connects and closes, sends nothing
            writer.close()
            return
        n = self.accepted  # counts connections that carried a request
        self.accepted += 1
        self.closed.append(asyncio.Event())
        ours = asyncio.StreamReader(limit=2**20)  # the request's first bytes, then the rest as it comes
        ours.feed_data(first)

        async def pump() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    ours.feed_data(data)
            ours.feed_eof()

        pumping = asyncio.create_task(pump())
        try:
            await self.handler(ours, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed[n].set()
            writer.close()
            pumping.cancel()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.transport.abort()
        if self.server is not None:
            await self.server.wait_closed()


async def until_closed(reader: asyncio.StreamReader) -> bool:
    """Whether the sidecar closed this connection within ``WAIT`` (what it sends meanwhile is dropped)."""
    try:
        async with asyncio.timeout(WAIT):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    except TimeoutError:
        return False
    return True


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """An honest upstream: every request on the connection gets its own answer, noting the connection."""
    while (req := await read_request(reader)) is not None:
        writer.write(answer(rpc_id(req[1]), note=f"conn{n}"))
        await writer.drain()


StartRaw = Callable[[Handler], Awaitable[RawUpstream]]


@pytest.fixture(name="raw")
async def raw_fixture() -> AsyncIterator[StartRaw]:
    """Starts ``RawUpstream``s, each stopped at the end of the test."""
    servers: list[RawUpstream] = []

    async def start(handler: Handler) -> RawUpstream:
        up = RawUpstream(handler)
        await up.start()
        servers.append(up)
        return up

    yield start
    for up in servers:
        await up.stop()


Setup = Callable[..., Awaitable[tuple[Running, str]]]


@pytest.fixture(name="sidecar")
def sidecar_fixture(make_sidecar: MakeSidecar, tmp_path: Path) -> Setup:
    """A sidecar with one plain-HTTP MCP upstream at ``port`` (through the pool), and a key."""

    async def make(port: int, read: str = "2s") -> tuple[Running, str]:
        cfg = base_config(f"http://127.0.0.1:{port}", tmp_path)
        cfg["upstreams"] = [
            {"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{port}/mcp", "path_prefix": "/mcp/tools",
             "timeouts": {"read": read}},
        ]  # fmt: skip
        gw = await make_sidecar(cfg)
        assert "tools" in gw.sc.pools  # the requests below go through ConnectionPool, not aiohttp's client
        _, key = await gw.create_key(name="agent")
        return gw, key

    return make


def call(rid: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": "x", "arguments": {}}}


async def post(gw: Running, key: str, rid: int = 1, **headers: str) -> tuple[int, str, bytes]:
    """One MCP POST through the sidecar: status, content type, whole body (bounded)."""
    async with asyncio.timeout(WAIT):
        r = await gw.proxy.post(
            "/mcp/tools", json=call(rid), headers={**ACCEPT, "Authorization": f"Bearer {key}", **headers}
        )
        async with r:
            return r.status, r.content_type, await r.read()


def error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


async def assert_ok(gw: Running, key: str, rid: int, note: str | None = None) -> None:
    """The next request gets its own answer (never bytes another answer left behind)."""
    status, _, body = await post(gw, key, rid)
    assert status == 200, body
    got = json.loads(body)
    assert got["id"] == rid
    if note is not None:
        assert got["result"]["note"] == note


def once_then_honest(first: bytes) -> Handler:
    """Connection 0 answers its request with ``first`` and closes; every later connection is honest."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        assert await read_request(reader) is not None
        writer.write(first)
        await writer.drain()
        writer.write_eof()
        await until_closed(reader)

    return handler


def answer_then(after: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> Handler:
    """Connection 0 answers its first request honestly (note ``conn0``), then does ``after``;
    every later connection is honest."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        req = await read_request(reader)
        assert req is not None
        writer.write(answer(rpc_id(req[1]), note="conn0"))
        await writer.drain()
        await after(reader, writer)

    return handler


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def progress(i: int, pad: int = 0) -> bytes:
    note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": i}}
    if pad:
        note["params"]["message"] = "p" * pad  # type: ignore[index]
    return b"event: message\ndata: " + json.dumps(note).encode() + b"\n\n"


async def open_stream(gw: Running, key: str, rid: int = 1) -> aiohttp.ClientResponse:
    """An MCP POST whose answer the test reads itself (headers in, body not yet read)."""
    async with asyncio.timeout(WAIT):
        resp: aiohttp.ClientResponse = await gw.proxy.post(
            "/mcp/tools", json=call(rid), headers={**ACCEPT, "Authorization": f"Bearer {key}"}
        )
        return resp


async def delete(gw: Running, key: str) -> tuple[int, bytes]:
    async with asyncio.timeout(WAIT):
        r = await gw.proxy.delete("/mcp/tools", headers={"Authorization": f"Bearer {key}"})
        async with r:
            return r.status, await r.read()
