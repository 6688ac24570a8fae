"""Rewriting MCP answers on their way down: tool lists, refusals, the legacy ``endpoint`` event.

Pure: no aiohttp, no I/O. The gateway (``sidecar.upstreams.mcp.gateway``) wires these into the
forwarder's ``ResponseFilter`` hook (``core.relay``); everything here works on bytes and dicts.

* :class:`SseSplitter` cuts an event stream into complete events whatever the
  chunking and line endings (``\\r\\n``, ``\\n``, ``\\r``). Complete events leave as
  soon as their blank line arrives — nothing waits for the stream to end — and an
  event that needs no change leaves byte for byte (``: ping`` comments included).
* :class:`Policy` decides what to change in one JSON-RPC message from the server:
  a ``tools/list`` result loses the tools the key may not call (``resources/list``,
  ``resources/templates/list`` and ``prompts/list`` likewise), and an answer to a
  request the gateway refused becomes the refusal. It knows which ids are which
  because the gateway records them when it reads the request body.
* :class:`SseRewriter` and :class:`JsonRewriter` apply a policy to an SSE or JSON
  body, and append the gateway's own answers to the forbidden elements of a batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from .authz import LISTS
from .jsonrpc import INTERNAL_ERROR, dumps, error_object
from .pending import PendingIds

__all__ = [
    "Access",
    "JsonRewriter",
    "PendingIds",
    "Policy",
    "SseEvent",
    "SseRewriter",
    "SseSplitter",
    "client_path",
    "message_event",
    "parse_event",
    "render_event",
]

DEFAULT_MAX_EVENT = 16 * 1024**2  # one SSE event or JSON body held for rewriting
HEAD_BYTES = 512  # the start of an oversized answer, read for its id
_ID = re.compile(rb'"id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")')
_NO_ID = object()


def sniff_id(head: bytes) -> Any:
    """The JSON-RPC id near the start of an answer too large to parse (``_NO_ID`` if none is there)."""
    m = _ID.search(head)
    if m is None:
        return _NO_ID
    try:
        return json.loads(m.group(1))
    except ValueError:
        return _NO_ID


_EOL = re.compile(rb"\r\n|\r|\n")


class SseSplitter:
    """Splits an SSE byte stream into complete raw events (each ending with its blank line)."""

    def __init__(self, max_event: int = DEFAULT_MAX_EVENT, *, drop: Callable[[bytes], bool] | None = None) -> None:
        self.max_event = max_event
        self._buf = b""
        self._scan = 0  # where the next line starts, inside _buf
        self.overflowed = False  # an event outgrew max_event: the rest passes through untouched
        # ``drop(head)``: asked when an event outgrows max_event (with its first bytes); True
        # skips that event to its end instead, and splitting goes on after it.
        self.drop = drop
        self.dropping = False
        self._line_start = True  # while dropping: nothing seen yet on the current line

    def feed(self, chunk: bytes, *, final: bool = False) -> list[tuple[bytes, bool]]:
        """``(raw, complete)`` pieces: complete events, then (past the bound) raw bytes to pass on.

        ``final``: the stream ends after this chunk, so a trailing ``\r`` ends its line.
        """
        if self.overflowed:
            return [(chunk, False)] if chunk else []
        if self.dropping:
            rest = self._skip(chunk)
            if rest is None:
                return []
            return self.feed(rest, final=final)
        self._buf += chunk
        events: list[tuple[bytes, bool]] = []
        start = 0
        pos = self._scan
        while True:
            m = _EOL.search(self._buf, pos)
            if m is None:
                break
            if m.group() == b"\r" and m.end() == len(self._buf) and not final:
                break  # maybe the first half of \r\n: wait for the next byte
            if m.start() == pos:  # an empty line: the event is complete
                events.append((self._buf[start : m.end()], True))
                start = m.end()
            pos = m.end()
        self._buf = self._buf[start:]
        self._scan = pos - start
        if len(self._buf) > self.max_event:
            if self.drop is not None and self.drop(self._buf[:HEAD_BYTES]):
                partial = self._buf[self._scan :]  # _scan is the start of a line
                self._buf, self._scan = b"", 0
                self.dropping, self._line_start = True, True
                rest = self._skip(partial)
                if rest is not None:
                    events.extend(self.feed(rest, final=final))
                return events
            self.overflowed = True
            events.append((self._buf, False))
            self._buf, self._scan = b"", 0
        return events

    def _skip(self, data: bytes) -> bytes | None:
        """Skip the event being dropped; what follows its blank line, or None while still inside it."""
        i = 0
        while True:
            m = _EOL.search(data, i)
            if m is None:
                if i < len(data):
                    self._line_start = False
                return None
            if m.start() == i and self._line_start:  # the blank line that ends the event
                self.dropping = False
                return data[m.end() :]
            self._line_start = True
            i = m.end()

    def flush(self) -> bytes:
        """Whatever is left (an event the stream ended in the middle of)."""
        rest, self._buf, self._scan = self._buf, b"", 0
        return rest


@dataclass(slots=True)
class SseEvent:
    event: str = "message"
    data: str = ""
    has_data: bool = False
    id: str | None = None


def parse_event(raw: bytes) -> SseEvent:
    """Field values of one raw event (comments and unknown fields ignored), per the SSE spec."""
    ev = SseEvent()
    data: list[str] = []
    for line in _EOL.split(raw):
        if not line or line.startswith(b":"):
            continue
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        text = value.decode("utf-8", "replace")
        if name == b"event":
            ev.event = text or "message"
        elif name == b"data":
            data.append(text)
        elif name == b"id":
            ev.id = text
    ev.data = "\n".join(data)
    ev.has_data = bool(data)
    return ev


def render_event(raw: bytes, data: str) -> bytes:
    """``raw`` with its data replaced by ``data`` (one line); other fields and line endings kept."""
    m = _EOL.search(raw)
    eol = m.group() if m else b"\n"
    out: list[bytes] = []
    placed = False
    for line in _EOL.split(raw):
        if not line:
            continue
        if line == b"data" or line.startswith(b"data:"):
            if not placed:
                out.append(b"data: " + data.encode())
                placed = True
            continue
        out.append(line)
    if not placed:
        out.append(b"data: " + data.encode())
    return eol.join(out) + eol + eol


def message_event(msg: dict[str, Any], eol: bytes = b"\n") -> bytes:
    """A fresh ``event: message`` for a JSON-RPC message the gateway adds to a stream."""
    return b"event: message" + eol + b"data: " + dumps(msg) + eol + eol


class Access(Protocol):
    """What a policy asks of a key's limits (``authz.McpAccess``)."""

    def allows(self, kind: str, name: Any) -> bool: ...


@dataclass
class Policy:
    """What to change in a server's JSON-RPC message for one key.

    ``lists``: ids of list requests (``tools/list``, ``resources/list``,
    ``resources/templates/list``, ``prompts/list``), whose results lose what ``access`` does
    not allow — every list a marked answer carries, and only an answer carrying one takes a
    mark, so a reused id cannot spend it on a ``ping``. ``refusals``: ids of requests the gateway
    refused but still sent up as a harmless ``ping`` (legacy SSE, where the answer must
    come down the stream); their answers are replaced by the stored refusal. Several
    sources may be consulted (the request's own ids and its sessions').
    """

    access: Access
    lists: tuple[PendingIds, ...] = ()
    refusals: tuple[PendingIds, ...] = ()
    filtered: int = field(default=0, init=False)  # items removed so far (for tests and logs)
    # Whether the key's lists lose anything; if not, a list is only read for its cacheScope.
    restricted: bool = field(default=True, init=False)
    # A session's GET stream: answers replayed after a resumption on another worker or replica
    # carry ids this process never saw, so a restricted key's lists are also found by their shape,
    # and any key's list with a public cacheScope (made private, as where the request was seen).
    by_shape: bool = False

    def __post_init__(self) -> None:
        self.restricted = bool(getattr(self.access, "restricted", True))

    def active(self) -> bool:
        return any(self.lists) or any(self.refusals) or self.by_shape  # by shape: a limited key's lists, any public

    def guarding(self) -> bool:
        """Whether an answer may have to be withheld (a list to filter for this key, or a refusal)."""
        return (self.restricted and any(self.lists)) or any(self.refusals)

    def skips(self, raw: bytes) -> bool:
        """An answer that needs no reading: nothing to filter or refuse, and no public cacheScope to take back."""
        if self.by_shape and self.restricted:  # lists found by shape: only what names no list field is skipped
            return not _LIST_FIELD.search(raw) and not any(self.refusals)
        # "public" may also be written with \u escapes: any escape means the answer is read.
        return b"public" not in raw and b"\\u" not in raw and not self.guarding()

    def guards(self, rid: Any) -> bool:
        """Whether an answer with this id must be rewritten (a list to filter, or a refusal)."""
        listed = self.restricted and any(rid in p for p in self.lists)
        return listed or any(rid in p for p in self.refusals)

    def too_large(self, rid: Any, limit: int) -> dict[str, Any] | None:
        """The error that replaces a guarded answer too large to filter (fail closed); None if not guarded."""
        refusal = None
        for pending in self.refusals:
            refusal = pending.pop(rid) or refusal
        listed = False
        for pending in self.lists:
            listed = pending.pop(rid) is not None or listed
        if refusal is not None:
            return refusal  # type: ignore[no-any-return]
        if not listed or not self.restricted:
            return None
        msg = f"the answer is over {limit} bytes, too large for the sidecar to filter for this key"
        return error_object(rid, INTERNAL_ERROR, msg, {"code": "payload_too_large"})

    def apply(self, msg: Any) -> Any | None:
        """The rewritten message, or None when it passes unchanged."""
        if not isinstance(msg, dict) or ("result" not in msg and "error" not in msg) or "method" in msg:
            return None
        rid = msg.get("id")
        for pending in self.refusals:
            refusal = pending.pop(rid)
            if refusal is not None:
                return refusal
        result = msg.get("result")
        if not isinstance(result, dict) or not (fields := _list_fields(result)):
            return None  # no list here: the id's marks are left for the answer that carries one
        listed = False
        for pending in self.lists:
            listed = pending.pop(rid) is not None or listed
        if not listed and not self.by_shape:  # a GET stream: a replay this process never saw asked for
            return None
        new_result = dict(result)
        removed = 0
        for name in fields:  # every list the answer carries, whichever request it claims to answer
            kind, key = _FIELDS[name]
            items = result[name]
            kept = [t for t in items if isinstance(t, dict) and self.access.allows(kind, t.get(key))]
            if self.restricted and len(kept) < len(items):
                removed += len(items) - len(kept)
                new_result[name] = kept
        if not removed and result.get("cacheScope") == "public":
            # Through the sidecar a list depends on the key: a client cache shared across
            # authorization contexts must never serve it to another key (MCP 2026-07-28).
            return dict(msg, result=dict(result, cacheScope="private"))
        if not removed:
            return None
        self.filtered += removed
        if "cacheScope" in new_result:
            new_result["cacheScope"] = "private"  # the list now depends on the key
        return dict(msg, result=new_result)


_LIST_FIELD = re.compile(rb'"(?:tools|resources|resourceTemplates|prompts)"|\\u')  # or an escape that may spell one
_FIELDS = {field_name: (kind, key) for kind, field_name, key in LISTS.values()}  # "tools" -> ("tools", "name")


def _list_fields(result: dict[str, Any]) -> list[str]:
    """The list fields a result carries (``{"tools": [...]}`` …): what filtering reads."""
    return [f for f in _FIELDS if isinstance(result.get(f), list)]


class SseRewriter:
    """Applies a policy to each ``message`` event; rewrites the legacy ``endpoint`` event; appends extras."""

    def __init__(
        self,
        policy: Policy,
        *,
        endpoint: Callable[[str], str] | None = None,
        extra: Iterable[dict[str, Any]] = (),
        max_event: int = DEFAULT_MAX_EVENT,
    ) -> None:
        self.policy = policy
        self.endpoint = endpoint
        self.extra = list(extra)
        self.max_event = max_event
        self._split = SseSplitter(max_event, drop=self._drop)
        self._eol = b"\n"
        self._outbox: list[bytes] = []  # errors standing in for dropped answers

    def feed(self, chunk: bytes) -> bytes:
        out = b"".join(self._event(raw) if complete else raw for raw, complete in self._split.feed(chunk))
        return out + self._drain()

    def flush(self) -> bytes:
        last = self._split.feed(b"", final=True)
        tail = b"".join(self._event(raw) if complete else raw for raw, complete in last) + self._drain()
        rest = self._split.flush()  # an event the stream ended in the middle of
        if self.extra:
            if rest:
                rest += self._eol + self._eol  # close it, so ours are not glued onto it
            rest += b"".join(message_event(e, self._eol) for e in self.extra)
            self.extra = []
        return tail + rest

    def _drop(self, head: bytes) -> bool:
        """An event outgrew the bound: drop it if it may be an answer this key must not see whole.

        Fail closed: while anything is guarded, an oversized event whose id cannot be read is
        dropped too; one with a readable id passes only when that id is not guarded.
        """
        if not self.policy.guarding():
            return False
        rid = sniff_id(head)
        if rid is not _NO_ID and not self.policy.guards(rid):
            return False
        if rid is not _NO_ID:
            err = self.policy.too_large(rid, self.max_event)
            if err is not None:
                self._outbox.append(message_event(err, self._eol))
        return True

    def _drain(self) -> bytes:
        out, self._outbox = b"".join(self._outbox), []
        return out

    def _event(self, raw: bytes) -> bytes:
        m = _EOL.search(raw)
        if m:
            self._eol = m.group()
        ev = parse_event(raw)
        if not ev.has_data:
            return raw
        if ev.event == "endpoint" and self.endpoint is not None:
            return render_event(raw, self.endpoint(ev.data))
        if ev.event != "message" or not self.policy.active() or self.policy.skips(raw):
            return raw
        try:
            msg = json.loads(ev.data)
        except ValueError:
            return raw
        if isinstance(msg, list):  # a batch of answers in one event (2025-03-26 lets a server send one)
            changed = [self.policy.apply(m) for m in msg]
            new: Any = None if all(c is None for c in changed) else [c or m for c, m in zip(changed, msg, strict=True)]
        else:
            new = self.policy.apply(msg)
        return raw if new is None else render_event(raw, dumps(new).decode())


class JsonRewriter:
    """Holds a JSON body (bounded), applies the policy to it or to each batch element, appends extras."""

    def __init__(
        self,
        policy: Policy,
        *,
        extra: Iterable[dict[str, Any]] = (),
        own: Iterable[Any] = (),
        batch: bool = False,
        max_body: int = DEFAULT_MAX_EVENT,
    ) -> None:
        self.policy = policy
        self.extra = list(extra)
        self.own = list(own)  # ids of the request's lists, which this body answers
        self.batch = batch
        self.max_body = max_body
        self._chunks: list[bytes] = []
        self._size = 0
        self._passing = False  # over the bound: stream the rest untouched
        self._dropping = False  # over the bound with a list to filter: answer errors instead

    def feed(self, chunk: bytes) -> bytes:
        if self._passing or self._dropping:
            return b"" if self._dropping else chunk
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > self.max_body:
            held, self._chunks = b"".join(self._chunks), []
            if self.policy.restricted and any(rid in p for rid in self.own for p in self.policy.lists):
                self._dropping = True  # fail closed: the list cannot be filtered, so it is not relayed
                return b""
            self._passing = True
            return held
        return b""

    def flush(self) -> bytes:
        if self._dropping:
            errors = [e for e in (self.policy.too_large(rid, self.max_body) for rid in self.own) if e is not None]
            answers = errors + self.extra
            return dumps(answers if self.batch or len(answers) > 1 else answers[0])
        if self._passing:
            return b""
        raw = b"".join(self._chunks)
        self._chunks = []
        if not self.extra and self.policy.skips(raw):
            return raw
        try:
            body = json.loads(raw)
        except ValueError:
            return raw  # not ours to judge: the upstream's body passes as it came
        if isinstance(body, list):
            new = [self.policy.apply(m) or m for m in body] + self.extra
        elif self.extra:
            new = [self.policy.apply(body) or body, *self.extra]
        else:
            changed = self.policy.apply(body)
            if changed is None:
                return raw
            new = changed
        return dumps(new)


def client_path(location: str, *, upstream_url: str, prefix: str, strip_prefix: bool) -> str | None:
    """Map an upstream URL or absolute path back into the sidecar's prefix; None if it is elsewhere.

    ``/messages/?session_id=1`` from an upstream at ``http://host:8000`` behind the prefix
    ``/mcp/legacy`` becomes ``/mcp/legacy/messages/?session_id=1``. Absolute URLs are
    mapped only when they name the upstream's own origin; relative references
    (``messages/``) are already right and are left alone (None).
    """
    up = urlsplit(upstream_url)
    loc = urlsplit(location)
    if loc.scheme or loc.netloc:
        if (loc.scheme, loc.netloc.lower()) != (up.scheme, up.netloc.lower()):
            return None
    elif not location.startswith("/"):
        return None
    base = up.path.rstrip("/")
    path = loc.path or "/"
    if strip_prefix:
        if base and path != base and not path.startswith(base + "/"):
            return None
        rest = path[len(base) :]
        path = (prefix.rstrip("/") + rest) if prefix != "/" else (rest or "/")
    elif base:
        if path != base and not path.startswith(base + "/"):
            return None
        path = path[len(base) :] or "/"
    path = path or "/"
    out = path + (f"?{loc.query}" if loc.query else "")
    return out + (f"#{loc.fragment}" if loc.fragment else "")
