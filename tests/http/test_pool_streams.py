"""The lean upstream client (``sidecar.http.pool``) with long answers, and the pool itself.

Event streams through a real Sidecar (backpressure, a client that leaves, a drain), idle
connections after a burst, ``request_head``'s refusals, and the pool on uvloop (production's
loop) as well as asyncio's, alone and inside a whole Sidecar. Helpers: ``tests/pool_support.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import pytest
import uvloop
from aiohttp import web
from conftest import Running, base_config
from multidict import CIMultiDict
from pool_support import (  # noqa: F401 - raw_fixture and sidecar_fixture: the fixtures raw and sidecar
    ACCEPT,
    SSE_HEAD,
    WAIT,
    RawUpstream,
    Setup,
    StartRaw,
    answer,
    assert_ok,
    call,
    chunk,
    keep_answering,
    open_stream,
    post,
    progress,
    raw_fixture,
    read_request,
    rpc_id,
    sidecar_fixture,
    until_closed,
)
from prometheus_client import CollectorRegistry
from raw_http import read_response
from yarl import URL

from sidecar.app import Sidecar, create_apps
from sidecar.config import parse_config
from sidecar.http import answer as answer_mod
from sidecar.http import pool as pool_mod
from sidecar.http.pool import ConnectionPool, request_head

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
            assert conn.response is not None and conn.response.content._size <= answer_mod.HIGH_WATER + 256 * 1024
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


async def test_a_client_that_leaves_a_paused_stream_closes_the_upstream_connection(
    raw: StartRaw, sidecar: Setup
) -> None:
    """The same while the pool has paused reading (the client read nothing of a fast stream): the
    upstream, held back in ``drain()``, sees its connection reset once the client hangs up."""
    cancelled = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        assert await read_request(reader) is not None
        writer.write(SSE_HEAD)
        try:
            for i in range(EVENTS * 4):  # far more than the buffers in between take
                writer.write(chunk(progress(i, pad=65_000)))
                await writer.drain()
        except ConnectionError:
            cancelled.set()

    up = await raw(handler)
    gw, key = await sidecar(up.port)
    r = await open_stream(gw, key)
    async with asyncio.timeout(WAIT):
        while not (conns := gw.sc.pools["tools"]._all) or not next(iter(conns))._paused:
            await asyncio.sleep(0.005)  # polled: the pool's pause is visible only there
        r.close()
        await cancelled.wait()
    assert not gw.sc.pools["tools"]._all


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


async def read_all(resp: answer_mod.PooledResponse) -> bytes:
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
                assert resp.content._size <= answer_mod.HIGH_WATER + 256 * 1024
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
