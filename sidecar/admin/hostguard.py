"""DNS rebinding: an admin listener bound to loopback answers only to loopback names and ``admin.allowed_hosts``.

A web page at ``evil.example`` can re-point its own name at 127.0.0.1; the browser then sends
that page's requests to the loopback admin listener as the page's *own* origin (``Origin`` and
``Host`` agree), so neither the same-origin policy nor the console's origin check stands in the
way: the page reads ``/metrics`` (key ids, names, owners, counts) and the unauthenticated pages,
and guesses at sign-in until the operator's own address is throttled. The browser cannot lie
about ``Host``, though: on a listener bound to loopback, a ``Host`` that is not a loopback name
(``localhost``, ``*.localhost``, a loopback address) nor listed in ``admin.allowed_hosts`` is
refused before anything runs, as the MCP SDK's own guard does (its ``allowed_hosts``; Django's
``ALLOWED_HOSTS``). A listener bound elsewhere is left alone (its names are the operator's) unless
``allowed_hosts`` is set, which then holds there too.

The TCP peer earns no exemption: a proxy in ``server.trusted_proxies`` is often a local nginx at
127.0.0.1, which is exactly where the rebound browser connects from too, and any header a proxy
would add (``X-Forwarded-*``) the same-origin page can send itself. A proxy that forwards the
public ``Host`` needs that name in ``allowed_hosts``; nginx's default (``$proxy_host``, the
upstream's loopback address) needs nothing. A request over a unix socket (a worker's admin app,
scraped by the supervisor as ``http://worker/…``) has no IP peer and is no browser's: it passes.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from aiohttp import web

from ..config.hosts import host_and_port
from ..core.errors import BadRequest

if TYPE_CHECKING:
    from collections.abc import Iterable

    from aiohttp.typedefs import Handler, Middleware

__all__ = ["host_guard", "loopback_name"]

REFUSED = (
    "this admin listener answers only to loopback names (localhost, 127.0.0.1, [::1]) and admin.allowed_hosts: "
    "a request naming another host is refused (DNS rebinding)"
)


def _loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: browsers resolve these to loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def loopback_name(host: str) -> bool:
    """Is this ``Host`` a name that can only mean this machine?"""
    return _loopback(host_and_port(host)[0])


def _listen_name(listen: str) -> str:
    """``127.0.0.1:9188``, ``[::1]:9188`` and ``::1:9188`` (always host:port) → the host, normalized."""
    return host_and_port(listen.rpartition(":")[0].strip("[]"))[0]


def host_guard(listen: str, allowed_hosts: Iterable[str] = ()) -> Middleware | None:
    """The middleware for an admin listener bound to loopback (or any, once ``allowed_hosts`` is set);
    None when there is nothing to guard. ``allowed_hosts`` are normalized entries (config/hosts.py)."""
    allowed = frozenset(host_and_port(h) for h in allowed_hosts)
    own = _listen_name(listen)
    if not _loopback(own) and not allowed:
        return None
    if own:
        allowed |= {(own, "")}  # the address it is bound to (10.0.0.5:9188) names it too: no rebound page's name

    def named_right(host: str) -> bool:
        name, port = host_and_port(host)
        return _loopback(name) or (name, "") in allowed or (bool(port) and (name, port) in allowed)

    def over_ip(request: web.Request) -> bool:
        """A unix socket's peer is no IP address (aiohttp gives ``""`` or None): no browser is on it."""
        try:
            ipaddress.ip_address(request.remote or "")
        except ValueError:
            return False
        return True

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is None or named_right(host) or not over_ip(request):
            return await handler(request)
        return BadRequest(REFUSED).response()

    return guard
