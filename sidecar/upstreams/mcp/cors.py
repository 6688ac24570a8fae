"""CORS for browser MCP clients: which origin may call, the preflight, the headers on answers.

Off unless ``cors.enabled``; origins from ``cors.origins`` (``*`` for any). The preflight and
the headers on every answer of an MCP route (errors included, so a browser can read them) are
built here; the gateway decides which requests are MCP routes.
"""

from __future__ import annotations

from aiohttp import web

from ...config.schema import CorsConfig
from ...core.errors import Forbidden

__all__ = ["ALLOW_HEADERS", "EXPOSE_HEADERS", "allowed_origin", "expose", "preflight"]

ALLOW_HEADERS = (
    "Authorization", "Content-Type", "Accept", "MCP-Protocol-Version", "Mcp-Session-Id", "Last-Event-ID",
    "Mcp-Method", "Mcp-Name", "x-api-key",
)  # fmt: skip
EXPOSE_HEADERS = (
    "Mcp-Session-Id", "MCP-Protocol-Version", "WWW-Authenticate", "Retry-After", "RateLimit", "RateLimit-Policy",
    "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
)  # fmt: skip


def allowed_origin(cors: CorsConfig, request: web.BaseRequest) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for this request, or None (CORS off, no or foreign origin)."""
    origin = request.headers.get("Origin")
    if not cors.enabled or not origin:
        return None
    if "*" in cors.origins:
        return "*"
    return origin if origin in cors.origins else None


def expose(response: web.StreamResponse, origin: str) -> None:
    """The CORS headers of an answer to an allowed origin."""
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = ", ".join(EXPOSE_HEADERS)
    if origin != "*" and "Origin" not in response.headers.getall("Vary", []):
        response.headers.add("Vary", "Origin")


def preflight(cors: CorsConfig, request: web.BaseRequest) -> web.Response:
    """The answer to a preflight of an MCP route (a foreign origin: 403)."""
    origin = allowed_origin(cors, request)
    if origin is None:
        raise Forbidden("this origin may not use the MCP routes (cors.origins)")
    requested = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")]
    allow = list(ALLOW_HEADERS) + [h for h in requested if h.lower().startswith("mcp-param-")]
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": ", ".join(allow),
            "Access-Control-Max-Age": "600",
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        },
    )
