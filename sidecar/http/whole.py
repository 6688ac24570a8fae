"""Short answers, read whole and sent whole (``Forwarder._relay``).

Most API answers are a few KiB and an MCP POST's event stream is usually one event: sent as
one ``web.Response`` the headers and body leave in one write with an exact length, and an
upstream that fails mid-body is still a clean 502/504 because nothing reached the client yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..config import UpstreamConfig
from ..core.errors import UpstreamTimeout, UpstreamUnavailable
from ..core.relay import ResponseFilter, ResponseTap
from ..core.scope import RequestScope
from .answer import PooledBody, PooledResponse

__all__ = ["EVENT_ENDS", "FIRST_EVENT_WAIT", "WHOLE_WAIT", "Answer", "answer_in_hand", "end_soon", "relay_whole"]

Answer = aiohttp.ClientResponse | PooledResponse  # what the upstream sent: aiohttp's, or the pool's (``pool``)

WHOLE_WAIT = 0.005  # seconds a short MCP answer's stream may take to end before its headers go out
FIRST_EVENT_WAIT = 1.0  # seconds an MCP answer's headers are held while no event has come yet
EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")  # the blank line that ends an SSE event


async def answer_in_hand(body: PooledBody, whole: Callable[[bytes], bytes | None], limit: int) -> bool:
    """Whether a short MCP answer's one event is in hand, its stream still open.

    Why not wait for the end: a server writes it a moment after the answer (the SDK's,
    0.1-0.3 ms here) and the SDK's own client stops reading at the answer anyway. MCP says the
    stream ends after its answer; anything a server still sends is read and dropped.

    How long: while no event has come (a tool at work; the SDK's server sends its headers at
    once), up to ``FIRST_EVENT_WAIT``: held headers tell the client nothing it can use, a
    JSON-answering server holds them just so, and an answer sent whole costs the sidecar a
    third of a streamed one (bench: 0.4 vs 1.2 ms of CPU per call to a tool that takes 7 ms).
    Once anything else is in hand (progress, a priming id, a comment) it goes out within
    ``WHOLE_WAIT``: nothing the client should see now is held. Bounded, so the stream is
    under revocation's watch (``_revocable``) within a second; ``limit`` bytes at most.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not body.is_eof() and not body.failed():
        got = body.peek()
        if got.endswith(EVENT_ENDS) and whole(got) is not None:
            return True
        if len(got) > limit:
            return False
        wait = WHOLE_WAIT if got and _has_event(got) else FIRST_EVENT_WAIT
        left = start + wait - loop.time()
        if left <= 0:
            return False
        await body.more(left)
    return False


def _has_event(got: bytes) -> bool:
    """Whether ``got`` holds an event's end (or a comment's): something a client may want now."""
    return any(end in got for end in EVENT_ENDS)


async def end_soon(resp: Answer) -> None:
    """Wait (``WHOLE_WAIT`` at most) for a short answer's stream to end, so it can go out whole.

    An MCP server writes the answer event and the end of its stream separately, and they often
    arrive a moment apart; a stream still open after this is relayed as it comes.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:  # the end, or WHOLE_WAIT (a broken stream: the relay finds out)
        if not done.done():
            done.set_result(None)

    resp.content.on_eof(wake)  # cheaper than asyncio.timeout around wait_eof: no task cancellation
    timer = loop.call_later(WHOLE_WAIT, wake)
    try:
        await done
    finally:
        timer.cancel()


async def relay_whole(
    scope: RequestScope,
    upstream: UpstreamConfig,
    resp: Answer,
    size: int,
    headers: CIMultiDict[str],
    response_filter: ResponseFilter | None,
    rewrite: bool,
    recording: bool,
    tap: ResponseTap | None,
    reason: str | None = None,
    as_json: Callable[[bytes], bytes | None] | None = None,
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
    if as_json is not None and (answer := as_json(body)) is not None:
        # A finished stream of one answer, as JSON: a client reads it to its end and keeps
        # its connection (the SDK's client closes an SSE answer early, which costs it one).
        body = answer
        headers["Content-Type"] = "application/json"
        headers.popall("X-Accel-Buffering", None)
    headers.popall("Content-Length", None)  # aiohttp sets it from the body
    response = web.Response(status=resp.status, reason=reason, headers=headers, body=body)
    scope.status = resp.status
    scope.bytes_sent = len(body)
    return response
