"""The websocket relay: connect upstream, then pump frames both ways until one side closes."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..config import UpstreamConfig
from ..core.errors import BadRequest, UpstreamTimeout, UpstreamUnavailable
from ..core.scope import RequestScope
from ..upstreams.health import connect_problem
from ..upstreams.scrub import ScrubFilter

if TYPE_CHECKING:
    from .forwarder import Forwarder

__all__ = ["relay_websocket"]

_WS_HANDSHAKE = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol")


async def relay_websocket(
    fw: Forwarder,
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
    if not web.WebSocketResponse().can_prepare(request).ok:
        # Checked before connecting: the upstream must not hear a handshake the client's side then fails,
        # and the client gets the designed 400, not aiohttp's plain-text one.
        raise BadRequest("not a websocket handshake: Connection: Upgrade, Sec-WebSocket-Key and -Version are needed")
    # From the headers going up, not the client's: a subprotocol carrying the key was stripped there.
    protocols = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    for h in _WS_HANDSHAKE:
        headers.popall(h, None)
    headers.popall("Content-Length", None)  # the handshake has no body
    session = fw.sessions[upstream.id]
    ws_url = url.with_scheme("wss" if url.scheme == "https" else "ws")
    try:
        async with fw.waiting(scope), asyncio.timeout(upstream.read_timeout):  # revoked meanwhile: 401
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
                if not scope.error and not fw.shutting_down:  # not the sidecar's own close
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
        async with fw._long_lived_stream(going_away), fw._revocable(scope, revoked):
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
