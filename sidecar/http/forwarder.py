"""Upstream forwarding: streaming both ways, websockets, SSE, and upstream faults.

Nothing here buffers a body: requests stream up from ``request.content``, responses
stream down chunk by chunk, so a 256 MiB media file costs a few chunks of memory.
aiohttp's client defaults are wrong for a proxy, so the session is built with
``auto_decompress=False`` (gzip arrives as sent; ``sidecar.upstreams.scrub`` decodes Plex bodies) and no total timeout
(aiohttp's 300 s total would kill every long stream). Instead ``timeouts.read`` is an
*idle* timeout: the upstream must accept the request body, answer with headers, and
send each next chunk within it. Time spent waiting on the client (a slow upload, a
paused player that stops reading) never counts against the upstream. SSE and
websockets have no idle timeout at all: a quiet event stream is normal.

Faults map onto the contract: no answer in time is ``504 upstream_timeout``; refused,
reset, TLS failure or a bad response before the headers is ``502 upstream_unavailable``;
a fault after the headers went out can only cut the client's connection, so the client
never mistakes a truncated body for a whole one (a websocket gets close 1014, bad gateway).

Around it: ``outbound`` builds the upstream request (session, URL, headers), ``bodies``
holds the idle deadline and what the body relays share, ``websocket`` relays websockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..config import UpstreamConfig
from ..core.errors import BadRequest, PayloadTooLarge, RequestTimeout, UpstreamTimeout, UpstreamUnavailable
from ..core.relay import HOP_BY_HOP, ResponseFilter, ResponseTap, as_sent
from ..core.scope import RequestScope
from ..upstreams.health import connect_problem
from ..upstreams.scrub import ScrubFilter, Unscrubbable, whole_needed
from .answer import PooledResponse
from .bodies import SMALL_BODY, IdleDeadline, Upload, is_stream, small_body
from .browser import answer_headers, refused
from .outbound import (
    Networks,
    connection_tokens,
    forward_headers,
    make_session,
    public_origin,
    strip_prefix_raw,
    upstream_url,
)
from .pool import METHODS, ConnectionPool
from .streams import Closer, StreamRegistry
from .websocket import relay_websocket
from .whole import Answer, answer_in_hand, end_soon, relay_whole

__all__ = [
    "HOP_BY_HOP",
    "Forwarder",
    "Networks",
    "ResponseFilter",
    "ResponseTap",
    "forward_headers",
    "make_session",
    "public_origin",
    "strip_prefix_raw",
    "upstream_url",
]


END_WAIT = 0.1  # seconds an answered stream may take to end once its client has left


class _Seen:
    """Whether the answer a client waits for has been sent (``Forwarder.forward``'s ``answered``)."""

    __slots__ = ("done", "test")

    def __init__(self, test: Callable[[bytes], bool]) -> None:
        self.test = test
        self.done = False


class Forwarder:
    """Sends one request upstream and streams the answer back."""

    def __init__(self, sessions: dict[str, aiohttp.ClientSession], pools: dict[str, ConnectionPool]) -> None:
        self.sessions = sessions
        self.pools = pools  # plain-HTTP MCP upstreams (``sidecar.http.pool``)
        self.shutting_down = False
        # Streams that only end when a side hangs up (websockets, SSE), each with its closer.
        self._long_lived: dict[object, Callable[[], Awaitable[None]]] = {}
        self.streams: StreamRegistry | None = None  # set by the app: revocation ends open streams
        self._ending: set[asyncio.Task[None]] = set()  # answered streams waiting for their end (``_release_later``)

    async def end_streams(self) -> None:
        """Close websockets (1001 going away) and SSE streams, so a drain does not wait out its grace.

        Plain requests in flight are left to finish; event streams never do by themselves, and
        their clients reconnect (to another replica) at once.
        """
        self.shutting_down = True
        await asyncio.gather(*(close() for close in list(self._long_lived.values())), return_exceptions=True)

    def _revocable(self, scope: RequestScope, closer: Closer) -> contextlib.AbstractAsyncContextManager[object]:
        """Registers a stream under its key, so that revocation or expiry ends it (``sidecar.http.streams``)."""
        if self.streams is None or not scope.key_id:
            return contextlib.nullcontext()
        return self.streams.watch(scope.key_id, closer, scope.granted, scope.until)

    def waiting(self, scope: RequestScope) -> contextlib.AbstractAsyncContextManager[object]:
        """Ends a wait for the upstream's answer with 401 when its key is revoked or expires (``streams._Wait``)."""
        if self.streams is None or not scope.key_id:
            return contextlib.nullcontext()
        return self.streams.waiting(scope.key_id, scope.granted, scope.until)

    @contextlib.asynccontextmanager
    async def _long_lived_stream(self, close: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
        token = object()
        self._long_lived[token] = close
        try:
            if self.shutting_down:  # it started just as the drain began
                await close()
            yield
        finally:
            self._long_lived.pop(token, None)

    @staticmethod
    async def _body(
        request: web.Request, scope: RequestScope, limit: int, deadline: IdleDeadline, upload: Upload
    ) -> AsyncIterator[bytes]:
        """The client's body, chunk by chunk as it arrives, cut off past ``limit`` bytes.

        Going over the limit raises inside aiohttp's body writer, which aborts the upstream
        connection (the upstream sees an incomplete body, never a truncated "whole" one) and
        fails the pending request; ``forward`` turns that into 413 through ``upload``.
        """
        seen = 0
        while True:
            deadline.pause()
            try:
                chunk = await request.content.readany()
            except RequestTimeout as e:  # body idle timeout (sidecar/http/listener.py): 408, not the upstream's fault
                upload.stalled = e
                raise
            deadline.touch()  # from here on the upstream must take the chunk in time
            if not chunk:
                return
            seen += len(chunk)
            if limit and seen > limit:
                upload.too_large = True
                raise PayloadTooLarge(f"request body over the {limit}-byte limit")
            scope.bytes_received = seen
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
        tap: ResponseTap | None = None,
        answered: Callable[[bytes], bool] | None = None,
        as_json: Callable[[bytes], bytes | None] | None = None,
    ) -> web.StreamResponse:
        """Stream the request up and the response down; raise contract errors before the first byte.

        ``answered(chunk)``: whether a chunk sent to the client completes what it asked for (an
        MCP POST's answer). A client that leaves after that has nothing left to cancel, so the
        upstream connection is given a moment (``END_WAIT``) to end its stream and is kept.
        ``as_json(body)``: for an event stream that had ended when its headers were read, the one
        JSON answer it carries (sent as ``application/json``), or None to send the stream as it is.
        """
        scrub = response_filter if isinstance(response_filter, ScrubFilter) else None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if request.method != "GET" or request.body_exists:
                # The upstream's handshake is a GET: anything else was authorised as another request.
                raise BadRequest("a websocket upgrade must be a GET request without a body")
            return await self.websocket(request, scope, upstream, url, headers, scrub)
        limit = upstream.max_body
        if request.content_length is not None and limit and request.content_length > limit:
            raise PayloadTooLarge(f"request body over the {limit}-byte limit")
        deadline = IdleDeadline(upstream.read_timeout)
        upload = Upload()
        data: bytes | AsyncIterator[bytes] | None
        if body is not None:
            data = body
            headers["Content-Length"] = str(len(body))
            scope.bytes_received = len(body)
        elif request.body_exists:
            data = self._body(request, scope, limit, deadline, upload)
        else:
            data = None
        session: aiohttp.ClientSession | ConnectionPool = self.sessions[upstream.id]
        pool = self.pools.get(upstream.id)
        held = data is None or isinstance(data, bytes)  # not the ABC check: that costs ~1 µs a call
        if pool is not None and held and request.method in METHODS:
            session = pool
        started = time.perf_counter()
        resp = await self._send(scope, request, upstream, session, url, headers, data, deadline, upload)
        if scrub is not None and held and request.method in ("GET", "HEAD") and whole_needed(resp.status, resp.headers):
            # Ranges of a body that must be scrubbed could be joined around the token: ask for
            # it whole (a server may always ignore Range); a 206 again is refused by the filter.
            # Never another method: a call would run twice on one authorisation (the filter's 502).
            resp.close()
            for name in ("Range", "If-Range"):
                headers.popall(name, None)
            resp = await self._send(scope, request, upstream, session, url, headers, data, deadline, upload)
        scope.upstream_seconds = time.perf_counter() - started
        if not 100 <= resp.status <= 599:  # aiohttp's client takes any three digits (RFC 9110 §15: invalid)
            resp.close()
            raise UpstreamUnavailable(f"upstream {upstream.id} sent a malformed answer")
        seen = _Seen(answered) if answered is not None else None
        try:
            return await self._relay(
                request, scope, upstream, resp, response_filter, on_headers, tap, upload, seen, as_json
            )
        finally:
            if resp.content.at_eof():
                resp.release()
            elif seen is not None and seen.done and not self.shutting_down:
                self._release_later(resp)  # the answer is out: nothing to cancel upstream
            else:
                resp.close()  # closing is cancellation (MCP 2026-07-28)

    def _release_later(self, resp: Answer) -> None:
        """Let an answered stream end (bounded) and keep its connection; close it if it does not."""
        if isinstance(resp, PooledResponse):
            resp.release_at_end(END_WAIT)  # no task: a callback at the end, a timer for the bound
            return

        async def end() -> None:
            try:
                async with asyncio.timeout(END_WAIT):
                    while await resp.content.readany():
                        pass
            except (TimeoutError, aiohttp.ClientError, OSError):
                resp.close()
                return
            resp.release()

        task = asyncio.get_running_loop().create_task(end())
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _send(
        self,
        scope: RequestScope,
        request: web.Request,
        upstream: UpstreamConfig,
        session: aiohttp.ClientSession | ConnectionPool,
        url: URL,
        headers: CIMultiDict[str],
        data: bytes | AsyncIterator[bytes] | None,
        deadline: IdleDeadline,
        upload: Upload,
    ) -> Answer:
        """The upstream's answer up to its headers, or the contract error for why there is none; ended with
        401 when the key is revoked or expires while the upstream thinks (up to its ``read_timeout``): no
        answer reaches a key revoked meanwhile (invariant 5)."""
        limit = upstream.max_body
        # aiohttp itself sends an idempotent request once more when a pooled keep-alive
        # connection turns out closed (RFC 9112 §9.3.1); a streamed body is never replayed.
        try:
            async with self.waiting(scope), deadline:
                if isinstance(session, ConnectionPool):
                    assert data is None or isinstance(data, bytes)
                    return await session.request(request.method, url, headers, data)
                return await session.request(
                    request.method, url, headers=headers, data=data, allow_redirects=False, compress=None
                )
        except aiohttp.ServerDisconnectedError:
            if upload.stalled is not None:
                raise upload.stalled from None
            if upload.too_large:
                raise PayloadTooLarge(f"request body over the {limit}-byte limit") from None
            raise UpstreamUnavailable(f"upstream {upstream.id} closed the connection without answering") from None
        except PayloadTooLarge:
            raise
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamTimeout(
                f"upstream {upstream.id} did not accept a connection within {upstream.connect_timeout:g}s"
            ) from None
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {upstream.id} did not answer within {upstream.read_timeout:g}s") from None
        except aiohttp.ClientConnectorError as e:  # refused, name not resolved, TLS
            raise UpstreamUnavailable(connect_problem(upstream, e)) from None
        except (aiohttp.ClientError, OSError) as e:
            if upload.stalled is not None:
                raise upload.stalled from None
            if upload.too_large:
                raise PayloadTooLarge(f"request body over the {limit}-byte limit") from None
            raise UpstreamUnavailable(f"upstream {upstream.id} failed: {type(e).__name__}") from None

    async def _relay(
        self,
        request: web.Request,
        scope: RequestScope,
        upstream: UpstreamConfig,
        resp: Answer,
        response_filter: ResponseFilter | None,
        on_headers: Callable[[int, CIMultiDict[str]], None] | None,
        tap: ResponseTap | None = None,
        upload: Upload | None = None,
        seen: _Seen | None = None,
        as_json: Callable[[bytes], bytes | None] | None = None,
    ) -> web.StreamResponse:
        drop = connection_tokens(resp.headers)
        if "Transfer-Encoding" in resp.headers:
            drop = drop | {"content-length"}  # both sent: the framing was Transfer-Encoding (RFC 9112 §6.3)
        out_headers: CIMultiDict[str] = CIMultiDict()
        mcp = upstream.kind == "mcp"
        drop = refused(drop, mcp)  # + the headers that act on the whole origin (browser.py), precomputed
        for name, value in resp.headers.items():
            if name.lower() not in drop:
                out_headers.add(name, as_sent(value))
        answer_headers(mcp, out_headers, request.path, upstream.path_prefix, upstream.strip_prefix, upstream.url)
        reason = resp.reason
        if reason and not (reason.isascii() and reason.isprintable()):
            # A control character or a non-ASCII byte: aiohttp refuses to write it (the client got no
            # answer at all) and it carries no meaning (RFC 9112 §4): the standard phrase goes instead.
            reason = None
        scrub = response_filter if isinstance(response_filter, ScrubFilter) else None
        if scrub is not None:
            reason = scrub.text(reason) if reason else reason
            scrub.check_framing(resp.headers)
        recording = tap.start(resp.status, out_headers.copy()) if tap is not None else False
        rewrite = response_filter.headers(resp.status, out_headers) if response_filter else False
        if rewrite and scrub is None:  # the ScrubFilter keeps it where the length does not change
            out_headers.popall("Content-Length", None)
        if on_headers:
            on_headers(resp.status, out_headers)
        streaming = is_stream(out_headers)
        short = streaming and request.method == "POST"  # an MCP POST's SSE answer: usually one event, then the end
        if streaming:
            out_headers.setdefault("X-Accel-Buffering", "no")
            if as_json is not None and seen is not None and isinstance(resp, PooledResponse):
                if short and not resp.content.is_eof() and await answer_in_hand(resp.content, as_json, SMALL_BODY):
                    seen.done = True  # ``forward`` reads the end of the stream after the answer went out
                    return await relay_whole(scope, upstream, resp, resp.content.total_bytes, out_headers,
                                             response_filter, rewrite, recording, tap, reason, as_json)  # fmt: skip
            elif short and not resp.content.is_eof():
                await asyncio.sleep(0)  # one turn of the loop: the rest of a short answer is usually on its way
                if as_json is not None and not resp.content.is_eof():
                    await end_soon(resp)
            if resp.content.is_eof() and resp.content.total_bytes <= SMALL_BODY:
                # The whole stream came in with its headers (an MCP POST's one-answer SSE): one write
                # with a Content-Length, so the client holds a complete answer (and can reuse its connection).
                return await relay_whole(scope, upstream, resp, resp.content.total_bytes, out_headers,
                                         response_filter, rewrite, recording, tap, reason, as_json)  # fmt: skip
        else:
            size = small_body(request.method, resp.status, resp.headers)
            if size is not None:
                return await relay_whole(scope, upstream, resp, size, out_headers, response_filter, rewrite,
                                         recording, tap, reason)  # fmt: skip
        # No explicit chunking: without a Content-Length aiohttp chunks for HTTP/1.1 clients,
        # closes the connection for HTTP/1.0 ones, and sends no body at all for HEAD/204/304.
        response = web.StreamResponse(status=resp.status, reason=reason, headers=out_headers)
        await response.prepare(request)
        scope.status = resp.status  # sent: a client that leaves from here on is logged with it, not 499
        deadline = IdleDeadline(None if streaming else upstream.read_timeout)
        last = b""

        async def end_stream() -> None:
            resp.close()  # the pending read fails; the client's connection is then cut

        async def revoked(reason: str) -> None:  # the key was revoked or expired: cut the download/stream
            scope.error = f"key_{reason}"
            if request.transport is not None:
                # The handler is cancelled (handler_cancellation), also from a write stuck on a client
                # that stopped reading; ``forward`` then closes the upstream response.
                request.transport.abort()

        try:
            async with (
                self._long_lived_stream(end_stream) if streaming else contextlib.nullcontext(),
                self._revocable(scope, revoked),
                deadline,
            ):
                while True:
                    deadline.touch()
                    try:
                        chunk = await resp.content.readany()
                    except (aiohttp.ClientError, OSError):
                        too_large = upload is not None and upload.too_large
                        error = "payload_too_large" if too_large else "upstream_unavailable"
                        if streaming and self.shutting_down:
                            error = "server_shutdown"
                        return self._cut(request, response, scope, error)
                    if not chunk:
                        break
                    if recording and tap is not None:
                        recording = tap.feed(chunk)
                    if rewrite and response_filter is not None:
                        try:
                            chunk = response_filter.feed(chunk)
                        except Unscrubbable:  # e.g. "gzip" that is not: nothing unscrubbed goes out
                            return self._cut(request, response, scope, "upstream_unavailable")
                        if not chunk:
                            continue
                    if resp.content.at_eof():
                        last = chunk  # the end came with it: sent together with the end of the answer
                        break
                    deadline.pause()  # a client that reads slowly is not a slow upstream
                    if not await self._write(response, scope, chunk):
                        return response
                    if seen is not None and not seen.done:
                        seen.done = seen.test(chunk)
        except TimeoutError:  # only the idle deadline: it is paused whenever anything else is awaited
            return self._cut(request, response, scope, "upstream_timeout")
        tail = b""
        if rewrite and response_filter is not None:
            try:
                tail = response_filter.flush()
            except Unscrubbable:  # a compressed body that ended in the middle is no whole answer
                return self._cut(request, response, scope, "upstream_unavailable")
        if recording and tap is not None:
            tap.end()  # after the filter accepted the whole body: an answer it refuses is never stored
        tail = last + tail if last else tail
        try:
            await response.write_eof(tail)  # the last bytes and the end of the body in one write
        except ConnectionError:
            if tail:
                scope.error = "client_disconnected"
            return response
        scope.bytes_sent += len(tail)
        return response

    @staticmethod
    async def _write(response: web.StreamResponse, scope: RequestScope, chunk: bytes) -> bool:
        """Send one chunk to the client; False once the client has gone away."""
        try:
            await response.write(chunk)
        except ConnectionError:  # aiohttp's ClientConnectionResetError is one too
            scope.error = "client_disconnected"
            return False
        scope.bytes_sent += len(chunk)
        return True

    @staticmethod
    def _cut(request: web.Request, response: web.StreamResponse, scope: RequestScope, error: str) -> web.StreamResponse:
        """The headers are gone: the only honest signal left is to close the client's connection
        before the body is complete (no final chunk, or fewer bytes than Content-Length)."""
        scope.error = error
        if request.transport is not None:
            request.transport.close()
        return response

    async def websocket(
        self,
        request: web.Request,
        scope: RequestScope,
        upstream: UpstreamConfig,
        url: URL,
        headers: CIMultiDict[str],
        scrub: ScrubFilter | None = None,
    ) -> web.StreamResponse:
        """Relay a websocket (``sidecar.http.websocket``): a dead upstream is a clean 502, then frames both ways."""
        return await relay_websocket(self, request, scope, upstream, url, headers, scrub)
