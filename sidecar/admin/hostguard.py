"""DNS rebinding: an admin listener bound to loopback answers only to loopback names.

A web page at ``evil.example`` can re-point its own name at 127.0.0.1; the browser then sends
that page's requests to the loopback admin listener as the page's *own* origin (``Origin`` and
``Host`` agree), so neither the same-origin policy nor the console's origin check stands in the
way: the page reads ``/metrics`` (key ids, names, owners, counts) and the unauthenticated pages,
and guesses at sign-in until the operator's own address is throttled. The browser cannot lie
about ``Host``, though: on a listener bound to loopback, a ``Host`` that is not a loopback name
(``localhost``, ``*.localhost``, a loopback address) is refused before anything runs, as the MCP
SDK's own guard does. A listener bound elsewhere is left alone (its names are the operator's),
and so is a request from a trusted proxy (the ingress in front judges its own ``Host``) or over
a unix socket (a worker's admin app, scraped by the supervisor as ``http://worker/…``).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from aiohttp import web

from ..core.errors import BadRequest

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware

    from ..http.outbound import Networks

__all__ = ["host_guard", "loopback_name"]

REFUSED = (
    "this admin listener is bound to loopback and answers only to loopback names (localhost, 127.0.0.1, [::1]): "
    "a request naming another host is refused (DNS rebinding)"
)


def _host_part(value: str) -> str:
    """``[::1]:9188`` → ``::1``; ``localhost:9188`` → ``localhost``; lower case, no trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    name, sep, port = value.rpartition(":")
    return (name if sep and port.isdigit() else value).rstrip(".")


def loopback_name(host: str) -> bool:
    """Is this ``Host`` (or listen address) a name that can only mean this machine?"""
    name = _host_part(host)
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: browsers resolve these to loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_guard(listen: str, trusted: Networks) -> Middleware | None:
    """The middleware for an admin listener bound to loopback; None for one bound elsewhere."""
    if not loopback_name(listen):
        return None

    def browser_may_be(request: web.Request) -> bool:
        """Over TCP from a peer that is not a trusted proxy (a unix socket, as a worker's admin app is
        scraped on, is no browser's; an ingress in front judges its own ``Host``)."""
        try:
            peer = ipaddress.ip_address(request.remote or "")
        except ValueError:
            return False
        return not any(peer in net for net in trusted)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is None or loopback_name(host) or not browser_may_be(request):
            return await handler(request)
        return BadRequest(REFUSED).response()

    return guard
