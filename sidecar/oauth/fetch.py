"""Fetching a Client ID Metadata Document without becoming an SSRF proxy.

The client id is an https URL chosen by whoever starts an authorization, so the fetch
is an outbound request an attacker controls. Guard rails:

- https only; no credentials in the URL; no redirects followed.
- Every address the name resolves to must be globally routable (no private, loopback,
  link-local, shared, multicast or reserved range; IPv4 carried in IPv6 (mapped, NAT64, SIIT,
  6to4) judged as that IPv4 address; IPv4-compatible, local-use NAT64 and site-local refused) —
  unless the host is on ``oauth.cimd.allowed_hosts``. The check runs inside aiohttp's
  resolver, on the very addresses the connection then uses, so a name that resolves to
  a public address for the check and a private one for the connect (DNS rebinding)
  gains nothing. IP literals, which aiohttp does not resolve, are checked up front.
- A total time limit, a byte limit on the body, no proxy from the environment.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

__all__ = ["FetchRefused", "GuardedResolver", "fetch_document", "public_address"]


class FetchRefused(Exception):
    """The document may not or could not be fetched; the message is safe to show the client."""


def public_address(ip: str) -> bool:
    """Is ``ip`` globally routable (and so not a way into the sidecar's own networks)?"""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if any(addr in net for net in _REFUSED_V6):
            return False
        addr = _embedded_ipv4(addr) or addr
    return addr.is_global and not addr.is_multicast


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: reaches the IPv4 address it carries
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 6145 IPv4-translated
_REFUSED_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/96",  # IPv4-compatible (deprecated), ::1 and :: too
    "64:ff9b:1::/48",  # RFC 8215 local-use NAT64: the embedding is the network's choice
    "fec0::/10",  # site-local (deprecated, still routed in places)
))  # fmt: skip


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches (mapped, NAT64, SIIT, 6to4); None for a plain one."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64 or addr in _SIIT:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name that resolves to any non-public address."""

    def __init__(self, allowed_hosts: frozenset[str]) -> None:
        self._inner = DefaultResolver()
        self._allowed = allowed_hosts
        self.refused = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self._inner.resolve(host, port, family)
        if host.lower() not in self._allowed and not all(public_address(i["host"]) for i in infos):
            self.refused = True
            raise OSError(f"{host} resolves to a private, loopback or link-local address")
        return infos

    async def close(self) -> None:
        await self._inner.close()


def _check_url(url: str, allowed: frozenset[str]) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise FetchRefused("the client id is not a URL") from None
    if parts.scheme != "https" or not parts.hostname or parts.username is not None or parts.password is not None:
        raise FetchRefused("a client metadata document's URL must be https, without credentials")
    if not url.isascii() or "\\" in parts.netloc or "%" in parts.netloc:  # the consent page shows this id:
        # its host must be the one fetched and browsers show, never a look-alike (IDN: punycode)
        raise FetchRefused("a client metadata document's URL must be plain ASCII (punycode for a name)")
    if parts.fragment or parts.path in ("", "/"):
        raise FetchRefused("a client metadata document's URL needs a path and no fragment")
    host = parts.hostname.lower()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return  # a name: the resolver judges its addresses
    if host not in allowed and not public_address(host):
        raise FetchRefused("the client metadata document's address is private, loopback or link-local")


async def fetch_document(
    url: str, *, allowed_hosts: frozenset[str], time_limit: float, max_bytes: int, ca_file: str | None
) -> dict[str, Any]:
    """The JSON object at ``url``, or ``FetchRefused``."""
    _check_url(url, allowed_hosts)
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    resolver = GuardedResolver(allowed_hosts)
    connector = aiohttp.TCPConnector(resolver=resolver, ssl=ctx, use_dns_cache=False)
    client_timeout = aiohttp.ClientTimeout(total=time_limit)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=client_timeout, trust_env=False) as session,
            session.get(url, allow_redirects=False, headers={"Accept": "application/json"}) as resp,
        ):
            if resp.status != 200:
                raise FetchRefused(f"the client metadata document answered {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise FetchRefused("the client metadata document is too large")
            body = b""
            while len(body) <= max_bytes:  # read(n) returns what has arrived so far, not the whole document
                chunk = await resp.content.read(max_bytes + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            if len(body) > max_bytes:
                raise FetchRefused("the client metadata document is too large")
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        if resolver.refused:
            raise FetchRefused("the client metadata document's host resolves to a private address") from None
        raise FetchRefused(f"the client metadata document could not be fetched: {type(e).__name__}") from None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deeper than json can
        raise FetchRefused("the client metadata document is not JSON") from None
    if not isinstance(doc, dict):
        raise FetchRefused("the client metadata document is not a JSON object")
    return doc
