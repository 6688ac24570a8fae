"""Sealed ``Mcp-Session-Id``: the session travels with the client, so any worker or replica can serve it.

The client never sees the upstream's session id. It gets a token sealed with AES-GCM
(``cryptography``'s ``AESGCM``; nothing here is hand-rolled) that carries:

* the upstream's session id (what is sent upstream in its place),
* the id of the API key that opened the session (another key presenting it is refused
  with ``403`` at once: no table, no lookup, no shared state),
* when it expires (``mcp_sessions.ttl``, 24 h by default),

authenticated together with the upstream it belongs to (a token of one upstream is
no session on another) and the id of the sealing key. Layout, base64url without
padding (visible ASCII, as MCP requires of a session id)::

    version (1) | key id (4) | nonce (12) | AES-GCM( expires (8) | owner length (1) | owner | upstream sid ) + tag (16)

**Keys** come from ``mcp_sessions.seal_key_env`` (current: seals and opens) and
``previous_key_envs`` (open only), so a rotation keeps open sessions alive: deploy the
new key as current with the old one as previous, and drop the old one after ``ttl``.
The key id is a hash of the key, so a token names the key that opens it and nothing
is tried in turn. Without a configured key each process draws a random one at start:
sessions then survive neither a restart nor a move to another worker or replica
(the client gets ``404`` and starts a new session, as MCP says it must) — except
between the workers of one host, whose supervisor draws one key for all of them
(``sidecar.workers.sealkey``).

A token that does not open (tampered, foreign, unknown key, expired) is ``404
not_found``: for MCP that means "start a new session". A token that opens but belongs
to another key is ``403 insufficient_permissions``. Neither reaches the upstream.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ...config.mcp_scale import DEFAULT_SESSION_TTL, McpSessions
from ...core.errors import Forbidden, NotFound

__all__ = ["SEAL_VERSION", "Sealer", "Unsealed"]

log = logging.getLogger("sidecar.mcp")

SEAL_VERSION = 1
_HEAD = struct.Struct(">BI")  # version, key id
_EXPIRES = struct.Struct(">QB")  # expires (unix seconds), owner length
_NONCE = 12
_MIN_LEN = _HEAD.size + _NONCE + _EXPIRES.size + 16
MEMO = 20_000  # tokens that opened, remembered per process (cleared when full)
_MAX_TOKEN = 1024  # characters; anything longer is not ours (and is not decoded)
_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

GONE = "no such MCP session (unknown, expired or not sealed by this sidecar's keys): start a new session"


def key_id(key: bytes) -> int:
    """A 32-bit name for a sealing key (a hash: the token names its key without revealing it)."""
    return int.from_bytes(hashlib.sha256(b"sidecar mcp session seal\0" + key).digest()[:4], "big")


@dataclass(frozen=True, slots=True)
class Unsealed:
    owner: str  # the API key id the session belongs to
    sid: str  # the upstream's own session id
    expires: int


class Sealer:
    """Seals and opens session ids; the first key seals, every key opens."""

    def __init__(
        self, keys: Sequence[bytes], ttl: float = DEFAULT_SESSION_TTL, *, clock: Callable[[], float] = time.time
    ) -> None:
        if not keys:
            raise ValueError("at least one sealing key")
        self.ttl = ttl
        self.clock = clock
        self._kid = key_id(keys[0])
        self._seal = AESGCM(keys[0])
        # Keys by id; two ids can collide (32 bits): then both are tried, the current key first.
        self._open: dict[int, tuple[AESGCM, ...]] = {}
        for k in keys:
            self._open[key_id(k)] = (*self._open.get(key_id(k), ()), AESGCM(k))
        self._head = _HEAD.pack(SEAL_VERSION, self._kid)
        self._opened: dict[tuple[str, str], Unsealed] = {}

    @classmethod
    def random(cls, ttl: float = DEFAULT_SESSION_TTL) -> Sealer:
        return cls([AESGCM.generate_key(bit_length=256)], ttl)

    @classmethod
    def from_config(cls, cfg: McpSessions) -> Sealer:
        if cfg.configured:
            return cls(cfg.keys, cfg.ttl)
        log.warning(
            "mcp_sessions.seal_key_env is not set: MCP session ids are sealed with a random key of this "
            "process, so sessions do not survive a restart or move between workers or replicas"
        )
        return cls.random(cfg.ttl)

    def seal(self, upstream_id: str, owner: str, sid: str) -> str:
        """The client-facing id of the upstream session ``sid``, opened by key ``owner`` on ``upstream_id``."""
        owner_b = owner.encode()
        plain = _EXPIRES.pack(int(self.clock() + self.ttl), len(owner_b)) + owner_b + sid.encode()
        nonce = os.urandom(_NONCE)
        aad = self._head + upstream_id.encode()
        token = self._head + nonce + self._seal.encrypt(nonce, plain, aad)
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode("ascii")

    def unseal(self, upstream_id: str, token: str) -> Unsealed:
        """The session a token names, or ``404`` (not ours, tampered, expired).

        A token that opened once is remembered (bounded): a session's every request carries
        the same token, and a dictionary hit is a fraction of a decryption. Only tokens that
        opened are kept, so garbage cannot fill the memo; the expiry is checked every time.
        """
        hit = self._opened.get((upstream_id, token))
        if hit is not None:
            if hit.expires <= self.clock():
                raise NotFound("this MCP session has expired: start a new session")
            return hit
        opened = self._unseal(upstream_id, token)
        if len(self._opened) >= MEMO:
            self._opened.clear()
        self._opened[(upstream_id, token)] = opened
        return opened

    def _unseal(self, upstream_id: str, token: str) -> Unsealed:
        raw = _decode(token)
        if raw is None or len(raw) < _MIN_LEN:
            raise NotFound(GONE)
        version, kid = _HEAD.unpack_from(raw)
        head = _HEAD.size
        for aead in self._open.get(kid, ()) if version == SEAL_VERSION else ():
            try:
                plain = aead.decrypt(raw[head : head + _NONCE], raw[head + _NONCE :], raw[:head] + upstream_id.encode())
                break
            except InvalidTag:
                continue
        else:
            raise NotFound(GONE)
        expires, n = _EXPIRES.unpack_from(plain)
        if expires <= self.clock():
            raise NotFound("this MCP session has expired: start a new session")
        at = _EXPIRES.size
        try:
            return Unsealed(plain[at : at + n].decode(), plain[at + n :].decode(), expires)
        except UnicodeDecodeError:  # only we seal: cannot happen short of a broken key
            raise NotFound(GONE) from None

    def open_for(self, upstream_id: str, token: str, owner: str) -> Unsealed:
        """``unseal``, then ``403`` when the session is another key's (checked with no lookup)."""
        s = self.unseal(upstream_id, token)
        if s.owner != owner:
            raise Forbidden("this MCP session belongs to another key")
        return s


def _decode(token: str) -> bytes | None:
    if len(token) > _MAX_TOKEN or not token.isascii():
        return None
    data = token.encode("ascii")
    if not _B64.issuperset(data):
        return None
    try:
        raw = base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return None
    # Only the canonical form: a last character whose unused bits are set would name the same token.
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=") == data else None
