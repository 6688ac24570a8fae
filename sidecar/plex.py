"""Plex specifics: the real token and client identity going up, scrubbing coming down,
and transcode sessions owned by the key that started them.

Each rule here was learned from real clients (see DESIGN.md, "Plex specifics").
"""

from __future__ import annotations

import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable

from multidict import CIMultiDict, MultiMapping

from .config import UpstreamConfig

__all__ = ["IDENTITY_HEADERS", "ScrubFilter", "TranscodeSessions", "inject_plex"]

IDENTITY_HEADERS = ("X-Plex-Client-Identifier", "X-Plex-Product", "X-Plex-Version")
_TEXT_TYPES = ("text/", "application/xml", "application/json", "application/vnd.apple.mpegurl",
               "application/x-mpegurl", "audio/mpegurl", "application/dash+xml")  # fmt: skip
_SESSION_PATH = re.compile(r"^/(?:video|audio|music|photo)/:/transcode/universal/session/([^/]+)/", re.IGNORECASE)
_START_PATH = re.compile(
    r"^/(?:video|audio|music|photo)/:/transcode/universal/(?:start|decision|subtitles|ping|stop)", re.IGNORECASE
)


def inject_plex(headers: CIMultiDict[str], query: MultiMapping[str], upstream: UpstreamConfig, token: str) -> None:
    """Add the real token; add the sidecar's identity only when the client sent none.

    Overwriting X-Plex-Client-Identifier for every client would merge all their devices
    and sessions into one in Plex, so a client's own identity always passes through.
    """
    headers["X-Plex-Token"] = token
    sent = any(h in headers for h in IDENTITY_HEADERS) or any(
        name.lower().startswith("x-plex-client-identifier") or name.lower() in ("x-plex-product", "x-plex-version")
        for name in query
    )
    if not sent:
        headers["X-Plex-Client-Identifier"] = upstream.plex_client_identifier
        headers["X-Plex-Product"] = upstream.plex_product
        headers["X-Plex-Version"] = upstream.plex_version


class ScrubFilter:
    """Replace the real upstream token with the client's own key on the way down.

    Headers that can echo it (``Location``, ``Content-Location``) always; bodies only
    when textual (XML, JSON, m3u8), never media. The token may straddle two chunks, so
    the last ``len(token) - 1`` bytes are held back until the next chunk or the end.
    Compressed text bodies are decoded to be scrubbed and sent uncompressed: a token
    hidden in gzip is still a token.
    """

    def __init__(self, token: str, replacement: str) -> None:
        self.token = token.encode()
        self.replacement = replacement.encode()
        self._tail = b""
        self._decoder: zlib._Decompress | None = None

    def headers(self, status: int, headers: CIMultiDict[str]) -> bool:
        tok = self.token.decode()
        for name in ("Location", "Content-Location", "Link", "Refresh"):
            values = headers.getall(name, [])
            if any(tok in v for v in values):
                headers.popall(name)
                for v in values:
                    headers.add(name, v.replace(tok, self.replacement.decode()))
        ctype = headers.get("Content-Type", "").lower()
        if not ctype.startswith(_TEXT_TYPES):
            return False
        encoding = headers.get("Content-Encoding", "identity").lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding != "identity":
            return False  # br/zstd: no decoder in the stdlib budget; pass through untouched
        if self._decoder is not None:
            headers.popall("Content-Encoding", None)
            headers.popall("ETag", None)  # the representation changed
        return True

    def feed(self, chunk: bytes) -> bytes:
        if self._decoder is not None:
            chunk = self._decoder.decompress(chunk)
        data = self._tail + chunk
        data = data.replace(self.token, self.replacement)
        # Hold back only a tail that could start the token, never a fixed width: an SSE
        # event ending in "\n\n" must go out now, not when the next event arrives.
        keep = self._partial(data)
        self._tail = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def _partial(self, data: bytes) -> int:
        """Length of the longest end of ``data`` that is a proper beginning of the token."""
        for n in range(min(len(self.token) - 1, len(data)), 0, -1):
            if data.endswith(self.token[:n]):
                return n
        return 0

    def flush(self) -> bytes:
        if self._decoder is not None:
            self._tail += self._decoder.flush()
        out, self._tail = self._tail.replace(self.token, self.replacement), b""
        return out


class TranscodeSessions:
    """Transcode session id -> the key that started it.

    ``start.m3u8`` answers with relative segment URLs and players do not re-attach the
    key to them, so requests under ``…/transcode/universal/session/<id>/`` are
    authorised as the owning key, and nobody else's key may touch the session.
    """

    def __init__(self, ttl: float = 6 * 3600, max_sessions: int = 10_000, clock: Callable[[], float] = time.time):
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.clock = clock
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def untracked(self, path: str) -> bool:
        """True when ``claim`` has nothing to record or refuse for this path (no session in it)."""
        return self.session_of(path) is None and not _START_PATH.match(path)

    def claim(self, path: str, query: MultiMapping[str], key_id: str) -> bool:
        """Record ownership when a key starts, pings or reads a session. False if another key owns it."""
        sid = self.session_of(path)
        if sid is None:
            if not _START_PATH.match(path):
                return True
            sid = query.get("session") or query.get("X-Plex-Session-Identifier")
            if not sid:
                return True
        owner = self.owner(sid)
        if owner is not None and owner != key_id:
            return False
        self._owners[sid] = (key_id, self.clock() + self.ttl)
        self._owners.move_to_end(sid)
        while len(self._owners) > self.max_sessions:
            self._owners.popitem(last=False)
        return True

    def owner(self, session_id: str) -> str | None:
        entry = self._owners.get(session_id)
        if entry is None:
            return None
        if entry[1] < self.clock():
            del self._owners[session_id]
            return None
        return entry[0]

    def session_of(self, path: str) -> str | None:
        m = _SESSION_PATH.match(path)
        return m.group(1) if m else None
