"""The lean keep-alive upstream client (``sidecar.http.pool``), attacked by its upstream.

A plain-HTTP MCP upstream's requests go through ``ConnectionPool`` instead of aiohttp's
client. Here the upstream is a raw asyncio TCP server that writes exact bytes (the answer
is the attacker's), and a real Sidecar sits in front of it. Each test asserts what the
client sees: the designed JSON error before any byte went out, a cut connection after, a
connection never reused once its framing cannot be trusted, and the next request working.
Helpers: ``tests/pool_support.py``; long answers and the pool itself: ``test_pool_streams.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeSidecar, base_config
from pool_support import (  # noqa: F401 - raw_fixture and sidecar_fixture: the fixtures raw and sidecar
    ACCEPT,
    SSE_HEAD,
    WAIT,
    Setup,
    StartRaw,
    answer,
    answer_then,
    assert_ok,
    call,
    chunk,
    delete,
    error_code,
    keep_answering,
    once_then_honest,
    open_stream,
    post,
    progress,
    raw_fixture,
    read_request,
    rpc_id,
    sidecar_fixture,
    until_closed,
)
from raw_http import read_response

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

    async def after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write_eof()  # idle: the upstream's keep-alive timer ran out
        assert await until_closed(reader)  # the sidecar closed its side in turn
        hung_up.set()

    up = await raw(answer_then(after))
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

    async def after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reset.wait()
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    up = await raw(answer_then(after))
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
    "status 600": b"HTTP/1.1 600 OK\r\nContent-Length: 2\r\n\r\n{}",
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
    "content-length overflow": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n{}",
    "closed before the headers end": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
}


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
    closed = raw_answer == MALFORMED["closed before the headers end"]
    said = (
        "upstream tools closed the connection without answering" if closed else "upstream tools sent a malformed answer"
    )
    assert json.loads(body)["error"]["message"] == said
    assert b"Set-Cookie" not in body and b"aaaa" not in body
    await assert_ok(gw, key, 2, note="conn1")


@pytest.mark.parametrize("reason", [b"OK\x7f", b"OK\x01", b"\x80", "Caf\u00e9".encode()])
async def test_an_odd_reason_phrase_becomes_the_standard_one(raw: StartRaw, sidecar: Setup, reason: bytes) -> None:
    """Through the pool too: a reason phrase that is not printable ASCII is replaced by the
    standard one (aiohttp refused to write a control character: the client got no answer)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            writer.write(answer(rpc_id(req[1])).replace(b"200 OK", b"200 " + reason, 1))
            await writer.drain()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    async with asyncio.timeout(WAIT):
        r = await gw.proxy.post("/mcp/tools", json=call(1), headers={**ACCEPT, "Authorization": f"Bearer {key}"})
        async with r:
            assert (r.status, r.reason) == (200, "OK")
            assert json.loads(await r.read())["id"] == 1


async def test_a_secret_split_by_bytes_that_are_not_utf8_never_joins_on_the_way_out(
    raw: StartRaw, make_sidecar: MakeSidecar, tmp_path: Path
) -> None:
    """Invariant 1 through the pool: an upstream that echoes its configured credential in a header,
    cut by bytes that are not UTF-8, never gets it out whole (aiohttp's writer dropped such bytes
    after the scrubber had looked); the client sees U+FFFD where they were."""
    secret = "s3cr3t-mcp-token-0123456789"
    split = secret[:6].encode() + b"\x80" + secret[6:].encode()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            writer.write(answer(rpc_id(req[1]), b"X-Echo: " + split + b"\r\n"))
            await writer.drain()

    up = await raw(handler)
    cfg = base_config("http://unused", tmp_path)
    auth = {"Authorization": "Bearer ${MCP_SECRET}"}
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{up.port}/mcp",
                         "path_prefix": "/mcp/tools", "headers": auth}]  # fmt: skip
    gw = await make_sidecar(cfg, extra_env={"MCP_SECRET": secret})
    assert "tools" in gw.sc.pools
    _, key = await gw.create_key(name="agent")
    async with asyncio.timeout(WAIT):
        r = await gw.proxy.post("/mcp/tools", json=call(1), headers={**ACCEPT, "Authorization": f"Bearer {key}"})
        async with r:
            assert r.status == 200
            raw_headers = b"\r\n".join(k + b": " + v for k, v in r.raw_headers)
            assert secret.encode() not in raw_headers and secret.encode() not in await r.read()
            assert r.headers["X-Echo"] == secret[:6] + "\ufffd" + secret[6:]


async def test_request_header_bytes_that_are_not_utf8_go_up_as_u_fffd(raw: StartRaw, sidecar: Setup) -> None:
    """Through the pool as through aiohttp's client: a client's header bytes that are not UTF-8
    reach the upstream as U+FFFD, UTF-8 as sent (``forward_headers``)."""
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            heads.append(req[0])
            writer.write(answer(rpc_id(req[1])))
            await writer.drain()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
    body = json.dumps(call(1)).encode()
    writer.write(
        b"POST /mcp/tools HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
        + b"\r\nAccept: application/json, text/event-stream\r\nContent-Type: application/json"
        + b"\r\nX-Note: a\x80b\r\nX-Title: Caf\xc3\xa9\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )  # fmt: skip
    assert (await asyncio.wait_for(reader.read(), WAIT)).startswith(b"HTTP/1.1 200 ")
    writer.close()
    assert b"\r\nX-Note: a\xef\xbf\xbdb\r\n" in heads[0]
    assert b"\r\nX-Title: Caf\xc3\xa9\r\n" in heads[0]


async def test_headers_the_upstream_names_in_connection_stay_upstream(raw: StartRaw, sidecar: Setup) -> None:
    """An answer that names headers in ``Connection`` (hop-by-hop by RFC 9110 §7.6.1) through the
    pool: neither they nor ``Connection`` reach the client, the rest does."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            extra = b"Connection: keep-alive, X-Internal,x-other\r\nX-Internal: a\r\nX-Other: b\r\nX-Kept: c\r\n"
            writer.write(answer(rpc_id(req[1]), extra))
            await writer.drain()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    async with asyncio.timeout(WAIT):
        r = await gw.proxy.post("/mcp/tools", json=call(1), headers={**ACCEPT, "Authorization": f"Bearer {key}"})
        async with r:
            assert r.status == 200 and json.loads(await r.read())["id"] == 1
            names = {k.lower() for k, _ in r.raw_headers}
    assert b"x-kept" in names
    assert not names & {b"x-internal", b"x-other", b"connection"}


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

    async def after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await inject.wait()
        writer.write(answer(2, note="injected"))
        await writer.drain()
        if await until_closed(reader):
            retired.set()

    up = await raw(answer_then(after))
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


@pytest.mark.parametrize("how", ["closed", "bad chunk size", "chunk size overflow", "reset"])
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
        elif how == "chunk size overflow":
            writer.write(b"ffffffffffffffffff\r\n" + progress(1) + b"\r\n")
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
