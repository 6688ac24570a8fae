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
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict
from yarl import URL

from ..config import UpstreamConfig
from ..core.errors import BadRequest, PayloadTooLarge, RequestTimeout, UpstreamTimeout, UpstreamUnavailable
from ..core.relay import HOP_BY_HOP, ResponseFilter, ResponseTap
from ..core.scope import RequestScope
from ..upstreams.health import connect_problem
from ..upstreams.scrub import ScrubFilter, Unscrubbable, whole_needed
from .listener import CLIENT_CLAIMS, forwarded_for
from .streams import Closer, StreamRegistry

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

CHUNK = 64 * 1024
MAX_HEADER_SIZE = 65536  # the same bound the proxy listener applies to clients
_WS_HANDSHAKE = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol")


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
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),  # only what the client sent
        read_bufsize=CHUNK,
        max_line_size=MAX_HEADER_SIZE,
        max_field_size=MAX_HEADER_SIZE,
    )


def strip_prefix_raw(upstream: UpstreamConfig, raw_path: str) -> str:
    """``raw_path`` (percent-encoded) less the upstream's ``path_prefix`` when it strips one.

    By segment, not by character count: the router matched the *decoded* path, and
    ``/%70lex/x`` is ``/plex/x`` decoded, so the prefix's segments go whatever their
    spelling. Segments that decode to something else (``/plex%2Fx`` decodes to ``/plex/x``
    too) are refused: the path the sidecar judged would not be the one forwarded.
    """
    if not upstream.strip_prefix or upstream.path_prefix == "/":
        return raw_path
    depth = upstream.path_prefix.count("/")
    parts = raw_path.split("/", depth + 1)
    head = "/".join(parts[: depth + 1])
    if head != upstream.path_prefix and unquote(head) != upstream.path_prefix:
        raise BadRequest(f"the path must begin with the segment(s) {upstream.path_prefix!r}, not {head!r}")
    return "/" + parts[depth + 1] if len(parts) > depth + 1 else "/"


def upstream_url(upstream: UpstreamConfig, raw_path: str, query: MultiDict[str]) -> URL:
    """The upstream URL for a request path (``raw_path`` still percent-encoded)."""
    url = URL(upstream.url + strip_prefix_raw(upstream, raw_path), encoded=True)
    return url.with_query(query) if query else url


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Hop-by-hop names: the fixed list plus every header the ``Connection`` header names."""
    listed = headers.getall("Connection", ())
    if not listed:
        return HOP_BY_HOP
    drop = set(HOP_BY_HOP)
    for value in listed:
        drop.update(v.strip().lower() for v in value.split(",") if v.strip())
    return frozenset(drop)


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def public_origin(request: web.Request, trusted_proxies: Networks = ()) -> tuple[str, str]:
    """The scheme and host the client used: the listener's own, or what a trusted proxy in front says."""
    proto, host = request.scheme, request.host
    if trusted_proxies:
        try:
            trusted = any(ipaddress.ip_address(request.remote or "") in net for net in trusted_proxies)
        except ValueError:
            trusted = False
        if trusted:
            proto = request.headers.get("X-Forwarded-Proto", proto).split(",")[0].strip() or proto
            host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip() or host
    return proto, host


def forward_headers(
    request: web.Request, headers: CIMultiDict[str], upstream: UpstreamConfig, trusted_proxies: Networks = ()
) -> CIMultiDict[str]:
    """Drop hop-by-hop headers (and any the client listed in Connection), set Host and X-Forwarded-*.

    X-Forwarded-Proto/Host describe the client's side: behind a trusted proxy (TLS
    terminated at an ingress) they are that proxy's, otherwise this listener's.
    X-Forwarded-For keeps only hops trusted proxies vouch for; what only the sidecar may
    say (X-Real-IP, Forwarded, method overrides) is never passed on (``listener.CLIENT_CLAIMS``).
    """
    drop = _connection_tokens(request.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        # Expect: the sidecar already answered the client's 100-continue; forwarded, it would
        # make the upstream request wait for a 100 that some servers never send.
        if lname in drop or lname in CLIENT_CLAIMS:
            continue
        out.add(name, value)
    out["Host"] = upstream.host
    out["X-Forwarded-For"] = forwarded_for(request.remote or "", headers.getall("X-Forwarded-For", ()), trusted_proxies)
    out["X-Forwarded-Proto"], out["X-Forwarded-Host"] = public_origin(request, trusted_proxies)
    return out


SMALL_BODY = CHUNK  # answers up to this size with a Content-Length are relayed whole (``_relay_whole``)


def _small_body(method: str, resp: aiohttp.ClientResponse) -> int | None:
    """The body's length when it is small, known and really follows the headers, else None."""
    if method == "HEAD" or resp.status < 200 or resp.status in (204, 304) or "Transfer-Encoding" in resp.headers:
        return None
    length = resp.headers.get("Content-Length")
    if length is None or not length.isdigit():
        return None
    size = int(length)
    return size if size <= SMALL_BODY else None


def _is_stream(headers: CIMultiDict[str]) -> bool:
    return headers.get("Content-Type", "").lower().startswith("text/event-stream")


class _IdleDeadline:
    """An idle timer: progress pushes it back, waiting on the client pauses it.

    Hand-written rather than ``asyncio.timeout`` + ``reschedule``: that cancels and
    re-creates a timer handle on every chunk (several % of a small request's CPU). Here
    ``touch`` only stores a new due time; the one armed handle checks it when it fires
    and re-arms itself if progress was made meanwhile. Cancellation follows
    ``asyncio.timeout``: the task is cancelled and ``TimeoutError`` raised at the exit.

    It may be moved from another task (aiohttp writes the request body in a task of its
    own); outside its ``async with`` every call is a no-op, so a body still streaming
    after the upstream answered early cannot touch a finished timer.
    """

    __slots__ = ("_due", "_fired", "_handle", "_loop", "_task", "seconds")

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._task: asyncio.Task[object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due: float | None = None
        self._fired = False

    async def __aenter__(self) -> _IdleDeadline:
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._fired = False
        self.touch()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        task, self._task = self._task, None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._fired and task is not None and task.uncancel() == 0 and et is asyncio.CancelledError:
            raise TimeoutError from exc
        return None

    def touch(self) -> None:
        """Progress: the upstream has ``seconds`` again from now."""
        if self._task is None or self.seconds is None or self._fired:
            return
        assert self._loop is not None
        self._due = self._loop.time() + self.seconds
        if self._handle is None:
            self._handle = self._loop.call_at(self._due, self._fire)

    def pause(self) -> None:
        """Waiting on the client, which is not the upstream's fault."""
        self._due = None

    def _fire(self) -> None:
        self._handle = None
        if self._task is None or self._due is None:
            return  # finished, or paused: the next touch arms it again
        assert self._loop is not None
        if self._loop.time() < self._due:  # touched since it was armed
            self._handle = self._loop.call_at(self._due, self._fire)
            return
        self._fired = True
        self._task.cancel()


class _Upload:
    """What the request-body pump learned, read by ``forward`` when the upstream request fails."""

    __slots__ = ("stalled", "too_large")

    def __init__(self) -> None:
        self.too_large = False
        self.stalled: RequestTimeout | None = None  # the client stopped sending its body


class Forwarder:
    """Sends one request upstream and streams the answer back."""

    def __init__(self, sessions: dict[str, aiohttp.ClientSession]) -> None:
        self.sessions = sessions
        self.shutting_down = False
        # Streams that only end when a side hangs up (websockets, SSE), each with its closer.
        self._long_lived: dict[object, Callable[[], Awaitable[None]]] = {}
        self.streams: StreamRegistry | None = None  # set by the app: revocation ends open streams

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
        return self.streams.watch(scope.key_id, closer)

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
        request: web.Request, scope: RequestScope, limit: int, deadline: _IdleDeadline, upload: _Upload
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
    ) -> web.StreamResponse:
        """Stream the request up and the response down; raise contract errors before the first byte."""
        scrub = response_filter if isinstance(response_filter, ScrubFilter) else None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if request.method != "GET" or request.body_exists:
                # The upstream's handshake is a GET: anything else was authorised as another request.
                raise BadRequest("a websocket upgrade must be a GET request without a body")
            return await self.websocket(request, scope, upstream, url, headers, scrub)
        limit = upstream.max_body
        if request.content_length is not None and limit and request.content_length > limit:
            raise PayloadTooLarge(f"request body over the {limit}-byte limit")
        deadline = _IdleDeadline(upstream.read_timeout)
        upload = _Upload()
        data: bytes | AsyncIterator[bytes] | None
        if body is not None:
            data = body
            headers["Content-Length"] = str(len(body))
            scope.bytes_received = len(body)
        elif request.body_exists:
            data = self._body(request, scope, limit, deadline, upload)
        else:
            data = None
        session = self.sessions[upstream.id]
        started = time.perf_counter()
        resp = await self._send(request, upstream, session, url, headers, data, deadline, upload)
        if scrub is not None and not isinstance(data, AsyncIterator) and whole_needed(resp.status, resp.headers):
            # Ranges of a body that must be scrubbed could be joined around the token: ask for
            # it whole (a server may always ignore Range); a 206 again is refused by the filter.
            resp.close()
            for name in ("Range", "If-Range"):
                headers.popall(name, None)
            resp = await self._send(request, upstream, session, url, headers, data, deadline, upload)
        scope.upstream_seconds = time.perf_counter() - started
        try:
            return await self._relay(request, scope, upstream, resp, response_filter, on_headers, tap, upload)
        finally:
            resp.release() if resp.content.at_eof() else resp.close()

    @staticmethod
    async def _send(
        request: web.Request,
        upstream: UpstreamConfig,
        session: aiohttp.ClientSession,
        url: URL,
        headers: CIMultiDict[str],
        data: bytes | AsyncIterator[bytes] | None,
        deadline: _IdleDeadline,
        upload: _Upload,
    ) -> aiohttp.ClientResponse:
        """The upstream's answer up to its headers, or the contract error for why there is none."""
        limit = upstream.max_body
        # aiohttp itself sends an idempotent request once more when a pooled keep-alive
        # connection turns out closed (RFC 9112 §9.3.1); a streamed body is never replayed.
        try:
            async with deadline:
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
        resp: aiohttp.ClientResponse,
        response_filter: ResponseFilter | None,
        on_headers: Callable[[int, CIMultiDict[str]], None] | None,
        tap: ResponseTap | None = None,
        upload: _Upload | None = None,
    ) -> web.StreamResponse:
        drop = _connection_tokens(resp.headers)
        if "Transfer-Encoding" in resp.headers:
            drop = drop | {"content-length"}  # both sent: the framing was Transfer-Encoding (RFC 9112 §6.3)
        out_headers: CIMultiDict[str] = CIMultiDict()
        for name, value in resp.headers.items():
            if name.lower() not in drop:
                out_headers.add(name, value)
        reason = resp.reason
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
        streaming = _is_stream(out_headers)
        if streaming:
            out_headers.setdefault("X-Accel-Buffering", "no")
        else:
            size = _small_body(request.method, resp)
            if size is not None:
                return await self._relay_whole(scope, upstream, resp, size, out_headers, response_filter, rewrite,
                                               recording, tap, reason)  # fmt: skip
        # No explicit chunking: without a Content-Length aiohttp chunks for HTTP/1.1 clients,
        # closes the connection for HTTP/1.0 ones, and sends no body at all for HEAD/204/304.
        response = web.StreamResponse(status=resp.status, reason=reason, headers=out_headers)
        await response.prepare(request)
        scope.status = resp.status  # sent: a client that leaves from here on is logged with it, not 499
        deadline = _IdleDeadline(None if streaming else upstream.read_timeout)

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
                    deadline.pause()  # a client that reads slowly is not a slow upstream
                    if not await self._write(response, scope, chunk):
                        return response
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
        if tail and not await self._write(response, scope, tail):
            return response
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    @staticmethod
    async def _relay_whole(
        scope: RequestScope,
        upstream: UpstreamConfig,
        resp: aiohttp.ClientResponse,
        size: int,
        headers: CIMultiDict[str],
        response_filter: ResponseFilter | None,
        rewrite: bool,
        recording: bool,
        tap: ResponseTap | None,
        reason: str | None = None,
    ) -> web.StreamResponse:
        """A small body with a known length, read whole and sent as one ``web.Response``.

        Why: most API answers are a few KiB. Sent whole, headers and body leave in one
        write with an exact ``Content-Length`` (also after token scrubbing, which would
        otherwise force chunked framing and a second write), and an upstream that fails
        mid-body is still a clean 502/504 because nothing has reached the client yet.
        Memory stays bounded by ``SMALL_BODY``, the size of one streamed chunk.
        """
        try:
            if resp.content.total_bytes >= size:  # usually: it came in with the headers
                body = await resp.content.readexactly(size) if size else b""
            else:
                async with asyncio.timeout(upstream.read_timeout):
                    body = await resp.content.readexactly(size)
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream {upstream.id} did not send its body within {upstream.read_timeout:g}s"
            ) from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError):
            raise UpstreamUnavailable(f"upstream {upstream.id} broke off its response") from None
        raw = body
        if rewrite and response_filter is not None:
            body = response_filter.feed(body) + response_filter.flush()  # Unscrubbable: a 502, nothing sent
        if recording and tap is not None and tap.feed(raw):
            tap.end()
        headers.popall("Content-Length", None)  # aiohttp sets it from the body
        response = web.Response(status=resp.status, reason=reason, headers=headers, body=body)
        scope.status = resp.status
        scope.bytes_sent = len(body)
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
        """Connect upstream first (so a dead upstream is a clean 502), then pump both ways.

        With ``scrub`` (Plex), every frame coming down is scrubbed: text, binary, ping/pong
        payloads and the close reason (aiohttp hands over whole messages, fragments joined).
        """
        for h in _WS_HANDSHAKE:
            headers.popall(h, None)
        headers.popall("Content-Length", None)  # the handshake has no body
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        session = self.sessions[upstream.id]
        ws_url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        try:
            async with asyncio.timeout(upstream.read_timeout):
                up = await session.ws_connect(ws_url, headers=headers, protocols=protocols, autoping=False)
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {upstream.id} did not answer within {upstream.read_timeout:g}s") from None
        except aiohttp.WSServerHandshakeError as e:
            if e.status >= 400:
                # The upstream's own refusal (401, 404, …) passes through, as for plain HTTP.
                return web.Response(status=e.status)
            raise UpstreamUnavailable(f"upstream {upstream.id} refused the websocket ({e.status})") from None
        except aiohttp.ClientConnectorError as e:  # refused, name not resolved, TLS
            raise UpstreamUnavailable(connect_problem(upstream, e)) from None
        except (aiohttp.ClientError, OSError) as e:  # e.g. closed before answering the handshake
            raise UpstreamUnavailable(
                f"upstream {upstream.id} broke off the websocket handshake ({type(e).__name__})"
            ) from None
        try:
            down = web.WebSocketResponse(protocols=[up.protocol] if up.protocol else (), autoping=False)
            await down.prepare(request)
        except BaseException:
            await up.close()
            raise
        scope.status = 101

        async def pump(
            src: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
            dst: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
        ) -> tuple[int, bytes]:
            """Relay frames until ``src`` closes; return the close code and reason to pass on."""
            to_client = src is up  # upstream -> client counts as sent, client -> upstream as received
            while True:
                msg = await src.receive()
                if to_client and scrub is not None:
                    msg = scrub.frame(msg)
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    if to_client:
                        scope.bytes_sent += len(msg.data)
                    else:
                        scope.bytes_received += len(msg.data)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.PING:
                    await dst.ping(msg.data)
                elif msg.type == aiohttp.WSMsgType.PONG:
                    await dst.pong(msg.data)
                elif msg.type == aiohttp.WSMsgType.CLOSE:
                    return _close_code(msg.data), str(msg.extra or "").encode()
                elif not to_client:  # CLOSING, CLOSED, ERROR: the client went without a close frame
                    return 1011 if msg.type == aiohttp.WSMsgType.ERROR else 1001, b""
                else:  # the upstream did (killed, reset, broken frames): 1014 bad gateway, not a clean end
                    if not scope.error and not self.shutting_down:  # not the sidecar's own close
                        scope.error = "upstream_unavailable"
                    return 1014, b"upstream connection lost"

        async def going_away() -> None:
            await asyncio.gather(
                down.close(code=1001, message=b"server shutting down"),
                up.close(code=1001, message=b"proxy shutting down"),
                return_exceptions=True,
            )

        async def revoked(reason: str) -> None:  # the key was revoked or expired: 1008 policy violation
            scope.error = f"key_{reason}"
            try:
                async with asyncio.timeout(1):
                    await asyncio.gather(
                        down.close(code=1008, message=f"API key {reason}".encode()), up.close(), return_exceptions=True
                    )
            except TimeoutError:  # a client that neither reads nor answers the close: cut it
                if request.transport is not None:
                    request.transport.abort()

        up_task = asyncio.create_task(pump(up, down))
        down_task = asyncio.create_task(pump(down, up))
        tasks = (up_task, down_task)
        try:
            async with self._long_lived_stream(going_away), self._revocable(scope, revoked):
                done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            first = done.pop()
            code, reason = (1011, b"") if first.exception() is not None else first.result()
            # Whoever closed first, the other side hears the same code and reason.
            other = down if first is up_task else up
            with contextlib.suppress(Exception):
                await other.close(code=code, message=reason)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await up.close()
            await down.close()
        return down


def _close_code(code: object) -> int:
    """A close code that may be sent on: 1005/1006/1015 are reserved for "none given"/"dropped"."""
    if isinstance(code, int) and (1000 <= code < 1004 or 1007 <= code < 1015 or 3000 <= code < 5000):
        return code
    return 1000
