"""An MCP upstream's credential never reaches a client (DESIGN, "Security invariants" 1).

An MCP upstream's credential is its configured ``headers`` (``Authorization: Bearer
${MCP_TOKEN}``). A server that echoes what it received — a debug tool, an error message
quoting the request, a header, an event of either SSE transport, a REST tool call's
answer — would hand it to the client. So every answer of an MCP route passes
``sidecar.upstreams.scrub.ScrubFilter`` with these secrets, *after* the tool-list filtering
(``mcp._Filter``) that may re-serialise JSON: what is scrubbed is what is finally sent.

**The secrets** (computed once per distinct header set, ``_secrets``): every configured
header value, and for ``Scheme credential`` values the credential alone, each at least
``MIN_SECRET`` characters (``X-Version: 1`` is no secret and must not mask every "1"),
together with the forms an echo commonly takes: JSON-escaped (``\\u00e9``, ``\\"``,
PHP's ``\\/``) and percent-encoded. Headers that never carry a credential
(``NOT_SECRET``: ``Accept``, ``Content-Type``, ``User-Agent``, ``X-Forwarded-*`` …) are
left out, so their ordinary values are not masked in every answer. Each secret becomes
``REDACTED`` (``*`` of the same length in non-text bodies); the client's key is never
put in its place.

**Bodies** are decoded first (gzip/deflate; ``br``, ``zstd`` … are refused with 502, and
the gateway asks for ``identity``), so the list filter reads decoded JSON/SSE too. A
secret split across chunks or SSE events' chunks is held back until it is whole.

Out of scope: an upstream that *transforms* its own secret (base64, reversed, one
character per event) can always reveal it; scrubbing catches echoes, not intent.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

from multidict import CIMultiDict

from ..scrub import ScrubFilter

if TYPE_CHECKING:
    from ...config import UpstreamConfig
    from ...core.relay import ResponseFilter

__all__ = ["MASK", "MIN_SECRET", "McpScrubFilter", "mcp_secrets", "scrub_bytes", "scrub_text", "scrubbed"]

MASK: Final = "REDACTED"
MIN_SECRET: Final = 8  # shorter values are not credentials worth masking everywhere ("1", "true")
NOT_SECRET: Final = frozenset({
    "accept", "accept-charset", "accept-encoding", "accept-language", "cache-control", "content-language",
    "content-type", "forwarded", "host", "mcp-protocol-version", "origin", "pragma", "user-agent", "via",
})  # fmt: skip


def mcp_secrets(upstream: UpstreamConfig) -> tuple[str, ...]:
    """The strings an answer from this upstream must not carry, longest first (cached)."""
    headers = upstream.headers
    return _secrets(tuple(headers.items())) if headers else ()


@lru_cache(maxsize=256)
def _secrets(items: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    found: set[str] = set()
    for name, value in items:
        low = name.lower()
        if low in NOT_SECRET or low.startswith("x-forwarded-"):
            continue
        value = value.strip()
        forms = {value}
        scheme, _, rest = value.partition(" ")
        if scheme and rest.strip():  # "Bearer xyz", "Basic abc=", "Token token=xyz": the credential alone
            forms.update((rest.strip(), value.rpartition(" ")[2]))
        for form in forms:
            if len(form) < MIN_SECRET:
                continue
            found.add(form)
            found.add(json.dumps(form)[1:-1])  # \" \\ \uXXXX, as most JSON encoders write them
            found.add(form.replace("/", "\\/"))  # PHP's json_encode escapes "/"
            found.add(quote(form, safe=""))  # quoted in a URL an error message repeats
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


class McpScrubFilter(ScrubFilter):
    """The forwarder's filter for an MCP route whose upstream has a credential.

    Headers: scrubbed first (names, values, reason phrase; decoders set up), then the
    MCP policy (``inner``: 401, ``Location``, sessions, which bodies to rewrite). Body:
    decoded, rewritten by ``inner`` if it asked to, then scrubbed — also the upstream's
    error answers, which ``inner`` lets through untouched.
    """

    __slots__ = ("_inner_on", "inner")

    def __init__(self, secrets: tuple[str, ...], inner: ResponseFilter) -> None:
        super().__init__(secrets[0], MASK, also=secrets[1:])
        self.inner = inner
        self._inner_on = False

    def headers(self, status: int, headers: CIMultiDict[str]) -> bool:
        super().headers(status, headers)  # raises Unscrubbable for what cannot be scrubbed
        self._inner_on = self.inner.headers(status, headers)
        if self._inner_on:
            headers.popall("Content-Length", None)  # the rewriter changes the length
        return True

    def feed(self, chunk: bytes) -> bytes:
        if self._decoders:
            chunk = self.decode(chunk)
        if self._inner_on:
            chunk = self.inner.feed(chunk)
        return self.scrub(chunk)

    def flush(self) -> bytes:
        self.finish()
        return self.drain(self.inner.flush() if self._inner_on else b"")


def scrubbed(upstream: UpstreamConfig, inner: ResponseFilter) -> ResponseFilter:
    """``inner`` wrapped so the upstream's credential never gets out; ``inner`` itself without one."""
    secrets = mcp_secrets(upstream)
    return McpScrubFilter(secrets, inner) if secrets else inner


def scrub_text(upstream: UpstreamConfig, text: str) -> str:
    """A message built from the upstream's words (a REST call's error), scrubbed."""
    for secret in mcp_secrets(upstream):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def scrub_bytes(upstream: UpstreamConfig, body: bytes) -> bytes:
    """A whole answer the sidecar built from the upstream's (the REST call's JSON), scrubbed."""
    for secret in mcp_secrets(upstream):
        raw = secret.encode()
        if raw in body:
            body = body.replace(raw, MASK.encode())
    return body
