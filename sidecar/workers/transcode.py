"""Plex transcode-session owners for the whole host with ``workers: N`` (DESIGN invariant 4).

One process keeps ``TranscodeSessions``' owners in a dict. With workers that dict was per
process: a session claimed by key A on one worker was unknown on the next, so key B (any
playback key that read the id from ``/status/sessions``) claimed it there and drove A's
stream, and A's player — fetching segments without its key on new connections — was refused
on every worker but the first. Here the owners live in a table in shared memory that the
supervisor creates in its private directory and every worker maps, as the GCRA buckets do
(``sidecar.workers.shm``); only the table changes, every rule of ``TranscodeSessions`` (the
forms an id takes, the late claim, keyless requests from the owner's address) is inherited.

- **Layout.** A 32-byte header (a random secret the supervisor draws), then buckets of 8
  slots of 64 bytes: the session id's keyed BLAKE2b digest, the claim's expiry, the client
  address's digest, the owner key id's digest and the key id itself (for a keyless request's
  owner; a key id over 15 bytes — the store's are 12 — is never a keyless owner: it fails
  closed). Keyed hashes, so a client cannot choose ids that fill one bucket.
- **Claims are atomic for the host.** ``claim`` re-checks the owner and writes under one
  ``flock``; reads take the shared lock. A slot is taken only if it is empty, expired, or
  already the claiming key's — never another key's live session. A bucket full of other
  keys' live sessions refuses the claim with 503, as the one-process table does when full.
- **Bounded per key.** Each worker keeps the ids it claimed per key (at most ``per_key``,
  the oldest dropped from the table first), so a key holds at most N × ``per_key`` on the
  host and a flood pushes out only the flooder's own sessions.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from ..core.errors import Forbidden, ServiceUnavailable
from ..upstreams.transcode import TranscodeSessions

__all__ = ["BUCKETS", "ShmTranscode"]

BUCKETS = 1 << 14  # of 8 slots: 131 072 sessions on the host (one process keeps 100 000), 8 MiB
WAYS = 8
_HEAD = 32
_SLOT = struct.Struct("<16sd8s16sB15s")  # id digest, expires, address digest, key digest, key id length, key id
_KEY_TEXT = 15  # a key id longer than this (none of the store's: 12 hex) is never a keyless request's owner
_EMPTY = bytes(16)
_Entry = tuple[bytes, str, bytes]  # key digest, key id ("" when too long to keep), address digest


class ShmTranscode(TranscodeSessions):
    """``TranscodeSessions`` whose owners are the host's (see the module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        create: bool = False,
        buckets: int = BUCKETS,
        ttl: float = 6 * 3600,
        per_key: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(ttl=ttl, per_key=per_key, clock=clock)
        self.fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        if create:
            os.ftruncate(self.fd, _HEAD + buckets * WAYS * _SLOT.size)
            os.pwrite(self.fd, secrets.token_bytes(_HEAD), 0)
        self.mm = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        self.secret = bytes(self.mm[:_HEAD])
        self.mask = (len(self.mm) - _HEAD) // (WAYS * _SLOT.size) - 1
        self._mine: dict[str, OrderedDict[str, float]] = {}  # key id -> ids this worker claimed for it, oldest first

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    def _digest(self, kind: bytes, value: str) -> bytes:
        size = 8 if kind == b"addr" else 16
        return hashlib.blake2b(value.encode(), digest_size=size, key=self.secret, person=kind).digest()

    def _bucket(self, sid: str) -> tuple[bytes, int]:
        digest = self._digest(b"id", sid.lower())
        return digest, _HEAD + (int.from_bytes(digest[:8], "little") & self.mask) * WAYS * _SLOT.size

    def _find(self, digest: bytes, base: int, now: float) -> tuple[int, _Entry] | None:
        for off in range(base, base + WAYS * _SLOT.size, _SLOT.size):
            sd, expires, ad, kd, n, kid = _SLOT.unpack_from(self.mm, off)
            if sd == digest and expires >= now:
                return off, (kd, kid[:n].decode() if n else "", ad)
        return None

    def _read(self, sid: str) -> _Entry | None:
        digest, base = self._bucket(sid)
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        try:
            found = self._find(digest, base, self.clock())
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return found[1] if found is not None else None

    def check(self, ids: Iterable[str], key_id: str) -> None:
        mine = None
        for sid in ids:
            entry = self._read(sid)
            if entry is not None:
                mine = mine or self._digest(b"key", key_id)
                if entry[0] != mine:
                    raise Forbidden("this transcode session belongs to another key")

    def owner(self, session_id: str) -> str | None:
        entry = self._read(session_id)
        return entry[1] or None if entry is not None else None

    def keyless_owner(self, session_id: str, address: str) -> str | None:
        entry = self._read(session_id)
        if entry is None or entry[2] != self._digest(b"addr", address):
            return None
        return entry[1] or None

    def claim(self, ids: Iterable[str], key_id: str, address: str) -> None:
        ids = tuple(dict.fromkeys(sid.lower() for sid in ids))
        kd, ad = self._digest(b"key", key_id), self._digest(b"addr", address)
        raw = key_id.encode()
        kid = raw if len(raw) <= _KEY_TEXT else b""
        now = self.clock()
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            places = [self._bucket(sid) for sid in ids]
            for digest, base in places:  # every id checked before any is written: another key's, none is
                found = self._find(digest, base, now)
                if found is not None and found[1][0] != kd:
                    raise Forbidden("this transcode session belongs to another key")
            for digest, base in places:
                found = self._find(digest, base, now)
                off = found[0] if found is not None else self._free(base, kd, now)
                _SLOT.pack_into(self.mm, off, digest, now + self.ttl, ad, kd, len(kid), kid)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._remember(key_id, ids, now)

    def _free(self, base: int, kd: bytes, now: float) -> int:
        """An empty or expired slot of the bucket, else one of the same key's: never another key's live one."""
        own = -1
        for off in range(base, base + WAYS * _SLOT.size, _SLOT.size):
            sd, expires, _, skd, _, _ = _SLOT.unpack_from(self.mm, off)
            if sd == _EMPTY or expires < now:
                return off
            if own < 0 and skd == kd:
                own = off
        if own >= 0:
            return own
        raise ServiceUnavailable("too many transcode sessions are open; try again later")

    def _remember(self, key_id: str, ids: tuple[str, ...], now: float) -> None:
        """This worker's ids of ``key_id``, oldest first; past ``per_key`` the oldest leaves the table."""
        mine = self._mine.setdefault(key_id, OrderedDict())
        for sid in ids:
            mine.pop(sid, None)
            mine[sid] = now + self.ttl
        while mine and (len(mine) > self.per_key or next(iter(mine.values())) < now):
            self._drop(next(iter(mine)), key_id)
            mine.popitem(last=False)

    def _drop(self, sid: str, key_id: str) -> None:
        digest, base = self._bucket(sid)
        kd = self._digest(b"key", key_id)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            found = self._find(digest, base, self.clock())
            if found is not None and found[1][0] == kd:  # still this key's: another key's claim is never dropped
                self.mm[found[0] : found[0] + _SLOT.size] = bytes(_SLOT.size)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def __len__(self) -> int:
        now = self.clock()
        n = 0
        for off in range(_HEAD, len(self.mm), _SLOT.size):
            sd, expires, _, _, _, _ = _SLOT.unpack_from(self.mm, off)
            n += sd != _EMPTY and expires >= now
        return n
