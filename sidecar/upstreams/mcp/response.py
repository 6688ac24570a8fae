"""The forwarder's ResponseFilter for MCP routes (header policy, session binding, list filtering)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict

from ...auth.models import KeyRecord
from ...config import UpstreamConfig
from ...core.errors import (
    UpstreamUnavailable,
)
from ..scrub import Unscrubbable
from .eventids import EVENT_SCOPE, EventIdSealer
from .filter import JsonRewriter, SseRewriter
from .jsonrpc import dumps
from .rest import CREDENTIAL_REJECTED
from .sessions import SESSION_HEADER

if TYPE_CHECKING:
    from .gateway import McpGateway

__all__ = ["GatewayFilter", "answer_sent", "single_answer"]


def answer_sent(rid: Any) -> Callable[[bytes], bool] | None:
    """Whether a chunk of a POST's answer stream carries the answer to its request ``rid``.

    A cheap byte test (``"id":<rid>`` next to ``"result"`` or ``"error"``) for the forwarder's
    ``answered``: once it is out, a client that hangs up has nothing left to cancel, and the
    upstream connection is kept. A false positive only delays closing by ``END_WAIT``.
    """
    if rid is None:
        return None
    try:
        needle = b'"id":' + orjson.dumps(rid)  # the same bytes as ``dumps``, in a tenth of the time
    except TypeError:  # an integer over 64 bits
        needle = b'"id":' + dumps(rid)
    return lambda chunk: needle in chunk and (b'"result"' in chunk or b'"error"' in chunk)


def single_answer(rid: Any) -> Callable[[bytes], bytes | None] | None:
    """For a finished SSE answer to request ``rid``: its one JSON-RPC answer as a JSON body, else None.

    MCP lets the server answer a POST with either; once the stream has ended there is nothing
    left to stream, and a JSON body is read to its end, so the client keeps its connection (the
    SDK's client stops reading an SSE answer at its result event, which closes the connection).
    Only a stream of exactly one ``message`` event whose data is the object answering ``rid``
    (``result`` or ``error``, no ``method``) is changed; progress, notifications, several data
    lines or anything unexpected leave the stream as it is. The data goes out byte for byte:
    parsed only to be checked.
    """
    if rid is None:
        return None
    try:  # how most servers (the SDK's among them) begin it: then nothing needs parsing
        head = b'{"jsonrpc":"2.0","id":' + orjson.dumps(rid)
    except TypeError:  # an integer over 64 bits: no fast path
        head = b"\0"
    heads = (head + b',"result":', head + b',"error":')

    def convert(body: bytes) -> bytes | None:
        data: bytes | None = None
        for line in body.splitlines():
            if not line or line.startswith((b":", b"id:", b"retry:")):
                continue
            if line.startswith(b"data:"):
                if data is not None:
                    return None  # several data lines, or several events
                data = line[6:] if line.startswith(b"data: ") else line[5:]
            elif line.rstrip() not in (b"event: message", b"event:message"):
                return None
        if not data or data[:1] != b"{":
            return None
        if data.startswith(heads) and data.endswith(b"}"):
            return data
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or "method" in obj or ("result" not in obj and "error" not in obj):
            return None
        got = obj.get("id")
        if type(got) is not type(rid) or got != rid:
            return None
        return data

    return convert


class GatewayFilter:
    """The forwarder's ResponseFilter for MCP routes: header policy always, body rewriting when needed."""

    def __init__(
        self,
        gw: McpGateway,
        upstream: UpstreamConfig,
        key: KeyRecord,
        *,
        sid: str | None = None,
        upstream_sid: str | None = None,
        sse: Callable[[], SseRewriter] | None = None,
        json_body: Callable[[], JsonRewriter] | None = None,
    ) -> None:
        self.gw, self.upstream, self.key, self.sid = gw, upstream, key, sid
        self.upstream_sid = upstream_sid  # what the upstream was sent in Mcp-Session-Id (``sid`` unsealed)
        self._sse, self._json = sse, json_body
        self._body: SseRewriter | JsonRewriter | None = None
        self._ids: EventIdSealer | None = None  # every event stream's ids leave sealed to the key (eventids.py)
        self.status = 0

    def headers(self, status: int, headers: CIMultiDict[str]) -> bool:
        self.status = status
        if status == 401:
            # The upstream's challenge is about the sidecar's credential, not the client's.
            raise UpstreamUnavailable(CREDENTIAL_REJECTED)
        headers.popall("WWW-Authenticate", None)
        for name in ("Location", "Content-Location"):
            value = headers.get(name)
            if value:
                mapped = self.gw.client_path(self.upstream, value)
                if mapped is not None:
                    headers[name] = mapped
        new_sid = headers.get(SESSION_HEADER)
        if new_sid:
            if status < 400:
                self.gw.sessions.bind(self.upstream.id, "http", new_sid, self.key.id)  # never moves another key's
            # The client only ever sees the sealed form (sealing.py); its own token again when unchanged.
            if new_sid == self.upstream_sid and self.sid:
                headers[SESSION_HEADER] = self.sid
            else:
                headers[SESSION_HEADER] = self.gw.sealer.seal(self.upstream.id, self.key.id, new_sid)
        if status == 404 and self.upstream_sid:
            self.gw.sessions.forget(self.upstream.id, "http", self.upstream_sid)
        if not 200 <= status < 300:
            return False  # the upstream's errors pass through untouched
        ctype = headers.get("Content-Type", "").lower()
        if ctype.startswith("text/event-stream"):
            self._ids = EventIdSealer(partial(self.gw.sealer.seal, self.upstream.id + EVENT_SCOPE, self.key.id))
            if self._sse is not None:
                self._body = self._sse()
        elif ctype.startswith("application/json") and self._json is not None:
            self._body = self._json()
        rewrite = self._body is not None or self._ids is not None
        if rewrite and headers.get("Content-Encoding", "identity").lower() != "identity":
            # Asked for identity. A list that must be filtered, or an event id that must be sealed, is never
            # relayed unread; with a credential configured, McpScrubFilter has decoded it before this.
            raise UpstreamUnavailable("the MCP upstream compressed an answer that must be filtered")
        return rewrite

    def feed(self, chunk: bytes) -> bytes:
        if self._body is not None:
            try:
                chunk = self._body.feed(chunk)
            except RecursionError:  # JSON nested past what Python parses: it cannot be filtered, so it is not relayed
                raise Unscrubbable(_TOO_DEEP) from None
        return chunk if self._ids is None else self._ids.feed(chunk)

    def flush(self) -> bytes:
        tail = b""
        if self._body is not None:
            try:
                tail = self._body.flush()
            except RecursionError:
                raise Unscrubbable(_TOO_DEEP) from None
        if self._ids is not None:
            tail = self._ids.feed(tail) + self._ids.flush()
        return tail


_TOO_DEEP = "the MCP upstream answered JSON nested too deeply to filter"
