"""The proxy listener's edge: what a client connection may cost, and what a client may claim.

DESIGN invariant 6 — *unauthenticated clients cost little*. aiohttp's own server bounds
one header line and the number of headers, but not the whole head, not the time a head
may take, and not a body that stops arriving (a slow body pins an upstream connection).
``GuardedHandler`` adds, per connection and without a timer per request:

- **header timeout**: a request head must be complete within ``server.header_timeout``
  of its first byte (the first request: of the connection opening). A partial head is
  answered ``408 request_timeout`` and the connection closed; a connection that never
  sent a byte is closed silently.
- **header size**: a head over ``server.max_header_size`` bytes in total (request line
  and all header lines) is answered ``431 headers_too_large``; nothing more is read.
- **body idle timeout**: while a request body is incomplete and the sidecar is ready to
  read it, the client must send something every ``server.body_idle_timeout``; else the
  body fails with ``408 request_timeout`` (the upstream request carrying it is aborted)
  and the connection is closed after the answer.
- **keep-alive**: an idle connection is closed after ``server.keepalive_timeout``.

Everything aiohttp answers itself (a malformed request line, a header line over the
limit) is the designed JSON error too, and is logged without the raw bytes (they may hold
a key). One ``loop.call_at`` handle per connection serves all the deadlines: progress
only stores a due time; the handle re-arms itself when it fires early.

What a client may *claim* is decided here as well: ``X-Forwarded-For`` keeps only the hops
that trusted proxies vouch for, ``X-Real-IP``, ``Forwarded`` and the method-override headers
never reach the upstream, and the origin named in RFC 9728 metadata and ``WWW-Authenticate``
is ``server.public_url``, a trusted proxy's ``X-Forwarded-*``, or the listener's own
address — never the client's ``Host``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from ..config import ServerConfig
from ..core.addresses import forwarded_for, public_base
from ..core.errors import BadRequest, HeadersTooLarge, RequestTimeout, SidecarError, UpstreamTimeout

__all__ = [
    "CLIENT_CLAIMS",
    "GuardedAppRunner",
    "GuardedHandler",
    "GuardedServer",
    "ListenerLimits",
    "forwarded_for",
    "guarded_server",
    "odd_target",
    "public_base",
]

log = logging.getLogger("sidecar")

MAX_LINE = 65536  # one request line or header line (aiohttp's own per-line bound)
# After a refusal: how long the sidecar keeps reading (and discarding) before it closes.
# Closing a socket with unread input sends a TCP RST, which can destroy the error answer
# still in flight to the client (nginx's lingering_close, for the same reason).
LINGER = 2.0

# Request headers a client may send but the upstream never sees: each claims something only
# the sidecar may say (who the client is, which method this really is). X-Forwarded-* are
# rewritten by ``forward_headers``; Host is the upstream's.
CLIENT_CLAIMS = frozenset(
    ("host", "expect", "x-real-ip", "forwarded", "x-http-method-override", "x-http-method", "x-method-override")
)


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one client connection may cost (``server:`` in the config)."""

    header_timeout: float
    max_header_size: int
    body_idle_timeout: float

    @classmethod
    def from_config(cls, server: ServerConfig) -> ListenerLimits:
        return cls(server.header_timeout, server.max_header_size, server.body_idle_timeout)


def guarded_server(server: ServerConfig, handler: Any, **kwargs: Any) -> GuardedServer:
    """The proxy listener's ``web.Server`` with the connection limits of ``server``."""
    line = min(MAX_LINE, server.max_header_size)
    return GuardedServer(
        handler,
        limits=ListenerLimits.from_config(server),
        keepalive_timeout=server.keepalive_timeout,
        max_line_size=line,
        max_field_size=line,
        **kwargs,
    )


class GuardedAppRunner(web.AppRunner):
    """An ``AppRunner`` whose server is a ``GuardedServer``: the admin listener (admin API, console,
    metrics) is reachable without a token too, so it gets the same head and body deadlines and the
    same head-size cap as the proxy listener (aiohttp's own server has neither)."""

    def __init__(self, app: web.Application, server: ServerConfig, **kwargs: Any) -> None:
        line = min(MAX_LINE, server.max_header_size)
        super().__init__(
            app, keepalive_timeout=server.keepalive_timeout, max_line_size=line, max_field_size=line, **kwargs
        )
        self._limits = ListenerLimits.from_config(server)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup hooks and freezes it
        return GuardedServer(
            plain.request_handler,
            limits=self._limits,
            request_factory=plain.request_factory,
            loop=plain._loop,
            **plain._kwargs,
        )


class GuardedServer(web.Server):
    """aiohttp's low-level server, building ``GuardedHandler`` protocols."""

    def __init__(self, handler: Any, *, limits: ListenerLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)


class GuardedHandler(RequestHandler):
    """aiohttp's HTTP/1 protocol plus the head and body deadlines and the head-size cap."""

    __slots__ = ("_body", "_ending", "_eof", "_head_bytes", "_head_due", "_limits", "_rx_at", "_timer")

    def __init__(self, manager: web.Server, *, limits: ListenerLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_due: float | None = None  # when the head being received must be complete
        self._head_bytes = 0  # bytes of that head so far
        self._body: StreamReader | None = None  # a request body still arriving
        self._ending = False  # refused: answer, linger, close
        self._eof: asyncio.Future[None] | None = None  # set while lingering
        self._rx_at = 0.0  # when the client last sent anything
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        now = self._loop.time()
        self._rx_at = now
        self._head_due = now + self._limits.header_timeout  # the first request may not wait forever
        self._arm(self._head_due)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._body = None
        if self._eof is not None and not self._eof.done():
            self._eof.set_result(None)
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self._eof is not None and not self._eof.done():
            self._eof.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self._payload_parser is not None or self._close or self._force_close:
            super().data_received(data)  # websocket frames, or a connection that is ending
            return
        if not data:  # aiohttp re-parsing what it held while its pipelining queue was full
            count = self._request_count
            super().data_received(data)
            if self._request_count != count:
                self._heads_done(self._request_count - count, True, self._loop.time())
            return
        now = self._loop.time()
        self._rx_at = now
        body = self._body
        if body is not None and body.is_eof():
            body = self._body = None
        before = self._head_bytes
        if body is None:  # these bytes start or continue a request head
            if self._head_due is None:
                self._head_due = now + self._limits.header_timeout
                self._arm(self._head_due)
            self._head_bytes = before + len(data)
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._heads_done(self._request_count - count, before + len(data) > self._limits.max_header_size, now)
        elif body is None and self._head_bytes > self._limits.max_header_size:
            self._refuse(HeadersTooLarge(f"request head over {self._limits.max_header_size} bytes"))

    # ------------------------------------------------------------------ aiohttp hooks

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if self._ending and not resp.prepared:
            resp.force_close()  # "Connection: close": nothing more is read on this connection
        result = await super().finish_response(request, resp, start_time)
        if self._ending:
            await self._linger()
            self.force_close()
        return result

    async def _linger(self) -> None:
        """Half-close after the answer and discard input a while, so the close sends no RST."""
        transport = self.transport
        if transport is None:
            return
        self._close = True  # data_received ignores whatever still comes
        if transport.can_write_eof():
            transport.write_eof()
        self._eof = self._loop.create_future()
        try:
            async with asyncio.timeout(LINGER):
                await self._eof
        except TimeoutError:
            pass
        finally:
            self._eof = None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The designed JSON error for what aiohttp answers itself; the raw request never reaches a log."""
        if isinstance(exc, SidecarError):
            err: SidecarError = exc
            log.debug("refused a request from %s: %s", request.remote, err.code)
        elif isinstance(exc, LineTooLong):
            err = HeadersTooLarge(f"a request line or header line is over {self.max_field_size} bytes")
            log.debug("refused a request from %s: header line too long", request.remote)
        elif isinstance(exc, HttpProcessingError) or (status == 400 and exc is not None):
            err = BadRequest("malformed HTTP request")
            log.debug("refused a malformed request from %s: %s", request.remote, type(exc).__name__)
        elif status == 504:
            err = UpstreamTimeout("the request timed out")
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            err = SidecarError("internal error")
        if request.writer.output_size > 0:  # part of an answer went out: only closing is left
            raise ConnectionError("response already started; cannot send an error")
        self._close = self._ending = True  # the parser may be broken: answer, then close
        resp = err.response()
        resp.force_close()
        return resp

    # ------------------------------------------------------------------ deadlines

    def close_after_answer(self) -> None:
        """The request being handled is refused for its framing: answer it, read nothing more, close.

        What follows its head on this connection (its body, pipelined requests) was framed by a
        reading that a proxy in front or the upstream may not share, so none of it is served."""
        self._close = self._ending = True

    def _heads_done(self, new: int, maybe_oversized: bool, now: float) -> None:
        """One or more request heads just completed: check their size, start watching a body."""
        self._head_due = None
        self._head_bytes = 0
        messages = self._messages
        first = len(messages) - new
        if maybe_oversized:  # only a large read can hold a large head: measure exactly then
            for i in range(max(first, 0), len(messages)):
                msg = messages[i][0]
                if isinstance(msg, RawRequestMessage) and _head_size(msg) > self._limits.max_header_size:
                    while len(messages) > i:
                        messages.pop()
                    self._refuse(HeadersTooLarge(f"request head over {self._limits.max_header_size} bytes"))
                    return
        if messages:
            msg, payload = messages[-1]
            if isinstance(msg, RawRequestMessage) and payload is not EMPTY_PAYLOAD and not payload.is_eof():
                self._body = payload
                self._arm(now + self._limits.body_idle_timeout)

    def _refuse(self, err: SidecarError) -> None:
        """Answer ``err`` as the next response, read nothing more, close after it."""
        self._close = self._ending = True  # the attribute, not close(): that would cancel the waiting handler
        self._head_due = None
        self._messages.append((_ErrInfo(status=err.status, exc=err, message=err.message), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return  # it fires first and re-arms for what is due then
            timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None or self._force_close:
            return
        now = self._loop.time()
        due = math.inf
        if self._head_due is not None:
            if self._buffer_paused:  # the sidecar stopped reading (pipelined queue full), not the client
                self._head_due = now + self._limits.header_timeout
            elif now >= self._head_due:
                self._head_timeout()
                return
            due = self._head_due
        body = self._body
        if body is not None:
            if body.is_eof() or body.exception() is not None:
                self._body = None
            else:
                if self._reading_paused:  # the body buffer is full: waiting on us, not on the client
                    self._rx_at = now
                body_due = self._rx_at + self._limits.body_idle_timeout
                if now >= body_due:
                    self._body_timeout(body)
                    return
                due = min(due, body_due)
        if due < math.inf:
            self._timer = self._loop.call_at(due, self._on_timer)

    def _head_timeout(self) -> None:
        if self._head_bytes == 0 and self._request_count == 0:
            self.force_close()  # connected and never sent a byte: nobody to answer
            return
        self._refuse(RequestTimeout(f"the request head did not arrive within {self._limits.header_timeout:g}s"))

    def _body_timeout(self, body: StreamReader) -> None:
        """The handler reading the body gets 408 (and aborts the upstream request it feeds)."""
        self._body = None
        self._close = self._ending = True
        body.set_exception(RequestTimeout(f"no request body data for {self._limits.body_idle_timeout:g}s"))
        if not self._request_in_progress:  # nobody will answer (aiohttp is draining it): just close
            self.force_close()


def _head_size(msg: RawRequestMessage) -> int:
    """Bytes of a request head as sent: request line and header lines with their CRLFs."""
    size = len(msg.method) + len(msg.path) + 12
    for name, value in msg.raw_headers:
        size += len(name) + len(value) + 4
    return size


# --------------------------------------------------------------------------- what a client may claim


def odd_target(request: web.BaseRequest) -> SidecarError | None:
    """``CONNECT`` and request targets that are not a path (``OPTIONS *``, authority-form): refused.

    The sidecar is a reverse proxy: it serves paths. Absolute-form (``GET http://h/p``) is
    accepted, as RFC 9112 §3.2.2 requires; its path is what is routed and forwarded.
    """
    if request.method == "CONNECT":
        return BadRequest("CONNECT is not supported: this is a reverse proxy")
    target = request.raw_path
    if target.startswith("/") or target.startswith(("http://", "https://")):
        return None
    return BadRequest("the request target must be a path")
