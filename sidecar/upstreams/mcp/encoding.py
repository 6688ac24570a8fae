"""An MCP request body in a content coding, decoded here to be judged.

The proxy listener passes request bodies as sent (DESIGN: no decompression), so a generic
upstream gets exactly what the client wrote. The MCP gateway must read the JSON-RPC body to
authorize it; a gzip or deflate body is decoded here, bounded by ``mcp.max_body`` once decoded
(a small bomb is a 413, not memory), and goes up decoded, as judged, without the header.
"""

from __future__ import annotations

import zlib

from ...core.errors import BadRequest, PayloadTooLarge

__all__ = ["decoded_body"]

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decoded_body(raw: bytes, coding: str | None, limit: int) -> bytes:
    """``raw`` decoded from ``coding`` (the request's Content-Encoding); another coding is a 400."""
    coding = (coding or "").strip().lower()
    if coding in ("", "identity"):
        return raw
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise BadRequest(
            f"an MCP request body in Content-Encoding {coding[:40]!r} cannot be read: send gzip, deflate or none"
        )
    # deflate: the zlib format, or the raw stream some clients send under that name.
    for bits in (wbits, -zlib.MAX_WBITS) if coding == "deflate" else (wbits,):
        d = zlib.decompressobj(bits)
        try:
            out = d.decompress(raw, limit + 1 if limit else 0)
        except zlib.error:
            continue
        if limit and (len(out) > limit or d.unconsumed_tail):
            raise PayloadTooLarge(f"MCP request body over the {limit}-byte limit once decoded")
        if d.eof and not d.unused_data:
            return out
    raise BadRequest(f"the MCP request body is not valid {coding}: it cannot be judged")
