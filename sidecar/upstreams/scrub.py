"""Scrubbing on the way down: the upstream's real token never reaches a client (DESIGN,
"Security invariants" 1).

Every channel an upstream answer reaches a client through passes the ``ScrubFilter``:

- **Headers**: every header name and value, and the status line's reason phrase.
- **Bodies, whatever their type**: textual bodies (XML, JSON, m3u8, SSE, …) get the
  client's own key in place of the token (so URLs in them keep working) where the key may
  go (below), ``REDACTED`` elsewhere; every other
  body (media, images, ``application/octet-stream``, no type at all) is scanned too
  and the token is masked with ``*`` of the same length, so ``Content-Length`` and byte
  offsets stay exact. A token straddling two chunks is caught: only a tail that could
  start the token is held back until the next chunk.
- **Content-Encoding**: ``gzip``/``x-gzip``/``deflate``, also stacked, are decoded (and
  sent as identity; at most 3 layers, and a chunk may decode to 1 MiB or 256× its size,
  beyond that it is a decompression bomb); anything else (``br``, ``zstd``, ``compress``, unknown) cannot be
  scrubbed and is refused with ``502 upstream_unavailable`` (``Unscrubbable``). So the
  upstream is never asked for those: ``restrict_accept_encoding``. A body labelled with a
  coding it does not have is refused the same way (or cut, once headers went out).
- **Range**: ranges are relayed only for identity video and audio (seeking needs them,
  and Plex never puts a token in media; each part is still scanned). Any other 206 would
  let two ranges split across the token reveal it, so the forwarder asks again without
  ``Range`` (``whole_needed``) and a 206 that still comes back is refused.
- **Websocket frames** coming down (``frame``): text and binary frames, ping/pong
  payloads and the close reason.
- **Several secrets** (``also=``): an MCP upstream's credential is its configured headers,
  so ``sidecar.upstreams.mcp.scrub`` passes each value, its credential part and their escaped forms,
  all replaced by ``REDACTED`` (Plex has one token and keeps its one-token path).

**Where the key may go** (``scrub_urls``; DESIGN invariants 1 and 3, the answer-direction twin
of "an absolute URL never gets a token"): substitution only where the client would send the
key back to the sidecar itself — a bare value (Plex's ``authToken="…"``), a relative URL, an
absolute URL to the sidecar's own public origin (``origin``: ``public_origin``'s scheme and
host). In an absolute URL to any other origin, the upstream's own address included, and
wherever that cannot be told, the token becomes ``REDACTED``. Why: a malicious or compromised
upstream answering ``Location: https://attacker.example/?X-Plex-Token=<token>`` (or such a URL
in a ``thumb=``, a JSON string, a playlist) would otherwise have the sidecar rewrite it into a
link carrying the client's key, which the client follows. The decision looks back from each
occurrence over the whole value its reader (XML, JSON, a line: by ``Content-Type``) sees it in
(at most 2 KiB, across chunks: the last bytes sent are kept; HTML, CSS, scripts, SVG and DASH
never get the key; an HLS playlist is held whole, up to 1 MiB, since a variable or a content
steering tag anywhere in it decides where its URLs go), and runs only where the token occurs;
headers, the reason phrase and websocket text and
binary frames are decided the same way. With ``REDACTED`` as replacement (no key: MCP, a
request without one) nothing is looked at.

Cost: one ``bytes.replace`` (with a key: one ``in``) per chunk and one short ``find`` in its last
``len(token) - 1`` bytes: about 8 µs per 64 KiB (~8 GB/s) on the bench machine, some 5-10%
of a 256 MiB stream through the whole sidecar; on a small answer it is cheaper than before.

Not covered (the upstream itself would have to split the token): a token cut across two
headers or two websocket messages; and a token inside an identity ``video/*``/``audio/*``
body read by ranges (Plex never puts its token into media; seeking needs ranges).
"""

from __future__ import annotations

import zlib
from typing import Final

from aiohttp import WSMessage, WSMsgType
from multidict import CIMultiDict, CIMultiDictProxy

from ..core.errors import UpstreamUnavailable
from .scrub_urls import LINE, PLAYLIST, WINDOW, Origin, frame_kind, key_may_go, kind_of, own_origin, steers

__all__ = ["ScrubFilter", "Unscrubbable", "restrict_accept_encoding", "whole_needed"]

_TEXT_TYPES: Final = (
    "text/", "application/xml", "application/json", "application/vnd.apple.mpegurl", "application/x-mpegurl",
    "audio/mpegurl", "audio/x-mpegurl", "application/dash+xml", "application/javascript",
    "application/x-www-form-urlencoded", "application/ld+json",
)  # fmt: skip
_RANGE_SAFE: Final = ("video/", "audio/")  # identity media: ranges pass (seeking), each part is still scanned
_DECODABLE: Final = {"gzip": True, "x-gzip": True, "deflate": False}  # coding -> is gzip
_ACCEPTABLE: Final = frozenset({"gzip", "x-gzip", "deflate", "identity"})
MAX_STACK: Final = 3  # Content-Encoding layers decoded at most (``gzip, gzip`` is legal; more is an attack)
MAX_RATIO: Final = 256  # decoded bytes per encoded byte before a body counts as a decompression bomb
MIN_DECODE_LIMIT: Final = 1 << 20  # ... but a tiny network chunk may always decode to this much
MAX_PLAYLIST: Final = 1 << 20  # a playlist is held whole up to this; a bigger one gets no key
REDACTED: Final = "REDACTED"  # what the token becomes where the client's key may not go
_REDACTED: Final = REDACTED.encode()


class Unscrubbable(UpstreamUnavailable):
    """The upstream's answer cannot be scrubbed, so it is not relayed (502 before the headers, a cut after).

    Messages never quote the upstream's values: they may hold the token.
    """


def restrict_accept_encoding(headers: CIMultiDict[str]) -> None:
    """Keep only codings the filter can decode in the ``Accept-Encoding`` going upstream.

    Without one the upstream answers identity; ``br``/``zstd``/``*`` are dropped, and a
    client that accepted only those is asked ``identity`` for.
    """
    values = headers.getall("Accept-Encoding", ())
    if not values:
        return
    kept = [p.strip() for v in values for p in v.split(",") if p.split(";", 1)[0].strip().lower() in _ACCEPTABLE]
    headers["Accept-Encoding"] = ", ".join(kept) or "identity"


def _codings(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> list[str]:
    """The content codings in the order they were applied, ``identity`` left out."""
    out: list[str] = []
    for value in headers.getall("Content-Encoding", ()):
        for part in value.split(","):
            coding = part.strip().lower()
            if coding and coding != "identity":
                out.append(coding)
    return out


def _is_text(ctype: str) -> bool:
    if ctype.startswith(_TEXT_TYPES):
        return True
    mime = ctype.split(";", 1)[0].strip()
    return mime.endswith(("+xml", "+json"))


def _domain_cookie(name: str, value: str) -> bool:
    """A ``Set-Cookie`` that may carry a ``Domain`` attribute (any mention counts: a broken cookie at worst)."""
    return name.lower() == "set-cookie" and "domain" in value.lower()


def whole_needed(status: int, headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> bool:
    """A partial answer that must not be relayed by range: anything but identity video/audio."""
    if status != 206:
        return False
    ctype = headers.get("Content-Type", "").lower()
    return _is_text(ctype) or not ctype.startswith(_RANGE_SAFE) or bool(_codings(headers))


class _Inflate:
    """One gzip or deflate layer, decoded incrementally, bounded against decompression bombs."""

    __slots__ = ("_head", "_z", "gzip")

    def __init__(self, coding: str) -> None:
        if coding not in _DECODABLE:
            raise Unscrubbable("the upstream answered in a Content-Encoding the sidecar cannot scrub")
        self.gzip = _DECODABLE[coding]
        self._z: zlib._Decompress | None = None
        self._head = b""  # deflate: the first byte, until the second tells zlib from raw

    def _new(self, data: bytes) -> zlib._Decompress:
        if self.gzip:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # "deflate" is meant to be zlib-wrapped; some servers send raw deflate. The header says which.
        wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def decompress(self, data: bytes, limit: int) -> bytes:
        out: list[bytes] = []
        size = 0
        if self._head:
            data, self._head = self._head + data, b""
        try:
            while data:
                z = self._z
                if z is None:
                    if not self.gzip and len(data) < 2:
                        self._head = data
                        break
                    z = self._z = self._new(data)
                piece = z.decompress(data, limit - size)
                size += len(piece)
                if size >= limit:
                    raise Unscrubbable("the upstream's compressed answer expands beyond what the sidecar scrubs")
                out.append(piece)
                if not z.eof:
                    break
                # A gzip body may hold several members; anything after a deflate stream is garbage.
                data, self._z = z.unused_data, None
                if data and not self.gzip:
                    raise Unscrubbable("the upstream's compressed answer has data after its end")
        except zlib.error:
            raise Unscrubbable("the upstream's answer is not in the Content-Encoding it claims") from None
        return b"".join(out)

    def finish(self) -> None:
        if self._z is not None or self._head:
            raise Unscrubbable("the upstream's compressed answer ended in the middle")


class ScrubFilter:
    """Replace the real upstream token on the way down (a ``core.relay.ResponseFilter``, one per request).

    ``replacement`` is the client's own key (it already has it), or ``REDACTED``. ``also``
    are further secrets replaced the same way (an MCP upstream's credential headers: the
    whole value and its escaped forms, ``sidecar.upstreams.mcp.scrub``); ``token`` should be the
    longest, ``also`` longest first, so a secret that contains another goes as a whole.
    """

    __slots__ = ("_also", "_body_look", "_ctx", "_ctx_cut", "_decoders", "_first", "_kind", "_look", "_mask", "_origin",
                 "_origin_raw", "_out", "_outs", "_repl", "_tail", "_tok", "_toks", "_whole", "replacement",
                 "token")  # fmt: skip

    def __init__(
        self, token: str, replacement: str, *, also: tuple[str, ...] = (), origin: tuple[str, str] | None = None
    ) -> None:
        self.token = token.encode()
        self.replacement = replacement.encode()
        self._tok, self._repl = token, replacement
        self._mask = b"*" * len(self.token)
        self._out = self.replacement  # what the token becomes in this body (the key, or the mask)
        self._first = self.token[:1]
        self._tail = b""
        self._decoders: list[_Inflate] = []
        extra = tuple(a for a in also if a and a != token)
        self._toks = (token, *extra) if token else extra  # every secret, for headers and frames
        self._also = tuple(a.encode() for a in extra)  # empty for Plex: its one-token path stays as it was
        self._outs = tuple((a, self.replacement) for a in self._also)  # (secret, what it becomes) in bodies
        # The client's key goes only where the client would send it back to us (``scrub_urls``):
        # ``origin`` is ``public_origin``'s (scheme, host), read only once a token shows up.
        self._look = self._body_look = bool(token) and replacement != REDACTED and not extra
        self._origin_raw = origin
        self._origin: Origin | None = None
        self._ctx, self._ctx_cut = b"", False  # the body's last emitted bytes, for the look-back
        self._kind = LINE  # how the body is read (``scrub_urls.kind_of``), set at the headers
        self._whole: bytearray | None = None  # a playlist, held whole: a tag anywhere in it decides (``steers``)

    # ------------------------------------------------------------------ headers

    def text(self, value: str, kind: int | None = None) -> str:
        """A header name or value, a reason phrase, a websocket text frame (``kind``: read as JSON if
        it looks like it; headers are one line)."""
        if self._also:
            for tok in self._toks:
                if tok in value:
                    value = value.replace(tok, self._repl)
            return value
        if not self._tok or self._tok not in value:
            return value
        if self._look:
            raw = value.encode("utf-8", "surrogateescape")
            kind = frame_kind(raw) if kind is None else kind
            return self._swap(raw, b"", False, kind).decode("utf-8", "surrogateescape")
        return value.replace(self._tok, self._repl)

    def binary(self, data: bytes) -> bytes:
        """A websocket binary frame (its length is framed, so the key may replace the token)."""
        if self._look and self.token in data:
            data = self._swap(data, b"", False, frame_kind(data))
        elif self.token:
            data = data.replace(self.token, self.replacement)
        for tok in self._also:
            data = data.replace(tok, self.replacement)
        return data

    def control(self, data: bytes) -> bytes:
        """A ping/pong payload or close reason: masked in place, so it stays within its 125 bytes."""
        data = data.replace(self.token, self._mask) if self.token else data
        for tok in self._also:
            data = data.replace(tok, b"*" * len(tok))
        return data

    def frame(self, msg: WSMessage) -> WSMessage:
        """One websocket frame from the upstream: the key in data frames, a same-length mask in control ones."""
        kind = msg.type
        if kind == WSMsgType.TEXT:
            return msg._replace(data=self.text(msg.data))
        if kind == WSMsgType.BINARY:
            return msg._replace(data=self.binary(msg.data))
        if kind in (WSMsgType.PING, WSMsgType.PONG):
            return msg._replace(data=self.control(msg.data))
        if kind == WSMsgType.CLOSE and msg.extra:
            return msg._replace(extra=self.control(msg.extra.encode()).decode(errors="replace"))
        return msg

    def scrub_headers(self, headers: CIMultiDict[str]) -> None:
        toks = self._toks
        if not toks or not any(tok in k or tok in v for k, v in headers.items() for tok in toks):
            return
        prior: dict[str, bytes] = {}
        items = [(self.text(k, LINE), self._header_value(k, v, prior)) for k, v in headers.items()]
        headers.clear()
        headers.extend(items)

    def _header_value(self, name: str, value: str, prior: dict[str, bytes]) -> str:
        """One header value, decided with the same-named lines before it (a reader joins them with ", ")."""
        if not self._look:
            return self.text(value, LINE)
        raw, lname = value.encode("utf-8", "surrogateescape"), name.lower()
        before = prior.get(lname, b"")
        prior[lname] = before + raw + b", "
        if self._tok not in value:
            return value
        if _domain_cookie(name, value):  # its Domain= sends it to other hosts too (a host-only one may)
            return value.replace(self._tok, REDACTED)
        return self._swap(raw, before, False, LINE).decode("utf-8", "surrogateescape")

    @staticmethod
    def check_framing(raw: CIMultiDict[str] | CIMultiDictProxy[str]) -> None:
        """Refuse transfer codings other than chunked: aiohttp does not undo them, so a
        ``Transfer-Encoding: gzip, chunked`` body would pass as opaque, unscrubbed bytes."""
        for value in raw.getall("Transfer-Encoding", ()):
            for coding in value.split(","):
                if coding.strip().lower() != "chunked":
                    raise Unscrubbable("the upstream answered in a transfer coding the sidecar cannot scrub")

    def headers(self, status: int, headers: CIMultiDict[str]) -> bool:
        """Scrub every header; set up the body: decoders, key or mask. Raises ``Unscrubbable``."""
        if not self.token:
            return False
        self.scrub_headers(headers)
        if whole_needed(status, headers):
            raise Unscrubbable("the upstream answered part of a body that can only be scrubbed whole")
        codings = _codings(headers)
        if codings:
            if len(codings) > MAX_STACK:
                raise Unscrubbable("the upstream answered in a Content-Encoding the sidecar cannot scrub")
            self._decoders = [_Inflate(c) for c in reversed(codings)]  # the last one applied comes off first
            for name in ("Content-Encoding", "Content-Length", "ETag"):  # the representation changed
                headers.popall(name, None)
        ctype = headers.get("Content-Type", "").lower()
        if _is_text(ctype):
            # Several types, or a list: a browser reads the last one, so none is trusted to say how the body is read
            kind = kind_of(ctype) if "," not in ctype and len(headers.getall("Content-Type")) == 1 else None
            self._out = self.replacement if kind is not None or not self._look else _REDACTED
            self._body_look = self._look and kind is not None
            self._kind = LINE if kind is None else kind
            if self._body_look and kind == PLAYLIST:
                self._whole = bytearray()
            headers.popall("Content-Length", None)  # the key is not as long as the token
        else:
            self._out = self._mask  # same length: Content-Length and byte offsets stay right
            self._body_look = False
            self._outs = tuple((a, b"*" * len(a)) for a in self._also)
        return True

    # ------------------------------------------------------------------ body

    def feed(self, chunk: bytes) -> bytes:
        return self.scrub(self.decode(chunk) if self._decoders else chunk)

    def decode(self, chunk: bytes) -> bytes:
        """Undo the body's Content-Encoding (as far as this chunk goes). Raises ``Unscrubbable``."""
        limit = max(MIN_DECODE_LIMIT, len(chunk) * MAX_RATIO)
        for d in self._decoders:
            chunk = d.decompress(chunk, limit)
        return chunk

    def scrub(self, chunk: bytes) -> bytes:
        """Replace every secret in decoded bytes, holding back a tail that could start one."""
        if self._whole is not None:
            self._whole += chunk
            if len(self._whole) <= MAX_PLAYLIST:
                return b""
            chunk, self._whole = bytes(self._whole), None  # too big to hold: no key in it at all
            self._body_look, self._out = False, _REDACTED
        data = self._tail + chunk if self._tail else chunk
        if not self._body_look:
            data = data.replace(self.token, self._out)
        elif self.token in data:  # rare: the look-back decides, occurrence by occurrence
            data = self._swap(data, self._ctx, self._ctx_cut, self._kind)
        for tok, out in self._outs:
            data = data.replace(tok, out)
        # Hold back only a tail that could start the token, never a fixed width: an SSE
        # event ending in "\n\n" must go out now, not when the next event arrives.
        keep = self._partial(data)
        if keep:
            self._tail = data[-keep:]
            data = data[:-keep]
        else:
            self._tail = b""
        if self._body_look and data:
            self._remember(data)
        return data

    def _remember(self, out: bytes) -> None:
        """Keep what went out last (at least ``WINDOW`` bytes of it, by reference when it is that big)."""
        if len(out) >= WINDOW:
            self._ctx_cut = self._ctx_cut or bool(self._ctx)
            self._ctx = out
            return
        ctx = self._ctx + out
        if len(ctx) > WINDOW:
            ctx, self._ctx_cut = ctx[-WINDOW:], True
        self._ctx = ctx

    def _swap(self, data: bytes, ctx: bytes, cut: bool, kind: int) -> bytes:
        """``data`` with each token replaced by the key where the key may go, by ``REDACTED`` elsewhere.

        ``ctx``: the bytes that went out just before ``data`` (``cut``: not all of them since the start).
        """
        if self._origin is None and self._origin_raw is not None:
            self._origin = own_origin(*self._origin_raw)
        tok, n, pos = self.token, len(self.token), 0
        parts: list[bytes] = []
        i = data.find(tok)
        while i != -1:
            if i >= WINDOW:
                before, at_start = data[i - WINDOW : i], False
            else:
                need = WINDOW - i
                before, at_start = ctx[-need:] + data[:i], not cut and len(ctx) <= need
            ok = key_may_go(before, at_start=at_start, origin=self._origin, kind=kind)
            parts += (data[pos:i], self.replacement if ok else _REDACTED)
            pos = i + n
            i = data.find(tok, pos)
        parts.append(data[pos:])
        return b"".join(parts)

    def _partial(self, data: bytes) -> int:
        """Length of the longest end of ``data`` that is a proper beginning of a secret."""
        keep = self._held(data, self.token, self._first)
        for tok in self._also:
            keep = max(keep, self._held(data, tok, tok[:1]))
        return keep

    @staticmethod
    def _held(data: bytes, token: bytes, first: bytes) -> int:
        i = data.find(first, max(0, len(data) - len(token) + 1))
        while i != -1:
            if token.startswith(data[i:]):
                return len(data) - i
            i = data.find(first, i + 1)
        return 0

    def finish(self) -> None:
        """The body ended: a compressed one must have ended whole. Raises ``Unscrubbable``."""
        for d in self._decoders:
            d.finish()

    def flush(self) -> bytes:
        self.finish()
        return self.drain()

    def drain(self, last: bytes = b"") -> bytes:
        """The held-back tail (and ``last``, the final decoded bytes), scrubbed, nothing kept."""
        out, self._tail = self._tail + last, b""
        if self._whole is not None:
            out, self._whole = bytes(self._whole) + out, None
            if steers(out):
                self._body_look, self._out = False, _REDACTED
        if not out:
            return out
        if self._body_look and self.token in out:
            out = self._swap(out, self._ctx, self._ctx_cut, self._kind)
        else:
            out = out.replace(self.token, self._out)
        for tok, rep in self._outs:
            out = out.replace(tok, rep)
        return out
