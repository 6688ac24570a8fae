"""The lean upstream client (``sidecar.http.pool``) under an attacker's review: desync, leaks, framing.

A pooled connection is shared by every key: an exchange that did not fully complete (both ways:
the answer read to its end *and* the request written to its end) must leave nothing behind for
the next request, a connection given up on must go at once whatever the upstream does, an idle
connection that already heard something is not reused, a call goes up once, and what the sidecar
cannot relay faithfully (a transfer coding, a trailer) is refused or dropped, never passed on
half-done. Upstreams: ``RawUpstream`` (exact bytes, reads everything), ``Stalled`` (stops reading
its socket, so what the sidecar wrote stays in the sidecar's buffers), or a ``ConnectionPool``
driven directly where only the loop's ordering shows the race. Each test asserts what the client
(or, for a leak, the upstream) sees. Helpers: ``tests/pool_support.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import uvloop
from conftest import MakeSidecar, Running, base_config
from multidict import CIMultiDict
from pool_support import (  # noqa: F401 - raw_fixture and sidecar_fixture: the fixtures raw and sidecar
    ACCEPT,
    WAIT,
    Setup,
    StartRaw,
    answer,
    assert_ok,
    call,
    chunk,
    error_code,
    keep_answering,
    once_then_honest,
    open_stream,
    post,
    raw_fixture,
    read_request,
    rpc_id,
    sidecar_fixture,
    until_closed,
)
from yarl import URL

from sidecar.config import parse_config
from sidecar.http.pool import ConnectionPool, PooledResponse

BIG = 8 * 1024 * 1024  # a request body larger than the kernel's buffers on both ends take
First = Callable[[asyncio.StreamWriter], Awaitable[None]]


class Stalled:
    """An upstream whose connection 0 reads the request head, then ``first(writer)``, then never
    reads again (asyncio stops reading at 128 KiB buffered; its receive buffer is 4 KiB). Later
    connections answer honestly. ``got`` is what connection 0 received once ``drain0`` is called."""

    def __init__(self, first: First) -> None:
        self.first = first
        self.accepted = 0
        self.release = asyncio.Event()
        self.got = b""
        self.drained = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")  # nothing: a readiness probe (``upstreams.health``)
            n = self.accepted  # counts connections that carried a request
            self.accepted += 1
            if n > 0:  # honest: this request (its head is read), then every next one
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                writer.write(answer(rpc_id(await reader.readexactly(length)), note=f"conn{n}"))
                return await keep_answering(reader, writer, n)
            await self.first(writer)
            await self.release.wait()
            self.got = head
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(1 << 20):
                    self.got += data
            self.drained.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before listen: inherited, small window
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._serve, sock=sock)
        self.port = sock.getsockname()[1]

    async def drain0(self) -> bytes:
        """Let connection 0 read all it can until the sidecar's end closes: what it received."""
        self.release.set()
        async with asyncio.timeout(WAIT):
            await self.drained.wait()
        return self.got

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self._writers:
            w.transport.abort()
        await self.server.wait_closed()


StartStalled = Callable[[First], Awaitable[Stalled]]


@pytest.fixture(name="stalled")
async def stalled_fixture() -> AsyncIterator[StartStalled]:
    """Starts ``Stalled`` upstreams, each stopped at the end of the test."""
    ups: list[Stalled] = []

    async def start(first: First) -> Stalled:
        up = Stalled(first)
        await up.start()
        ups.append(up)
        return up

    yield start
    for up in ups:
        await up.stop()


async def big_sidecar(make_sidecar: MakeSidecar, tmp_path: Path, port: int) -> tuple[Running, str]:
    """A pooled MCP upstream that takes JSON-RPC bodies of 16 MiB, read timeout 0.5 s."""
    cfg = base_config(f"http://127.0.0.1:{port}", tmp_path)
    cfg["upstreams"] = [
        {"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{port}/mcp", "path_prefix": "/mcp/tools",
         "timeouts": {"read": "0.5s"}, "mcp": {"max_body": "16MiB"}},
    ]  # fmt: skip
    gw = await make_sidecar(cfg)
    assert "tools" in gw.sc.pools
    _, key = await gw.create_key(name="agent")
    return gw, key


def big_call(rid: int) -> bytes:
    body = call(rid)
    body["params"]["arguments"] = {"pad": "p" * BIG}
    return json.dumps(body).encode()


async def post_raw(gw: Running, key: str, body: bytes) -> tuple[int, bytes]:
    async with asyncio.timeout(WAIT):
        r = await gw.proxy.post("/mcp/tools", data=body, headers={**ACCEPT, "Authorization": f"Bearer {key}"})
        async with r:
            return r.status, await r.read()


async def pool_empty(gw: Running) -> bool:
    """Whether the pool holds no connection within ``WAIT`` (polled: only the pool knows)."""
    deadline = time.monotonic() + WAIT
    while gw.sc.pools["tools"]._all:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# ------------------------------------------------------------------ a request not fully written


async def test_an_early_answer_while_the_body_is_unsent_never_keeps_the_connection(
    stalled: StartStalled, make_sidecar: MakeSidecar, tmp_path: Path
) -> None:
    """The upstream answers (keep-alive) after the request head, before it read the 8 MiB body,
    then stops reading. The pool took the exchange for complete and put the connection back with
    megabytes of that body still unsent: the next client's request queued behind them on a socket
    nobody reads (504 after the read timeout; an upstream that read on would parse the rest of one
    client's body as the next request). Now the connection is dropped: request 2 gets its own answer
    on a new connection, and the upstream never receives the rest of request 1's body."""

    async def first(writer: asyncio.StreamWriter) -> None:
        writer.write(answer(1, note="early"))
        await writer.drain()

    up = await stalled(first)
    gw, key = await big_sidecar(make_sidecar, tmp_path, up.port)
    body = big_call(1)
    status, got = await post_raw(gw, key, body)
    assert status == 200 and json.loads(got)["result"]["note"] == "early"
    await assert_ok(gw, key, 2, note="conn1")
    assert up.accepted == 2
    received = await up.drain0()
    assert len(received) < len(body)  # cut off: the rest of the body was never pushed after the answer


async def test_a_request_given_up_on_while_its_body_is_unsent_frees_its_connection(
    stalled: StartStalled, make_sidecar: MakeSidecar, tmp_path: Path
) -> None:
    """The upstream reads the head of an 8 MiB POST, then neither answers nor reads (a hung
    server). 504 after the read timeout; the pool closed the connection gracefully, which waits
    for the unsent megabytes to drain first: socket and body stayed for as long as the upstream
    hung, one per request a client sends. Now the connection is gone at once, and the upstream,
    reading again, gets a cut-off request, never the whole one."""

    async def first(writer: asyncio.StreamWriter) -> None:
        return None

    up = await stalled(first)
    gw, key = await big_sidecar(make_sidecar, tmp_path, up.port)
    body = big_call(1)
    status, got = await post_raw(gw, key, body)
    assert status == 504 and error_code(got) == "upstream_timeout"
    assert await pool_empty(gw)
    received = await up.drain0()
    assert len(received) < len(body)
    await assert_ok(gw, key, 2, note="conn1")


# ------------------------------------------------------------------ an exchange given up on: nothing left behind


async def test_a_client_that_leaves_before_the_headers_never_leaves_its_answer_behind(
    raw: StartRaw, sidecar: Setup
) -> None:
    """A client sends its call and hangs up while the upstream works on it: its request is
    cancelled, which closes the upstream connection (the upstream sees it), so the answer the
    upstream writes afterwards can never become the next client's."""
    arrived = asyncio.Event()
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        req = await read_request(reader)
        assert req is not None
        arrived.set()
        if await until_closed(reader):
            closed.set()
        with contextlib.suppress(ConnectionError):
            writer.write(answer(2, note="left behind") + answer(3, note="left behind"))
            await writer.drain()

    up = await raw(handler)
    gw, key = await sidecar(up.port, read="10s")
    body = json.dumps(call(1)).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
    writer.write(
        b"POST /mcp/tools HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nAccept: application/json, "
        b"text/event-stream\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (key.encode(), len(body), body)
    )
    async with asyncio.timeout(WAIT):
        await arrived.wait()
    writer.close()
    async with asyncio.timeout(WAIT):
        await closed.wait()
    await assert_ok(gw, key, 2, note="conn1")
    await assert_ok(gw, key, 3, note="conn1")


async def test_a_small_body_that_stalls_is_a_504_and_its_rest_never_reaches_the_next_request(
    raw: StartRaw, sidecar: Setup
) -> None:
    """Headers and 10 of 100 body bytes, then silence: 504 ``upstream_timeout`` (a small body is
    read whole before anything goes out). The rest of that body and a forged answer to the next
    call, written once the sidecar gave up, find the connection closed: call 2 gets its own answer."""
    closed = asyncio.Event()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        assert await read_request(reader) is not None
        writer.write(head + b"0123456789")
        await writer.drain()
        if await until_closed(reader):
            closed.set()
        with contextlib.suppress(ConnectionError):
            writer.write(b"x" * 90 + answer(2, note="forged"))
            await writer.drain()

    up = await raw(handler)
    gw, key = await sidecar(up.port, read="0.5s")
    status, _, body = await post(gw, key, 1)
    assert status == 504 and error_code(body) == "upstream_timeout"
    assert json.loads(body)["error"]["message"] == "upstream tools did not send its body within 0.5s"
    async with asyncio.timeout(WAIT):
        await closed.wait()
    await assert_ok(gw, key, 2, note="conn1")


# ------------------------------------------------------------------ framing the sidecar cannot relay

CODINGS = {
    "gzip, read until close": b"Transfer-Encoding: gzip\r\n\r\n",
    "identity, read until close": b"Transfer-Encoding: identity\r\n\r\n",
    "gzip, chunked": b"Transfer-Encoding: gzip, chunked\r\n\r\n",
    "gzip then chunked, two fields": b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
}


@pytest.mark.parametrize("framing", CODINGS.values(), ids=CODINGS.keys())
async def test_a_transfer_coding_other_than_chunked_is_a_clean_502(
    raw: StartRaw, sidecar: Setup, framing: bytes
) -> None:
    """The sidecar never asks for one (``TE`` is hop-by-hop, not forwarded), cannot undo one, and
    drops ``Transfer-Encoding`` on the way out: ``gzip, chunked`` reached the client as gzip bytes
    labelled as plain JSON, and a body read until close was cut after the 200 had gone out (llhttp
    reads it until close, the pool took it for broken). Now it is refused before anything is sent."""
    data = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"note": "conn0"}}).encode()
    coded = gzip.compress(data) if b"gzip" in framing else data
    body = chunk(coded) + b"0\r\n\r\n" if framing.rstrip().endswith(b"chunked") else coded
    up = await raw(once_then_honest(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + body))
    gw, key = await sidecar(up.port)
    status, ctype, got = await post(gw, key, 1)
    assert (status, ctype) == (502, "application/json"), got
    assert json.loads(got)["error"] == {
        "code": "upstream_unavailable",
        "message": "upstream tools sent a malformed answer",
    }
    await assert_ok(gw, key, 2, note="conn1")


# ------------------------------------------------------------------ a call goes up once


async def test_a_partial_answer_to_a_call_never_sends_the_call_again(
    raw: StartRaw, make_sidecar: MakeSidecar, tmp_path: Path
) -> None:
    """The client adds ``Range`` to its ``tools/call``; the upstream (one that applies ranges to any
    answer) says 206. A 206 cannot be scrubbed, so the forwarder asked again without ``Range``: for
    a POST that ran the tool twice on one authorisation, one rate-limit and per-tool count
    (``delete_*: 1/hour`` let two through). Now only a GET is asked again; the call went up once
    and the client gets the designed 502."""
    calls: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            calls.append(req[0].split(b" ", 1)[0])
            if b"\r\nrange:" in req[0].lower():
                part = b'{"jsonrpc"'
                writer.write(
                    b"HTTP/1.1 206 Partial Content\r\nContent-Type: application/json\r\n"
                    b"Content-Range: bytes 0-9/60\r\nContent-Length: 10\r\n\r\n" + part
                )
            else:
                writer.write(answer(rpc_id(req[1]), note=f"conn{n}"))
            await writer.drain()

    up = await raw(handler)
    cfg = base_config("http://unused", tmp_path)
    auth = {"Authorization": "Bearer ${MCP_SECRET}"}
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{up.port}/mcp",
                         "path_prefix": "/mcp/tools", "headers": auth}]  # fmt: skip
    gw = await make_sidecar(cfg, extra_env={"MCP_SECRET": "s3cr3t-mcp-token-0123456789"})
    assert "tools" in gw.sc.pools
    _, key = await gw.create_key(name="agent")
    status, ctype, body = await post(gw, key, 1, Range="bytes=0-9")
    assert (status, ctype) == (502, "application/json"), body
    assert error_code(body) == "upstream_unavailable"
    assert calls == [b"POST"]
    await assert_ok(gw, key, 2)


# ------------------------------------------------------------------ regression guards: framing llhttp decides

FORGED = answer(2, note="forged")


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_a_bodiless_status_with_a_body_never_hands_it_to_the_next_request(
    raw: StartRaw, sidecar: Setup, status: bytes
) -> None:
    """204 and 304 have no body whatever their ``Content-Length`` says: the client gets the bare
    status, and the "body" (a whole forged answer to the next call) never becomes call 2's answer."""
    head = b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(FORGED)
    up = await raw(once_then_honest(head + FORGED))
    gw, key = await sidecar(up.port)
    code, _, body = await post(gw, key, 1)
    assert (code, body) == (int(status[:3]), b"")
    await assert_ok(gw, key, 2, note="conn1")


async def test_head_never_goes_through_the_pool(raw: StartRaw, sidecar: Setup) -> None:
    """A HEAD answer carries a length but no body, which the pool's parser cannot be told about:
    it would wait for the 46 bytes (a 504) or take the next answer's bytes for them. HEAD stays
    on aiohttp's client: answered at once, and the pool's next call is not disturbed."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            if req[0].startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 46\r\n\r\n")
            else:
                writer.write(answer(rpc_id(req[1]), note=f"conn{n}"))
            await writer.drain()

    up = await raw(handler)
    gw, key = await sidecar(up.port, read="0.5s")
    async with asyncio.timeout(WAIT):
        r = await gw.proxy.head("/mcp/tools", headers={"Authorization": f"Bearer {key}"})
        async with r:
            assert (r.status, r.headers["Content-Length"]) == (200, "46")
    await assert_ok(gw, key, 1)
    await assert_ok(gw, key, 2)


async def test_a_secret_in_a_trailer_or_a_chunk_extension_never_reaches_the_client(
    raw: StartRaw, make_sidecar: MakeSidecar, tmp_path: Path
) -> None:
    """Invariant 1: an upstream that echoes its credential where no scrubber looks (a chunk
    extension, a trailer field after the last chunk). Neither is relayed: the client gets the
    body, re-chunked by the sidecar, and no trailer; the connection is kept (the answer was whole)."""
    secret = b"s3cr3t-mcp-token-0123456789"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            data = json.dumps({"jsonrpc": "2.0", "id": rpc_id(req[1]), "result": {"note": f"conn{n}"}}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                b"Trailer: X-Echo\r\n\r\n%x;echo=%s\r\n%s\r\n0;echo=%s\r\nX-Echo: %s\r\n\r\n"
                % (len(data), secret, data, secret, secret)
            )
            await writer.drain()

    up = await raw(handler)
    cfg = base_config("http://unused", tmp_path)
    auth = {"Authorization": "Bearer ${MCP_SECRET}"}
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{up.port}/mcp",
                         "path_prefix": "/mcp/tools", "headers": auth}]  # fmt: skip
    gw = await make_sidecar(cfg, extra_env={"MCP_SECRET": secret.decode()})
    _, key = await gw.create_key(name="agent")
    body = json.dumps(call(1)).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
    try:
        writer.write(
            b"POST /mcp/tools HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nAccept: application/json, "
            b"text/event-stream\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (key.encode(), len(body), body)
        )
        async with asyncio.timeout(WAIT):
            everything = await reader.read()
    finally:
        writer.close()
    assert everything.startswith(b"HTTP/1.1 200 ") and b'"note": "conn0"' in everything
    assert secret not in everything and b"X-Echo" not in everything and b"echo=" not in everything
    await assert_ok(gw, key, 2, note="conn0")


# ------------------------------------------------------------------ an idle connection that already heard something


async def next_after(tmp_path: Path, how: str) -> list[str]:
    """Two calls through a ``ConnectionPool`` on the running loop. Between them, while connection 0
    sits idle, its upstream writes a forged answer (``forged``) or closes (``closed``): the bytes or
    the FIN are in the sidecar's kernel buffer, but the loop has not read them when call 2 takes the
    connection (``pool.request`` runs up to its write without yielding). The notes answered, or the error."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = len(writers)
        writers.append(writer)
        while (req := await read_request(reader)) is not None:
            writer.write(answer(rpc_id(req[1]), note=f"conn{n}"))
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{port}/mcp"}]
    env = {"SIDECAR_ADMIN_TOKEN": "x", "PLEX_TOKEN": "y"}
    pool = ConnectionPool(parse_config(cfg, env=env, base=tmp_path).upstreams[0])
    notes: list[str] = []
    try:
        async with asyncio.timeout(WAIT):
            for rid in (1, 2):
                body = json.dumps(call(rid)).encode()
                headers = CIMultiDict({"Host": f"127.0.0.1:{port}", "Content-Length": str(len(body))})
                if rid == 2 and how == "forged":  # a write to an idle asyncio transport reaches the kernel at once
                    writers[0].write(answer(2, note="forged"))
                elif rid == 2:  # its FIN, sent at once (``close`` and uvloop's ``write_eof`` wait a loop turn)
                    with socket.socket(fileno=os.dup(writers[0].get_extra_info("socket").fileno())) as sock:
                        sock.shutdown(socket.SHUT_WR)
                try:
                    resp = await pool.request("POST", URL(f"http://127.0.0.1:{port}/mcp"), headers, body)
                except aiohttp.ClientError as e:
                    notes.append(type(e).__name__)
                    continue
                got = b""
                while part := await resp.content.readany():
                    got += part
                resp.release()
                notes.append(json.loads(got)["result"]["note"])
    finally:
        await pool.close()
        server.close()
        for w in writers:
            w.transport.abort()
        await server.wait_closed()
    return notes


@pytest.mark.parametrize("how", ["forged", "closed"])
async def test_an_idle_connection_that_heard_anything_is_not_used(tmp_path: Path, how: str) -> None:
    """Unsolicited bytes on an idle connection were taken for call 2's answer when they were already
    in when the call went out (the pool only aborts on bytes it reads while idle); a FIN already in
    made a POST, which is never sent twice, a 502. Now the pool looks (one ``poll``) before it reuses
    a connection: call 2 goes out on a new one and gets its own answer."""
    assert await next_after(tmp_path, how) == ["conn0", "conn1"]


@pytest.mark.parametrize("how", ["forged", "closed"])
def test_an_idle_connection_that_heard_anything_is_not_used_on_uvloop(tmp_path: Path, how: str) -> None:
    """The same on production's loop."""
    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(next_after(tmp_path, how)) == ["conn0", "conn1"]
    finally:
        loop.close()


async def test_a_client_that_leaves_mid_answer_never_passes_the_rest_to_the_next_call(
    raw: StartRaw, sidecar: Setup
) -> None:
    """A 300 KB JSON answer (streamed: over the small-body bound), of which the upstream sends a
    third and stalls; the client reads a little and hangs up. The answer had begun (its id and
    ``result`` went out), so the forwarder gives the stream ``END_WAIT`` to end for a clean reuse;
    it does not end, so the connection is closed. The rest of that answer and a forged answer to
    call 2, written afterwards, never reach call 2."""
    data = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"note": "conn0", "pad": "q" * 300_000}}).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data)
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            return await keep_answering(reader, writer, n)
        assert await read_request(reader) is not None
        writer.write(head + data[:100_000])
        await writer.drain()
        if await until_closed(reader):
            closed.set()
        with contextlib.suppress(ConnectionError):
            writer.write(data[100_000:] + FORGED)
            await writer.drain()

    up = await raw(handler)
    gw, key = await sidecar(up.port, read="10s")
    r = await open_stream(gw, key)
    async with asyncio.timeout(WAIT):
        assert (await r.content.readexactly(20)).startswith(b'{"jsonrpc"')
    r.close()
    async with asyncio.timeout(WAIT):
        await closed.wait()
    await assert_ok(gw, key, 2, note="conn1")


async def test_an_answer_already_released_cannot_touch_the_next_exchange(tmp_path: Path) -> None:
    """A ``PooledResponse`` is released (its connection goes back to the pool and carries the next
    call), then closed late, as a drain's stream closer can be (``Forwarder.end_streams`` runs the
    closers it listed a loop turn later). That closed the connection under the next call, which then
    waited for an answer that could no longer come (no error: the connection was no longer busy).
    Now a late ``close`` or ``release`` only ever acts on its own exchange: call 2 gets its answer."""
    arrived = asyncio.Event()
    go = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            if rpc_id(req[1]) == 2:
                arrived.set()
                await go.wait()
            writer.write(answer(rpc_id(req[1]), note="conn0"))
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{port}/mcp"}]
    pool = ConnectionPool(
        parse_config(cfg, env={"SIDECAR_ADMIN_TOKEN": "x", "PLEX_TOKEN": "y"}, base=tmp_path).upstreams[0]
    )
    url = URL(f"http://127.0.0.1:{port}/mcp")

    def send(rid: int) -> Awaitable[PooledResponse]:
        body = json.dumps(call(rid)).encode()
        return pool.request("POST", url, CIMultiDict({"Host": "x", "Content-Length": str(len(body))}), body)

    try:
        async with asyncio.timeout(WAIT):
            first = await send(1)
            while await first.content.readany():
                pass
            first.release()
            second = asyncio.ensure_future(send(2))
            await arrived.wait()  # call 2 is out, on the same connection
            first.close()  # late
            first.release()
            go.set()
            resp = await second
            got = b""
            while part := await resp.content.readany():
                got += part
            resp.release()
        assert json.loads(got)["id"] == 2 and len(pool._all) == 1
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------------ an answer in 1-byte chunks


async def test_an_answer_in_one_byte_chunks_costs_its_size_not_forty_times_it(tmp_path: Path) -> None:
    """A hostile upstream frames 96 KiB as 1-byte chunks (under the 128 KiB at which the pool stops
    reading, so none of it is held back). Each chunk was buffered as its own bytes object, ~40 bytes
    of overhead per byte (~4 MB per answer); now the chunks of one read are joined: a handful of
    buffered pieces, and the body arrives intact."""
    size = 96 * 1024
    body = bytes(range(256)) * (size // 256)
    framed = b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(size)) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is not None:
            writer.write(head + framed)
            await writer.drain()
        await until_closed(reader)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{port}/mcp"}]
    pool = ConnectionPool(
        parse_config(cfg, env={"SIDECAR_ADMIN_TOKEN": "x", "PLEX_TOKEN": "y"}, base=tmp_path).upstreams[0]
    )
    try:
        async with asyncio.timeout(WAIT):
            resp = await pool.request("GET", URL(f"http://127.0.0.1:{port}/mcp"), CIMultiDict({"Host": "up"}), None)
            while not resp.content.is_eof():  # read nothing until all of it is in
                await asyncio.sleep(0.005)
            pieces = len(resp.content._buffer)
            assert pieces <= 64, f"{pieces} buffered pieces for {size} bytes"
            got = b""
            while part := await resp.content.readany():
                got += part
            resp.release()
        assert got == body
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
