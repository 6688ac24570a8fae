"""The lean keep-alive upstream client (``sidecar.http.pool``), attacked by its upstream.

A plain-HTTP MCP upstream's requests go through ``ConnectionPool`` instead of aiohttp's
client. Here the upstream is a raw asyncio TCP server that writes exact bytes (the answer
is the attacker's), and a real Sidecar sits in front of it. Each test asserts what the
client sees: the designed JSON error before any byte went out, a cut connection after, a
connection never reused once its framing cannot be trusted, and the next request working.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import pytest
import uvloop
from aiohttp import web
from conftest import MakeSidecar, Running, base_config
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from raw_http import read_response
from yarl import URL

from sidecar.app import Sidecar, create_apps
from sidecar.config import parse_config
from sidecar.http import pool as pool_mod
from sidecar.http.pool import ConnectionPool, request_head

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


@pytest.fixture
async def raw() -> AsyncIterator[StartRaw]:
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


@pytest.fixture
def sidecar(make_sidecar: MakeSidecar, tmp_path: Path) -> Setup:
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


# ------------------------------------------------------------------ keep-alive


async def test_sequential_posts_share_one_upstream_connection(raw: StartRaw, sidecar: Setup) -> None:
    """Ten MCP POSTs one after another: ten right answers, one TCP connection at the upstream."""
    up = await raw(keep_answering)
    gw, key = await sidecar(up.port)
    for rid in range(10):
        await assert_ok(gw, key, rid, note="conn0")
    assert up.accepted == 1


async def test_connection_close_answer_is_not_reused(raw: StartRaw, sidecar: Setup) -> None:
    """An answer with ``Connection: close``: relayed whole, and the next request opens a new connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        req = await read_request(reader)
        assert req is not None
        writer.write(answer(rpc_id(req[1]), close=n == 0, note=f"conn{n}"))
        await writer.drain()
        if n == 0:
            return  # and close
        await keep_answering(reader, writer, n)

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    await assert_ok(gw, key, 1, note="conn0")
    await assert_ok(gw, key, 2, note="conn1")
    await assert_ok(gw, key, 3, note="conn1")
    assert up.accepted == 2


async def test_upstream_closing_an_idle_connection_costs_nothing(raw: StartRaw, sidecar: Setup) -> None:
    """The upstream answers (keep-alive), then hangs up while idle: the pool drops that connection
    (it sees the FIN and closes its side, which the upstream waits for), the next request gets a new one."""
    hung_up = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        req = await read_request(reader)
        assert req is not None
        writer.write(answer(rpc_id(req[1]), note="conn0"))
        await writer.drain()
        writer.write_eof()  # idle: the upstream's keep-alive timer ran out
        assert await until_closed(reader)  # the sidecar closed its side in turn
        hung_up.set()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    await assert_ok(gw, key, 1, note="conn0")
    async with asyncio.timeout(WAIT):
        await hung_up.wait()
    await assert_ok(gw, key, 2, note="conn1")
    assert up.accepted == 2


async def test_upstream_resetting_an_idle_connection_costs_nothing(raw: StartRaw, sidecar: Setup) -> None:
    """The same with a reset instead of a FIN: the pool forgets the connection (polled: the pool's
    idle list is the only place that shows it), and the next POST gets a new one."""
    reset = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        req = await read_request(reader)
        assert req is not None
        writer.write(answer(rpc_id(req[1]), note="conn0"))
        await writer.drain()
        await reset.wait()
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    await assert_ok(gw, key, 1, note="conn0")
    pool = gw.sc.pools["tools"]
    assert len(pool._idle) == 1
    reset.set()
    async with asyncio.timeout(WAIT):
        while pool._idle or pool._all:
            await asyncio.sleep(0.005)
    await assert_ok(gw, key, 2, note="conn1")
    assert up.accepted == 2


# ------------------------------------------------------------------ malformed answers

BIG = b"X-Big: " + b"a" * 70_000 + b"\r\n"
MALFORMED = {
    "garbage status line": b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "not http at all": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "status 000": b"HTTP/1.1 000 OK\r\nContent-Length: 2\r\n\r\n{}",
    "status 099": b"HTTP/1.1 099 OK\r\nContent-Length: 2\r\n\r\n{}",
    "status 20": b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\n{}",
    "content-length and chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
    "two content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "a header line over 64 KiB": b"HTTP/1.1 200 OK\r\n" + BIG + b"Content-Length: 2\r\n\r\n{}",
    "headers over 64 KiB in all": (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(80))
        + b"Content-Length: 2\r\n\r\n{}"
    ),
    "129 header fields": (
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(128)) + b"Content-Length: 2\r\n\r\n{}"
    ),
    "101 switching protocols": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi"
    ),
    "101 without upgrade headers": (
        b"HTTP/1.1 101 Switching Protocols\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    ),
    "bare LF line endings": b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 2\n\n{}",
    "a bare LF inside the headers": b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\n{}",
    "NUL in a header value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    "CR in a header value": b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: x=1\r\nContent-Length: 2\r\n\r\n{}",
    "obs-fold continuation line": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\n{}",
    "space before the colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}",
    "negative content-length": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n{}",
    "closed before the headers end": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
}


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


@pytest.mark.parametrize("raw_answer", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_answer_is_a_clean_502_and_the_next_request_works(
    raw: StartRaw, sidecar: Setup, raw_answer: bytes
) -> None:
    """llhttp (strict) or the pool's own bounds refuse it before anything reached the client:
    a JSON ``upstream_unavailable``, none of the upstream's bytes or headers; the next call is fine."""
    up = await raw(once_then_honest(raw_answer))
    gw, key = await sidecar(up.port)
    status, ctype, body = await post(gw, key, 1)
    assert (status, ctype) == (502, "application/json"), body
    assert error_code(body) == "upstream_unavailable"
    assert b"Set-Cookie" not in body and b"aaaa" not in body
    await assert_ok(gw, key, 2, note="conn1")


ENDLESS = {
    "a header value": (b"HTTP/1.1 200 OK\r\nX-Endless: ", b"z" * 65536),
    "100 Continue, again and again": (b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 2600),
}


@pytest.mark.parametrize(("start", "unit"), ENDLESS.values(), ids=ENDLESS.keys())
async def test_an_endless_head_is_refused_at_its_bound_not_buffered(
    raw: StartRaw, sidecar: Setup, start: bytes, unit: bytes
) -> None:
    """A header value that never ends (httptools keeps a value until its line ends, and the pool's
    64 KiB bound counted whole ones only), or interim answers without end: the sidecar held it all
    until the read timeout. Now it is a 502 once 128 KiB came without the answer's headers, long
    before the timeout (10 s here)."""
    sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        assert await read_request(reader) is not None
        writer.write(start)
        with contextlib.suppress(ConnectionError):
            for _ in range(4096):  # up to 256 MiB, unless the sidecar hangs up first
                writer.write(unit)
                await writer.drain()
        sent.set()

    up = await raw(handler)
    gw, key = await sidecar(up.port, read="10s")
    started = time.monotonic()
    status, _, body = await post(gw, key, 1)
    assert status == 502 and error_code(body) == "upstream_unavailable"
    assert time.monotonic() - started < 2.0
    async with asyncio.timeout(WAIT):
        await sent.wait()  # the upstream was cut off: its writes failed
    await assert_ok(gw, key, 2, note="conn1")


async def test_an_endless_trailer_cuts_the_stream_instead_of_filling_memory(raw: StartRaw, sidecar: Setup) -> None:
    """After an event stream's last chunk, a trailer line that never ends. An event stream has no
    idle timeout, and httptools keeps a trailer's value until its line ends, so this was memory
    without bound; the pool refuses more than 128 KiB without a body byte, which cuts the client."""
    go = asyncio.Event()
    cut_off = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        assert await read_request(reader) is not None
        writer.write(SSE_HEAD + chunk(progress(0)))
        await writer.drain()
        await go.wait()
        writer.write(b"0\r\nX-Trailer: ")
        try:
            for _ in range(256):  # 16 MiB at most
                writer.write(b"t" * 65536)
                await writer.drain()
        except ConnectionError:
            cut_off.set()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    r = await open_stream(gw, key)
    async with r, asyncio.timeout(WAIT):
        assert await r.content.readuntil(b"\n\n") == progress(0)
        go.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.content.read()
        await cut_off.wait()
    await assert_ok(gw, key, 2, note="conn1")


# ------------------------------------------------------------------ desync: bytes nobody asked for


async def test_a_second_answer_in_the_same_packet_is_never_the_next_requests(raw: StartRaw, sidecar: Setup) -> None:
    """Response splitting: the upstream writes its answer and, in the same write, an answer to the
    request it expects next. The first is relayed; the connection is dropped, so request 2 is
    answered on a new connection, never with the injected bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        req = await read_request(reader)
        assert req is not None
        writer.write(answer(rpc_id(req[1]), note="conn0") + answer(2, note="injected"))
        await writer.drain()
        await keep_answering(reader, writer, n)  # it would answer more, if asked

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    await assert_ok(gw, key, 1, note="conn0")
    await assert_ok(gw, key, 2, note="conn1")
    await assert_ok(gw, key, 3, note="conn1")
    assert up.accepted == 2


async def test_bytes_on_an_idle_connection_retire_it(raw: StartRaw, sidecar: Setup) -> None:
    """The upstream sends an unrequested answer while the connection sits idle in the pool: the
    pool aborts it at once (the upstream sees it closed), and request 2 gets its own answer."""
    inject = asyncio.Event()
    retired = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        req = await read_request(reader)
        assert req is not None
        writer.write(answer(rpc_id(req[1]), note="conn0"))
        await writer.drain()
        await inject.wait()
        writer.write(answer(2, note="injected"))
        await writer.drain()
        if await until_closed(reader):
            retired.set()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    await assert_ok(gw, key, 1, note="conn0")
    inject.set()
    async with asyncio.timeout(WAIT):
        await retired.wait()
    await assert_ok(gw, key, 2, note="conn1")
    assert up.accepted == 2


# ------------------------------------------------------------------ bodies cut short


async def test_a_small_body_cut_short_is_a_502(raw: StartRaw, sidecar: Setup) -> None:
    """``Content-Length: 100``, 10 bytes, close: a small body is read whole before anything is
    sent, so the client gets a clean 502 instead of 10 bytes of a 100-byte answer."""
    cut = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"jsonrpc"'
    up = await raw(once_then_honest(cut))
    gw, key = await sidecar(up.port)
    status, ctype, body = await post(gw, key, 1)
    assert (status, ctype) == (502, "application/json")
    assert error_code(body) == "upstream_unavailable" and b"jsonrpc" not in body
    await assert_ok(gw, key, 2, note="conn1")


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


@pytest.mark.parametrize("how", ["closed", "bad chunk size", "reset"])
async def test_an_event_stream_broken_after_its_headers_cuts_the_client(
    raw: StartRaw, sidecar: Setup, how: str
) -> None:
    """The 200 and a first event went out; then the upstream closes without the last chunk, sends
    a malformed chunk, or resets. The client's connection is cut (an incomplete chunked body), never
    a clean end it could take for the whole answer; the next request works."""
    go = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        assert await read_request(reader) is not None
        writer.write(SSE_HEAD + chunk(progress(0)))
        await writer.drain()
        await go.wait()
        if how == "bad chunk size":
            writer.write(b"zz\r\n" + progress(1) + b"\r\n")
        elif how == "reset":
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        writer.write_eof()
        await until_closed(reader)

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    r = await open_stream(gw, key)
    async with r:
        assert (r.status, r.content_type) == (200, "text/event-stream")
        async with asyncio.timeout(WAIT):
            assert await r.content.readuntil(b"\n\n") == progress(0)
            go.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.content.read()
    await assert_ok(gw, key, 2, note="conn1")


# ------------------------------------------------------------------ read until close


async def test_a_body_read_until_close_arrives_whole_and_the_connection_goes(raw: StartRaw, sidecar: Setup) -> None:
    """No Content-Length, no chunking: the body ends with the connection. All of it is relayed
    (it is ended cleanly), and that connection is not reused."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"note": "conn0", "pad": "u" * 200_000}}).encode()
    up = await raw(once_then_honest(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + body))
    gw, key = await sidecar(up.port)
    status, _, got = await post(gw, key, 1)
    assert status == 200 and got == body
    await assert_ok(gw, key, 2, note="conn1")
    assert up.accepted == 2


async def test_a_body_read_until_close_that_is_reset_is_cut(raw: StartRaw, sidecar: Setup) -> None:
    """Such a body ends with a clean close (FIN) only: a reset mid-body is a broken answer, and the
    client's connection is cut instead of a clean end after the truncated JSON."""
    go = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        assert await read_request(reader) is not None
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b'{"jsonrpc":"2.0","id":1,')
        await writer.drain()
        await go.wait()
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    r = await open_stream(gw, key)
    async with r:
        assert r.status == 200
        async with asyncio.timeout(WAIT):
            assert await r.content.readany() == b'{"jsonrpc":"2.0","id":1,'
            go.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.content.read()
    await assert_ok(gw, key, 2, note="conn1")


# ------------------------------------------------------------------ informational answers


async def test_interim_answers_are_skipped_and_the_connection_kept(raw: StartRaw, sidecar: Setup) -> None:
    """``100 Continue`` and ``103 Early Hints`` before the 200: the client gets the 200 and its
    body, none of the 1xx's headers, and the connection stays in use."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        req = await read_request(reader)
        assert req is not None
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </evil.css>; rel=preload\r\nX-Hint: 1\r\n\r\n"
            + answer(rpc_id(req[1]), note=f"conn{n}")
        )
        await writer.drain()
        await keep_answering(reader, writer, n)

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    async with asyncio.timeout(WAIT):
        r = await gw.proxy.post("/mcp/tools", json=call(1), headers={**ACCEPT, "Authorization": f"Bearer {key}"})
        async with r:
            assert r.status == 200 and "Link" not in r.headers and "X-Hint" not in r.headers
            assert json.loads(await r.read()) == {"jsonrpc": "2.0", "id": 1, "result": {"note": "conn0"}}
    await assert_ok(gw, key, 2, note="conn0")
    assert up.accepted == 1


# ------------------------------------------------------------------ timeouts and refusals


async def test_an_upstream_that_never_answers_is_a_504_and_its_connection_closed(raw: StartRaw, sidecar: Setup) -> None:
    """It accepts and reads the request, then says nothing: 504 ``upstream_timeout`` after
    ``timeouts.read`` (0.5 s), the sidecar closes that connection, and the next request gets a new one."""
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        assert await read_request(reader) is not None
        if await until_closed(reader):
            closed.set()
            writer.write(answer(1, note="too late"))  # nobody is listening any more

    up = await raw(handler)
    gw, key = await sidecar(up.port, read="0.5s")
    started = time.monotonic()
    status, _, body = await post(gw, key, 1)
    took = time.monotonic() - started
    assert status == 504 and error_code(body) == "upstream_timeout"
    assert 0.45 <= took < 2.0
    async with asyncio.timeout(WAIT):
        await closed.wait()
    await assert_ok(gw, key, 2, note="conn1")


async def test_a_refused_connect_is_a_502_naming_the_upstream(sidecar: Setup) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw, key = await sidecar(port)
    status, _, body = await post(gw, key, 1)
    assert status == 502 and error_code(body) == "upstream_unavailable"
    assert json.loads(body)["error"]["message"] == "upstream tools refused the connection"


# ------------------------------------------------------------------ large streams, backpressure, cancellation

EVENTS = 192  # of ~64 KiB each: 12 MiB in one answer
STALL = 0.3  # a drain that takes this long: the upstream is held back (a bound, not a wait)


async def test_a_large_event_stream_is_relayed_intact_with_backpressure(raw: StartRaw, sidecar: Setup) -> None:
    """12 MiB of progress events then the answer, to a client that reads nothing at first.

    Backpressure, seen from both ends: the pool's connection pauses reading with at most
    ``HIGH_WATER`` plus one socket read unread (``sidecar.http.pool`` internals: the only place
    where it is the pool that stopped, not aiohttp's writer), and then the upstream's ``drain()``
    stalls (``STALL``) before it has written it all, so nothing in between reads without bound.
    Loopback socket buffers absorb several MiB on their own (~7 MiB measured here: the sidecar's
    send buffer to the client ~4 MiB, its receive buffer from the upstream ~2.6 MiB, both
    autotuned), hence 12 MiB, a client socket with a small fixed receive buffer, and a small one
    at the upstream. Then the client reads, and gets every byte in order, then the end of the body."""
    events = [progress(i, pad=65_000) for i in range(EVENTS)]
    final = b"event: message\ndata: " + json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}).encode() + b"\n\n"
    total = sum(map(len, events)) + len(final)
    progress_: dict[str, int] = {"written": 0, "stalled_at": 0}
    stalled = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        assert await read_request(reader) is not None
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        writer.write(SSE_HEAD)
        for ev in [*events, final]:
            writer.write(chunk(ev))
            progress_["written"] += len(ev)
            while True:
                try:
                    await asyncio.wait_for(writer.drain(), STALL)
                    break
                except TimeoutError:  # held back: said again every STALL for as long as it lasts
                    progress_["stalled_at"] = progress_["written"]
                    stalled.set()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await until_closed(reader)

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    reader, writer = await slow_client(gw)
    body = json.dumps(call(1)).encode()
    writer.write(
        b"POST /mcp/tools HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nAccept: application/json, "
        b"text/event-stream\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (key.encode(), len(body), body)
    )
    try:
        async with asyncio.timeout(WAIT):
            while not (conns := gw.sc.pools["tools"]._all) or not next(iter(conns))._paused:
                await asyncio.sleep(0.005)  # polled: the pool pauses once HIGH_WATER is unread
            (conn,) = conns
            assert conn.response is not None and conn.response.content._size <= pool_mod.HIGH_WATER + 256 * 1024
            stalled.clear()
            await stalled.wait()  # a stall after the pause: the upstream is held back
        assert progress_["stalled_at"] < total  # it could not write it all
        assert conn._paused  # still: nothing was read meanwhile
        async with asyncio.timeout(WAIT * 2):
            status, headers, got = await read_response(reader)
    finally:
        writer.close()
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(b"".join(events) + final).hexdigest()


async def slow_client(gw: Running) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection whose receive window stays small (set before connect: no autotuning),
    so what the client has not read cannot hide in its kernel buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.proxy.port))
    return await asyncio.open_connection(sock=sock)


async def test_a_client_that_leaves_mid_stream_closes_the_upstream_connection(raw: StartRaw, sidecar: Setup) -> None:
    """The client reads a first progress event and hangs up before the answer: closing is how MCP
    cancels, so the upstream sees its connection closed at once (bounded), and it is not reused."""
    cancelled = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        assert await read_request(reader) is not None
        writer.write(SSE_HEAD + chunk(progress(0)))
        await writer.drain()
        if await until_closed(reader):
            cancelled.set()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    r = await open_stream(gw, key)
    async with asyncio.timeout(WAIT):
        assert await r.content.readuntil(b"\n\n") == progress(0)
    r.close()  # the client's connection goes with it
    async with asyncio.timeout(WAIT):
        await cancelled.wait()
    await assert_ok(gw, key, 2, note="conn1")


# ------------------------------------------------------------------ request_head and the pool itself


def parse_request(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    """Method, target, headers and body as llhttp's request parser reads them (must be one whole request)."""
    got: dict[str, Any] = {"headers": [], "body": b"", "done": False, "url": b""}

    class Sink:
        def on_url(self, url: bytes) -> None:
            got["url"] += url

        def on_header(self, name: bytes, value: bytes) -> None:
            got["headers"].append((name, value))

        def on_body(self, body: bytes) -> None:
            got["body"] += body

        def on_message_complete(self) -> None:
            got["done"] = True

    parser = httptools.HttpRequestParser(Sink())
    parser.feed_data(data)
    assert got["done"]
    return parser.get_method(), got["url"], got["headers"], got["body"]


def test_request_head_round_trips() -> None:
    headers = CIMultiDict([("Host", "up:8080"), ("Content-Type", "application/json"), ("X-A", "1"), ("X-A", "é")])
    headers["Content-Length"] = "2"
    head = request_head("POST", "/mcp?x=1&y=%20", headers)
    assert head == (
        b"POST /mcp?x=1&y=%20 HTTP/1.1\r\nHost: up:8080\r\nContent-Type: application/json\r\nX-A: 1\r\n"
        b"X-A: \xc3\xa9\r\nContent-Length: 2\r\n\r\n"
    )
    method, target, parsed, body = parse_request(head + b"{}")
    assert (method, target, body) == (b"POST", b"/mcp?x=1&y=%20", b"{}")
    assert parsed == [(k.encode(), v.encode()) for k, v in headers.items()]


@pytest.mark.parametrize("bad", ["\r", "\n", "\r\n", "\x00", "\r\nX-Injected: 1"])
@pytest.mark.parametrize("where", ["name", "value", "target"])
def test_request_head_refuses_line_breaks_and_nul(bad: str, where: str) -> None:
    """Header injection and request splitting: nothing is sent with a CR, LF or NUL anywhere."""
    name, value, target = "X-A", "v", "/mcp"
    if where == "name":
        name = "X" + bad + "A"
    elif where == "value":
        value = "v" + bad + "w"
    else:
        target = "/mcp" + bad + "x"
    with pytest.raises(ValueError):
        request_head("GET", target, CIMultiDict([("Host", "h"), (name, value)]))


@pytest.mark.parametrize("target", ["/mcp HTTP/1.1\r\n", "/a b", "mcp", "http://evil/mcp", "*", ""])
def test_request_head_refuses_targets_that_are_not_a_path(target: str) -> None:
    with pytest.raises(ValueError):
        request_head("GET", target, CIMultiDict([("Host", "h")]))


def upstream_config(url: str, tmp_path: Path, read: str = "2s") -> Any:
    cfg = base_config(url, tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": url, "timeouts": {"read": read}}]
    return parse_config(cfg, env={"SIDECAR_ADMIN_TOKEN": "x", "PLEX_TOKEN": "y"}, base=tmp_path).upstreams[0]


BIG_ANSWER = bytes(range(256)) * (16 * 1024)  # 4 MiB


def echo_app() -> web.Application:
    """An in-process aiohttp upstream: echoes the body with the client's port (one port: one
    connection); ``/big`` streams ``BIG_ANSWER`` in 64 KiB writes."""

    async def echo(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername")[1] if request.transport else 0
        return web.json_response({"body": (await request.read()).decode(), "peer": peer})

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(BIG_ANSWER), 65536):
            await resp.write(BIG_ANSWER[i : i + 65536])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/mcp", echo)
    app.router.add_get("/big", big)
    return app


async def read_all(resp: pool_mod.PooledResponse) -> bytes:
    data = b""
    while part := await resp.content.readany():
        data += part
    resp.release()
    return data


async def pool_round_trips(tmp_path: Path) -> list[dict[str, Any]]:
    """Requests through a ``ConnectionPool`` on the running loop, the answers' JSON: POST, GET,
    DELETE, then a 4 MiB stream left unread until the pool has paused reading (it must, and then
    resume), then one more GET; all on one connection."""
    runner = web.AppRunner(echo_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pool = ConnectionPool(upstream_config(f"http://127.0.0.1:{port}/mcp", tmp_path))
    url = URL(f"http://127.0.0.1:{port}/mcp")
    answers = []
    try:
        async with asyncio.timeout(WAIT):
            for i, method in enumerate(["POST", "GET", "DELETE", "big", "GET"]):
                headers = CIMultiDict({"Host": f"127.0.0.1:{port}"})
                body = f"call {i}".encode() if method == "POST" else None
                if body:
                    headers["Content-Length"] = str(len(body))
                if method != "big":
                    resp = await pool.request(method, url, headers, body)
                    assert resp.status == 200
                    answers.append(json.loads(await read_all(resp)))
                    continue
                resp = await pool.request("GET", url.with_path("/big"), headers, None)
                (conn,) = pool._all
                while not conn._paused:  # nothing read: the pool stops reading at HIGH_WATER
                    await asyncio.sleep(0.005)
                assert resp.content._size <= pool_mod.HIGH_WATER + 256 * 1024
                assert await read_all(resp) == BIG_ANSWER
                assert not conn._paused
    finally:
        await pool.close()
        await runner.cleanup()
    return answers


def test_the_pool_works_on_uvloop(tmp_path: Path) -> None:
    """Production runs on uvloop, whose transports are not asyncio's classes (a bug once): real
    requests, a paused and resumed stream, all on one kept-alive connection, on a uvloop loop."""
    loop = uvloop.new_event_loop()
    try:
        answers = loop.run_until_complete(pool_round_trips(tmp_path))
    finally:
        loop.close()
    assert [a["body"] for a in answers] == ["call 0", "", "", ""]
    assert len({a["peer"] for a in answers}) == 1


async def test_the_pool_works_on_asyncio(tmp_path: Path) -> None:
    """The same on asyncio's own loop."""
    answers = await pool_round_trips(tmp_path)
    assert [a["body"] for a in answers] == ["call 0", "", "", ""]
    assert len({a["peer"] for a in answers}) == 1


async def test_idle_connections_after_a_burst_are_closed_when_they_expire(
    raw: StartRaw, sidecar: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five concurrent calls open five connections; afterwards, with no more traffic, each is closed
    once idle for ``KEEPALIVE`` (set to 0.3 s here), as aiohttp's connector does. Before, only the
    connection on top of the idle stack was ever checked: the rest stayed open for good."""
    monkeypatch.setattr(pool_mod, "KEEPALIVE", 0.3)
    arrived = 0
    all_in = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal arrived
        req = await read_request(reader)
        assert req is not None
        arrived += 1
        if arrived == 5:
            all_in.set()
        await all_in.wait()  # answer only once all five are in: five connections
        writer.write(answer(rpc_id(req[1]), note=f"conn{n}"))
        await writer.drain()
        if await until_closed(reader):
            gone.append(n)

    gone: list[int] = []
    up = await raw(handler)
    gw, key = await sidecar(up.port)
    results = await asyncio.gather(*(post(gw, key, rid) for rid in range(5)))
    assert [s for s, _, _ in results] == [200] * 5
    assert up.accepted == 5
    async with asyncio.timeout(WAIT):
        for closed in up.closed:
            await closed.wait()
    assert sorted(gone) == [0, 1, 2, 3, 4] and not gw.sc.pools["tools"]._idle


async def test_a_chunked_request_goes_up_with_one_content_length(raw: StartRaw, sidecar: Setup) -> None:
    """The client's framing never reaches the upstream: a chunked POST (two chunks) and then a
    DELETE arrive as exactly two requests on one connection, the POST framed by one
    ``Content-Length`` that matches its body and no ``Transfer-Encoding``, the DELETE with none."""
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            seen.append(req)
            writer.write(answer(rpc_id(req[1]) if req[1] else None, note=f"conn{n}"))
            await writer.drain()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    body = json.dumps(call(7)).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
    try:
        writer.write(
            b"POST /mcp/tools HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nAccept: application/json, "
            b"text/event-stream\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n%s%s0\r\n\r\n"
            % (key.encode(), chunk(body[:10]), chunk(body[10:]))
        )
        async with asyncio.timeout(WAIT):
            status, _, got = await read_response(reader)
        assert status == 200 and json.loads(got)["id"] == 7
        writer.write(b"DELETE /mcp/tools HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n" % key.encode())
        async with asyncio.timeout(WAIT):
            status, _, got = await read_response(reader)
        assert status == 200
    finally:
        writer.close()
    assert up.accepted == 1 and [h.split(b" ", 2)[:2] for h, _ in seen] == [[b"POST", b"/mcp"], [b"DELETE", b"/mcp"]]
    (post_head, post_body), (delete_head, delete_body) = seen
    assert json.loads(post_body) == call(7)
    assert b"transfer-encoding" not in post_head.lower() + delete_head.lower()
    assert post_head.lower().count(b"content-length:") == 1
    assert b"\r\ncontent-length: %d\r\n" % len(post_body) in post_head.lower()
    assert b"content-length" not in delete_head.lower() and delete_body == b""


async def test_a_drain_ends_a_pooled_event_stream(raw: StartRaw, sidecar: Setup) -> None:
    """Shutdown (``Forwarder.end_streams``) ends event streams by closing their upstream answer; the
    relay's pending read must fail then. It did not for a pooled answer (closing it gave no error to
    a waiting read), so the stream hung until the drain's grace ran out. Now the client is cut at
    once and the upstream sees its connection closed."""
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        assert await read_request(reader) is not None
        writer.write(SSE_HEAD + chunk(progress(0)))
        await writer.drain()
        if await until_closed(reader):
            gone.set()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    r = await open_stream(gw, key)
    async with r, asyncio.timeout(WAIT):
        assert await r.content.readuntil(b"\n\n") == progress(0)
        await gw.sc.forwarder.end_streams()
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.content.read()
        await gone.wait()


async def delete(gw: Running, key: str) -> tuple[int, bytes]:
    async with asyncio.timeout(WAIT):
        r = await gw.proxy.delete("/mcp/tools", headers={"Authorization": f"Bearer {key}"})
        async with r:
            return r.status, await r.read()


@pytest.mark.parametrize("method", ["DELETE", "POST"])
async def test_a_kept_alive_connection_closed_under_a_request(raw: StartRaw, sidecar: Setup, method: str) -> None:
    """The upstream's keep-alive timer runs out just as the next request arrives: it reads it and
    closes without a byte of answer. Like aiohttp, the pool sends a DELETE (idempotent) once more
    on a new connection, and the client never notices; a POST is never sent twice: 502, and the
    upstream saw it once."""
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            requests.append(req[0].split(b" ", 1)[0])
            if n == 0 and len(requests) == 2:
                return  # the second request on connection 0: closed, unanswered
            writer.write(answer(rpc_id(req[1]) if req[1] else None, note=f"conn{n}"))
            await writer.drain()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    await assert_ok(gw, key, 1, note="conn0")
    if method == "DELETE":
        status, body = await delete(gw, key)
        assert status == 200 and json.loads(body)["result"]["note"] == "conn1"
        assert requests == [b"POST", b"DELETE", b"DELETE"]
    else:
        status, _, body = await post(gw, key, 2)
        assert status == 502 and error_code(body) == "upstream_unavailable"
        assert requests == [b"POST", b"POST"]
        await assert_ok(gw, key, 3, note="conn1")
    assert up.accepted == 2


async def test_a_malformed_answer_to_a_get_is_not_sent_again(raw: StartRaw, sidecar: Setup) -> None:
    """Only a connection closed without a byte of answer is retried: a kept-alive connection that
    answers a DELETE with garbage is a 502 and the DELETE went up once."""
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            requests.append(req[0].split(b" ", 1)[0])
            if len(requests) == 2:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}")
            else:
                writer.write(answer(rpc_id(req[1]) if req[1] else None, note=f"conn{n}"))
            await writer.drain()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    await assert_ok(gw, key, 1, note="conn0")
    status, body = await delete(gw, key)
    assert status == 502 and error_code(body) == "upstream_unavailable"
    assert requests == [b"POST", b"DELETE"]


async def uvloop_scenario(tmp_path: Path) -> dict[str, Any]:
    """A whole Sidecar (its proxy served as ``serve`` does) in front of a raw upstream, on the running
    loop: keep-alive, a malformed answer, an injected answer, a client that leaves mid-stream."""
    cancelled = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            rid = rpc_id(req[1])
            if rid == 3:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
            elif rid == 4:
                writer.write(answer(4, note=f"conn{n}") + answer(5, note="injected"))
            elif rid == 6:
                writer.write(SSE_HEAD + chunk(progress(0)))
                await writer.drain()
                if await until_closed(reader):
                    cancelled.set()
                return
            else:
                writer.write(answer(rid, note=f"conn{n}"))
            await writer.drain()

    up = RawUpstream(handler)
    await up.start()
    cfg = base_config(f"http://127.0.0.1:{up.port}", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{up.port}/mcp"}]
    env = {"SIDECAR_ADMIN_TOKEN": "admin", "PLEX_TOKEN": "p"}
    sc = Sidecar(parse_config(cfg, env=env, base=tmp_path), registry=CollectorRegistry(), env=env)
    await sc.start()
    runner = web.ServerRunner(create_apps(sc)[0])
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/mcp/tools"
    _, key = await sc.manager().create({"name": "agent"}, "test")
    await sc.verifier.refresh()
    headers = {**ACCEPT, "Authorization": f"Bearer {key}"}
    seen: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(WAIT):
            for rid in (1, 2, 3, 4, 5):
                async with http.post(base, json=call(rid), headers=headers) as r:
                    seen[str(rid)] = (r.status, json.loads(await r.read()))
            r = await http.post(base, json=call(6), headers=headers)
            seen["6"] = await r.content.readuntil(b"\n\n")
            r.close()
            await cancelled.wait()
            async with http.post(base, json=call(7), headers=headers) as r:
                seen["7"] = (r.status, json.loads(await r.read()))
    finally:
        await runner.cleanup()
        await sc.close()
        await up.stop()
    seen["accepted"] = up.accepted
    return seen


def test_a_whole_sidecar_on_uvloop(tmp_path: Path) -> None:
    """Production's loop, end to end through the pool and the forwarder (transports, pause,
    abort and close all differ from asyncio's)."""
    loop = uvloop.new_event_loop()
    try:
        seen = loop.run_until_complete(uvloop_scenario(tmp_path))
    finally:
        loop.close()
    notes = {rid: seen[rid][1].get("result", {}).get("note") for rid in ("1", "2", "4", "5", "7")}
    assert notes == {"1": "conn0", "2": "conn0", "4": "conn1", "5": "conn2", "7": "conn3"}
    assert seen["3"][0] == 502 and seen["3"][1]["error"]["code"] == "upstream_unavailable"
    assert seen["6"] == progress(0)
    assert seen["accepted"] == 4
