"""SSE event ids belong to keys: sealed on the way down, opened from ``Last-Event-ID`` on the way up.

A resumable MCP server (2025-03-26 … 2025-11-25) tags each event of a stream with an id and,
given ``Last-Event-ID``, replays the events after it. The SDK's server asks its event store
which stream an id belongs to and replays that stream on whichever session asked: the store
is one for all sessions, and the upstream sees one credential (the sidecar's) for every key.
So a key that learns or guesses another key's event id (the SDK's example stores number
them) would be replayed that key's answers — a ``resources/read`` it may not make, a tool
result — without any request the gateway judges.

As for ``Mcp-Session-Id`` (``sealing.py``), the client only ever sees a sealed form: every
``id:`` field of an event stream on an MCP route is replaced by a token sealing the
upstream's id with the key it was sent to (and the upstream), under its own associated data
(``EVENT_SCOPE``), so an event token is no session token. ``Last-Event-ID`` is opened before
anything goes up: another key's is ``403``, one the sidecar did not seal ``404``, a repeated
header ``400``; the upstream gets its own id back. Any worker or replica holding the sealing
key opens it, as with sessions.

:class:`EventIdSealer` rewrites a stream holding back at most one incomplete ``id:`` line;
everything else passes as it comes (an SSE stream is never buffered).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from multidict import CIMultiDict, MultiMapping

from ...core.errors import BadRequest, Forbidden, NotFound
from .sealing import Sealer

__all__ = ["EVENT_SCOPE", "LAST_EVENT_ID", "EventIdSealer", "open_last_event_id"]

LAST_EVENT_ID = "Last-Event-ID"
EVENT_SCOPE = "\0sse-event-id"  # appended to the upstream id in the seal's associated data
MAX_ID_LINE = 4096  # an id line longer than this is dropped (the client loses resumption for that event)

_ID_LINE = re.compile(rb"(?:^|(?<=[\r\n]))id:([^\r\n]*)")
_EOL = re.compile(rb"[\r\n]")


class EventIdSealer:
    """Replaces the value of every ``id:`` line of an SSE stream by ``seal(value)``."""

    def __init__(self, seal: Callable[[str], str]) -> None:
        self._seal = seal
        self._held = b""  # the start of a line that is, or may become, an id line
        self._mid = False  # the bytes already sent end in the middle of a line (not an id line)
        self._skip = False  # inside an id line too long to seal: dropped up to its end

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        self._held = b""
        out = b""
        if self._skip or self._mid:  # the rest of a line already decided: up to its end
            m = _EOL.search(data)
            if m is None:
                return b"" if self._skip else data
            out = b"" if self._skip else data[: m.start()]
            data = data[m.start() :]
            self._skip = self._mid = False
        end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1  # after the last complete line
        whole, rest = data[:end], data[end:]
        if b"id:" in whole:
            whole = _ID_LINE.sub(self._sealed, whole)
        out += whole
        if rest.startswith(b"id:") or b"id:".startswith(rest):
            if len(rest) > MAX_ID_LINE:
                self._skip = True  # fail closed: an id that cannot be sealed never reaches the client
            else:
                self._held = rest
            return out
        self._mid = True
        return out + rest

    def flush(self) -> bytes:
        """The stream ended: an unfinished id line is completed sealed (the upstream's id never gets out)."""
        held, self._held = self._held, b""
        if held.startswith(b"id:"):
            return _ID_LINE.sub(self._sealed, held)
        return held

    def _sealed(self, m: re.Match[bytes]) -> bytes:
        value = m.group(1)
        if value.startswith(b" "):
            value = value[1:]
        if not value:
            return m.group(0)  # an empty id resets the client's last id: nothing to seal
        return b"id: " + self._seal(value.decode("latin-1")).encode()


def open_last_event_id(
    sealer: Sealer, upstream_id: str, owner: str, request_headers: MultiMapping[str], headers: CIMultiDict[str]
) -> None:
    """Put the upstream's own id in ``headers`` for the client's ``Last-Event-ID`` (403 another key's, 404 not ours)."""
    values = request_headers.getall(LAST_EVENT_ID, [])
    if len(values) > 1:
        raise BadRequest("Last-Event-ID appears more than once")
    token = values[0].strip()
    if not token:
        headers.popall(LAST_EVENT_ID, None)
        return
    try:
        raw = sealer.open_for(upstream_id + EVENT_SCOPE, token, owner).sid
    except NotFound:
        raise NotFound("no such event id (not one this sidecar sent, or expired): open a new stream") from None
    except Forbidden:
        raise Forbidden("this event id belongs to another key's stream") from None
    headers[LAST_EVENT_ID] = raw
