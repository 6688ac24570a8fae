"""Plex specifics: the real token and client identity going up, scrubbing coming down,
and transcode sessions owned by the key that started them.

Each rule here was learned from real clients (see DESIGN.md, "Plex specifics").
"""

from __future__ import annotations

from multidict import CIMultiDict, MultiMapping

from ..config import UpstreamConfig
from .scrub import ScrubFilter  # re-exported: it lived here
from .transcode import TranscodeSessions  # re-exported: it lived here

__all__ = ["IDENTITY_HEADERS", "ScrubFilter", "TranscodeSessions", "inject_plex"]

IDENTITY_HEADERS = ("X-Plex-Client-Identifier", "X-Plex-Product", "X-Plex-Version")


def inject_plex(headers: CIMultiDict[str], query: MultiMapping[str], upstream: UpstreamConfig, token: str) -> None:
    """Add the real token; add the sidecar's identity only when the client sent none.

    Overwriting X-Plex-Client-Identifier for every client would merge all their devices
    and sessions into one in Plex, so a client's own identity always passes through.
    """
    headers["X-Plex-Token"] = token
    sent = any(h in headers for h in IDENTITY_HEADERS) or any(
        name.lower().startswith("x-plex-client-identifier") or name.lower() in ("x-plex-product", "x-plex-version")
        for name in query
    )
    if not sent:
        headers["X-Plex-Client-Identifier"] = upstream.plex_client_identifier
        headers["X-Plex-Product"] = upstream.plex_product
        headers["X-Plex-Version"] = upstream.plex_version
