"""MCP awareness: the gateway, JSON-RPC framing, per-key authorisation and list filtering, sessions, scrubbing."""
