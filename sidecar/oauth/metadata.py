"""Discovery documents: RFC 8414 authorization server metadata and RFC 9728 protected
resource metadata, built once from ``oauth.public_url`` (never from ``Host``).

The server metadata is checked with authlib's ``AuthorizationServerMetadata.validate()``
(RFC 8414 §2) when the sidecar starts, so a document a client would refuse never ships.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from authlib.oauth2.rfc8414 import AuthorizationServerMetadata  # type: ignore[import-untyped]

from ..config import UpstreamConfig
from ..config.oauth import OAuthConfig

__all__ = [
    "AS_WELL_KNOWN",
    "ENDPOINTS",
    "PRM_WELL_KNOWN",
    "SCOPE",
    "resource_metadata",
    "resource_url",
    "server_metadata",
]

AS_WELL_KNOWN = "/.well-known/oauth-authorization-server"
PRM_WELL_KNOWN = "/.well-known/oauth-protected-resource"
SCOPE = "mcp"  # the one scope: what a grant allows is chosen on the consent page, per tool
ENDPOINTS = {"authorize": "/oauth/authorize", "token": "/oauth/token", "register": "/oauth/register",
             "revoke": "/oauth/revoke"}  # fmt: skip


def resource_url(issuer: str, upstream: UpstreamConfig) -> str:
    """The MCP URL clients use for ``upstream``: its RFC 8707 resource identifier."""
    return issuer if upstream.path_prefix == "/" else issuer + upstream.path_prefix


def server_metadata(config: OAuthConfig, issuer: str) -> dict[str, Any]:
    auth_methods = ["none", "client_secret_post", "client_secret_basic"]
    doc: dict[str, Any] = {
        "issuer": issuer,
        "authorization_endpoint": issuer + ENDPOINTS["authorize"],
        "token_endpoint": issuer + ENDPOINTS["token"],
        "revocation_endpoint": issuer + ENDPOINTS["revoke"],
        "scopes_supported": [SCOPE],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,  # RFC 9207
        "client_id_metadata_document_supported": config.cimd.enabled,
    }
    if config.allow_dynamic_registration:
        doc["registration_endpoint"] = issuer + ENDPOINTS["register"]
    AuthorizationServerMetadata(doc).validate()  # raises ValueError on anything RFC 8414 forbids
    return doc


def resource_metadata(issuer: str, upstream: UpstreamConfig, idps: Sequence[str] = ()) -> dict[str, Any]:
    """RFC 9728 §2 for one MCP upstream, naming the sidecar as its authorization server — first, so
    clients that take the first one get the full flow — then the ``jwt:`` identity providers (``idps``)."""
    return {
        "resource": resource_url(issuer, upstream),
        "authorization_servers": [issuer, *(i for i in idps if i != issuer)],
        "scopes_supported": [SCOPE],
        "bearer_methods_supported": ["header"],
        "resource_name": f"Sidecar MCP gateway ({upstream.id})",
    }


def metadata_url(issuer: str, upstream: UpstreamConfig) -> str:
    """Where the RFC 9728 metadata of ``upstream`` is served."""
    return f"{issuer}{PRM_WELL_KNOWN}{'' if upstream.path_prefix == '/' else upstream.path_prefix}"


def challenge(issuer: str, upstream: UpstreamConfig, error: str | None = None) -> str:
    """``WWW-Authenticate`` for a 401 at an OAuth-protected MCP upstream (RFC 6750 §3, RFC 9728 §5.1)."""
    value = f'Bearer resource_metadata="{metadata_url(issuer, upstream)}", scope="{SCOPE}"'
    if error:
        value += f', error="{error}"'
    return value


def protected(config: OAuthConfig, upstreams: Iterable[UpstreamConfig]) -> dict[str, UpstreamConfig]:
    """The MCP upstreams whose resource accepts this server's tokens, by id."""
    return {u.id: u for u in upstreams if u.kind == "mcp" and ("*" in config.upstreams or u.id in config.upstreams)}
