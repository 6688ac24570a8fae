"""Smuggling and desync, seen from the upstream's socket: the exact bytes the sidecar sends up.

``test_sec_framing.py`` checks that nothing unauthorised reaches an upstream that parses
like aiohttp. Here the upstream is a raw TCP server that records every byte, so a test sees
what a *different* parser would read: header names that a CGI-style upstream (WSGI, Rack,
PHP: ``X_Forwarded_For`` and ``X-Forwarded-For`` are both ``HTTP_X_FORWARDED_FOR``) would
take for a header the sidecar sets or strips, transfer codings the sidecar does not undo,
trailers, and requests following a refused one on the same connection. Both upstream
clients are attacked: aiohttp's (a Plex upstream) and the lean pool (a plain-HTTP MCP one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config

WAIT = 3.0
CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{}}}'
MCP_SECRET = "Bearer upstream-secret-0123456789"


class Wire:
    """A raw upstream: records each request's exact bytes (head and framed body), answers 200."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line]
                named = {n.strip().lower(): v.strip() for n, v in fields}
                if named.get(b"transfer-encoding", b"").lower() == b"chunked":
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        body += line
                        if int(line.split(b";")[0], 16) == 0:
                            while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                                body += trailer
                            body += b"\r\n"
                            break
                        body += await reader.readexactly(int(line.split(b";")[0], 16) + 2)
                elif b"content-length" in named:
                    body = await reader.readexactly(int(named[b"content-length"]))
                self.requests.append(head + body)
                if head.startswith(b"POST /mcp "):
                    out = json.dumps({"jsonrpc": "2.0", "id": json.loads(body)["id"], "result": {}}).encode()
                    kind = b"application/json"
                else:
                    out, kind = b'<MediaContainer size="0"/>', b"text/xml"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (kind, len(out)))
                writer.write(out)
                await writer.drain()
        writer.close()

    def names(self, i: int = 0) -> list[str]:
        """Header names of request ``i`` as the upstream received them."""
        head = self.requests[i].split(b"\r\n\r\n", 1)[0]
        return [line.split(b":", 1)[0].decode("latin-1") for line in head.split(b"\r\n")[1:]]


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    up = Wire()
    up.server = await asyncio.start_server(up._serve, "127.0.0.1", 0)
    up.port = up.server.sockets[0].getsockname()[1]
    yield up
    up.server.close()
    await up.server.wait_closed()


@pytest.fixture
async def rig(make_sidecar: MakeSidecar, wire: Wire, tmp_path: Path) -> tuple[Running, Wire, str, str]:
    """Plex at ``/library…`` (key ``plex``) and a pooled MCP upstream at ``/mcp/tools`` (key ``mcp``)
    that gets ``Authorization`` and ``X-Api-Key`` injected."""
    url = f"http://127.0.0.1:{wire.port}"
    cfg = base_config(url, tmp_path, log={"access": "off"})
    cfg["upstreams"].append({
        "id": "tools", "kind": "mcp", "url": url + "/mcp", "path_prefix": "/mcp/tools",
        "headers": {"Authorization": MCP_SECRET, "X-Api-Key": "upstream-api-key"},
    })  # fmt: skip
    gw = await make_sidecar(cfg)
    assert "tools" in gw.sc.pools  # MCP requests go through the lean pool
    _, plex = await gw.create_key(name="plex", permissions={"upstreams": ["plex"], "paths": ["/library/*"]})
    _, mcp = await gw.create_key(name="mcp", permissions={"upstreams": ["tools"]})
    return gw, wire, plex, mcp


async def exchange(gw: Running, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; everything the sidecar answers until it closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
    writer.write(data)
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(WAIT):
            while chunk := await asyncio.wait_for(reader.read(65536), 0.5 if out else WAIT):
                out += chunk
    writer.close()
    return out


def statuses(answer: bytes) -> list[int]:
    """Status codes of the answers (a JSON error body is followed by the next status line directly)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


def plex_get(key: str, extra: bytes = b"", target: bytes = b"/library/x") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: h\r\nX-Plex-Token: %s\r\n%s" % (target, key.encode(), extra)


def mcp_post(key: str, extra: bytes) -> bytes:
    return (
        b"POST /mcp/tools HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer %s\r\n" % key.encode()
        + b"Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n" + extra
    )  # fmt: skip


# ------------------------------------------------------------------ header names a CGI-style upstream conflates

UNDERSCORED = (
    b"X_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Host: evil.example\r\nX_Real_IP: 6.6.6.6\r\n"
    b"X_HTTP_Method_Override: DELETE\r\nAccept_Encoding: br\r\nX_Plex_Token: evil\r\nX_Api_Key: evil\r\n"
    b"Authorization_: Bearer evil\r\n"
)


async def test_underscore_spellings_of_headers_never_reach_a_plex_upstream(rig: tuple[Running, Wire, str, str]) -> None:
    """WSGI, Rack and PHP read ``X_Forwarded_For`` as ``X-Forwarded-For`` (both ``HTTP_X_FORWARDED_FOR``):
    forwarded, the client's spelling would override or join the sidecar's own (Puma CVE-2024-45614),
    and a method override or identity claim the sidecar strips would arrive anyway. Dropped, as nginx does."""
    gw, wire, plex, _ = rig
    answer = await exchange(gw, plex_get(plex, UNDERSCORED + b"Connection: close\r\n\r\n"))
    assert statuses(answer) == [200], answer[:300]
    assert len(wire.requests) == 1
    assert not [n for n in wire.names() if "_" in n], wire.requests[0]
    assert b"X-Forwarded-For: 127.0.0.1\r\n" in wire.requests[0]
    assert b"X-Plex-Token: %s\r\n" % PLEX_TOKEN.encode() in wire.requests[0]
    assert b"evil" not in wire.requests[0] and b"6.6.6.6" not in wire.requests[0]


async def test_underscore_spellings_of_headers_never_reach_a_pooled_mcp_upstream(
    rig: tuple[Running, Wire, str, str],
) -> None:
    """The same through the pool: the injected ``X-Api-Key`` cannot be shadowed by the client's ``X_Api_Key``."""
    gw, wire, _, mcp = rig
    data = mcp_post(mcp, UNDERSCORED + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(CALL) + CALL)
    answer = await exchange(gw, data)
    assert statuses(answer) == [200], answer[:300]
    assert not [n for n in wire.names() if "_" in n], wire.requests[0]
    assert b"X-Api-Key: upstream-api-key\r\n" in wire.requests[0]
    assert b"Authorization: %s\r\n" % MCP_SECRET.encode() in wire.requests[0]
    assert b"evil" not in wire.requests[0] and b"6.6.6.6" not in wire.requests[0]


async def test_injected_headers_spelled_with_underscores_are_still_sent(
    make_sidecar: MakeSidecar, wire: Wire, tmp_path: Path
) -> None:
    """Only the client's underscored names go: an operator's own ``X_Upstream_Auth`` is the sidecar's header."""
    url = f"http://127.0.0.1:{wire.port}"
    cfg = base_config(url, tmp_path, log={"access": "off"})
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": url + "/mcp", "path_prefix": "/mcp/tools",
                         "headers": {"X_Upstream_Auth": "configured"}}]  # fmt: skip
    gw = await make_sidecar(cfg)
    _, mcp = await gw.create_key(name="mcp")
    data = mcp_post(mcp, b"X_Upstream_Auth: evil\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(CALL) + CALL)
    assert statuses(await exchange(gw, data)) == [200]
    assert b"\r\nX_Upstream_Auth: configured\r\n" in wire.requests[0]
    assert b"evil" not in wire.requests[0]


# ------------------------------------------------------------------ transfer codings and framing


@pytest.mark.parametrize(
    "framing",
    [
        b"POST /library/x HTTP/1.1\r\nHost: h\r\nX-Plex-Token: {K}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST /library/x HTTP/1.1\r\nHost: h\r\nX-Plex-Token: {K}\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
        b"POST /library/x HTTP/1.0\r\nHost: h\r\nX-Plex-Token: {K}\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["gzip_chunked", "identity_chunked", "http10_chunked"],
)
async def test_a_transfer_coding_the_sidecar_does_not_undo_is_refused(
    rig: tuple[Running, Wire, str, str], framing: bytes
) -> None:
    """``gzip, chunked`` was read as chunked and sent up as plain chunked: the coding the client declared
    was dropped, not undone. RFC 9112 §6.1: a request with a coding the server does not understand, or
    an HTTP/1.0 request with Transfer-Encoding (faulty framing), is refused; the connection is closed
    (its framing is in doubt), so the body is never read as a next request."""
    gw, wire, plex, _ = rig
    smuggled = plex_get(plex, b"\r\n", b"/library/smuggled")
    data = framing.replace(b"{K}", plex.encode()) + b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n"
    answer = await exchange(gw, data)
    assert statuses(answer) == [400], answer[:300]
    assert b'"bad_request"' in answer
    assert answer.startswith(b"HTTP/1.0 ") or b"\r\nConnection: close\r\n" in answer  # 1.0: closes by default
    assert wire.requests == []


async def test_a_trailer_never_reaches_the_upstream_as_a_header(rig: tuple[Running, Wire, str, str]) -> None:
    """Trailers after the last chunk (``X-Plex-Token``, ``Authorization``) are not headers: neither
    upstream client sends them, as trailer or header; each upstream gets its own credential only."""
    gw, wire, plex, mcp = rig
    trailers = b"0\r\nX-Plex-Token: evil\r\nAuthorization: Bearer evil\r\nX-Api-Key: evil\r\nHost: evil\r\n\r\n"
    plex_post = b"POST /library/x HTTP/1.1\r\nHost: h\r\nX-Plex-Token: %s\r\n" % plex.encode()
    framed = b"Transfer-Encoding: chunked\r\nTrailer: X-Plex-Token\r\nConnection: close\r\n\r\n"
    assert statuses(await exchange(gw, plex_post + framed + b"3\r\nabc\r\n" + trailers)) == [200]
    call = b"%x\r\n" % len(CALL) + CALL + b"\r\n"
    assert statuses(await exchange(gw, mcp_post(mcp, framed) + call + trailers)) == [200]
    assert len(wire.requests) == 2
    for sent in wire.requests:
        assert b"evil" not in sent, sent
    assert wire.requests[0].endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert wire.requests[1].endswith(b"\r\n\r\n" + CALL)


# ------------------------------------------------------------------ what follows a refused request


@pytest.mark.parametrize(
    "first",
    [
        b"POST /library/x HTTP/1.1\r\nHost: h\r\nContent-Length: {N}\r\n\r\n{S}",  # 401: no key
        b"POST /other HTTP/1.1\r\nHost: h\r\nX-Plex-Token: {K}\r\nContent-Length: {N}\r\n\r\n{S}",  # 403
        b"POST /other HTTP/1.1\r\nHost: h\r\nX-Plex-Token: {K}\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"{X}\r\n{S}\r\n0\r\n\r\n",
        b"POST /library/x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: {N}\r\n\r\n{S}",  # 100, 401
    ],
    ids=["401_length", "403_length", "403_chunked", "401_expect"],
)
async def test_a_refused_requests_body_is_never_a_request_and_the_next_one_is_read_at_its_offset(
    rig: tuple[Running, Wire, str, str], first: bytes
) -> None:
    """The refused request's body holds a whole authorised request; then comes a real second request.
    The upstream gets exactly one request, the second, with nothing of the first's body."""
    gw, wire, plex, _ = rig
    hidden = plex_get(plex, b"\r\n", b"/library/hidden")
    head = first.replace(b"{K}", plex.encode()).replace(b"{N}", b"%d" % len(hidden))
    head = head.replace(b"{X}", b"%x" % len(hidden))
    second = plex_get(plex, b"Connection: close\r\n\r\n", b"/library/second")
    answer = await exchange(gw, head.replace(b"{S}", hidden) + second)
    assert [c for c in statuses(answer) if c != 100][-1] == 200, answer[:400]
    assert [r.split(b" ", 2)[1] for r in wire.requests] == [b"/library/second"]
    assert b"hidden" not in wire.requests[0]


# ------------------------------------------------------------------ the Host header


@pytest.mark.parametrize(
    "host", [b"user:pw@evil.example", b"a b", b"h/../x", b"h:99999x", b"h\\x", b"evil.example#", b"[::1"]
)
async def test_an_invalid_host_is_refused_never_forwarded_as_x_forwarded_host(
    rig: tuple[Running, Wire, str, str], host: bytes
) -> None:
    """RFC 9112 §3.2: a Host that is not ``uri-host [":" port]`` is a 400. Forwarded, it reached the upstream
    as ``X-Forwarded-Host`` and was the origin under which the scrubber writes the client's key back."""
    gw, wire, plex, _ = rig
    answer = await exchange(
        gw,
        b"GET /library/x HTTP/1.1\r\nHost: %s\r\nX-Plex-Token: %s\r\nConnection: close\r\n\r\n" % (host, plex.encode()),
    )
    assert statuses(answer) == [400], answer[:300]
    assert b'"bad_request"' in answer
    assert wire.requests == []


@pytest.mark.parametrize(
    "host", [b"plex.test", b"plex.test:32400", b"127.0.0.1:8080", b"[::1]:8080", b"xn--e1a.example"]
)
async def test_a_valid_host_is_forwarded_as_x_forwarded_host(rig: tuple[Running, Wire, str, str], host: bytes) -> None:
    gw, wire, plex, _ = rig
    answer = await exchange(
        gw,
        b"GET /library/x HTTP/1.1\r\nHost: %s\r\nX-Plex-Token: %s\r\nConnection: close\r\n\r\n" % (host, plex.encode()),
    )
    assert statuses(answer) == [200], answer[:300]
    assert b"\r\nX-Forwarded-Host: %s\r\n" % host in wire.requests[0]
