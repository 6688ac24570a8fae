"""OAuth codes and tokens: random, checksummed like keys, stored only as a SHA-256 digest.

``<key prefix><kind>_<64 hex><8 hex CRC-32>``: ``kind`` is ``oac`` (authorization code),
``oat`` (access token) or ``ort`` (refresh token). 256 random bits from ``secrets``;
the CRC-32 (as in ``sidecar.auth.keys``) refuses a mistyped or truncated token before
any lookup, and lets a secret scanner recognise one. The underscore and the kind's
letters keep a token from ever parsing as an API key (whose body is hex only).
A token has 256 bits of entropy, so a plain SHA-256 is the right store hash (no
argon2: nothing to stretch), compared by dictionary lookup of the digest.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib

__all__ = ["ACCESS", "CODE", "REFRESH", "digest", "mint", "parse", "token_kind"]

CODE, ACCESS, REFRESH = "oac", "oat", "ort"
_SECRET_HEX = 64
_BODY = re.compile(r"^[0-9a-f]{72}$")


def _crc(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


def mint(prefix: str, kind: str) -> str:
    """A new token of ``kind``; shown to the client once, never stored."""
    head = f"{prefix}{kind}_{secrets.token_hex(_SECRET_HEX // 2)}"
    return head + _crc(head)


def token_kind(prefix: str, value: str) -> str | None:
    """The kind a value claims by its shape (cheap: a prefix test), or None when it is no OAuth token."""
    if not value.startswith(prefix) or value[len(prefix) + 3 : len(prefix) + 4] != "_":
        return None
    kind = value[len(prefix) : len(prefix) + 3]
    return kind if kind in (CODE, ACCESS, REFRESH) else None


def parse(prefix: str, value: str, kind: str) -> bool:
    """Is ``value`` a well-formed token of ``kind`` (right shape and checksum)?"""
    head_len = len(prefix) + 4
    if len(value) != head_len + 72 or token_kind(prefix, value) != kind:
        return False
    body = value[head_len:]
    if not _BODY.match(body):
        return False
    return _crc(value[:-8]) == body[-8:]


def digest(value: str) -> str:
    """What the store keeps: the hex SHA-256 of the token."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()  # a header byte may be a surrogate
