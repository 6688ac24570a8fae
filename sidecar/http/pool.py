"""Keep-alive HTTP/1.1 connections to one plain-HTTP MCP upstream, parsed by httptools.

Why not aiohttp's client here: an MCP ``tools/call`` is a small POST and a small answer,
and building aiohttp's ``ClientRequest``/``ClientResponse`` (headers, payload registry,
connector, timers, traces) was the largest part of Sidecar's CPU per call (issue 19; ~0.1 ms
of ~0.4 ms, ``bench/run mcp``). This pool writes the request head and body in one write
and parses the answer with ``httptools`` (llhttp, strict: no ``Content-Length`` together
with ``Transfer-Encoding``, no bare LF, no obs-fold), so nothing HTTP is hand-parsed; a
transfer coding other than chunked, which nothing here would undo, is refused too.

Used only for what it is built for: MCP upstreams over ``http://`` (a sidecar's upstream
is on loopback or in the pod), requests whose body Sidecar already holds whole, methods
GET/POST/DELETE. TLS upstreams, streamed uploads, websockets and every other upstream
keep aiohttp's client. The answer is read as it arrives (SSE streams never end by
themselves), with backpressure: past ``HIGH_WATER`` unread bytes the socket is paused.

Errors are aiohttp's, so the forwarder maps them as before: ``ServerDisconnectedError``
(closed before the headers), ``ClientPayloadError`` (broken off after them),
``ConnectionTimeoutError``; a malformed head, and a refused or unresolvable connect, are
``UpstreamUnavailable`` (the latter with the words ``upstreams.health.connect_problem`` uses). Like aiohttp, a POST is
never sent twice: a pooled connection found closed is dropped before it is used, and one
closed just as the request went out is a 502; a GET or DELETE is then sent once more.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from typing import cast

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..config import UpstreamConfig
from ..core.errors import UpstreamUnavailable
from .answer import PooledResponse
from .outbound import MAX_HEADER_SIZE

METHODS = frozenset({"GET", "POST", "DELETE"})  # no HEAD: its answer has a length but no body
IDEMPOTENT = frozenset({"GET", "DELETE"})  # sent again on a new connection if a kept-alive one was closed under it
MAX_HEADERS = 128  # header fields in one answer
KEEPALIVE = 30.0  # seconds an idle connection is kept (aiohttp's connector used 30 too)


def pooled(upstream: UpstreamConfig) -> bool:
    """Whether the upstream's plain requests go through a ``ConnectionPool``."""
    return upstream.kind == "mcp" and URL(upstream.url).scheme == "http"


def request_head(method: str, target: str, headers: CIMultiDict[str]) -> bytes:
    """The request line and headers; a CR, LF or NUL anywhere is refused, never sent."""
    parts = [method, " ", target, " HTTP/1.1\r\n"]
    for name, value in headers.items():
        parts += (name, ": ", value, "\r\n")
    parts.append("\r\n")
    head = "".join(parts)
    # Every line break is one this function wrote: one scan each instead of one per value.
    lines = len(headers) + 2
    if head.count("\r\n") != lines or head.count("\r") != lines or head.count("\n") != lines or "\x00" in head:
        raise ValueError("a CR, LF or NUL in the request target or a header: not sent")
    if " " in target or not target.startswith("/"):
        raise ValueError("the request target must be an origin-form path without spaces")
    return head.encode("utf-8", "surrogateescape")


def _coded(values: list[str]) -> bool:
    """Whether ``Transfer-Encoding`` names any coding but chunked."""
    return any(c.strip().lower() != "chunked" for v in values for c in v.split(","))


class _Connection(asyncio.Protocol):
    """One upstream connection; at most one request on it at a time (no pipelining)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False  # a request is out and its answer not yet released
        self.complete = False  # the answer's message ended
        self.keep_alive = False
        self.until_close = False  # a body without length or chunking: it ends with the connection
        self.idle_since = 0.0
        self.waiter: asyncio.Future[PooledResponse] | None = None
        self.response: PooledResponse | None = None
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._unframed = 0  # bytes read since the request or the last body byte (``data_received``)
        self._got_body = False
        self._pieces: list[bytes] = []  # body bytes parsed from the read in hand (``on_body``)
        self._paused = False
        self._error: str | None = None
        self._poll = select.poll()  # ``heard``

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for: the connection cannot be trusted
            self._abort("the upstream sent bytes without a request")
            return
        self._got_body = False
        self._unframed += len(data)  # before parsing: it also tells ``request`` that an answer had begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._pieces.clear()
            self._abort(self._error or f"malformed answer ({type(e).__name__})")
            return
        self._flush_body()
        if self._got_body:
            self._unframed = 0
        elif self._unframed > 2 * MAX_HEADER_SIZE:
            # httptools holds a header's name and value until its line ends, and ``_count`` only
            # sees whole ones: an endless header line, or trailer line after the last chunk (no
            # idle timeout on an event stream), would be buffered without bound. So the bytes
            # read with no body byte among them are bounded too (twice the parsed bound: CRLFs,
            # ": ", chunk sizes), at the cost of one flag per body callback.
            self._abort(f"over {2 * MAX_HEADER_SIZE} bytes of headers or framing")

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.forget(self)
        if self.busy:
            # Only a clean close (FIN) ends a body read until close: a reset breaks it off, and
            # taking it for the end would relay a truncated answer as a whole one.
            self._fail("closed the connection" if exc is None else "reset the connection", clean=exc is None)

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request
            self._error = "bytes after its answer"
            raise ValueError(self._error)
        self._reason = b""
        self._headers = []
        self._header_bytes = 0

    def on_status(self, status: bytes) -> None:
        self._reason += status
        self._count(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        if len(self._headers) >= MAX_HEADERS:
            self._error = f"over {MAX_HEADERS} header fields"
            raise ValueError(self._error)
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_SIZE:
            self._error = f"headers over {MAX_HEADER_SIZE} bytes"
            raise ValueError(self._error)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()  # any three digits: the forwarder refuses those outside 100-599
        if 100 <= status < 200:
            if status == 101:  # never asked for: nothing after it is HTTP
                self._error = "an unrequested protocol switch"
                raise ValueError(self._error)
            return  # 1xx: informational, the real answer follows
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        if "Transfer-Encoding" in headers and _coded(headers.getall("Transfer-Encoding")):
            # Never asked for (TE is not forwarded), not undone here, and Transfer-Encoding is not
            # relayed: gzip bytes would reach the client as the plain body, unscrubbed.
            self._error = "a transfer coding other than chunked"
            raise ValueError(self._error)
        self.keep_alive = bool(self.parser.should_keep_alive())
        self.until_close = (
            status not in (204, 304) and "Content-Length" not in headers and "Transfer-Encoding" not in headers
        )
        reason = self._reason.decode("utf-8", "surrogateescape")
        self.response = PooledResponse(self, status, reason, headers)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.response)

    def on_body(self, body: bytes) -> None:
        # Gathered, then handed over once per read (``_flush_body``): an answer in 1-byte chunks
        # would otherwise be one ~40-byte object per byte, ~40× its size before reading pauses.
        self._got_body = True
        self._pieces.append(body)

    def _flush_body(self) -> None:
        pieces = self._pieces
        if pieces:
            self._pieces = []
            if self.response is not None:
                self.response.content.feed(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def on_message_complete(self) -> None:
        if self.response is None:  # the end of a 1xx
            return
        self._flush_body()
        self.complete = True
        self.response.content.feed_eof()

    # -- the pool's side
    def send(self, data: bytes) -> asyncio.Future[PooledResponse]:
        assert self.transport is not None
        self.busy, self.complete, self.response, self._error = True, False, None, None
        self._unframed = 0
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def heard(self) -> bool:
        """Whether bytes, a FIN or a reset wait on this idle socket, unread by the loop as yet: an
        answer nobody asked for would be taken for the next request's, a POST on a closed one is a
        502. One ``poll`` (~0.3 µs) before each reuse, as urllib3 does."""
        return bool(self._poll.poll(0))

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def done(self, reuse: bool) -> None:
        if not self.busy:
            return
        self.busy = False
        self.waiter = None
        # Complete means both ways: an upstream may answer before it read the body, and what of
        # it is still unsent would be read as the start of the next request on this connection.
        sent = self.transport is not None and not self.transport.get_write_buffer_size()
        if reuse and sent and self.complete and self.keep_alive and not self._paused:
            self.response = None
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.busy = False
        t = self.transport
        if t is not None:
            # A graceful close first sends what is still unsent, which an upstream that stopped
            # reading never takes: the socket and the rest of the body would stay with it.
            if t.get_write_buffer_size():
                t.abort()
            else:
                t.close()

    def _abort(self, why: str) -> None:
        self._fail(why, broken=True)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, why: str, *, broken: bool = False, clean: bool = False) -> None:
        """The connection failed (``broken``: the answer itself was malformed; ``clean``: a FIN)."""
        if self.response is None:
            if self.waiter is not None and not self.waiter.done():
                if broken:  # the client is told what happened, not "closed without answering"
                    exc: Exception = UpstreamUnavailable(f"upstream {self.pool.upstream.id} sent a malformed answer")
                else:
                    exc = aiohttp.ServerDisconnectedError(why)
                self.waiter.set_exception(exc)
        elif not self.complete:
            if self.until_close and clean and self._error is None:
                self.complete = True
                self.response.content.feed_eof()
            else:
                self.response.content.set_exception(aiohttp.ClientPayloadError(f"upstream answer broken off: {why}"))


class ConnectionPool:
    """Idle keep-alive connections to one upstream, most recently used first."""

    def __init__(self, upstream: UpstreamConfig) -> None:
        url = URL(upstream.url)
        self.upstream = upstream
        self.host = url.host or "localhost"
        self.port = url.port or 80
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    def put(self, conn: _Connection) -> None:
        if self.closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(KEEPALIVE, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for ``KEEPALIVE``. ``_take_idle`` only looks at the top of the
        stack, so after a burst the ones below would stay open for good (aiohttp's connector has a
        timer for this too); one timer per pool, armed while anything is idle."""
        self._sweeper = None
        now = time.monotonic()
        while self._idle and now - self._idle[0].idle_since >= KEEPALIVE:
            self._idle.pop(0).close()
        if self._idle:
            wait = self._idle[0].idle_since + KEEPALIVE - now
            self._sweeper = asyncio.get_running_loop().call_later(wait, self._sweep)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            t = conn.transport
            if t is not None and not t.is_closing() and now - conn.idle_since < KEEPALIVE and not conn.heard():
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        up = self.upstream
        try:
            async with asyncio.timeout(up.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(f"connect to upstream {up.id} timed out") from None
        except socket.gaierror:
            raise UpstreamUnavailable(f"upstream {up.id}: its host name does not resolve") from None
        except OSError:
            raise UpstreamUnavailable(f"upstream {up.id} refused the connection") from None
        self._all.add(conn)
        return conn

    async def request(self, method: str, url: URL, headers: CIMultiDict[str], body: bytes | None) -> PooledResponse:
        """Send one request; the answer once its headers are in (its body follows in ``content``)."""
        data = request_head(method, url.raw_path_qs, headers)
        if body:
            data += body
        conn = self._take_idle()
        if conn is not None and method in IDEMPOTENT:
            try:
                return await self._exchange(conn, data)
            except aiohttp.ServerDisconnectedError:
                if conn._unframed:  # an answer had begun (a malformed one): not a close in passing
                    raise
            # The upstream closed its idle connection just as the request went out: like aiohttp
            # (RFC 9112 §9.3.1), an idempotent request is sent once more, on a new connection.
            conn = None
        return await self._exchange(conn or await self._connect(), data)

    @staticmethod
    async def _exchange(conn: _Connection, data: bytes) -> PooledResponse:
        try:
            return await conn.send(data)
        except BaseException:
            conn.close()  # a timeout, a cancelled call: whatever comes next on it is not ours
            raise

    async def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        self._all.clear()
