"""Invariant 1 on the way down: the upstream's real token never reaches a client.

A misbehaving Plex-like upstream echoes ``PLEX_TOKEN`` everywhere it can: in every
header (``Set-Cookie``, ``X-*``, a header *name*, the reason phrase), in bodies of every
``Content-Encoding`` (gzip, deflate, stacked, br, zstd, compress, unknown, fake gzip,
decompression bombs, a gzip transfer coding), in ranges split across the token, in
non-text bodies (``application/octet-stream``, ``image/jpeg``, ``video/mp4``), in SSE
events split across chunks, in websocket text, binary, ping and close frames, and in
cached answers. Each test says what the client sees instead.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import pytest
import zstandard
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config, log_lines
from multidict import CIMultiDict

from sidecar.upstreams.scrub import ScrubFilter, Unscrubbable, restrict_accept_encoding

TOKEN = PLEX_TOKEN.encode()
MASK = b"*" * len(TOKEN)
XML = b'<MediaContainer><Video key="/library/parts/1?X-Plex-Token=' + TOKEN + b'"/></MediaContainer>'
SEEN: web.AppKey[list[dict[str, str]]] = web.AppKey("seen")
GATE: web.AppKey[asyncio.Event] = web.AppKey("gate")


def clean(resp: aiohttp.ClientResponse, body: bytes = b"") -> None:
    """Nothing the client received holds the token: status line, header names and values, body."""
    assert PLEX_TOKEN not in (resp.reason or ""), resp.reason
    for name, value in resp.raw_headers:
        assert TOKEN not in name and TOKEN not in value, (name, value)
    assert TOKEN not in body


def _encode(coding: str, data: bytes) -> tuple[bytes, str]:
    """``data`` under a Content-Encoding (the header value to send with it)."""
    if coding == "gzip":
        return gzip.compress(data), "gzip"
    if coding == "x-gzip":
        return gzip.compress(data), "x-gzip"
    if coding == "deflate":
        return zlib.compress(data), "deflate"
    if coding == "raw-deflate":
        c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return c.compress(data) + c.flush(), "deflate"
    if coding == "gzip-gzip":
        return gzip.compress(gzip.compress(data)), "gzip, gzip"
    if coding == "gzip-identity":
        return gzip.compress(data), "identity, gzip"
    if coding == "two-members":
        half = len(data) // 2  # the token straddles two gzip members
        return gzip.compress(data[:half]) + gzip.compress(data[half:]), "gzip"
    if coding == "br":
        return brotli.compress(data), "br"
    if coding == "zstd":
        return zstandard.ZstdCompressor().compress(data), "zstd"
    if coding == "br-gzip":
        return gzip.compress(brotli.compress(data)), "br, gzip"
    if coding == "compress":
        return data, "compress"  # an LZW decoder would be needed; the plain bytes prove refusal is content-blind
    if coding == "unknown":
        return data, "x-snappy-framed"
    if coding == "token-named":
        return data, PLEX_TOKEN  # the refusal must not quote the coding it refuses
    raise AssertionError(coding)


def misbehaving_upstream() -> web.Application:
    app = web.Application()
    app[SEEN] = []
    app[GATE] = asyncio.Event()

    def record(request: web.Request) -> None:
        app[SEEN].append({"path": request.path, **{k.lower(): v for k, v in request.headers.items()}})

    async def echo_headers(request: web.Request) -> web.Response:
        record(request)
        headers = CIMultiDict(
            [
                ("Set-Cookie", f"plex={PLEX_TOKEN}; Path=/"),
                ("Set-Cookie", "other=1"),
                ("X-Anything", f"token {PLEX_TOKEN} here"),
                ("X-Plex-Token", PLEX_TOKEN),
                (f"X-{PLEX_TOKEN}", "a header whose name is the token"),
                ("Location", f"/library?X-Plex-Token={PLEX_TOKEN}"),
                ("WWW-Authenticate", f'Bearer realm="{PLEX_TOKEN}"'),
                ("Content-Disposition", f'attachment; filename="{PLEX_TOKEN}.xml"'),
            ]
        )
        return web.Response(status=200, reason=f"OK {PLEX_TOKEN}", body=b"ok", headers=headers)

    async def encoded(request: web.Request) -> web.Response:
        record(request)
        body, value = _encode(request.match_info["coding"], XML)
        return web.Response(body=body, headers={"Content-Type": "text/xml", "Content-Encoding": value})

    async def encoded_stream(request: web.Request) -> web.StreamResponse:
        """The same bodies, chunked and big: headers go out before the body is known to be bad."""
        record(request)
        data = (b"<pad>" + b"x" * 1000 + b"</pad>") * 200 + XML
        body, value = _encode(request.match_info["coding"], data)
        resp = web.StreamResponse(headers={"Content-Type": "text/xml", "Content-Encoding": value})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(body), 4096):
            await resp.write(body[i : i + 4096])
        await resp.write_eof()
        return resp

    async def fake_gzip(request: web.Request) -> web.StreamResponse:
        record(request)
        junk = b"this is not gzip " + TOKEN
        if request.query.get("big"):
            resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(junk * 5000)
            await resp.write_eof()
            return resp
        return web.Response(body=junk, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})

    async def bomb(request: web.Request) -> web.Response:
        record(request)
        inner = gzip.compress(b"\0" * (16 << 20), compresslevel=9)  # 16 MiB of zeros, ~16 KiB packed
        return web.Response(
            body=gzip.compress(inner), headers={"Content-Type": "text/xml", "Content-Encoding": "gzip, gzip"}
        )

    def ranged_body(request: web.Request, data: bytes, ctype: str, always_partial: bool = False) -> web.Response:
        record(request)
        rng = request.http_range
        if rng.start is None and rng.stop is None and not always_partial:
            return web.Response(body=data, content_type=ctype, headers={"Accept-Ranges": "bytes"})
        start, stop = rng.start or 0, min(rng.stop if rng.stop is not None else len(data), len(data))
        part = data[start:stop]
        return web.Response(
            status=206, body=part, content_type=ctype,
            headers={"Content-Range": f"bytes {start}-{start + len(part) - 1}/{len(data)}", "Accept-Ranges": "bytes"},
        )  # fmt: skip

    async def ranged_xml(request: web.Request) -> web.Response:
        return ranged_body(request, XML, "text/xml")

    async def ranged_jpeg(request: web.Request) -> web.Response:
        return ranged_body(request, b"\xff\xd8\xff\xe0JFIF" + TOKEN + b"\xff\xd9", "image/jpeg")

    async def always_partial(request: web.Request) -> web.Response:
        return ranged_body(request, XML, "text/xml", always_partial=True)

    async def video(request: web.Request) -> web.Response:
        return ranged_body(request, b"\0" * 100 + TOKEN + b"\0" * 100, "video/mp4")

    async def binary(request: web.Request) -> web.StreamResponse:
        """A body the upstream calls opaque, the token straddling each 64 KiB write."""
        record(request)
        ctype = request.query.get("type", "application/octet-stream")
        piece = b"\x00" * (65536 - 10) + TOKEN[:10]
        size = 4 * (len(piece) + len(TOKEN) - 10)
        resp = web.StreamResponse(headers={"Content-Type": ctype, "Content-Length": str(size)})
        await resp.prepare(request)
        for _ in range(4):
            await resp.write(piece)
            await resp.write(TOKEN[10:])
        await resp.write_eof()
        return resp

    async def events(request: web.Request) -> web.StreamResponse:
        record(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\ndata: " + TOKEN[:9])
        await app[GATE].wait()  # the client has the first event before the token's second half exists
        await resp.write(TOKEN[9:] + b"\n\n")
        await resp.write_eof()
        return resp

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(autoping=False)
        await sock.prepare(request)
        await sock.send_str(f'{{"token": "{PLEX_TOKEN}"}}')
        await sock.send_bytes(b"\x00\x01" + TOKEN + b"\x02")
        await sock.ping(TOKEN)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:  # echo, with the token appended
                await sock.send_str(msg.data + PLEX_TOKEN)
                break
        await sock.close(code=4000, message=TOKEN)
        return sock

    async def cached(request: web.Request) -> web.Response:
        """``gz``: a gzip body holding the token; ``plain``: the token only in a header *name*."""
        record(request)
        gz = request.match_info["name"] == "gz"
        headers = {"Content-Type": "text/xml", "Cache-Control": "max-age=60", f"X-Echo-{PLEX_TOKEN}": "name-only"}
        if gz:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=gzip.compress(XML) if gz else b"<plain/>", headers=headers)

    app.router.add_get("/echo-headers", echo_headers)
    app.router.add_get("/enc/{coding}", encoded)
    app.router.add_get("/enc-stream/{coding}", encoded_stream)
    app.router.add_get("/fake-gzip", fake_gzip)
    app.router.add_get("/bomb", bomb)
    app.router.add_get("/ranged.xml", ranged_xml)
    app.router.add_get("/ranged.jpg", ranged_jpeg)
    app.router.add_get("/always-partial", always_partial)
    app.router.add_get("/video.mp4", video)
    app.router.add_get("/binary", binary)
    app.router.add_get("/events", events)
    app.router.add_get("/ws", ws)
    app.router.add_get("/cached/{name}", cached)
    return app


Setup = tuple[Running, TestServer, str]


@pytest.fixture
async def evil(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> Setup:
    up: TestServer = await aiohttp_server(misbehaving_upstream())
    rules = [{"upstream": "plex", "path": "/cached/*", "ttl": "60s"}]
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path, cache={"max_bytes": "1MiB", "rules": rules})
    run = await make_sidecar(cfg)
    _, key = await run.create_key(permissions={"admin": True})
    return run, up, key


async def get(run: Running, key: str, path: str, **headers: str) -> tuple[aiohttp.ClientResponse, bytes]:
    resp = await run.proxy.get(path, headers={"X-Plex-Token": key, **headers}, allow_redirects=False)
    return resp, await resp.read()


def error_code(resp: aiohttp.ClientResponse, body: bytes) -> str:
    assert resp.content_type == "application/json", (resp.status, body[:200])
    return str(json.loads(body)["error"]["code"])


# ---------------------------------------------------------------------------- headers


async def test_every_header_name_and_value_and_the_reason_phrase_are_scrubbed(evil: Setup) -> None:
    """Client sees its own key wherever the upstream echoed the token, in every header and the status line."""
    run, _, key = evil
    resp, body = await get(run, key, "/echo-headers")
    assert resp.status == 200 and body == b"ok"
    clean(resp, body)
    assert resp.reason == f"OK {key}"
    assert f"plex={key}; Path=/" in resp.headers.getall("Set-Cookie")
    assert "other=1" in resp.headers.getall("Set-Cookie")
    assert resp.headers["X-Anything"] == f"token {key} here"
    assert resp.headers[f"X-{key}"] == "a header whose name is the token"
    assert resp.headers["Location"] == f"/library?X-Plex-Token={key}"
    assert key in resp.headers["WWW-Authenticate"] and key in resp.headers["Content-Disposition"]


# ---------------------------------------------------------------------------- content encodings


@pytest.mark.parametrize(
    "coding", ["gzip", "x-gzip", "deflate", "raw-deflate", "gzip-gzip", "gzip-identity", "two-members"]
)
async def test_decodable_encodings_are_decoded_and_scrubbed(evil: Setup, coding: str) -> None:
    """gzip/deflate, also stacked or multi-member: the client gets identity XML with its own key."""
    run, _, key = evil
    for path in (f"/enc/{coding}", f"/enc-stream/{coding}"):
        resp, body = await get(run, key, path, **{"Accept-Encoding": "gzip, deflate"})
        assert resp.status == 200, (path, resp.status, body[:200])
        clean(resp, body)
        assert "Content-Encoding" not in resp.headers
        assert body.endswith(XML.replace(TOKEN, key.encode()))


@pytest.mark.parametrize("coding", ["br", "zstd", "br-gzip", "compress", "unknown", "token-named"])
async def test_encodings_that_cannot_be_scrubbed_are_refused(evil: Setup, coding: str) -> None:
    """br, zstd, compress, unknown (also under gzip): a designed 502 when small, a cut stream when big."""
    run, _, key = evil
    resp, body = await get(run, key, f"/enc/{coding}", **{"Accept-Encoding": "br, zstd, gzip"})
    assert resp.status == 502
    assert error_code(resp, body) == "upstream_unavailable"
    clean(resp, body)
    if coding in ("br", "zstd", "br-gzip"):
        resp = await run.proxy.get(f"/enc-stream/{coding}", headers={"X-Plex-Token": key}, auto_decompress=False)
        assert resp.status == 502  # refused at the headers, before any byte of the body
        clean(resp, await resp.read())


async def test_upstream_is_only_asked_for_encodings_the_sidecar_can_scrub(evil: Setup) -> None:
    """The client's br/zstd/* never reach the upstream; a client accepting only br gets identity asked for."""
    run, up, key = evil
    await get(run, key, "/enc/gzip", **{"Accept-Encoding": "br;q=1.0, zstd, gzip;q=0.5, *"})
    assert up.app[SEEN][-1]["accept-encoding"] == "gzip;q=0.5"
    await get(run, key, "/enc/gzip", **{"Accept-Encoding": "br"})
    assert up.app[SEEN][-1]["accept-encoding"] == "identity"


async def test_a_body_labelled_gzip_that_is_not_is_a_502_or_a_cut_never_a_500(evil: Setup, tmp_path: Path) -> None:
    """Small: ``502 upstream_unavailable`` (nothing sent yet). Big and chunked: the connection is cut."""
    run, _, key = evil
    resp, body = await get(run, key, "/fake-gzip")
    assert resp.status == 502 and error_code(resp, body) == "upstream_unavailable"
    clean(resp, body)
    resp = await run.proxy.get("/fake-gzip?big=1", headers={"X-Plex-Token": key})
    assert resp.status == 200  # the headers had gone out
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    lines = await log_lines(tmp_path / "access.log", want=2)
    assert [(x["status"], x.get("error")) for x in lines[-2:]] == [
        (502, "upstream_unavailable"), (200, "upstream_unavailable"),
    ]  # fmt: skip
    assert all(PLEX_TOKEN not in str(x) for x in lines)


async def test_a_stacked_decompression_bomb_is_refused(evil: Setup) -> None:
    """16 MiB of zeros under ``gzip, gzip`` (a few hundred bytes on the wire): 502, never decoded whole."""
    run, _, key = evil
    resp, body = await get(run, key, "/bomb")
    assert resp.status == 502 and error_code(resp, body) == "upstream_unavailable"


async def test_a_gzip_transfer_coding_is_refused(make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    """``Transfer-Encoding: gzip, chunked`` (aiohttp only undoes ``chunked``): 502, not opaque gzip bytes."""
    packed = gzip.compress(XML)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        writer.write(head + b"%x\r\n" % len(packed) + packed + b"\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        run = await make_sidecar(base_config(f"http://127.0.0.1:{port}", tmp_path))
        _, key = await run.create_key()
        resp, body = await get(run, key, "/x")
        assert resp.status == 502 and error_code(resp, body) == "upstream_unavailable"
        clean(resp, body)
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------- ranges


async def test_ranges_split_across_the_token_get_the_whole_scrubbed_body(evil: Setup) -> None:
    """Two ranges that, joined, would hold the token: each is answered 200 with the whole scrubbed body."""
    run, up, key = evil
    cut = XML.index(TOKEN) + 10
    first, body1 = await get(run, key, "/ranged.xml", Range=f"bytes=0-{cut - 1}")
    second, body2 = await get(run, key, "/ranged.xml", Range=f"bytes={cut}-")
    for resp, body in ((first, body1), (second, body2)):
        assert resp.status == 200 and "Content-Range" not in resp.headers
        clean(resp, body)
        assert body == XML.replace(TOKEN, key.encode())
    assert TOKEN not in body1 + body2
    # The upstream was asked again without Range (and If-Range) after each 206.
    ranges = [s.get("range") for s in up.app[SEEN] if s["path"] == "/ranged.xml"]
    assert ranges == [f"bytes=0-{cut - 1}", None, f"bytes={cut}-", None]


async def test_a_partial_answer_of_a_non_media_body_is_refetched_whole(evil: Setup) -> None:
    """An ``image/jpeg`` (not range-safe) holding the token: 200, whole, masked; never one byte of it by range."""
    run, _, key = evil
    resp, body = await get(run, key, "/ranged.jpg", Range="bytes=10-10")
    assert resp.status == 200
    clean(resp, body)
    assert body == b"\xff\xd8\xff\xe0JFIF" + MASK + b"\xff\xd9"


async def test_an_upstream_that_insists_on_206_is_refused(evil: Setup) -> None:
    """A 206 even without Range, for a body that must be scrubbed whole: 502, not a fragment."""
    run, _, key = evil
    resp, body = await get(run, key, "/always-partial", Range="bytes=0-40")
    assert resp.status == 502 and error_code(resp, body) == "upstream_unavailable"
    clean(resp, body)


async def test_video_ranges_pass_and_each_part_is_still_scanned(evil: Setup) -> None:
    """Seeking keeps working for identity video: 206 with exact offsets, the token masked in place."""
    run, _, key = evil
    resp, body = await get(run, key, "/video.mp4", Range="bytes=50-199")
    assert resp.status == 206 and resp.headers["Content-Range"] == f"bytes 50-199/{200 + len(TOKEN)}"
    clean(resp, body)
    assert body == b"\0" * 50 + MASK + b"\0" * (150 - 50 - len(TOKEN))


# ---------------------------------------------------------------------------- bodies of any type


@pytest.mark.parametrize("ctype", ["application/octet-stream", "image/jpeg", "video/mp4", ""])
async def test_non_text_bodies_are_scanned_and_masked_in_place(evil: Setup, ctype: str) -> None:
    """Any body type: the token (straddling 64 KiB writes) becomes ``*`` of the same length; length is exact."""
    run, _, key = evil
    resp, body = await get(run, key, f"/binary?type={ctype}")
    assert resp.status == 200
    clean(resp, body)
    piece = b"\x00" * (65536 - 10) + MASK
    assert body == piece * 4
    assert resp.headers["Content-Length"] == str(len(body))


async def test_sse_event_split_across_chunks_is_scrubbed_and_not_delayed(evil: Setup) -> None:
    """The first event arrives at once; the token split across two writes arrives as the client's key."""
    run, up, key = evil
    resp = await run.proxy.get("/events", headers={"X-Plex-Token": key})
    assert resp.status == 200
    first = await resp.content.readuntil(b"\n\n")
    assert first == b"data: first\n\n"
    up.app[GATE].set()
    rest = await resp.read()
    assert rest == b"data: " + key.encode() + b"\n\n"
    clean(resp, first + rest)


# ---------------------------------------------------------------------------- websockets


async def test_websocket_frames_are_scrubbed_text_binary_ping_and_close(evil: Setup) -> None:
    """Text and binary frames carry the client's key; ping payload and close reason a same-length mask."""
    run, _, key = evil
    async with run.proxy.ws_connect("/ws", headers={"X-Plex-Token": key}, autoping=False) as ws:
        text = await ws.receive()
        assert text.type == aiohttp.WSMsgType.TEXT and text.data == f'{{"token": "{key}"}}'
        binary = await ws.receive()
        assert binary.type == aiohttp.WSMsgType.BINARY and binary.data == b"\x00\x01" + key.encode() + b"\x02"
        ping = await ws.receive()
        assert ping.type == aiohttp.WSMsgType.PING and ping.data == MASK
        await ws.send_str("echo:")
        echo = await ws.receive()
        assert echo.type == aiohttp.WSMsgType.TEXT and echo.data == "echo:" + key
        close = await ws.receive()
        assert close.type == aiohttp.WSMsgType.CLOSE
        assert close.data == 4000 and close.extra == MASK.decode()


# ---------------------------------------------------------------------------- the cache


async def test_cached_answers_are_scrubbed_like_fresh_ones(evil: Setup) -> None:
    """MISS, HIT and the repeat-hit fast path all scrub: a gzip body and a header *name* holding the token."""
    run, up, key = evil
    _, other = await run.create_key(permissions={"admin": True})
    for name, want in (("gz", XML), ("plain", b"<plain/>")):
        seen: list[str] = []
        for who in (key, key, key, other):
            resp, body = await get(run, who, f"/cached/{name}")
            seen.append(resp.headers["X-Cache-Status"])
            assert resp.status == 200
            clean(resp, body)
            assert body == want.replace(TOKEN, who.encode())
            assert resp.headers[f"X-Echo-{who}"] == "name-only"
        assert seen == ["MISS", "HIT", "HIT", "HIT"]
        assert len([s for s in up.app[SEEN] if s["path"] == f"/cached/{name}"]) == 1


# ---------------------------------------------------------------------------- the filter itself


def test_filter_unit_cases() -> None:
    """Edge cases a network test would take long to set up."""
    f = ScrubFilter(PLEX_TOKEN, "pmcp_key")
    h: CIMultiDict[str] = CIMultiDict({"Content-Type": "text/plain", "Transfer-Encoding": "chunked"})
    f.check_framing(h)
    with pytest.raises(Unscrubbable):
        f.check_framing(CIMultiDict({"Transfer-Encoding": "gzip, chunked"}))
    # A deflate stream followed by garbage, a truncated gzip, four stacked layers: all refused.
    for value, data in (
        ("deflate", zlib.compress(TOKEN) + b"junk"),
        ("gzip", gzip.compress(TOKEN)[:-6]),
        ("gzip, gzip, gzip, gzip", TOKEN),
    ):
        g = ScrubFilter(PLEX_TOKEN, "pmcp_key")
        with pytest.raises(Unscrubbable) as err:
            g.headers(200, CIMultiDict({"Content-Type": "text/xml", "Content-Encoding": value}))
            g.feed(data)
            g.flush()
        assert PLEX_TOKEN not in str(err.value)
    # Every decodable coding, fed one byte at a time (a trickling upstream): still the key, never the token.
    for coding in ("gzip", "deflate", "raw-deflate", "gzip-gzip", "two-members"):
        data, value = _encode(coding, XML)
        d = ScrubFilter(PLEX_TOKEN, "pmcp_key")
        d.headers(200, CIMultiDict({"Content-Type": "text/xml", "Content-Encoding": value}))
        out = b"".join(d.feed(data[i : i + 1]) for i in range(len(data))) + d.flush()
        assert out == XML.replace(TOKEN, b"pmcp_key"), coding
    # A 304 labelled gzip has no body: nothing to decode, nothing refused.
    n = ScrubFilter(PLEX_TOKEN, "pmcp_key")
    assert n.headers(304, CIMultiDict({"Content-Encoding": "gzip", "ETag": '"x"'})) is True
    assert n.flush() == b""
    # The token split at every possible point, one byte at a time.
    for cut in range(1, len(TOKEN)):
        s = ScrubFilter(PLEX_TOKEN, "K")
        s.headers(200, CIMultiDict({"Content-Type": "text/xml"}))
        out = s.feed(b"a" + TOKEN[:cut]) + s.feed(TOKEN[cut:] + b"b") + s.flush()
        assert out == b"aKb"
    # Accept-Encoding keeps only what can be undone.
    ae: CIMultiDict[str] = CIMultiDict({"Accept-Encoding": "zstd, br"})
    restrict_accept_encoding(ae)
    assert ae["Accept-Encoding"] == "identity"
