"""Upstream forwarding: streaming both ways, websockets, SSE, and upstream faults.

Nothing here buffers a body: requests stream up from ``request.content``, responses
stream down chunk by chunk, so a 256 MiB media file costs a few chunks of memory.
aiohttp's client defaults are wrong for a proxy, so the session is built with
``auto_decompress=False`` (gzip passes through byte-identical) and no total timeout
(aiohttp's 300 s total would kill every long stream); instead a header timeout
(504 when the upstream is slow to answer) and an *idle* timeout between chunks,
which a stream that keeps sending never trips. SSE and websockets have no idle
timeout at all: a quiet event stream is normal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiDict
from yarl import URL

from .config import UpstreamConfig
from .errors import PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable
from .scope import RequestScope

__all__ = [
    "HOP_BY_HOP",
    "Forwarder",
    "ResponseFilter",
    "make_session",
    "upstream_url",
]

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Trailers", "Transfer-Encoding", "Upgrade", "Proxy-Connection",
    )
)  # fmt: skip
CHUNK = 64 * 1024


class ResponseFilter(Protocol):
    """Rewrites a response on its way down (token scrubbing, MCP tool-list filtering)."""

    def headers(self, status: int, headers: CIMultiDict[str]) -> bool:
        """Edit headers in place; return True if the body must pass through ``feed``."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


def make_session(upstream: UpstreamConfig) -> aiohttp.ClientSession:
    """One pooled, keep-alive session per upstream, owned by the app."""
    ssl_ctx: ssl.SSLContext | bool = True
    if not upstream.tls_verify:
        ssl_ctx = False
    elif upstream.tls_ca_file is not None:
        ssl_ctx = ssl.create_default_context(cafile=str(upstream.tls_ca_file))
    connector = aiohttp.TCPConnector(limit=0, ssl=ssl_ctx, keepalive_timeout=30, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(
            total=None, connect=upstream.connect_timeout, sock_connect=upstream.connect_timeout
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        read_bufsize=CHUNK,
    )


def upstream_url(upstream: UpstreamConfig, raw_path: str, query: MultiDict[str]) -> URL:
    """The upstream URL for a request path (``raw_path`` still percent-encoded)."""
    if upstream.strip_prefix and upstream.path_prefix != "/":
        raw_path = raw_path[len(upstream.path_prefix) :] or "/"
        if not raw_path.startswith("/"):
            raw_path = "/" + raw_path
    url = URL(upstream.url + raw_path, encoded=True)
    return url.with_query(query) if query else url


def forward_headers(request: web.Request, headers: CIMultiDict[str], upstream: UpstreamConfig) -> CIMultiDict[str]:
    """Drop hop-by-hop headers (and any the client listed in Connection), set Host and X-Forwarded-*."""
    drop = set(HOP_BY_HOP)
    for value in request.headers.getall("Connection", []):
        drop.update(v.strip().lower() for v in value.split(","))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname in drop or lname == "host":
            continue
        out.add(name, value)
    out["Host"] = upstream.host
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = request.scheme
    out["X-Forwarded-Host"] = request.host
    return out


def _is_stream(headers: CIMultiDict[str] | aiohttp.typedefs.LooseHeaders) -> bool:
    ctype = CIMultiDict(headers).get("Content-Type", "")
    return ctype.startswith("text/event-stream")


class Forwarder:
    """Sends one request upstream and streams the answer back."""

    def __init__(self, sessions: dict[str, aiohttp.ClientSession]) -> None:
        self.sessions = sessions

    async def _body(self, request: web.Request, limit: int) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.content.iter_any():
            seen += len(chunk)
            if limit and seen > limit:
                raise PayloadTooLarge(f"request body over the {limit}-byte limit")
            yield chunk

    async def forward(
        self,
        request: web.Request,
        scope: RequestScope,
        upstream: UpstreamConfig,
        url: URL,
        headers: CIMultiDict[str],
        *,
        body: bytes | None = None,
        response_filter: ResponseFilter | None = None,
        on_headers: Callable[[int, CIMultiDict[str]], None] | None = None,
    ) -> web.StreamResponse:
        """Stream the request up and the response down; raise contract errors before the first byte."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request, scope, upstream, url, headers)
        limit = upstream.max_body
        if request.content_length is not None and limit and request.content_length > limit:
            raise PayloadTooLarge(f"request body over the {limit}-byte limit")
        data: bytes | AsyncIterator[bytes] | None
        if body is not None:
            data = body
            headers["Content-Length"] = str(len(body))
        elif request.body_exists:
            data = self._body(request, limit)
        else:
            data = None
        session = self.sessions[upstream.id]
        started = time.perf_counter()
        try:
            async with asyncio.timeout(upstream.read_timeout):
                resp = await session.request(
                    request.method, url, headers=headers, data=data, allow_redirects=False, compress=None
                )
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {upstream.id} did not answer within {upstream.read_timeout:g}s") from None
        except PayloadTooLarge:
            raise
        except aiohttp.ClientConnectorError:
            raise UpstreamUnavailable(f"upstream {upstream.id} refused the connection") from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamUnavailable(f"upstream {upstream.id} failed: {type(e).__name__}") from None
        scope.upstream_seconds = time.perf_counter() - started
        try:
            return await self._relay(request, scope, upstream, resp, response_filter, on_headers)
        finally:
            resp.release() if resp.content.at_eof() else resp.close()

    async def _relay(
        self,
        request: web.Request,
        scope: RequestScope,
        upstream: UpstreamConfig,
        resp: aiohttp.ClientResponse,
        response_filter: ResponseFilter | None,
        on_headers: Callable[[int, CIMultiDict[str]], None] | None,
    ) -> web.StreamResponse:
        out_headers: CIMultiDict[str] = CIMultiDict()
        for name, value in resp.headers.items():
            if name.lower() not in HOP_BY_HOP:
                out_headers.add(name, value)
        rewrite = response_filter.headers(resp.status, out_headers) if response_filter else False
        if rewrite:
            out_headers.popall("Content-Length", None)
        if on_headers:
            on_headers(resp.status, out_headers)
        streaming = _is_stream(out_headers)
        if streaming:
            out_headers.setdefault("X-Accel-Buffering", "no")
        response = web.StreamResponse(status=resp.status, reason=resp.reason, headers=out_headers)
        if "Content-Length" not in out_headers and request.method != "HEAD" and resp.status not in (204, 304):
            response.enable_chunked_encoding()
        await response.prepare(request)
        idle = None if streaming else upstream.read_timeout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(idle) as deadline:
                while True:
                    if idle is not None:
                        deadline.reschedule(loop.time() + idle)
                    chunk = await resp.content.readany()
                    if not chunk:
                        break
                    if rewrite and response_filter is not None:
                        chunk = response_filter.feed(chunk)
                        if not chunk:
                            continue
                    scope.bytes_sent += len(chunk)
                    await response.write(chunk)
                if rewrite and response_filter is not None:
                    tail = response_filter.flush()
                    if tail:
                        scope.bytes_sent += len(tail)
                        await response.write(tail)
        except TimeoutError:
            # Headers are gone: the only honest signal left is to cut the stream.
            scope.error = "upstream_timeout"
            self._abort(request)
            return response
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            if isinstance(e, aiohttp.ClientConnectionResetError) or request.transport is None:
                scope.error = "client_disconnected"
            else:
                scope.error = "upstream_unavailable"
                self._abort(request)
            return response
        except ConnectionResetError:
            scope.error = "client_disconnected"
            return response
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            await response.write_eof()
        return response

    @staticmethod
    def _abort(request: web.Request) -> None:
        if request.transport is not None:
            request.transport.close()

    async def websocket(
        self,
        request: web.Request,
        scope: RequestScope,
        upstream: UpstreamConfig,
        url: URL,
        headers: CIMultiDict[str],
    ) -> web.StreamResponse:
        """Connect upstream first (so a dead upstream is a clean 502), then pump both ways."""
        for h in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol"):
            headers.popall(h, None)
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        session = self.sessions[upstream.id]
        ws_url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        try:
            async with asyncio.timeout(upstream.read_timeout):
                up = await session.ws_connect(ws_url, headers=headers, protocols=protocols, autoping=False)
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {upstream.id} did not answer within {upstream.read_timeout:g}s") from None
        except aiohttp.WSServerHandshakeError as e:
            raise UpstreamUnavailable(f"upstream {upstream.id} refused the websocket ({e.status})") from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamUnavailable(f"upstream {upstream.id} refused the connection") from None
        down = web.WebSocketResponse(protocols=[up.protocol] if up.protocol else (), autoping=False)
        await down.prepare(request)
        scope.status = 101

        async def pump(src: aiohttp.ClientWebSocketResponse | web.WebSocketResponse, dst: object) -> None:
            send = dst  # typed loosely: both sides share the send_* API
            async for msg in src:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    scope.bytes_sent += len(msg.data)
                    await send.send_str(msg.data)  # type: ignore[attr-defined]
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    scope.bytes_sent += len(msg.data)
                    await send.send_bytes(msg.data)  # type: ignore[attr-defined]
                elif msg.type == aiohttp.WSMsgType.PING:
                    await send.ping(msg.data)  # type: ignore[attr-defined]
                elif msg.type == aiohttp.WSMsgType.PONG:
                    await send.pong(msg.data)  # type: ignore[attr-defined]
                else:
                    break

        try:
            tasks = [asyncio.create_task(pump(up, down)), asyncio.create_task(pump(down, up))]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await up.close()
            await down.close()
        return down
