"""``oauth:`` — Sidecar as the OAuth 2.1 authorization server of its MCP upstreams (docs/oauth.md).

One top-level section rather than one per upstream: there is one issuer (``public_url``),
one set of clients and one set of endpoints (``/oauth/authorize``, ``/oauth/token``, …)
for the whole sidecar; ``upstreams`` says which ``kind: mcp`` upstreams accept its tokens.
Pydantic models (``Section``) validated by ``validate_section``; ``check_oauth`` adds
the checks that need the rest of the file (upstream ids, store kind).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from .models import PositiveDuration, Section, Size
from .units import parse_public_url

__all__ = ["CimdConfig", "OAuthClientConfig", "OAuthConfig", "check_oauth", "loopback_host"]

# The host (and port) of a redirect URI: what the consent page shows must be what browsers go to, so
# no homoglyph (IDN: punycode only), no "\\" or "%" that browsers rewrite in a host.
_NETLOC = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(:[0-9]{1,5})?")
DEFAULT_ACCESS_TOKEN_TTL = 3600.0
DEFAULT_REFRESH_TOKEN_TTL = 30 * 86400.0
DEFAULT_CODE_TTL = 60.0
DEFAULT_MAX_GRANT_LIFETIME = 90 * 86400.0


def loopback_host(host: str | None) -> bool:
    """``localhost``, ``127.x`` or ``::1``: where plain http is acceptable (OAuth 2.1 §1.5, RFC 8252 §7.3)."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:  # an address, not a name that merely starts like one ("127.0.0.1.evil.example")
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_redirect_uri(uri: str) -> str | None:
    """Why ``uri`` may not be a redirect URI, or None: https, or http on loopback; no fragment, no userinfo."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return f"{uri!r} is not a URL"
    if not uri.isprintable():  # urlsplit drops tabs and newlines; Postgres cannot store NUL
        return f"{uri!r}: a redirect URI must not contain control characters"
    if parts.fragment or "#" in uri:
        return f"{uri!r}: a redirect URI must not have a fragment"
    if "@" in parts.netloc:  # "https://claude.ai@evil.example/": the consent page must show the real host
        return f"{uri!r}: a redirect URI must not carry user information"
    if not uri.isascii() or not _NETLOC.fullmatch(parts.netloc):  # RFC 3986: a URI is ASCII
        return f"{uri!r}: a redirect URI's host must be plain ASCII letters, digits, dots and dashes (punycode)"
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and loopback_host(parts.hostname):
        return None
    return f"{uri!r}: a redirect URI must be https, or http on a loopback address"


class OAuthClientConfig(Section):
    """A pre-registered client (for connectors that take a client id and secret)."""

    client_id: str = Field(min_length=1, max_length=200)
    # ``${ENV_VAR}``: secrets never live in the file. None: a public client (PKCE only).
    client_secret: str | None = Field(default=None, repr=False)
    client_name: str = ""
    redirect_uris: tuple[str, ...] = Field(min_length=1)

    @field_validator("redirect_uris")
    @classmethod
    def _redirects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for uri in value:
            problem = check_redirect_uri(uri)
            if problem:
                raise ValueError(problem)
        return value


class CimdConfig(Section):
    """Client ID Metadata Documents: the client id is an https URL the sidecar fetches."""

    enabled: bool = True
    # Hosts (names or IP addresses) that may be fetched even when they are private, loopback or
    # link-local. Everything else must resolve to public addresses only (SSRF guard).
    allowed_hosts: tuple[str, ...] = ()
    timeout: PositiveDuration = 5.0
    max_bytes: Size = 64 * 1024
    cache_ttl: PositiveDuration = 3600.0
    tls_ca_file: str | None = None  # a CA bundle for the fetch (tests, private CAs); default: the system's


class OAuthConfig(Section):
    enabled: bool = False
    # The issuer: every URL a client sees is built from it, never from Host. Default server.public_url.
    public_url: str | None = None
    upstreams: tuple[str, ...] = ("*",)  # MCP upstream ids whose resource accepts these tokens ("*": all)
    access_token_ttl: PositiveDuration = DEFAULT_ACCESS_TOKEN_TTL
    refresh_token_ttl: PositiveDuration = DEFAULT_REFRESH_TOKEN_TTL
    code_ttl: PositiveDuration = DEFAULT_CODE_TTL
    max_grant_lifetime: PositiveDuration = DEFAULT_MAX_GRANT_LIFETIME
    max_grants_per_key: int = Field(default=20, ge=1)
    allow_dynamic_registration: bool = True
    clients: tuple[OAuthClientConfig, ...] = ()
    cimd: CimdConfig = CimdConfig()
    # The console's origin as the person's browser reaches it (the admin listener, e.g. https://admin.example:9090).
    # When set, the consent page offers "Approve from the console" (<console_url>/oauth/consent/<request>).
    console_url: str | None = None

    @field_validator("console_url")
    @classmethod
    def _console_url(cls, value: str | None) -> str | None:
        return None if value is None else parse_public_url(value)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = parse_public_url(value)
        parts = urlsplit(url)
        if parts.scheme != "https" and not loopback_host(parts.hostname):
            raise ValueError(f"{value!r}: the issuer must be https (http only on a loopback address)")
        return url

    def issuer(self, server_public_url: str | None) -> str:
        url = self.public_url or server_public_url
        assert url is not None, "check_oauth refuses an enabled oauth without a public_url"
        return url


def check_oauth(
    oauth: OAuthConfig,
    mcp_ids: Sequence[str],
    server_public_url: str | None,
    store_kind: str,
    problems: list[str],
) -> None:
    """What ``oauth:`` needs from the rest of the file."""
    if not oauth.enabled:
        return
    if oauth.public_url is None:
        if server_public_url is None:
            problems.append("oauth.public_url: required when oauth is enabled (or set server.public_url)")
        elif urlsplit(server_public_url).scheme != "https" and not loopback_host(urlsplit(server_public_url).hostname):
            problems.append("oauth.public_url: server.public_url is not https; give an https issuer here")
    if store_kind == "yaml":
        problems.append(
            "oauth.enabled: grants are keys written by the sidecar: use a writable store (sqlite or postgres)"
        )
    if not mcp_ids:
        problems.append("oauth.enabled: no upstream of kind mcp to protect")
    for i, uid in enumerate(oauth.upstreams):
        if uid != "*" and uid not in mcp_ids:
            problems.append(f"oauth.upstreams[{i}]: {uid!r} is not an upstream of kind mcp")
    ids = [c.client_id for c in oauth.clients]
    for i, cid in enumerate(ids):
        if cid in ids[:i]:
            problems.append(f"oauth.clients[{i}].client_id: {cid!r} is given twice")
        if cid.startswith(("https://", "http://")):
            problems.append(f"oauth.clients[{i}].client_id: a URL is a metadata document's id, not a local one")
