"""API key format: ``<prefix><id><secret><checksum>``, all lowercase hex after the prefix.

- ``id``: 12 hex (48 bits), public; the store's primary key, shown in metrics and logs.
- ``secret``: 48 hex (192 bits) from ``secrets.token_hex``; only its argon2id hash is stored.
- ``checksum``: 8 hex, CRC-32 of prefix+id+secret, so a mistyped or truncated key is
  refused before any store lookup, and secret scanners can match ``pmcp_[0-9a-f]{68}``.

Why hex: python-plexapi puts the token in URLs unencoded and turns ``http`` into ``ws``
across the *whole* URL; lowercase hex is URL-safe and can never contain ``http``
(hex has no ``h``, ``t`` or ``p``), so only the prefix could — ``check_prefix`` refuses
such a prefix. This module is pure: no aiohttp, no I/O.
"""

from __future__ import annotations

import re
import secrets
import zlib
from dataclasses import dataclass

from ..config.units import check_prefix  # the config validates the prefix; key format re-exports it

__all__ = [
    "BODY_LEN",
    "ID_LEN",
    "SECRET_LEN",
    "ParsedKey",
    "check_prefix",
    "display_form",
    "generate_key",
    "key_pattern",
    "parse_key",
]

ID_LEN = 12
SECRET_LEN = 48  # 192 bits
CHECK_LEN = 8
BODY_LEN = ID_LEN + SECRET_LEN + CHECK_LEN
_HEX = re.compile(r"^[0-9a-f]+$")
_ID = re.compile(r"^[0-9a-f]{12}$")


@dataclass(frozen=True, slots=True)
class ParsedKey:
    key_id: str
    secret: str = ""

    def __repr__(self) -> str:  # never print the secret
        return f"ParsedKey(key_id={self.key_id!r})"


def _checksum(prefix: str, key_id: str, secret: str) -> str:
    return f"{zlib.crc32((prefix + key_id + secret).encode()):08x}"


def generate_key(prefix: str, key_id: str | None = None) -> tuple[str, ParsedKey]:
    """A new key and its parts. The full key is shown once and never stored."""
    if key_id is not None and not _ID.match(key_id):
        raise ValueError(f"key id must be {ID_LEN} lowercase hex characters")
    kid = key_id or secrets.token_hex(ID_LEN // 2)
    secret = secrets.token_hex(SECRET_LEN // 2)
    return f"{prefix}{kid}{secret}{_checksum(prefix, kid, secret)}", ParsedKey(kid, secret)


def parse_key(prefix: str, key: str) -> ParsedKey | None:
    """The key's id and secret, or None when it is not a well-formed key of this prefix.

    Cheap on purpose (a length check, a regex and a CRC-32): it runs before any store
    lookup or argon2, so a typo costs nothing but this.
    """
    if len(key) != len(prefix) + BODY_LEN or not key.startswith(prefix):
        return None
    body = key[len(prefix) :]
    if not _HEX.match(body):
        return None
    kid, secret, check = body[:ID_LEN], body[ID_LEN : ID_LEN + SECRET_LEN], body[ID_LEN + SECRET_LEN :]
    if check != _checksum(prefix, kid, secret):
        return None
    return ParsedKey(kid, secret)


def key_pattern(prefix: str) -> str:
    """A regular expression matching this prefix's keys, for secret scanners."""
    return re.escape(prefix) + f"[0-9a-f]{{{BODY_LEN}}}"


def display_form(prefix: str, key_id: str, key: str | None = None) -> str:
    """``pmcp_3f9a…c41e``: enough to recognise a key, useless to an attacker."""
    tail = key[-4:] if key else key_id[-4:]
    return f"{prefix}{key_id[:4]}…{tail}"
