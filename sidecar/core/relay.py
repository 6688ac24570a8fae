"""What a response relay hands its hooks: the hop-by-hop header set, the filter and tap protocols.

The forwarder (``http/``) drives them; the response cache (``cache/``), the token scrubber
and the MCP filter (``upstreams/``) implement them. Kept here so none of those depends on ``http/``.
"""

from __future__ import annotations

from typing import Protocol

from multidict import CIMultiDict

__all__ = ["HOP_BY_HOP", "ResponseFilter", "ResponseTap", "as_sent"]

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Trailers", "Transfer-Encoding", "Upgrade", "Proxy-Connection",
    )
)  # fmt: skip


class ResponseFilter(Protocol):
    """Rewrites a response on its way down (token scrubbing, MCP tool-list filtering)."""

    def headers(self, status: int, headers: CIMultiDict[str]) -> bool:
        """Edit headers in place; return True if the body must pass through ``feed``."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class ResponseTap(Protocol):
    """Sees the upstream's answer as it arrived, before any filter (the response cache records through it)."""

    def start(self, status: int, headers: CIMultiDict[str]) -> bool:
        """Called before anything is sent (``headers`` is a copy, hop-by-hop removed); True to receive the body.

        May raise to refuse the answer: nothing has reached the client yet, so the caller
        of ``forward`` can still answer otherwise (the cache serves a stale copy).
        """

    def feed(self, chunk: bytes) -> bool:
        """One raw body chunk; False to stop receiving (the stream itself goes on)."""

    def end(self) -> None:
        """The upstream body arrived complete."""


def as_sent(value: str) -> str:
    """A header value as the client will receive it: bytes that were not UTF-8 become U+FFFD.

    The parsers keep such bytes as surrogates, and aiohttp's writer drops those silently,
    joining what was around them *after* the scrubber looked: ``tok\\x80en`` would reach the
    client as ``token``. Made explicit here, before any filter, what is checked is what is sent.
    """
    if value.isascii():  # nearly every value: one C scan
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value
