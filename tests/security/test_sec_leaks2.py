"""Second pass on invariant 1 and key confidentiality: the Plex path, the cache, websockets.

An echoing Plex-like upstream shows what reached it; each test asserts what a client sees:

- the client's key reaches the upstream in no form (a parameter *name*, any other header,
  a websocket subprotocol), so an echo can never hand it out;
- a cached answer is keyed by the origin the upstream was told (``X-Forwarded-Host``):
  one client's ``Host`` cannot poison what another client gets (links to an attacker's
  host, followed with that client's key);
- a query value that spells the cache's key placeholder shares no entry with a real key;
- a background refresh (stale-while-revalidate) never stores what a fresh answer would
  refuse (a transfer coding the scrubber cannot see through).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config
from plexrig import raw_request

TOKEN = PLEX_TOKEN.encode()
SEEN: web.AppKey[list[dict[str, Any]]] = web.AppKey("seen")


def echo_upstream() -> web.Application:
    app = web.Application()
    app[SEEN] = []

    def record(request: web.Request) -> dict[str, Any]:
        seen = {
            "target": request.raw_path,
            "query": list(request.query.items()),
            "headers": list(request.headers.items()),
        }
        app[SEEN].append(seen)
        return seen

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(record(request))

    async def ws(request: web.Request) -> web.WebSocketResponse:
        record(request)
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        sock = web.WebSocketResponse(protocols=[p.strip() for p in offered.split(",") if p.strip()])
        await sock.prepare(request)
        await sock.close()
        return sock

    async def links(request: web.Request) -> web.Response:
        """Absolute URLs built from the forwarded origin, as many servers do, with no ``Vary``."""
        record(request)
        host = request.headers.get("X-Forwarded-Host", request.host)
        proto = request.headers.get("X-Forwarded-Proto", "http")
        part = f"{proto}://{host}/library/parts/1?X-Plex-Token={PLEX_TOKEN}"
        body = f'<MediaContainer><Part key="{part}"/></MediaContainer>'
        return web.Response(text=body, content_type="text/xml", headers={"Cache-Control": "max-age=60"})

    app.router.add_get("/echo", echo)
    app.router.add_get("/cached-echo", echo)
    app.router.add_get("/ws", ws)
    app.router.add_get("/links", links)
    return app


Rig = tuple[Running, TestServer, str]


@pytest.fixture
async def rig(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> Rig:
    up: TestServer = await aiohttp_server(echo_upstream())
    rules = [
        {"upstream": "plex", "path": "/links", "ttl": "60s"},
        {"upstream": "plex", "path": "/cached-echo", "ttl": "60s"},
    ]
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path, cache={"max_bytes": "1MiB", "rules": rules})
    run = await make_sidecar(cfg)
    _, key = await run.create_key(permissions={"admin": True})
    return run, up, key


def upstream_saw(up: TestServer) -> str:
    return json.dumps(up.app[SEEN][-1])


@pytest.mark.parametrize(
    "target",
    ["/echo?{key}=1", "/echo?a{key}b=1", "/echo?{enc}=1"],
)
async def test_the_key_as_a_parameter_name_never_reaches_the_upstream(rig: Rig, target: str) -> None:
    run, up, key = rig
    enc = key.replace("_", "%5F")
    ans = await raw_request(run.proxy.server.host, run.proxy.server.port, "GET", target.format(key=key, enc=enc),
                            [("X-Plex-Token", key)])  # fmt: skip
    assert ans.status == 200, ans.body
    assert key not in upstream_saw(up)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Referer", "http://plex.test/web/index.html?X-Plex-Token={key}"),
        ("Cookie", "plex={key}; other=1"),
        ("X-Plex-Client-Identifier", "{key}"),
        ("X-Anything", "Bearer {key}"),
    ],
)
async def test_the_key_in_any_other_header_never_reaches_the_upstream(rig: Rig, name: str, value: str) -> None:
    run, up, key = rig
    resp = await run.proxy.get("/echo", headers={"X-Plex-Token": key, name: value.format(key=key)})
    assert resp.status == 200, await resp.text()
    assert key not in upstream_saw(up)


async def test_the_key_as_a_websocket_subprotocol_never_reaches_the_upstream(rig: Rig) -> None:
    run, up, key = rig
    async with run.proxy.ws_connect(f"/ws?X-Plex-Token={key}", protocols=("plex", key)) as sock:
        await sock.receive()
    assert key not in upstream_saw(up)


async def test_one_clients_host_does_not_poison_the_cached_answer_of_another(rig: Rig) -> None:
    """An attacker's ``Host`` goes up as ``X-Forwarded-Host``; the answer built from it stays theirs."""
    run, _, key = rig
    _, victim = await run.create_key(permissions={"admin": True})
    evil = await run.proxy.get("/links", headers={"X-Plex-Token": key, "Host": "attacker.example"})
    assert evil.status == 200 and b"attacker.example" in await evil.read()
    for _ in range(2):  # the cache's own path, then the repeat-hit fast path
        resp = await run.proxy.get("/links", headers={"X-Plex-Token": victim})
        body = await resp.read()
        assert resp.status == 200
        assert b"attacker.example" not in body, (resp.headers.get("X-Cache-Status"), body)
        assert victim.encode() in body and TOKEN not in body


async def test_an_absolute_form_authority_does_not_poison_the_cached_answer_of_another(rig: Rig) -> None:
    """``GET http://attacker.example/links`` with ``Host: plex.test``: RFC 9112 §3.2.2 makes the target's
    authority the host, and it went up as ``X-Forwarded-Host``, while the cache (and the repeat-hit memo)
    keyed the answer by the ``Host`` header. The victim's ``Host: plex.test`` got the attacker's links."""
    run, _, key = rig
    _, victim = await run.create_key(permissions={"admin": True})
    server = run.proxy.server
    evil = await raw_request(server.host, server.port, "GET", "http://attacker.example/links", [("X-Plex-Token", key)])
    assert evil.status == 200 and b"attacker.example" in evil.body
    for _ in range(2):  # the cache's own path, then the repeat-hit fast path
        resp = await run.proxy.get("/links", headers={"X-Plex-Token": victim, "Host": "plex.test"})
        body = await resp.read()
        assert resp.status == 200
        assert b"attacker.example" not in body, (resp.headers.get("X-Cache-Status"), body)
        assert b"http://plex.test/" in body and victim.encode() in body and TOKEN not in body


async def test_a_literal_key_placeholder_does_not_share_an_entry_with_a_real_key(rig: Rig) -> None:
    """The cache keys "the client's key inside a value" by a placeholder; a value that *is* that
    placeholder (``%00key``) is forwarded as it is, so its answer must not become the entry for
    requests that carry a real key there (those are forwarded without the parameter)."""
    run, _, key = rig
    _, victim = await run.create_key(permissions={"admin": True})
    evil = await run.proxy.get("/cached-echo?foo=%00key", headers={"X-Plex-Token": key})
    assert evil.status == 200 and evil.headers["X-Cache-Status"] == "MISS"
    resp = await run.proxy.get(f"/cached-echo?foo={victim}", headers={"X-Plex-Token": victim})
    body = json.loads(await resp.read())
    assert resp.headers["X-Cache-Status"] == "MISS" and body["query"] == []


async def test_a_background_refresh_never_stores_what_cannot_be_scrubbed(
    make_sidecar: MakeSidecar, tmp_path: Path
) -> None:
    """The refresh meets ``Transfer-Encoding: gzip, chunked`` (opaque to aiohttp, refused on a fill):
    not stored, so no client is ever served the gzip bytes around the token."""
    answers = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answers
        while not reader.at_eof():
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            answers += 1
            if answers == 1:
                body = b"<ok/>"
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nCache-Control: max-age=1\r\n"
                writer.write(head + b"Content-Length: 5\r\n\r\n" + body)
            else:
                packed = gzip.compress(b"<x>" + TOKEN + b"</x>")
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nCache-Control: max-age=60\r\n"
                head += b"Transfer-Encoding: gzip, chunked\r\n\r\n"
                writer.write(head + b"%x\r\n" % len(packed) + packed + b"\r\n0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        rules = [{"upstream": "plex", "path": "/*", "ttl": "60s", "stale_while_revalidate": "60s"}]
        cfg = base_config(f"http://127.0.0.1:{port}", tmp_path, cache={"max_bytes": "1MiB", "rules": rules})
        run = await make_sidecar(cfg)
        _, key = await run.create_key()
        resp = await run.proxy.get("/r", headers={"X-Plex-Token": key})
        assert resp.status == 200 and resp.headers["X-Cache-Status"] == "MISS"
        deadline = time.monotonic() + 3
        while answers < 2 or run.sc.cache._refreshing:  # expired after 1 s, then refreshed in the background
            assert time.monotonic() < deadline
            resp = await run.proxy.get("/r", headers={"X-Plex-Token": key})
            assert await resp.read() == b"<ok/>"
            await asyncio.sleep(0.02)
        resp = await run.proxy.get("/r", headers={"X-Plex-Token": key})
        body = await resp.read()
        assert body == b"<ok/>" and resp.headers["X-Cache-Status"] == "STALE", (resp.headers, body)
    finally:
        server.close()
        await server.wait_closed()
