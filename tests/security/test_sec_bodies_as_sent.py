"""Request bodies in a content coding (DESIGN: no decompression on the proxy listener).

What broke: aiohttp decoded a gzip request body and the forwarder sent the decoded bytes with
the client's ``Content-Encoding: gzip`` and compressed ``Content-Length``: the upstream got the
first N bytes of the decoded body, labelled gzip — a Plex upload cut and corrupted. Now a generic
upstream gets the body exactly as sent; the MCP gateway, which must read the JSON to judge it,
decodes gzip and deflate itself, bounded by ``mcp.max_body`` once decoded, and sends up what it
judged, decoded and unlabelled. What it cannot read is a 400 and never goes up.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config
from mcp_server import MCP_TOKEN, McpUpstream
from mcp_support import session

PERMS = {"upstreams": ["*"], "tools": {"tools": ["search"]}}


async def test_a_compressed_upload_reaches_a_plex_upstream_exactly_as_sent(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    seen: list[tuple[dict[str, str], bytes]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((dict(request.headers), await request.content.read()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    up = await aiohttp_server(app, auto_decompress=False)  # the upstream sees the bytes on the wire
    gw = await make_sidecar(base_config(str(up.make_url("")).rstrip("/"), tmp_path))
    _, key = await gw.create_key()
    body = gzip.compress(b'{"photo": "' + b"x" * 50_000 + b'"}')
    headers = {"X-Plex-Token": key, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    resp = await gw.proxy.put("/library/upload", data=body, headers=headers)
    assert resp.status == 200
    ((got_headers, got_body),) = seen
    assert got_body == body, f"{len(got_body)} bytes arrived of {len(body)} sent"
    assert got_headers["Content-Encoding"] == "gzip" and got_headers["Content-Length"] == str(len(body))


@pytest.fixture
async def gw(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path) -> tuple[Running, dict[str, str]]:
    cfg = base_config(upstream.url, tmp_path)
    auth = {"Authorization": "Bearer ${MCP_TOKEN}"}
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools",
                         "headers": auth, "mcp": {"max_body": 64 * 1024}}]  # fmt: skip
    running = await make_sidecar(cfg, extra_env={"MCP_TOKEN": MCP_TOKEN})
    _, key = await running.create_key(name="agent", permissions=PERMS)
    return running, await session(running, key)


def search(rid: int, pad: int = 0) -> bytes:
    args = {"query": "q", **({"pad": "p" * pad} if pad else {})}
    return json.dumps(
        {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": "search", "arguments": args}}
    ).encode()


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("coding", "pack"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", raw_deflate),
     ("GZip", gzip.compress), ("identity", lambda b: b)],
)  # fmt: skip
async def test_an_mcp_call_in_gzip_or_deflate_is_judged_and_sent_up_decoded(
    gw: tuple[Running, dict[str, str]], upstream: McpUpstream, coding: str, pack: Any
) -> None:
    running, h = gw
    r = await running.proxy.post("/mcp/tools", data=pack(search(7)), headers={**h, "Content-Encoding": coding})
    assert r.status == 200 and "results for q" in await r.text()
    last = upstream.rec.requests[-1]
    assert json.loads(last.body)["params"]["name"] == "search" and last.header("content-encoding") is None


@pytest.mark.parametrize(
    ("coding", "body", "status", "code", "says"),
    [
        ("br", b"\x0b\x02\x80{}\x03", 400, "bad_request", "cannot be read"),
        ("gzip, gzip", gzip.compress(gzip.compress(b"{}")), 400, "bad_request", "cannot be read"),
        ("gzip", b"not gzip at all", 400, "bad_request", "not valid gzip"),
        ("gzip", gzip.compress(search(8))[:-6], 400, "bad_request", "not valid gzip"),  # cut short
        ("gzip", gzip.compress(search(8)) + b"trailing", 400, "bad_request", "not valid gzip"),
        ("gzip", gzip.compress(search(9, pad=10 * 1024 * 1024)), 413, "payload_too_large", "once decoded"),  # a bomb
    ],
)
async def test_what_the_gateway_cannot_read_or_hold_never_goes_up(
    gw: tuple[Running, dict[str, str]], upstream: McpUpstream, coding: str, body: bytes, status: int, code: str,
    says: str,
) -> None:  # fmt: skip
    running, h = gw
    before = len(upstream.rec.requests)
    r = await running.proxy.post("/mcp/tools", data=body, headers={**h, "Content-Encoding": coding})
    answer = await r.json()
    assert (r.status, answer["error"]["code"]) == (status, code), answer
    assert says in answer["error"]["message"], answer
    assert len(upstream.rec.requests) == before, "nothing went up"


async def test_two_content_encoding_headers_are_read_together_never_one_of_them(
    gw: tuple[Running, dict[str, str]], upstream: McpUpstream
) -> None:
    """``Content-Encoding: identity`` then ``Content-Encoding: gzip``: judging by the first header
    alone would read gzip bytes as the body (or a second decoding upstream would act on other bytes).
    Both are read, as the list they make, and that is a coding the gateway does not take: a 400."""
    running, h = gw
    before = len(upstream.rec.requests)
    headers = [*h.items(), ("Content-Encoding", "identity"), ("Content-Encoding", "gzip")]
    r = await running.proxy.post("/mcp/tools", data=gzip.compress(search(11)), headers=headers)
    answer = await r.json()
    assert (r.status, answer["error"]["code"]) == (400, "bad_request"), answer
    assert "cannot be read" in answer["error"]["message"]
    assert len(upstream.rec.requests) == before
