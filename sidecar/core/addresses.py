"""Where a request came from and where the sidecar is reached: pure functions over a request.

``forwarded_for`` builds the X-Forwarded-For chain (only trusted proxies' claims kept);
``proxied_origin`` is the scheme and host a trusted proxy says the client used;
``public_base`` is the origin the sidecar hands out in URLs; ``client_ip`` is who is asking (the
failure throttles' unit). Shared by the listener, the forwarder, the MCP gateway, the admin API and
the console, so it depends on none of them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp import web

__all__ = ["browser_origin", "client_ip", "foreign_page", "forwarded_for", "proxied_origin", "public_base"]

_Nets = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def _trusted(addr: str, trusted: _Nets) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def forwarded_for(peer: str, claimed: Iterable[str], trusted: _Nets) -> str:
    """``X-Forwarded-For`` for the upstream: the hops trusted proxies vouch for, then the peer.

    From an untrusted peer nothing the client wrote is kept. Behind trusted proxies the
    chain is read from the right: each trusted hop vouches for the one before it, up to and
    including the first untrusted address (the client); anything further left is the
    client's own word and is dropped, as is a hop that is not an IP address.
    """
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for value in claimed for h in value.split(",")]
    kept: list[str] = []
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        kept.append(hop)
        if not _trusted(hop, trusted):
            break
    kept.reverse()
    kept.append(peer)
    return ", ".join(kept)


def public_base(request: web.BaseRequest, public_url: str | None, trusted: _Nets) -> str:
    """The origin clients reach the sidecar at, for URLs the sidecar hands out (RFC 9728, challenges).

    ``server.public_url`` when configured; else what a trusted proxy in front says
    (``X-Forwarded-Proto``/``-Host``, documented in docs/mcp.md); else the address this
    listener accepted the connection on. Never the client's own ``Host``: reflected, it
    would let anyone point a victim's client at another authority.
    """
    if public_url:
        return public_url
    proto, host = proxied_origin(request, trusted) or (request.scheme, "")
    return f"{proto}://{host or _own_address(request)}"


def proxied_origin(request: web.BaseRequest, trusted: _Nets) -> tuple[str, str] | None:
    """``X-Forwarded-Proto``/``-Host`` (first values; the request's own where absent) when the
    peer is a trusted proxy (TLS terminated at an ingress), else None: a client's own claim."""
    if not trusted or not _trusted(request.remote or "", trusted):
        return None
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() or request.scheme
    host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or request.host
    return proto, host


def browser_origin(request: web.BaseRequest, trusted: _Nets) -> tuple[str, str]:
    """The scheme and host the browser used: a trusted proxy's word (TLS ended at an ingress), else
    the request's own. The console's cookie is ``Secure`` and its forms same-origin by this."""
    return proxied_origin(request, trusted) or (request.scheme, request.host)


def foreign_page(request: web.BaseRequest, trusted: _Nets) -> bool:
    """A browser's own word that a page of another origin sent this request (``Sec-Fetch-Site``, else
    ``Origin`` compared with the host the browser used). Scripts and curl send neither: False.
    The proxy listener on the same host is another origin (the same *site*: cookies go with it)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # "http://[": not an origin any browser sends
        return True
    return origin == "null" or netloc.lower() != browser_origin(request, trusted)[1].lower()


def client_ip(request: web.BaseRequest, trusted: _Nets) -> str:
    """The peer address, or the first untrusted hop of X-Forwarded-For behind trusted proxies.

    Only an address is ever an address: a hop that is not one (``garbage-1``, ``1.2.3.4:80``)
    ends the walk at the last trusted hop, so rotating junk cannot mint new identities for
    the failure throttle. Addresses come out canonical (``0::1`` is ``::1``).
    """
    peer = request.remote or ""
    if not trusted:
        return peer
    hops = [h.strip() for h in reversed(request.headers.get("X-Forwarded-For", "").split(","))]
    client = peer
    for hop in [peer, *hops]:
        try:
            addr = ipaddress.ip_address(hop)
        except ValueError:
            return client  # not an address (or an empty hop): the last trusted hop is the client
        client = str(addr)
        if not any(addr in net for net in trusted):
            return client
    return client


def _own_address(request: web.BaseRequest) -> str:
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not sock or not isinstance(sock, tuple):
        return "localhost"
    host, port = str(sock[0]), int(sock[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
