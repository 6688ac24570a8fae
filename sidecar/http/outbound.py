"""The upstream request: its pooled session, its URL, and the headers it carries up."""

from __future__ import annotations

import ipaddress
import ssl
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict
from yarl import URL

from ..config import UpstreamConfig
from ..core.addresses import forwarded_for, proxied_origin
from ..core.errors import BadRequest
from ..core.relay import HOP_BY_HOP, as_sent
from .browser import upstream_cookie
from .listener import CLIENT_CLAIMS

CHUNK = 64 * 1024
MAX_HEADER_SIZE = 65536  # the same bound the proxy listener applies to clients


def make_session(upstream: UpstreamConfig) -> aiohttp.ClientSession:
    """One pooled, keep-alive session per upstream, owned by the app."""
    ssl_ctx: ssl.SSLContext | bool = True
    if not upstream.tls_verify:
        ssl_ctx = False
    elif upstream.tls_ca_file is not None:
        ssl_ctx = ssl.create_default_context(cafile=str(upstream.tls_ca_file))
    connector = aiohttp.TCPConnector(limit=0, ssl=ssl_ctx, keepalive_timeout=30, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(
            total=None, connect=upstream.connect_timeout, sock_connect=upstream.connect_timeout
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),  # only what the client sent
        read_bufsize=CHUNK,
        max_line_size=MAX_HEADER_SIZE,
        max_field_size=MAX_HEADER_SIZE,
    )


def strip_prefix_raw(upstream: UpstreamConfig, raw_path: str) -> str:
    """``raw_path`` (percent-encoded) less the upstream's ``path_prefix`` when it strips one.

    By segment, not by character count: the router matched the *decoded* path, and
    ``/%70lex/x`` is ``/plex/x`` decoded, so the prefix's segments go whatever their
    spelling. Segments that decode to something else (``/plex%2Fx`` decodes to ``/plex/x``
    too) are refused: the path the sidecar judged would not be the one forwarded.
    """
    if not upstream.strip_prefix or upstream.path_prefix == "/":
        return raw_path
    depth = upstream.path_prefix.count("/")
    parts = raw_path.split("/", depth + 1)
    head = "/".join(parts[: depth + 1])
    if head != upstream.path_prefix and unquote(head) != upstream.path_prefix:
        # The raw segments are not quoted back: they may hold the client's key (``/plex%2F<key>``).
        raise BadRequest(f"the path must begin with the segment(s) {upstream.path_prefix!r}, without encoded '/'")
    return "/" + parts[depth + 1] if len(parts) > depth + 1 else "/"


def upstream_url(upstream: UpstreamConfig, raw_path: str, query: MultiDict[str]) -> URL:
    """The upstream URL for a request path (``raw_path`` still percent-encoded)."""
    url = URL(upstream.url + strip_prefix_raw(upstream, raw_path), encoded=True)
    return url.with_query(query) if query else url


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Hop-by-hop names: the fixed list plus every header the ``Connection`` header names."""
    listed = headers.getall("Connection", ())
    if not listed:
        return HOP_BY_HOP
    drop = set(HOP_BY_HOP)
    for value in listed:
        drop.update(v.strip().lower() for v in value.split(",") if v.strip())
    return frozenset(drop)


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def public_origin(request: web.Request, trusted_proxies: Networks = ()) -> tuple[str, str]:
    """The scheme and host the client used: the listener's own, or what a trusted proxy in front says."""
    return proxied_origin(request, trusted_proxies) or (request.scheme, request.host)


def forward_headers(
    request: web.Request, headers: CIMultiDict[str], upstream: UpstreamConfig, trusted_proxies: Networks = ()
) -> CIMultiDict[str]:
    """Drop hop-by-hop headers (and any the client listed in Connection), set Host and X-Forwarded-*.

    X-Forwarded-Proto/Host describe the client's side: behind a trusted proxy (TLS
    terminated at an ingress) they are that proxy's, otherwise this listener's.
    X-Forwarded-For keeps only hops trusted proxies vouch for; what only the sidecar may
    say (X-Real-IP, Forwarded, method overrides) is never passed on (``listener.CLIENT_CLAIMS``).
    """
    drop = connection_tokens(request.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        # Expect: the sidecar already answered the client's 100-continue; forwarded, it would
        # make the upstream request wait for a 100 that some servers never send.
        if lname in drop or lname in CLIENT_CLAIMS:
            continue
        if lname == "cookie" and not (value := upstream_cookie(value)):
            continue  # the sidecar's own cookies (console session, consent CSRF) stay here (browser.py)
        out.add(name, as_sent(value))  # both upstream clients send the same bytes
    out["Host"] = upstream.host
    out["X-Forwarded-For"] = forwarded_for(request.remote or "", headers.getall("X-Forwarded-For", ()), trusted_proxies)
    out["X-Forwarded-Proto"], out["X-Forwarded-Host"] = public_origin(request, trusted_proxies)
    return out
