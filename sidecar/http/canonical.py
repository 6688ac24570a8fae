"""The request every stage sees: one form, so what is authorised is what is forwarded.

DESIGN invariant 2. ``canonical`` runs first in the pipeline and returns the request
itself (the usual case: nothing to do, a few string tests) or a clone in which:

- **Runs of ``/`` in the path are collapsed.** ``//video/…`` and ``/video//:/…`` become
  ``/video/:/…`` for routing, authorisation, transcode-session ownership, the cache key
  *and* forwarding alike. (Permissions already judged the collapsed path; the upstream got
  the raw one, which Plex may route differently.)
- **Percent-encoded ``/`` (``%2F``) stays as sent**, as the upstream may give it meaning;
  every check judges the *decoded* path with runs of ``/`` and ``\\`` collapsed (what a
  lenient upstream would serve): ``permissions.normalize_path`` and
  ``transcode.TranscodeSessions`` both do. Where it would split a routing prefix
  (``/plex%2Fx``), ``outbound.upstream_url`` refuses the request (400).
- **Headers named by ``Connection`` are removed** (RFC 9110 §7.6.1: they are meant for
  this hop, the sidecar), before the credential, cache and forwarding stages, and the
  ``Connection`` header is left naming only the standard hop-by-hop tokens. So the cache
  key is built from exactly the headers forwarded (``Connection: close, Accept`` can no
  longer store an XML answer under the JSON variant), and a client cannot make the
  forwarder drop a header the sidecar sets (``Connection: X-Plex-Token`` used to remove
  the injected real token). Credential headers, ``Host``, ``Content-Length`` and the
  websocket handshake headers are kept: the sidecar consumes or replaces them itself.
- **Header names with ``_`` are dropped** (nginx's ``underscores_in_headers off``). CGI-style
  upstreams (WSGI, Rack, PHP) read ``X_Forwarded_For`` as ``X-Forwarded-For``: forwarded, the
  client's spelling would shadow or join a header the sidecar sets (``X-Forwarded-For``, an
  injected ``X-Api-Key``) or strips (``X-Real-IP``, method overrides, Puma CVE-2024-45614).
  An upstream's configured ``headers`` are added after this, whatever their spelling.
- **An absolute-form target becomes origin-form, its authority the ``Host``** (RFC 9112
  §3.2.2: the target's authority *is* the host; aiohttp's ``request.host`` says so). The
  upstream is told that authority as ``X-Forwarded-Host``; the cache and the repeat-hit memo
  keyed the answer by the ``Host`` header instead, so ``GET http://attacker.example/links``
  with ``Host: plex.test`` stored the attacker's links for every ``plex.test`` client.
- **A ``Host`` that is not ``uri-host [":" port]`` is refused** (400, RFC 9112 §3.2): it went up
  as ``X-Forwarded-Host`` (``user:pw@evil.example``, ``h/../x``, ``a b``) and was the origin the
  scrubber writes the client's key back under. Valid values are remembered, so the usual
  request costs one set lookup.
- **A transfer coding other than ``chunked`` alone is refused** (400, connection closed): the
  parser reads ``gzip, chunked`` as chunked and the body went up re-chunked without the
  ``gzip`` it declared: dropped, not undone. An HTTP/1.0 request with ``Transfer-Encoding`` is
  faulty framing (RFC 9112 §6.1) and is refused the same way.

With ``strip_prefix``, ``sidecar.http.outbound.upstream_url`` strips the prefix by path segment,
so a percent-encoded prefix (``/%70lex/…``) loses exactly the segment the router matched.

Requests that needed a clone skip the repeat-hit memo (``pipeline.HitMemo``), which is keyed
by the request as sent.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import HttpVersion11, web
from multidict import CIMultiDict
from yarl import URL

from ..core.errors import BadRequest
from .forwarder import HOP_BY_HOP
from .listener import GuardedHandler

__all__ = ["canonical", "collapse_slashes"]

_SLASHES = re.compile(r"/{2,}")
# Connection tokens that name no end-to-end header: left in place.
_STANDARD = HOP_BY_HOP | {"close", "keep-alive", "upgrade"}
# RFC 3986 uri-host (an IP literal, or a reg-name: IPv4 addresses and DNS names are reg-names too)
# and an optional port.
_HOST = re.compile(r"(?:\[[0-9A-Za-z:.%~_-]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")
_GOOD_HOSTS: set[str] = set()  # Host values already found valid (a few per deployment)
_COMMON = frozenset({"keep-alive", "close", "upgrade", "keep-alive, upgrade", "upgrade, keep-alive"})
# Headers the sidecar itself consumes (credentials, the websocket handshake), replaces (Host)
# or frames the body by (Content-Length): a Connection token naming them must not hide them.
_KEPT = frozenset({
    "host", "content-length", "authorization", "x-api-key", "x-plex-token",
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
})  # fmt: skip


def collapse_slashes(raw_path: str) -> str:
    return _SLASHES.sub("/", raw_path) if "//" in raw_path else raw_path


def canonical(request: web.Request) -> web.Request:
    """``request`` itself when already canonical, else a canonical clone; BadRequest if it cannot be one."""
    host = request.headers.get("Host")
    if host is not None and host not in _GOOD_HOSTS:
        _check_host(host)
    coding = request.headers.get("Transfer-Encoding")
    if coding is not None and (coding.lower() != "chunked" or request.version != HttpVersion11):
        _check_coding(request, coding)
    url = request.rel_url
    raw = url.raw_path
    new_url: URL | None = None
    if "//" in raw:
        new_url = URL.build(path=collapse_slashes(raw), query_string=url.raw_query_string, encoded=True)
    new_headers = _without_connection_named(request)
    if request.raw_path[:1] != "/":  # absolute-form (``pipeline`` refused every other odd target)
        new_url = new_url or URL.build(path=raw, query_string=url.raw_query_string, encoded=True)
        new_headers = CIMultiDict(new_headers or request.headers)
        new_headers["Host"] = request.url.host_port_subcomponent or ""
    if "_" in "".join(request.headers):  # rare; the names joined in C: quicker than a scan in Python
        new_headers = CIMultiDict((n, v) for n, v in (new_headers or request.headers).items() if "_" not in n)
    if new_url is None and new_headers is None:
        return request
    changes: dict[str, Any] = {}
    if new_url is not None:
        changes["rel_url"] = new_url
    if new_headers is not None:
        changes["headers"] = new_headers
    try:
        clone = request.clone(**changes)
    except UnicodeEncodeError:  # a header value that is not UTF-8 cannot be re-encoded by the clone
        raise BadRequest("request headers are not valid UTF-8") from None
    return clone


def _check_host(host: str) -> None:
    """BadRequest unless ``host`` is a host name or address with an optional port; remembered if it is."""
    if _HOST.fullmatch(host) is None:
        raise BadRequest("the Host header must be a host name or address, with an optional port")
    if len(host) > 262:  # over a DNS name's 253 and a port: valid, but not worth remembering (memory)
        return
    if len(_GOOD_HOSTS) >= 256:  # clients that make up names cannot grow it without bound
        _GOOD_HOSTS.clear()
    _GOOD_HOSTS.add(host)


def _check_coding(request: web.Request, coding: str) -> None:
    """BadRequest (and the connection closed after it) unless the body is exactly ``chunked`` on HTTP/1.1."""
    codings = [c.strip().lower() for c in coding.split(",") if c.strip()]
    if codings == ["chunked"] and request.version == HttpVersion11:
        return  # ``chunked `` or ``,chunked``: spelled oddly, read the same way by every parser
    protocol = request.protocol
    if isinstance(protocol, GuardedHandler):
        protocol.close_after_answer()
    raise BadRequest("the only transfer coding accepted is chunked, on HTTP/1.1")


def _without_connection_named(request: web.Request) -> CIMultiDict[str] | None:
    """The headers minus those ``Connection`` names, or None when it names none."""
    listed = request.headers.getall("Connection", ())
    if not listed or (len(listed) == 1 and listed[0].lower() in _COMMON):
        return None  # the usual case, decided without splitting anything
    tokens = [t.strip().lower() for value in listed for t in value.split(",") if t.strip()]
    if all(t in _STANDARD for t in tokens):
        return None
    removed = {t for t in tokens if t not in _STANDARD and t not in _KEPT}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lname = name.lower()
        if lname not in removed and lname != "connection":
            out.add(name, value)
    standard = [t for t in dict.fromkeys(tokens) if t in _STANDARD]
    if standard:
        out["Connection"] = ", ".join(standard)
    return out
