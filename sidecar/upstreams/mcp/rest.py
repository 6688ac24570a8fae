"""The REST tool call's client: minimal JSON-RPC over Streamable HTTP on the pooled sessions, and
``open_upstream``, one upstream request with the forwarder's mapping of failures to contract errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from ...config import UpstreamConfig
from ...core.errors import (
    BadRequest,
    ExpiredKey,
    RevokedKey,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ...core.scope import RequestScope
from ..health import connect_problem
from .filter import DEFAULT_MAX_EVENT, SseSplitter, parse_event
from .jsonrpc import dumps
from .scrub import scrub_bytes, scrub_text
from .sessions import SESSION_HEADER

__all__ = [
    "CLIENT_NAME", "CREDENTIAL_REJECTED", "HANDSHAKE_VERSION", "RestClient", "answer_body", "open_upstream",
    "until_revoked",
]  # fmt: skip

CLIENT_NAME = "sidecar"
HANDSHAKE_VERSION = "2025-11-25"  # what the REST caller's pooled sessions negotiate
CREDENTIAL_REJECTED = "upstream rejected the sidecar's credential"
_VERSION = re.compile(r"[0-9A-Za-z._-]{1,32}")  # a protocol version that may go into a header as it is
MAX_POOLED = 10_000  # REST callers' upstream sessions (one per key and upstream) kept at once


async def open_upstream(
    session: aiohttp.ClientSession,
    upstream: UpstreamConfig,
    method: str,
    url: URL | str,
    headers: CIMultiDict[str] | dict[str, str],
    body: bytes,
) -> aiohttp.ClientResponse:
    """One upstream request, with the forwarder's mapping of failures to contract errors."""
    try:
        async with asyncio.timeout(upstream.read_timeout):
            return await session.request(method, url, headers=headers, data=body, allow_redirects=False)
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamTimeout(f"upstream {upstream.id} did not accept a connection in time") from None
    except TimeoutError:
        raise UpstreamTimeout(f"upstream {upstream.id} did not answer within {upstream.read_timeout:g}s") from None
    except aiohttp.ClientConnectorError as e:  # refused, name not resolved, TLS
        raise UpstreamUnavailable(connect_problem(upstream, e)) from None
    except (aiohttp.ClientError, OSError) as e:
        raise UpstreamUnavailable(f"upstream {upstream.id} failed: {type(e).__name__}") from None


T = TypeVar("T")


class Streams(Protocol):
    """``sidecar.http.streams.StreamRegistry`` as the REST call uses it (no import of ``sidecar.http``)."""

    def watch(
        self, key_id: str, closer: Callable[[str], Awaitable[None]]
    ) -> contextlib.AbstractAsyncContextManager[object]: ...


async def until_revoked(streams: Streams | None, key_id: str, call: Awaitable[T]) -> T:
    """``call``, ended like any open stream when its key is revoked or expires (invariant 5).

    A tool answering as an event stream may run for as long as it sends keep-alives; without
    this, its result would still be handed to a key revoked minutes before. The call is
    cancelled (which closes the upstream request, and so cancels the tool) and the client
    gets ``401 revoked_key`` / ``expired_key``.
    """
    if streams is None:
        return await call
    task = asyncio.ensure_future(call)
    ended: list[str] = []

    async def closer(reason: str) -> None:
        ended.append(reason)
        task.cancel()

    async with streams.watch(key_id, closer):
        try:
            return await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not ended or (me is not None and me.cancelling()):  # the request itself was cancelled
                raise
    if ended[0] == "expired":
        raise ExpiredKey("this API key has expired")
    raise RevokedKey("this API key has been revoked")


# ----------------------------------------------------------------------------- REST caller


@dataclass
class _Pooled:
    """The REST caller's one MCP session with an upstream (re-initialised when it expires)."""

    session_id: str | None = None
    version: str | None = None
    ready: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class RestClient:
    """Minimal JSON-RPC over Streamable HTTP, on the forwarder's pooled aiohttp sessions.

    Hand-rolled rather than the SDK's client: the SDK is not a runtime dependency of
    the sidecar, and its client brings httpx and a task group per connection, where a
    REST call needs three small POSTs (``initialize``, ``notifications/initialized``
    once per upstream, then ``tools/call``) over connections the sidecar already pools.
    """

    def __init__(
        self, sessions: dict[str, aiohttp.ClientSession], limit: int = MAX_POOLED, max_answer: int = DEFAULT_MAX_EVENT
    ) -> None:
        self.sessions = sessions
        self.limit = limit
        # The answer is parsed and re-serialised whole: past this many bytes (a JSON body, one SSE
        # event) it is a 502, never buffered on (one call must not hold gigabytes of the sidecar).
        self.max_answer = max_answer
        self._pool: OrderedDict[tuple[str, str], _Pooled] = OrderedDict()

    def pooled(self, upstream_id: str, owner: str = "") -> _Pooled:
        """The session of ``owner`` (a key id; ``""``: the sidecar's own) with an upstream.

        One per key, never shared: an upstream keeps state per session (a login, a workspace,
        a browser, subscriptions), and a session shared by every REST caller would hand one
        key's state to the next (DESIGN invariant 4). The least recently used go first past
        ``limit``; the upstream expires them.
        """
        ident = (upstream_id, owner)
        pooled = self._pool.get(ident)
        if pooled is None:
            pooled = self._pool[ident] = _Pooled()
            while len(self._pool) > self.limit:
                self._pool.popitem(last=False)
        else:
            self._pool.move_to_end(ident)
        return pooled

    async def _exchange(
        self,
        upstream: UpstreamConfig,
        method: str,
        params: dict[str, Any],
        scope: RequestScope | None = None,
        owner: str = "",
    ) -> tuple[int, dict[str, Any] | None]:
        """One JSON-RPC request on ``owner``'s pooled session: its HTTP status and answer. A 404 means
        the session expired upstream: a new one is initialised and the request sent again, once."""
        pooled = self.pooled(upstream.id, owner)
        status, msg = 0, None
        for attempt in range(2):
            await self._ensure(upstream, pooled)
            sid = pooled.session_id
            request = {"jsonrpc": "2.0", "id": next(pooled.ids), "method": method, "params": params}
            started = time.perf_counter()
            status, _, msg = await self._rpc(upstream, pooled, request)
            if scope is not None:
                scope.upstream_seconds = time.perf_counter() - started
            if status == 404 and sid is not None and attempt == 0:
                async with pooled.lock:  # the session expired upstream: initialise a new one, once
                    if pooled.session_id == sid:
                        pooled.ready, pooled.session_id = False, None
                continue
            break
        return status, msg

    async def call(
        self, upstream: UpstreamConfig, tool: str, arguments: dict[str, Any], scope: RequestScope, owner: str
    ) -> Any:
        """``tools/call`` on the calling key's own session with the upstream."""
        status, msg = await self._exchange(upstream, "tools/call", {"name": tool, "arguments": arguments}, scope, owner)
        if msg is None:
            raise UpstreamUnavailable(f"upstream {upstream.id} answered {status} without a JSON-RPC response")
        if "error" in msg:
            err = msg["error"] if isinstance(msg["error"], dict) else {}
            code, text = err.get("code"), scrub_text(upstream, str(err.get("message", "error")))
            if code in (-32600, -32601, -32602):
                raise BadRequest(f"the upstream refused the call: {text}")
            raise UpstreamUnavailable(f"upstream {upstream.id} failed the call ({code}): {text}")
        return msg.get("result")

    async def list_tools(
        self, upstream: UpstreamConfig, max_pages: int = 10, max_tools: int = 1000, max_description: int = 300
    ) -> list[dict[str, str]]:
        """``[{"name", "description"}]`` of the upstream's tools, asked with its own credential (the
        console's tools picker, the OAuth consent page). Names and descriptions are scrubbed of that
        credential like any upstream text (invariant 1); ``nextCursor`` is followed for at most
        ``max_pages`` pages or ``max_tools`` tools."""
        out: list[dict[str, str]] = []
        params: dict[str, Any] = {}
        for _ in range(max_pages):
            status, msg = await self._exchange(upstream, "tools/list", params)
            result = msg.get("result") if msg is not None and "error" not in msg else None
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                raise UpstreamUnavailable(
                    f"upstream {upstream.id} answered tools/list ({status}) without a list of tools"
                )
            for tool in result["tools"]:
                if isinstance(tool, dict) and isinstance(tool.get("name"), str) and len(out) < max_tools:
                    desc = tool.get("description") if isinstance(tool.get("description"), str) else ""
                    out.append({
                        "name": scrub_text(upstream, tool["name"]),
                        "description": scrub_text(upstream, str(desc)[:max_description]),
                    })  # fmt: skip
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor or len(out) >= max_tools:
                break
            params = {"cursor": cursor}
        return out

    async def _ensure(self, upstream: UpstreamConfig, pooled: _Pooled) -> None:
        if pooled.ready:
            return
        async with pooled.lock:
            if not pooled.ready:  # another call may have initialised it while this one waited
                await self._initialize(upstream, pooled)

    async def _initialize(self, upstream: UpstreamConfig, pooled: _Pooled) -> None:
        pooled.session_id = pooled.version = None
        init = {
            "jsonrpc": "2.0", "id": next(pooled.ids), "method": "initialize",
            "params": {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {},
                       "clientInfo": {"name": CLIENT_NAME, "version": "1.0"}},
        }  # fmt: skip
        status, headers, msg = await self._rpc(upstream, pooled, init)
        result = msg.get("result") if msg else None
        if status >= 300 or not isinstance(result, dict):
            raise UpstreamUnavailable(f"upstream {upstream.id} refused the MCP handshake ({status})")
        pooled.session_id = headers.get(SESSION_HEADER)
        version = result.get("protocolVersion")  # goes into every next request's headers: CR LF would be a 500
        pooled.version = version if isinstance(version, str) and _VERSION.fullmatch(version) else HANDSHAKE_VERSION
        await self._rpc(upstream, pooled, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        pooled.ready = True

    def _headers(self, upstream: UpstreamConfig, pooled: _Pooled) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "Accept-Encoding": "identity",
            **upstream.headers,
        }
        if pooled.session_id:
            headers[SESSION_HEADER] = pooled.session_id
        if pooled.version:
            headers["MCP-Protocol-Version"] = pooled.version
        return headers

    async def _rpc(
        self, upstream: UpstreamConfig, pooled: _Pooled, msg: dict[str, Any]
    ) -> tuple[int, CIMultiDict[str], dict[str, Any] | None]:
        """POST one message; the JSON-RPC answer to it (from JSON or an SSE stream), if any."""
        session = self.sessions[upstream.id]
        resp = await open_upstream(session, upstream, "POST", upstream.url, self._headers(upstream, pooled), dumps(msg))
        async with resp:
            headers = CIMultiDict(resp.headers)
            if resp.status == 401:
                raise UpstreamUnavailable(CREDENTIAL_REJECTED)
            if "id" not in msg or resp.status == 202:
                return resp.status, headers, None
            ctype = resp.headers.get("Content-Type", "").lower()
            try:
                if ctype.startswith("text/event-stream"):
                    answer = await _answer_from_sse(resp, msg["id"], upstream.read_timeout, self.max_answer)
                    return resp.status, headers, answer
                if ctype.startswith("application/json"):
                    async with asyncio.timeout(upstream.read_timeout):
                        body = json.loads(await _read_at_most(resp, self.max_answer))
                    return resp.status, headers, body if isinstance(body, dict) else None
            except TimeoutError:
                raise UpstreamTimeout(f"upstream {upstream.id} stalled answering the tool call") from None
            except _TooLarge:
                raise UpstreamUnavailable(
                    f"upstream {upstream.id} answered more than {self.max_answer} bytes; use an MCP client for it"
                ) from None
            except (aiohttp.ClientError, ValueError) as e:
                raise UpstreamUnavailable(f"upstream {upstream.id} failed: {type(e).__name__}") from None
            except RecursionError:
                raise UpstreamUnavailable(f"upstream {upstream.id} answered JSON nested too deeply") from None
            return resp.status, headers, None

    async def close(self, upstreams: Iterable[UpstreamConfig]) -> None:
        """End the pooled sessions politely (DELETE), best effort and quickly."""
        by_id = {up.id: up for up in upstreams}
        for (upstream_id, _), pooled in list(self._pool.items()):
            up, session = by_id.get(upstream_id), self.sessions.get(upstream_id)
            if up is None or not pooled.session_id or session is None or session.closed:
                continue
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    resp = await session.delete(up.url, headers=self._headers(up, pooled))
                    resp.release()
        self._pool.clear()


def answer_body(upstream: UpstreamConfig, result: Any) -> bytes:
    """The REST call's 200 body, scrubbed of the upstream's credential (an echo of it)."""
    try:
        return scrub_bytes(upstream, dumps({"success": True, "data": result}))
    except RecursionError:  # parsed just within the limit, serialised a level deeper and further down the stack
        raise UpstreamUnavailable(f"upstream {upstream.id} answered JSON nested too deeply") from None


class _TooLarge(Exception):
    """An answer past ``RestClient.max_answer``."""


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ``_TooLarge`` as soon as it passes ``limit`` bytes (whatever its Content-Length says)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise _TooLarge
    parts: list[bytes] = []
    seen = 0
    while chunk := await resp.content.readany():
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge
        parts.append(chunk)
    return b"".join(parts)


async def _answer_from_sse(
    resp: aiohttp.ClientResponse, rid: Any, idle: float, max_event: int = DEFAULT_MAX_EVENT
) -> dict[str, Any] | None:
    """Read an SSE answer until the response to ``rid`` (progress and other events are skipped).

    ``idle`` bounds the wait for each next chunk (``: ping`` comments count): the REST caller
    holds a concurrency slot, and a stream that went silent must end as a 504, not hang.
    """
    splitter = SseSplitter(max_event)
    while True:
        async with asyncio.timeout(idle):
            chunk = await resp.content.readany()
        if not chunk:
            break
        pieces = splitter.feed(chunk)
        if splitter.overflowed:  # an event past the bound: it cannot be parsed, and the answer may be in it
            raise _TooLarge
        for raw, complete in pieces:
            if not complete:
                continue
            ev = parse_event(raw)
            if ev.event != "message" or not ev.has_data:
                continue
            try:
                msg = json.loads(ev.data)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("id") == rid and ("result" in msg or "error" in msg):
                return msg
    return None
