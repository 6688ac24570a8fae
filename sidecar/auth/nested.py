"""Nested URLs Plex acts on for the client: authorised as the key's own GET (DESIGN invariants 2, 3).

Plex fetches the ``url=`` of ``/photo/:/transcode`` and transcodes the ``path=`` of
``/…/:/transcode/…`` on the client's behalf. Where that URL is on Plex itself, Plex is the
key's deputy, so the key must be allowed to GET its path, or the request is refused:

- a relative URL (``/library/metadata/1/thumb/2``): always on Plex itself;
- an absolute one whose host is Plex's own address or may be: loopback, a private,
  link-local or unspecified address in any spelling a resolver accepts (``127.1``,
  ``2130706433``, ``[::ffff:127.0.0.1]``), ``localhost``, a LAN name (``.local``, ``.lan``, …), the
  upstream's own host; or a scheme other than http(s) (``file:``);
- and the same again inside it (``url=/photo/:/transcode?url=…``), up to ``MAX_DEPTH``;
- the items a play queue or playlist is made of (``uri=server://…/library/metadata/1``,
  ``library://…/item/…``) and the item a play queue starts at (``key=``).

An absolute http(s) URL to a public name is the internet (artwork from a metadata agent):
Plex fetches it without a token (``credentials.strip_credential`` never puts one there),
and it is let through. A name that resolves to Plex's own address (a single-label LAN name such
as ``http://nas:32400/``, or ``127.0.0.1.nip.io``) cannot be told without DNS: it is let
through too, like any other name (docs/keys.md).
Pure: no I/O; runs only when the query has such a parameter.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import parse_qsl, unquote, urlsplit

from multidict import MultiDict

from .models import Permissions
from .permissions import allowed

__all__ = ["MAX_DEPTH", "lenient_query", "nested_refusal", "plex_itself"]

_PRINTABLE = re.compile(r"[!-~]+")  # a parameter name as sent, usually
_UNPRINTABLE = re.compile(r"[^!-~]")  # dropped from a name: ``url%00`` or `` url`` is ``url`` (as in ``transcode``)
MAX_DEPTH = 4  # nested URLs inside nested URLs: deeper than any client sends is refused
_LAN_SUFFIXES = (".localhost", ".local", ".lan", ".home", ".internal", ".intranet", ".home.arpa", ".localdomain")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone id is no part of the address
    except ValueError:
        try:  # the forms inet_aton (and so a C resolver) reads: 127.1, 0x7f000001, 2130706433, 0177.0.0.1
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if int(ip) >> 32 == 0:  # IPv4-compatible ::a.b.c.d
            return ipaddress.IPv4Address(int(ip))
    return ip


def plex_itself(scheme: str, netloc: str, host: str | None, own_host: str) -> bool:
    """May an absolute URL with this scheme and host reach the upstream itself (or the LAN behind it)?

    A user part (``a@``) or a backslash in the authority is read differently by other URL parsers
    (WHATWG's takes ``\\`` for ``/``: ``http://127.0.0.1\\@example.com/``), so it counts as Plex too.
    """
    if scheme and scheme.lower() not in ("http", "https"):  # no scheme: protocol-relative, http(s)
        return True
    if "@" in netloc or "\\" in netloc:
        return True
    h = unquote(host or "").rstrip(".").lower()
    if not h or h == "localhost" or h == own_host or h.endswith(_LAN_SUFFIXES):
        return True
    ip = _ip(h)
    return ip is not None and not ip.is_global


def _pairs(query: str) -> list[tuple[str, str]]:
    """A query's parameters, split at `&` and at `;`."""
    return parse_qsl(query.replace(";", "&"), keep_blank_values=True)


def lenient_query(query: Iterable[tuple[str, str]], raw_query: str) -> MultiDict[str]:
    """``query`` (the `&` reading) plus what a server that also splits at `;` reads in ``raw_query``:
    ``a=1;session=S`` names session S for it, and ``session=T;x=1`` names both ``T;x=1`` and ``T``
    (a parameter read two ways is then repeated, and refused as such)."""
    out = MultiDict(query)
    seen = set(out.items())
    for pair in _pairs(raw_query):
        if pair not in seen:
            out.add(*pair)
            seen.add(pair)
    return out


@lru_cache(maxsize=64)
def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").rstrip(".").lower()


def _params(route: str) -> tuple[str, ...]:
    """The parameters of ``route`` that name a URL Plex acts on."""
    r = route.lower()
    if "/:/transcode" in r:
        return ("url", "path")
    if r.startswith("/playqueues"):
        return ("url", "uri", "key")  # ``key``: the item to start at
    if r.startswith("/playlists"):
        return ("url", "uri")
    return ("url",)


def _library_uri(value: str) -> str | None:
    """The path on the server a play queue or playlist ``uri=`` names: ``server://<id>/<provider><path>``,
    ``library://<uuid>/item/<path>`` or ``library://<uuid>/directory/<path>`` (encoded or not); None if it
    names no such path (a scheme Plex reads from elsewhere)."""
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return "/"  # refused unless the key may use every path
    if parts.scheme.lower() not in ("server", "library"):
        return None
    rest = parts.path.lstrip("/").split("/", 1)  # the provider, or item/directory; then the path
    return "/" + unquote(rest[1] if len(rest) > 1 else "").lstrip("/")


def nested_refusal(
    perms: Permissions,
    upstream_id: str,
    kind: str,
    route: str,
    query: Iterable[tuple[str, str]],
    upstream_url: str,
    key: str = "",
    depth: int = 0,
    raw_query: str = "",
) -> str | None:
    """None when every URL Plex would act on for this request (``route``, ``query``'s pairs) is one
    the key may GET; else why not. ``upstream_url``: the upstream's own URL; ``key``: the
    client's key (a value holding it is never forwarded: ``credentials.strip_credential``)."""
    names = _params(route)
    if ";" in raw_query:  # a server that also splits on `;` reads `a=1;url=/x` as two parameters
        query = [*query, *_pairs(raw_query)]
    for name, value in query:
        lname = name.lower()
        if _PRINTABLE.fullmatch(lname) is None:  # as a server that trims names or stops at a NUL reads it
            lname = _UNPRINTABLE.sub("", lname)
        if lname not in names:
            continue
        if depth >= MAX_DEPTH:
            return "nested url: nested too deep"
        if lname == "uri":
            item = _library_uri(value)
            if item is not None and (reason := allowed(perms, upstream_id, kind, "GET", item.split("?", 1)[0])):
                return f"nested uri: {reason}"
            continue
        try:
            parts = urlsplit(value.strip())
            host = parts.hostname
        except ValueError:  # e.g. a bad [IPv6] host: refused, not guessed at (unless it is dropped anyway)
            if key and (key in value or key in unquote(value)):
                continue
            return "nested url: not a URL"
        if (parts.scheme or parts.netloc) and not plex_itself(parts.scheme, parts.netloc, host, _host(upstream_url)):
            continue  # the internet: fetched by Plex without any token
        nested = "/" + unquote(parts.path).lstrip("/")
        if reason := allowed(perms, upstream_id, kind, "GET", nested):
            return f"nested url: {reason}"
        if parts.query:
            inner = _pairs(parts.query)
            if reason := nested_refusal(perms, upstream_id, kind, nested, inner, upstream_url, key, depth + 1):
                return reason
    return None
