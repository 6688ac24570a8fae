"""RFC 9728 discovery on the MCP routes the sidecar's own OAuth server does not protect.

Every MCP path has protected-resource metadata naming the sidecar (not the upstream) as the
resource. Its ``authorization_servers`` lists the ``jwt:`` identity providers whose rules
grant that upstream, so an MCP client that discovers OAuth by itself finds the IdP whose
tokens Sidecar accepts; with no such provider it is left out (keys are issued out of band,
there is no flow to discover). The lists are worked out once, from the config.
"""

from __future__ import annotations

from typing import Any

from ...config import Config
from ...config.jwt import issuers_granting
from . import WELL_KNOWN

__all__ = ["Discovery"]


class Discovery:
    def __init__(self, config: Config, rest_path: str | None) -> None:
        mcp = [u for u in config.upstreams if u.kind == "mcp"]
        everywhere = issuers_granting(config.jwt, [u.id for u in mcp])
        # metadata path suffix -> (name, issuers); "" is the sidecar's origin
        self.resources: dict[str, tuple[str, list[str]]] = {"": ("Sidecar MCP gateway", everywhere)}
        if rest_path is not None:
            self.resources[rest_path] = ("Sidecar MCP REST tool calls", everywhere)
        for u in reversed(mcp):  # the first upstream with a prefix wins, as before
            if u.path_prefix != "/":
                self.resources[u.path_prefix] = (f"Sidecar MCP gateway ({u.id})", issuers_granting(config.jwt, [u.id]))
        self.by_upstream = {u.id: "" if u.path_prefix == "/" else u.path_prefix for u in mcp}

    def document(self, base: str, tail: str) -> dict[str, Any] | None:
        """The metadata for ``<base><tail>`` (``tail``: what follows the well-known path), or None."""
        found = self.resources.get(tail)
        if found is None:
            return None
        name, issuers = found
        body: dict[str, Any] = {"resource": base + tail, "bearer_methods_supported": ["header"], "resource_name": name}
        if issuers:
            body["authorization_servers"] = issuers
        return body

    def metadata_url(self, base: str, upstream_id: str) -> str | None:
        """Where an MCP upstream's metadata is (None: not an MCP upstream)."""
        suffix = self.by_upstream.get(upstream_id)
        return None if suffix is None else f"{base}{WELL_KNOWN}{suffix}"
