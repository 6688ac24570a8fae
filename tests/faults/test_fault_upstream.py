"""Upstream faults, with real processes and sockets: what the client sees, what is released, what is recorded.

- **Killed mid-answer**: the upstream is a separate Python process (an aiohttp app written
  by this file) killed with SIGKILL while it streams a large body, an SSE stream, a
  websocket and an MCP SSE answer. The client must see an honest end (a body cut short,
  never a complete-looking one; websocket close 1014), the key's concurrency slot and the
  pooled upstream connection must come back, and the access log and metrics say
  ``upstream_unavailable``.
- **Black-holed**: raw sockets that accept and never answer, or answer headers and stall:
  ``504 upstream_timeout`` once the (small) configured timeouts pass, never later, while a
  second upstream on the same sidecar is served normally.
- **Refused / unresolvable / wrong TLS certificate**: ``502 upstream_unavailable``,
  ``/readyz`` on the admin listener says which upstream and why, and both recover by
  themselves once the upstream is back (no restart of the sidecar).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config, log_lines
from tlscerts import make_tls

from sidecar.demo import free_port

# --------------------------------------------------------------------------- a killable upstream

UPSTREAM_SCRIPT = r'''
"""An upstream that starts an answer, then waits to be killed."""
import asyncio, json, socket
from aiohttp import web

CHUNK = b"x" * 65536


async def forever() -> None:
    await asyncio.Event().wait()


async def big(request):
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("framing") == "length":
        resp.content_length = 100 * 1024 * 1024
    await resp.prepare(request)
    await resp.write(CHUNK)
    await forever()


async def hang(request):
    print("answering", flush=True)  # the request is here; the answer never comes
    await forever()


async def upload(request):
    await request.content.readany()
    print("uploading", flush=True)  # the body has started to arrive
    await forever()


async def ws_hang(request):
    print("upgrading", flush=True)  # the handshake is here; the 101 never comes
    await forever()


async def events(request):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b"data: first\n\n")
    await forever()


async def ws(request):
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    await sock.send_str("first")
    await forever()


async def mcp(request):
    call = await request.json()
    if call.get("method") == "initialize":  # what the REST tool call's client needs first
        return web.json_response({"jsonrpc": "2.0", "id": call["id"], "result": {
            "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
            "serverInfo": {"name": "killable", "version": "1"}}})
    if "id" not in call:
        return web.Response(status=202)
    print("calling", flush=True)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                "params": {"progressToken": call["id"], "progress": 1, "total": 2}}
    await resp.write(b"event: message\ndata: " + json.dumps(progress).encode() + b"\n\n")
    await forever()


async def main() -> None:
    app = web.Application()
    app.router.add_get("/big", big)
    app.router.add_get("/hang", hang)
    app.router.add_post("/upload", upload)
    app.router.add_get("/events", events)
    app.router.add_get("/ws", ws)
    app.router.add_get("/ws-hang", ws_hang)
    app.router.add_post("/mcp", mcp)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    await web.SockSite(runner, sock).start()
    print(sock.getsockname()[1], flush=True)  # listening: connections queue from here on
    await forever()


asyncio.run(main())
'''


@dataclass
class Killable:
    proc: asyncio.subprocess.Process
    url: str

    async def said(self) -> str:
        """The next line the upstream printed (it says when a request reached it)."""
        assert self.proc.stdout is not None
        return (await asyncio.wait_for(self.proc.stdout.readline(), 5)).decode().strip()

    def kill(self) -> None:
        """SIGKILL: no close frames, no final chunk, the kernel just closes the process's sockets."""
        self.proc.kill()


@pytest.fixture
async def killable(tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[Killable]]]:
    procs: list[asyncio.subprocess.Process] = []
    script = tmp_path / "killable_upstream.py"
    script.write_text(UPSTREAM_SCRIPT)

    async def start() -> Killable:
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=asyncio.subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip().isdigit(), f"the upstream did not start: {line!r}"
        return Killable(proc, f"http://127.0.0.1:{int(line)}")

    yield start
    for p in procs:
        if p.returncode is None:
            p.kill()
        await p.wait()


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll a condition the sidecar reaches once the request's handler has finished."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.01)


def acquired(sc: Running, upstream: str) -> int:
    """Upstream connections the sidecar holds for a request right now (pooled idle ones excluded)."""
    connector = sc.sc.sessions[upstream].connector
    assert isinstance(connector, aiohttp.TCPConnector)
    return len(connector._acquired)


def requests_total(sc: Running, upstream: str, code: int) -> float:
    text = sc.sc.metrics.exposition().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sidecar_requests_total{") and f'upstream="{upstream}"' in line and f'code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric(sc: Running, name: str, **labels: str) -> float | None:
    text = sc.sc.metrics.exposition().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def upstream_errors(sc: Running, upstream: str, error: str) -> float:
    return metric(sc, "sidecar_upstream_errors_total", upstream=upstream, error=error) or 0.0


async def error_of(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json()
    assert body["success"] is False, body
    return str(body["error"]["code"])


MCP_ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def killable_front(
    make_sidecar: MakeSidecar, tmp_path: Path, url: str, mcp_read: str = "300s"
) -> tuple[Running, str, str]:
    """A sidecar with a Plex upstream and an MCP upstream, both the killable process; a key limited to 4 at once."""
    cfg = base_config(url, tmp_path)
    cfg["upstreams"].append({
        "id": "tools", "kind": "mcp", "url": f"{url}/mcp", "path_prefix": "/mcp/tools",
        "timeouts": {"read": mcp_read},
    })  # fmt: skip
    sc = await make_sidecar(cfg)
    rec, key = await sc.create_key(permissions={"upstreams": ["*"], "tools": {"tools": ["slow"]}}, concurrency=4)
    return sc, rec.id, key


# --------------------------------------------------------------------------- killed mid-answer


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_upstream_killed_mid_download_cuts_the_client_and_frees_everything(
    make_sidecar: MakeSidecar, killable: Callable[[], Awaitable[Killable]], tmp_path: Path, framing: str
) -> None:
    """A 100 MiB download whose upstream process is kill -9ed after 64 KiB: the client gets
    the 200 and the first 64 KiB, then a connection closed before the body is complete
    (aiohttp raises ClientPayloadError) — never a short body that looks whole."""
    up = await killable()
    sc, key_id, key = await killable_front(make_sidecar, tmp_path, up.url)
    resp = await sc.proxy.get(f"/big?framing={framing}", headers={"X-Plex-Token": key})
    assert resp.status == 200
    assert len(await resp.content.readexactly(65536)) == 65536
    assert sc.sc.limiter.in_flight(key_id) == 1 and acquired(sc, "plex") == 1
    up.kill()
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.read(), 5)
    await until(lambda: sc.sc.limiter.in_flight(key_id) == 0, "the concurrency slot is released")
    await until(lambda: acquired(sc, "plex") == 0, "the upstream connection is released")
    assert sc.sc.metrics.in_flight.value == 0
    lines = await log_lines(tmp_path / "access.log")
    assert (lines[-1]["status"], lines[-1]["error"]) == (200, "upstream_unavailable")
    assert requests_total(sc, "plex", 200) == 1  # the status that went out ...
    assert upstream_errors(sc, "plex", "upstream_unavailable") == 1  # ... and what became of it
    assert metric(sc, "sidecar_upstream_up", upstream="plex") == 0


async def test_upstream_killed_mid_sse_stream_cuts_the_client(
    make_sidecar: MakeSidecar, killable: Callable[[], Awaitable[Killable]], tmp_path: Path
) -> None:
    """An SSE stream (no idle timeout) whose upstream dies: the client's stream ends at once with
    an incomplete chunked body, not a clean end it could mistake for the server closing normally."""
    up = await killable()
    sc, key_id, key = await killable_front(make_sidecar, tmp_path, up.url)
    resp = await sc.proxy.get("/events", headers={"X-Plex-Token": key})
    assert resp.status == 200
    assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == b"data: first\n\n"
    up.kill()
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.read(), 5)
    await until(lambda: sc.sc.limiter.in_flight(key_id) == 0, "the concurrency slot is released")
    await until(lambda: acquired(sc, "plex") == 0, "the upstream connection is released")
    lines = await log_lines(tmp_path / "access.log")
    assert (lines[-1]["status"], lines[-1]["error"]) == (200, "upstream_unavailable")
    assert requests_total(sc, "plex", 200) == 1
    assert upstream_errors(sc, "plex", "upstream_unavailable") == 1


async def test_upstream_killed_mid_websocket_closes_the_client_with_1014(
    make_sidecar: MakeSidecar, killable: Callable[[], Awaitable[Killable]], tmp_path: Path
) -> None:
    """A websocket whose upstream process dies without a close frame: the client gets a close
    frame 1014 (bad gateway) — not 1000/1001, which would say the server ended it on purpose."""
    up = await killable()
    sc, key_id, key = await killable_front(make_sidecar, tmp_path, up.url)
    ws = await sc.proxy.ws_connect(f"/ws?X-Plex-Token={key}")
    try:
        first = await ws.receive(timeout=5)
        assert (first.type, first.data) == (aiohttp.WSMsgType.TEXT, "first")
        assert sc.sc.limiter.in_flight(key_id) == 1
        up.kill()
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE, msg
        assert msg.data == 1014, f"close code {msg.data}"
    finally:
        await ws.close()
    await until(lambda: sc.sc.limiter.in_flight(key_id) == 0, "the concurrency slot is released")
    await until(lambda: acquired(sc, "plex") == 0, "the upstream connection is released")
    lines = await log_lines(tmp_path / "access.log")
    assert (lines[-1]["status"], lines[-1].get("error")) == (101, "upstream_unavailable")
    assert requests_total(sc, "plex", 101) == 1
    assert upstream_errors(sc, "plex", "upstream_unavailable") == 1
    assert metric(sc, "sidecar_upstream_up", upstream="plex") == 0


async def test_upstream_killed_during_the_websocket_handshake_is_a_502(
    make_sidecar: MakeSidecar, killable: Callable[[], Awaitable[Killable]], tmp_path: Path
) -> None:
    """The upstream dies before answering the upgrade: no 101 was sent, so the client's handshake
    fails with a JSON 502 ``upstream_unavailable`` (not a hang, not a 101 followed by a close)."""
    up = await killable()
    sc, key_id, key = await killable_front(make_sidecar, tmp_path, up.url)
    pending = asyncio.ensure_future(sc.proxy.ws_connect(f"/ws-hang?X-Plex-Token={key}"))
    assert await up.said() == "upgrading"
    up.kill()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await asyncio.wait_for(pending, 5)
    assert refused.value.status == 502
    await until(lambda: sc.sc.limiter.in_flight(key_id) == 0, "the concurrency slot is released")
    assert acquired(sc, "plex") == 0
    lines = await log_lines(tmp_path / "access.log")
    assert (lines[-1]["status"], lines[-1]["error"]) == (502, "upstream_unavailable")


async def test_upstream_killed_mid_mcp_sse_answer_cuts_the_client(
    make_sidecar: MakeSidecar, killable: Callable[[], Awaitable[Killable]], tmp_path: Path
) -> None:
    """A tools/call answered as SSE (progress first, result later) whose MCP server dies before
    the result: the client's stream is cut incomplete, so its SDK reports a failed call instead
    of waiting for a result that cannot come."""
    up = await killable()
    sc, key_id, key = await killable_front(make_sidecar, tmp_path, up.url)
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "slow", "arguments": {}}}
    resp = await sc.proxy.post("/mcp/tools", json=call, headers={**MCP_ACCEPT, "Authorization": f"Bearer {key}"})
    assert resp.status == 200, await resp.text()
    event = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    assert b"notifications/progress" in event
    assert await up.said() == "calling"
    up.kill()
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.read(), 5)
    await until(lambda: sc.sc.limiter.in_flight(key_id) == 0, "the concurrency slot is released")
    await until(lambda: acquired(sc, "tools") == 0, "the upstream connection is released")
    lines = await log_lines(tmp_path / "access.log")
    assert (lines[-1]["status"], lines[-1]["error"]) == (200, "upstream_unavailable")
    assert requests_total(sc, "tools", 200) == 1
    assert upstream_errors(sc, "tools", "upstream_unavailable") == 1


async def test_upstream_killed_mid_rest_tool_call_is_a_502(
    make_sidecar: MakeSidecar, killable: Callable[[], Awaitable[Killable]], tmp_path: Path
) -> None:
    """The REST tool call (``POST /mcp``, a JSON answer) whose MCP server dies mid-SSE: nothing was
    sent yet, so the client gets a clean JSON 502 ``upstream_unavailable``."""
    up = await killable()
    sc, key_id, key = await killable_front(make_sidecar, tmp_path, up.url)
    body = {"mcp_id": "tools", "tool": "slow", "arguments": {}}
    pending = asyncio.ensure_future(sc.proxy.post("/mcp", json=body, headers={"Authorization": f"ApiKey {key}"}))
    assert await up.said() == "calling"
    up.kill()
    resp = await asyncio.wait_for(pending, 5)
    assert resp.status == 502
    assert await error_of(resp) == "upstream_unavailable"
    await until(lambda: sc.sc.limiter.in_flight(key_id) == 0, "the concurrency slot is released")
    await until(lambda: acquired(sc, "tools") == 0, "the upstream connection is released")
    assert upstream_errors(sc, "tools", "upstream_unavailable") == 1


async def test_rest_tool_call_whose_sse_answer_stalls_is_a_504(
    make_sidecar: MakeSidecar, killable: Callable[[], Awaitable[Killable]], tmp_path: Path
) -> None:
    """The REST tool call's upstream sends SSE headers and a progress event, then nothing: the
    client gets a JSON 504 ``upstream_timeout`` once the read timeout has passed with no byte,
    instead of waiting forever with the key's concurrency slot held."""
    up = await killable()
    sc, key_id, key = await killable_front(make_sidecar, tmp_path, up.url, mcp_read="0.5s")
    body = {"mcp_id": "tools", "tool": "slow", "arguments": {}}
    started = time.monotonic()
    resp = await asyncio.wait_for(sc.proxy.post("/mcp", json=body, headers={"Authorization": f"ApiKey {key}"}), 5)
    elapsed = time.monotonic() - started
    assert resp.status == 504
    assert await error_of(resp) == "upstream_timeout"
    assert 0.45 <= elapsed < 3, f"answered after {elapsed:.2f}s"
    assert sc.sc.limiter.in_flight(key_id) == 0
    await until(lambda: acquired(sc, "tools") == 0, "the upstream connection is released")


async def test_upstream_killed_before_answering_is_a_502(
    make_sidecar: MakeSidecar, killable: Callable[[], Awaitable[Killable]], tmp_path: Path
) -> None:
    """Killed while the request is on its way (nothing sent to the client yet): a clean JSON 502."""
    up = await killable()
    sc, key_id, key = await killable_front(make_sidecar, tmp_path, up.url)
    up.kill()
    await up.proc.wait()
    resp = await sc.proxy.get("/big", headers={"X-Plex-Token": key})
    assert resp.status == 502
    assert await error_of(resp) == "upstream_unavailable"
    assert sc.sc.limiter.in_flight(key_id) == 0 and acquired(sc, "plex") == 0
    assert requests_total(sc, "plex", 502) == 1
    assert upstream_errors(sc, "plex", "upstream_unavailable") == 1


async def test_upstream_killed_while_the_sidecar_waits_for_headers_is_a_502(
    make_sidecar: MakeSidecar, killable: Callable[[], Awaitable[Killable]], tmp_path: Path
) -> None:
    """The request reached the upstream, which dies before answering: nothing went to the client
    yet, so it gets a clean JSON 502 ``upstream_unavailable`` (not a reset, not a 504 later)."""
    up = await killable()
    sc, key_id, key = await killable_front(make_sidecar, tmp_path, up.url)
    pending = asyncio.ensure_future(sc.proxy.get("/hang", headers={"X-Plex-Token": key}))
    assert await up.said() == "answering"
    assert sc.sc.limiter.in_flight(key_id) == 1
    up.kill()
    resp = await asyncio.wait_for(pending, 5)
    assert resp.status == 502
    assert await error_of(resp) == "upstream_unavailable"
    await until(lambda: sc.sc.limiter.in_flight(key_id) == 0, "the concurrency slot is released")
    assert acquired(sc, "plex") == 0
    lines = await log_lines(tmp_path / "access.log")
    assert (lines[-1]["status"], lines[-1]["error"]) == (502, "upstream_unavailable")
    assert requests_total(sc, "plex", 502) == 1


async def test_upstream_killed_mid_upload_is_a_502(
    make_sidecar: MakeSidecar, killable: Callable[[], Awaitable[Killable]], tmp_path: Path
) -> None:
    """A streamed upload whose upstream dies after the first chunk: the client, still sending,
    gets a clean JSON 502 ``upstream_unavailable``; its unsent rest is never waited for."""
    up = await killable()
    sc, key_id, key = await killable_front(make_sidecar, tmp_path, up.url)
    stop = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"u" * 65536
        await stop.wait()  # the rest of the upload is never sent
        yield b"u"

    pending = asyncio.ensure_future(sc.proxy.post("/upload", data=body(), headers={"X-Plex-Token": key}))
    try:
        assert await up.said() == "uploading"
        up.kill()
        resp = await asyncio.wait_for(pending, 5)
        assert resp.status == 502
        assert await error_of(resp) == "upstream_unavailable"
    finally:
        stop.set()
    await until(lambda: sc.sc.limiter.in_flight(key_id) == 0, "the concurrency slot is released")
    await until(lambda: acquired(sc, "plex") == 0, "the upstream connection is released")
    lines = await log_lines(tmp_path / "access.log")
    assert (lines[-1]["status"], lines[-1]["error"]) == (502, "upstream_unavailable")


# --------------------------------------------------------------------------- black holes

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Hole:
    url: str
    accepted: asyncio.Event  # the sidecar connected
    released: asyncio.Event  # ... and has closed that connection again


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Handler], Awaitable[Hole]]]:
    """A bare TCP server; each returns its URL and an event set once the sidecar closed a connection."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: Handler) -> tuple[str, asyncio.Event]:
        accepted, released = asyncio.Event(), asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            accepted.set()
            try:
                await handler(reader, writer)
                while await reader.read(65536):  # never answers more; waits for the sidecar to hang up
                    pass
                released.set()
            except ConnectionError:
                released.set()
            finally:
                writer.close()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(srv)
        return Hole(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", accepted, released)

    yield start
    for w in writers:
        w.close()
    for s in servers:
        s.close()
        await s.wait_closed()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts the connection, reads nothing, answers nothing."""


async def headers_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\npartial")
    await writer.drain()


async def large_headers_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 10000000\r\n\r\n"
                 + b"y" * 70000)  # fmt: skip
    await writer.drain()


async def websocket_never_upgraded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")


READ_TIMEOUT = 1.0  # long enough that the healthy upstream surely answers within it on a loaded machine


async def two_upstreams(make_sidecar: MakeSidecar, tmp_path: Path, hole: str, healthy: str) -> tuple[Running, str]:
    cfg = base_config(healthy, tmp_path)
    cfg["upstreams"].append({
        "id": "hole", "kind": "plex", "url": hole, "token_env": "PLEX_TOKEN", "path_prefix": "/hole",
        "timeouts": {"connect": "1s", "read": f"{READ_TIMEOUT}s"},
    })  # fmt: skip
    sc = await make_sidecar(cfg)
    _, key = await sc.create_key()
    return sc, key


@pytest.fixture
async def healthy_upstream(aiohttp_server: Any) -> str:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize("hole", [silent, headers_then_stall, websocket_never_upgraded], ids=lambda h: h.__name__)
async def test_black_holed_upstream_is_a_504_after_the_read_timeout(
    make_sidecar: MakeSidecar,
    raw_upstream: Callable[[Handler], Awaitable[Hole]],
    healthy_upstream: str,
    tmp_path: Path,
    hole: Handler,
) -> None:
    """Accepts and never answers (or sends headers and a few bytes of a small body, or never
    completes a websocket handshake): the client gets a JSON 504 ``upstream_timeout`` once the
    read timeout has passed and not much later; the connection to the hole is closed; a second
    upstream of the same sidecar answers normally while the first request hangs."""
    black = await raw_upstream(hole)
    sc, key = await two_upstreams(make_sidecar, tmp_path, black.url, healthy_upstream)
    headers = {"X-Plex-Token": key}
    if hole is websocket_never_upgraded:
        headers |= {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    started = time.monotonic()
    stuck = asyncio.ensure_future(sc.proxy.get("/hole/x", headers=headers))
    await asyncio.wait_for(black.accepted.wait(), 5)  # the request is stuck at the hole now
    other = await sc.proxy.get("/library", headers={"X-Plex-Token": key})  # meanwhile, the healthy one
    assert other.status == 200 and await other.text() == "fine"
    assert not stuck.done(), "the healthy upstream should have answered while the hole was still waited on"
    resp = await asyncio.wait_for(stuck, 5)
    elapsed = time.monotonic() - started
    assert resp.status == 504
    assert await error_of(resp) == "upstream_timeout"
    assert READ_TIMEOUT * 0.9 <= elapsed < READ_TIMEOUT + 2, f"answered after {elapsed:.2f}s"
    await asyncio.wait_for(black.released.wait(), 5)  # the sidecar hung up on the hole
    lines = await log_lines(tmp_path / "access.log", want=2)
    hole_line = next(x for x in lines if x["upstream"] == "hole")
    assert (hole_line["status"], hole_line["error"]) == (504, "upstream_timeout")
    assert requests_total(sc, "hole", 504) == 1
    assert upstream_errors(sc, "hole", "upstream_timeout") == 1
    assert requests_total(sc, "plex", 200) == 1 and upstream_errors(sc, "plex", "upstream_timeout") == 0


async def test_upstream_that_never_reads_an_upload_is_a_504(
    make_sidecar: MakeSidecar, raw_upstream: Callable[[Handler], Awaitable[Hole]], healthy_upstream: str, tmp_path: Path
) -> None:
    """Accepts, then reads nothing while the client uploads 16 MiB: once the socket buffers are full
    the upload makes no progress, and after the read timeout the client gets a JSON 504."""

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await never_set.wait()

    never_set = asyncio.Event()
    black = await raw_upstream(deaf)
    sc, key = await two_upstreams(make_sidecar, tmp_path, black.url, healthy_upstream)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(256):
            yield b"u" * 65536

    started = time.monotonic()
    try:
        resp = await asyncio.wait_for(sc.proxy.post("/hole/up", data=body(), headers={"X-Plex-Token": key}), 10)
        assert resp.status == 504
        assert await error_of(resp) == "upstream_timeout"
    finally:
        never_set.set()
    assert time.monotonic() - started < READ_TIMEOUT + 3
    await asyncio.wait_for(black.released.wait(), 5)


async def test_tls_handshake_that_never_completes_is_a_504_and_not_ready(
    make_sidecar: MakeSidecar, raw_upstream: Callable[[Handler], Awaitable[Hole]], tmp_path: Path
) -> None:
    """An ``https`` upstream that accepts TCP and never answers the ClientHello: 504
    ``upstream_timeout`` after ``timeouts.connect`` (the handshake is part of connecting), and
    /readyz 503 after its own 1 s bound, not a hang."""
    black = await raw_upstream(silent)
    cfg = base_config(black.url.replace("http://", "https://"), tmp_path)
    cfg["upstreams"][0]["timeouts"] = {"connect": "0.5s", "read": "5s"}
    sc = await make_sidecar(cfg)
    _, key = await sc.create_key()
    started = time.monotonic()
    resp = await sc.proxy.get("/x", headers={"X-Plex-Token": key})
    elapsed = time.monotonic() - started
    assert resp.status == 504, await resp.text()
    assert await error_of(resp) == "upstream_timeout"
    assert 0.45 <= elapsed < 3, f"answered after {elapsed:.2f}s"
    started = time.monotonic()
    status, checks = await readyz(sc)
    assert status == 503 and checks["upstream:plex"].startswith("unreachable"), checks
    assert time.monotonic() - started < 3


async def test_upstream_stalling_mid_large_body_is_cut_after_the_read_timeout(
    make_sidecar: MakeSidecar,
    raw_upstream: Callable[[Handler], Awaitable[Hole]],
    healthy_upstream: str,
    tmp_path: Path,
) -> None:
    """Headers and 70 KB of a 10 MB body, then silence: the 200 and what arrived reach the client,
    then its connection is closed short of the Content-Length (ClientPayloadError) once the read
    timeout passes; the log says upstream_timeout."""
    black = await raw_upstream(large_headers_then_stall)
    sc, key = await two_upstreams(make_sidecar, tmp_path, black.url, healthy_upstream)
    started = time.monotonic()
    resp = await sc.proxy.get("/hole/big", headers={"X-Plex-Token": key})
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.read(), 5)
    assert time.monotonic() - started < READ_TIMEOUT + 2
    await asyncio.wait_for(black.released.wait(), 5)
    lines = await log_lines(tmp_path / "access.log")
    assert (lines[-1]["status"], lines[-1]["error"]) == (200, "upstream_timeout")
    assert upstream_errors(sc, "hole", "upstream_timeout") == 1


async def test_upstream_not_accepting_connections_is_a_504_after_the_connect_timeout(
    make_sidecar: MakeSidecar, healthy_upstream: str, tmp_path: Path
) -> None:
    """A listening socket whose accept queue is full drops the SYN: connect hangs. The client gets
    ``504 upstream_timeout`` after ``timeouts.connect``, not the kernel's minutes of SYN retries."""
    hole = socket.socket()
    fillers: list[socket.socket] = []
    try:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        port = hole.getsockname()[1]
        for _ in range(8):  # fill the accept queue (its length is backlog + 1 on Linux)
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        cfg = base_config(healthy_upstream, tmp_path)
        cfg["upstreams"][0]["url"] = f"http://127.0.0.1:{port}"
        cfg["upstreams"][0]["timeouts"] = {"connect": "0.3s", "read": "5s"}
        sc = await make_sidecar(cfg)
        _, key = await sc.create_key()
        started = time.monotonic()
        resp = await sc.proxy.get("/x", headers={"X-Plex-Token": key})
        elapsed = time.monotonic() - started
        assert resp.status == 504, await resp.text()
        assert await error_of(resp) == "upstream_timeout"
        assert 0.25 <= elapsed < 2.5, f"answered after {elapsed:.2f}s"
    finally:
        for s in fillers:
            s.close()
        hole.close()


# --------------------------------------------------------------------------- refused, DNS, TLS


async def readyz(sc: Running) -> tuple[int, dict[str, str]]:
    resp = await sc.admin.get("/readyz")
    body = await resp.json()
    return resp.status, body["checks"]


async def test_refused_upstream_is_a_502_and_readyz_follows_it_back(
    make_sidecar: MakeSidecar, healthy_upstream: str, tmp_path: Path
) -> None:
    """Nothing listens: 502 ``upstream_unavailable`` and /readyz 503 naming the upstream; once a
    server listens on that port, the next request and /readyz succeed with no restart."""
    port = free_port()
    cfg = base_config(f"http://127.0.0.1:{port}", tmp_path)
    sc = await make_sidecar(cfg)
    _, key = await sc.create_key()
    resp = await sc.proxy.get("/x", headers={"X-Plex-Token": key})
    assert resp.status == 502 and await error_of(resp) == "upstream_unavailable"
    status, checks = await readyz(sc)
    assert status == 503 and checks["upstream:plex"].startswith("unreachable"), checks

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="back")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        resp = await sc.proxy.get("/x", headers={"X-Plex-Token": key})
        assert resp.status == 200 and await resp.text() == "back"
        status, checks = await readyz(sc)
        assert status == 200 and checks["upstream:plex"] == "ok", checks
        assert metric(sc, "sidecar_upstream_up", upstream="plex") == 1
    finally:
        await runner.cleanup()


async def test_unresolvable_upstream_name_is_a_502_and_not_ready(make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    """A host under ``.invalid`` (RFC 6761: never resolves): 502 ``upstream_unavailable`` whose
    message says the name does not resolve, and /readyz 503 saying the same."""
    cfg = base_config("http://plex.invalid:32400", tmp_path)
    sc = await make_sidecar(cfg)
    _, key = await sc.create_key()
    resp = await sc.proxy.get("/x", headers={"X-Plex-Token": key})
    assert resp.status == 502
    body = await resp.json()
    assert body["error"]["code"] == "upstream_unavailable"
    assert "resolve" in body["error"]["message"], body
    status, checks = await readyz(sc)
    assert status == 503 and "resolve" in checks["upstream:plex"], checks


@pytest.mark.parametrize("fault", ["untrusted_ca", "wrong_name"])
async def test_wrong_tls_certificate_is_a_502_and_not_ready(
    make_sidecar: MakeSidecar, tmp_path: Path, fault: str
) -> None:
    """The upstream's certificate is signed by a CA the sidecar does not trust, or names another
    host: 502 ``upstream_unavailable`` mentioning the certificate, and /readyz 503 saying so (a
    TCP connect alone would say "ok"). When the upstream is restarted with a certificate from the
    trusted CA, the next request and /readyz succeed with no restart of the sidecar."""
    trusted = make_tls(tmp_path, "trusted-")
    other = make_tls(tmp_path, "other-")
    host = "127.0.0.1" if fault == "untrusted_ca" else "127.0.0.2"  # the certificates name 127.0.0.1
    port = free_port()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="secure hello")

    async def serve(ctx: Any) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/{tail:.*}", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=ctx, reuse_address=True).start()
        return runner

    runner = await serve(other.server_context() if fault == "untrusted_ca" else trusted.server_context())
    try:
        cfg = base_config(f"https://{host}:{port}", tmp_path)
        cfg["upstreams"][0]["tls"] = {"ca_file": str(trusted.ca)}
        sc = await make_sidecar(cfg)
        _, key = await sc.create_key()
        # The background probe does the handshake too, so the gauge is right before any request.
        await until(lambda: metric(sc, "sidecar_upstream_up", upstream="plex") == 0, "sidecar_upstream_up 0")
        resp = await sc.proxy.get("/x", headers={"X-Plex-Token": key})
        assert resp.status == 502
        body = await resp.json()
        assert body["error"]["code"] == "upstream_unavailable" and "certificate" in body["error"]["message"], body
        status, checks = await readyz(sc)
        assert status == 503 and "certificate" in checks["upstream:plex"], checks
        if fault == "wrong_name":
            return  # (a certificate for 127.0.0.2 would need another helper; the CA case shows recovery)

        await runner.cleanup()  # the operator fixes the upstream's certificate and restarts it
        runner = await serve(trusted.server_context())
        resp = await sc.proxy.get("/x", headers={"X-Plex-Token": key})
        assert resp.status == 200 and await resp.text() == "secure hello"
        status, checks = await readyz(sc)
        assert status == 200 and checks["upstream:plex"] == "ok", checks
    finally:
        await runner.cleanup()
