"""MCP awareness: the gateway, JSON-RPC framing, per-key authorisation and list filtering, sessions, scrubbing."""

__all__ = ["WELL_KNOWN"]

WELL_KNOWN = "/.well-known/oauth-protected-resource"  # RFC 9728 metadata, answered by the gateway
