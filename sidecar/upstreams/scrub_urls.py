"""Where the client's key may stand in for the upstream's token on the way down.

The ``ScrubFilter`` gives a Plex client its own key where the upstream wrote its real
token, so URLs in Plex answers keep working. A malicious or compromised upstream would
abuse that: ``Location: https://attacker.example/?X-Plex-Token=<token>`` (or such a URL in
an XML attribute, a JSON string, a playlist) would reach the client with *its key* in it,
and the client or its browser would follow it and hand the key to the attacker.

The rule (DESIGN "Security invariants" 1 and 3, the response-direction twin of "an
absolute URL never gets a token"): **the key replaces the token only where the client
would send it back to the sidecar itself** — a bare value (``authToken="…"``), a relative
URL, or an absolute URL to the sidecar's own public origin (``public_origin``: the scheme
and host the client used). In an absolute URL to any other origin (the upstream's own
address included: a client must never send its key there) and wherever that cannot be
told, the token becomes ``REDACTED``.

``key_may_go`` decides per occurrence from the *stretch* before it: the bytes back to the
nearest delimiter (whitespace, ``"``, ``'``, ``<``, ``>``, backtick), at most ``WINDOW``
bytes (longer counts as foreign). The stretch is decoded the way its reader would
(XML/HTML entities, JSON/JS escapes; tabs and newlines dropped as the WHATWG URL parser
does) and then:

- it starts with a scheme (``https:``, also without slashes) or with two slashes or
  backslashes (protocol-relative): absolute — the key only if it is exactly
  ``http(s)://<our host[:port]>`` followed by ``/``, ``?`` or ``#`` before the token;
- any nested absolute URL in it (``scheme://``, ``=//``; also percent-encoded once or
  twice, ``%3A%2F%2F``/``%253A%252F%252F``) must be to our origin too;
- a raw tab or newline as delimiter right after ``:``, ``/``, ``\\`` or ``;`` (a URL an
  HTML reader would join across it) is foreign.

The nearest delimiter is not where a value starts: a space, a quote of the other kind, ``>``
or an escaped ``\\"`` may sit *inside* a quoted value, and every reader keeps them in the URL
(``"https://attacker.example/ ?t=<token>"``). So the *whole value* the token ends must hold no
absolute URL but ours, back to where its reader starts it (``kind_of``, from the media type):
XML — the open attribute value or the text node after the last ``<`` (neither can hold one;
CDATA, comments and ``xml:base`` nearby cannot be told: foreign); JSON — the last unescaped
``"``; an SSE event — from its blank line, ``data:`` lines joined; anything else (playlists,
headers) — the line. A playlist with HLS variables or content steering gets no key (``steers``).
A value that starts beyond the window is foreign. Active content (HTML, CSS, scripts, SVG) and
DASH never get the key: a script, a CSS escape, ``<base href>`` or ``<BaseURL>`` decide where a
URL goes, not its text. Several ``Content-Type`` values, or a list: no key (browsers read the last).

Anything the checks cannot read as ours (userinfo, ``\\``, percent-encoded or non-ASCII
hosts, another scheme) is foreign: a wrong guess costs a broken link, never a key.
This runs only where the token actually occurs (rare): the body's fast path is untouched.
"""

from __future__ import annotations

import html
import re
from typing import Final
from urllib.parse import unquote

__all__ = [
    "EVENTS", "JSON", "LINE", "PLAYLIST", "WINDOW", "XML", "Origin", "frame_kind", "key_may_go", "kind_of",
    "last_delimiter", "own_origin", "steers",
]  # fmt: skip

WINDOW: Final = 2048  # bytes looked back from a token; a longer delimiter-free stretch is foreign
DELIMS: Final = b" \t\n\r\f\v\"'<>`"
_DELIM_BYTES: Final = tuple(bytes((d,)) for d in DELIMS)
_SOFT: Final = tuple(bytes((d,)) for d in b"\t\n\r")  # browsers drop them inside a URL: it may go on across
_JOINS: Final = tuple(bytes((d,)) for d in b":/\\;")  # ... when one of these stands before them
_DEFAULT_PORT: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_WEB_SCHEME: Final = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|x([0-9a-fA-F]{2})|(.))", re.S)
_SCHEME = re.compile(r"([a-z][a-z0-9+.\-]*):", re.I)
# Anywhere in the stretch (nested in a parameter, inside "url(", after a srcset ","): two slashes
# (the authority follows) and a special scheme's "https:" (browsers need no slashes after it).
_DOUBLE = re.compile(r"(?:\b([a-z][a-z0-9+.\-]*):)?(?P<s>[/\\]{2,})", re.I)
_SPECIAL_AT = re.compile(r"\b(https?|wss?|ftp|file|javascript|data|vbscript|blob|mailto|sms|smsto|intent):", re.I)
_HOSTPORT = re.compile(r"(?:([a-z0-9.\-]+)|(\[[0-9a-f:.]+\]))(?::(\d{1,5}))?", re.I)
_DROPPED: Final = {9: None, 10: None, 13: None}  # tab, LF, CR: browsers drop them inside a URL
_C0_SPACE: Final = "".join(chr(c) for c in range(33))
_CUT = re.compile(r"[\"'<>` ]")

# Schemes that reach no host without "//" (``https:host`` does: browsers read it as ``https://host``;
# ``javascript:``/``data:`` can send anything anywhere): not listed, so foreign.
_SPECIAL: Final = frozenset({
    "http", "https", "ws", "wss", "ftp", "file", "javascript", "data", "vbscript", "blob",
    "mailto", "sms", "smsto", "intent",  # no host, but one tap sends the text to someone else
})  # fmt: skip

Origin = tuple[str, str, int]  # scheme (http/https), lower-case host, port

LINE, JSON, XML, PLAYLIST, EVENTS = 0, 1, 2, 3, 4  # how a text is read: where a value starts (``_scan_start``)
_PLAYLISTS: Final = frozenset({
    "application/vnd.apple.mpegurl", "application/x-mpegurl", "audio/mpegurl", "audio/x-mpegurl",
})  # fmt: skip
# HLS variables ({$name}) and content steering (its server may clone a pathway onto its own host) decide where
# a playlist's relative URLs go, from anywhere in it: such a playlist never gets the key (``steers``).
_STEERS = re.compile(rb"#EXT-X-(?:CONTENT-STEERING|DEFINE)|\{\$")
# Active content (a script gets the key from any bare value; CSS escapes, <base>, meta refresh) and
# base URLs (DASH <BaseURL>): no look-back can tell where a relative URL goes, so the key never goes.
_NEVER: Final = frozenset({
    "text/html", "application/xhtml+xml", "image/svg+xml", "text/css", "application/javascript",
    "text/javascript", "application/ecmascript", "text/ecmascript", "application/dash+xml", "text/xsl",
    "application/xslt+xml", "text/xml-external-parsed-entity",
})  # fmt: skip
_XML_NAME = rb"[A-Za-z_:][-A-Za-z0-9_.:]*"
_XML_CUSTOM_ENTITY = re.compile(rb"&(?!(?:lt|gt|amp|quot|apos);|#)")
_XML_TAG = re.compile(
    rb"/?" + _XML_NAME + rb"(?:\s+" + _XML_NAME + rb"\s*=\s*(?:\"[^\"]*\"|'[^']*'))*"
    rb"(?:\s*/?>|\s+" + _XML_NAME + rb"\s*=\s*(?P<q>[\"']))"
)


def own_origin(scheme: str, host: str) -> Origin | None:
    """``public_origin``'s (scheme, host) as compared: None if it cannot be read (then nothing is ours)."""
    scheme = _WEB_SCHEME.get(scheme.lower(), "")
    hp = _hostport(host, scheme) if scheme else None
    return (scheme, hp[0], hp[1]) if hp else None


def _hostport(authority: str, scheme: str) -> tuple[str, int] | None:
    m = _HOSTPORT.fullmatch(authority)
    if m is None:
        return None
    port = int(m[3]) if m[3] else _DEFAULT_PORT[scheme]
    return (m[1] or m[2]).lower(), port


def last_delimiter(data: bytes) -> int:
    """Index of the last delimiter in ``data``, or -1."""
    return max(data.rfind(d) for d in _DELIM_BYTES)


def _readings(raw: bytes) -> set[str]:
    """The stretch as its readers may see it: as is, entities undone, escapes undone, both in either
    order (JSON in XML, XML in JSON). Each must be ours: what JSON reads as one backslash is two to XML."""
    text = raw.decode("utf-8", "replace")
    ent, esc = html.unescape(text), _ESCAPE.sub(_unescape, text)
    forms = {text, ent, esc, _ESCAPE.sub(_unescape, ent), html.unescape(esc)}
    return {f.translate(_DROPPED) for f in forms}


def _unescape(m: re.Match[str]) -> str:
    if m[1] or m[2]:
        return chr(int(m[1] or m[2], 16))
    return m[3]


def _ours(rest: str, scheme: str, origin: Origin | None) -> bool:
    """``rest`` follows ``scheme:`` (or ``//`` when scheme is ""): exactly ``//<our authority>`` then ``/?#``."""
    if origin is None:
        return False
    web = _WEB_SCHEME.get(scheme.lower(), "") if scheme else origin[0]
    if rest.startswith("\\/\\/"):  # JSON's "\/" read as is: browsers take "\" for "/", others stop at it
        rest = rest.replace("\\/", "/")
    if web != origin[0] or not rest.startswith("//"):
        return False
    rest = rest[2:]
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=-1)
    if end == -1:  # the token sits in the authority (or right after it): not a URL to us
        return False
    hp = _hostport(rest[:end], web)
    return hp is not None and hp == (origin[1], origin[2])


def _url_is_ours(url: str, origin: Origin | None) -> bool:
    """The URL the token ends: relative or bare (ours), or absolute and to our origin."""
    url = url.lstrip(_C0_SPACE)  # browsers strip leading C0 controls and spaces
    if url.startswith(":"):
        return False  # "https\n:x" joined by a reader: not a relative URL
    if len(url) >= 2 and url[0] in "/\\" and url[1] in "/\\":  # protocol-relative (browsers read \ as /)
        return _ours(url, "", origin)  # "//host" or JSON's "\/\/host" only
    m = _SCHEME.match(url)
    if m is None:
        return True  # relative, or a bare value
    rest = url[m.end() :]
    if m[1].lower() not in _SPECIAL and not (len(rest) >= 2 and rest[0] in "/\\" and rest[1] in "/\\"):
        return True  # "echo:<token>", "urn:…": no host to send it to
    return _ours(rest, m[1], origin)


def _nested_ours(text: str, origin: Origin | None) -> bool:
    """Every absolute URL anywhere in ``text`` (plain or percent-encoded once or twice) is to our origin.

    Any ``//`` counts (``/a//b`` too: a broken link at worst); ``\\\\`` and ``/\\`` are foreign whoever reads them.
    """
    for form in (text, unquote(text), unquote(unquote(text))):
        form = form.replace("\\/", "/")  # JSON's escaped "/" (where a URL starts, _url_is_ours reads it raw)
        for m in _DOUBLE.finditer(form):
            if not _ours(form[m.start("s") :], m[1] or "", origin):
                return False
        for m in _SPECIAL_AT.finditer(form):
            if not _ours(form[m.end() :], m[1], origin):
                return False
    return True


def kind_of(ctype: str) -> int | None:
    """How a text body of media type ``ctype`` (lower-case) is read: ``XML``, ``JSON`` or ``LINE``;
    None where the key never goes (active content, or a format with base URLs)."""
    mime = ctype.split(";", 1)[0].strip()
    if mime in _NEVER or mime.endswith(("+xhtml", "script")):
        return None
    if mime.endswith(("json", "+json")):
        return JSON
    if mime in _PLAYLISTS:
        return PLAYLIST
    if mime == "text/event-stream":
        return EVENTS
    if mime.endswith(("/xml", "+xml")):
        return XML
    return LINE


def steers(playlist: bytes) -> bool:
    """A playlist with HLS variables or content steering (decided on the whole playlist)."""
    return _STEERS.search(playlist) is not None


def frame_kind(text: bytes) -> int:
    """A websocket frame: JSON or XML when it looks like it, else read as one line."""
    first = text.lstrip()[:1]
    return JSON if first in (b"{", b"[") else XML if first == b"<" else LINE


def _json_start(before: bytes) -> int:
    """Where the JSON string holding the token begins (after its unescaped opening quote), or -1."""
    i = len(before)
    for _ in range(64):  # more escaped quotes than that in one string: cannot be told (and bounded work)
        i = before.rfind(b'"', 0, i)
        if i == -1:
            break
        if (i - len(before[:i].rstrip(b"\\"))) % 2 == 0:  # an even run of backslashes before it: unescaped
            return i + 1
    return -1


def _xml_start(before: bytes) -> int:
    """Where the XML attribute value or text node holding the token begins, or -1 if it cannot be told.

    Back to the last ``<`` (neither an attribute value nor a text node may hold one), then the tag is
    read: the token sits in its one open attribute value (which cannot hold its own quote), or in the
    text after it. CDATA, comments, processing instructions, a DTD's own entities: cannot be told.
    """
    lt = before.rfind(b"<")
    if lt == -1 or b"xml:base" in before:  # a base URL nearby: where a relative URL goes cannot be told
        return -1
    if before.rfind(b"<![CDATA[") > before.rfind(b"]]>"):  # inside CDATA, "<" is text
        return -1
    m = _XML_TAG.match(before, lt + 1)
    if m is None:
        return -1
    value = before[m.end() :]
    if m["q"] and m["q"][-1:] in value:
        return -1
    if b"&" in value and _XML_CUSTOM_ENTITY.search(value):  # a DTD's entity may expand to any URL
        return -1
    return m.end()


def _scan_start(before: bytes, kind: int) -> int:
    """The start of what a reader of ``kind`` could take as one value with the token at its end, or -1."""
    if kind == JSON:
        return _json_start(before)
    if kind == XML:
        return _xml_start(before)
    if kind == EVENTS:  # one event's data: lines are joined into one value
        lf, crlf = before.rfind(b"\n\n"), before.rfind(b"\r\n\r\n")
        return max(lf + 2 if lf != -1 else -1, crlf + 4 if crlf != -1 else -1)
    return before.rfind(b"\n") + 1 or -1  # not a bare CR: a reader splitting at LF keeps it (URLs drop it)


def key_may_go(before: bytes, *, at_start: bool, origin: Origin | None, kind: int = LINE) -> bool:
    """May the client's key replace a token that follows ``before`` (the bytes before it)?

    ``before`` holds up to ``WINDOW`` bytes; ``at_start``: it begins at the start of the
    text (a header value, a frame, the body's first bytes), which delimits like a quote.
    ``kind`` says how the text is read (``kind_of``): every absolute URL in the whole value the
    token ends (back to where that reader starts it, not only to the nearest delimiter, which
    may sit *inside* a quoted value: ``"https://attacker.example/ ?t=``) must be ours.
    """
    cut = last_delimiter(before)
    if cut == -1 and not (at_start and len(before) < WINDOW):
        return False  # no delimiter within the window: cannot tell, so foreign
    start = _scan_start(before, kind)
    if start == -1:
        if not (at_start and len(before) < WINDOW) or (kind == XML and b"<" in before):
            return False  # the value began beyond the window (or cannot be read): foreign
        start = 0
    value = before[start:]
    if kind in (LINE, EVENTS):  # SSE field names, not "data:" URLs
        value = value.removeprefix(b"data:").replace(b"\ndata:", b"\n")
    for stretch in _readings(value):
        if not _nested_ours(stretch, origin):
            return False
    if cut != -1 and before[cut : cut + 1] in _SOFT:
        i = cut
        while i > 0 and before[i - 1 : i] in _SOFT:
            i -= 1
        if i > 0 and before[i - 1 : i] in _JOINS:
            return False  # "https:\n//x", "/\t/x": a browser joins them into one absolute URL
    for stretch in _readings(before[cut + 1 :]):
        if not _nested_ours(stretch, origin):
            return False
        decoded_cut = max((m.end() for m in _CUT.finditer(stretch)), default=0)  # a decoded quote ends it too
        if not _url_is_ours(stretch[decoded_cut:], origin):
            return False
    return True
