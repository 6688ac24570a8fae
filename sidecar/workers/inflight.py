"""``concurrency`` limits exact across the workers of a host: in-flight counts in shared memory.

A key's ``concurrency: N`` is the number of its requests in flight on the host, not on
each worker. The counts live in a table in a file the supervisor creates in its private
directory and every worker maps (``mmap``, ``MAP_SHARED``), as the GCRA buckets do
(``sidecar.workers.shm``): one row per ``(key id, scope)`` with requests in flight,
found by a 64-bit BLAKE2b hash (keyed with a random key in the file's head: key ids a delegate can
create by the thousand and JWT identity ids anyone can compute must not aim at a chosen row's probe
window) and linear probing; a row holds one count **per worker**
(its column is the worker's index). Taking a slot sums the row and adds one to the
worker's own column under one ``flock``; giving it back takes one away. A row whose
counts are all zero is free to reuse in place, so nothing needs a sweep.

Why a column per worker: a worker that dies holds slots it will never give back. The
supervisor zeroes that worker's column (``clear``) before it starts the replacement, so
a crash cannot leave a key locked out. The check before the rate limits (a refusal that
spends no budget) reads the row without the lock; the slot itself is taken under it.
Cost: two ``flock`` round trips per request of a key with a concurrency limit (a few µs);
nothing at all for keys without one. Used whatever ``rate_limits.backend`` is (Redis
does not hold concurrency: it is per process, so per host with workers).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from types import TracebackType

from ..limits.concurrency import concurrency_error

__all__ = ["ROWS", "ShmInflight"]

ROWS = 1 << 14  # (key, scope) pairs with requests in flight at once on the host
MAX_PROBE = 64
_HEAD = struct.Struct("<q16s")  # number of columns (workers), the hash key (random: see ShmBuckets)
_HASH = struct.Struct("<q")
_COUNT = struct.Struct("<i")
_MAX_HASHES = 100_000


class ShmInflight:
    """The host's in-flight counts; ``column`` is this worker's (None: the supervisor, which only clears)."""

    def __init__(self, path: str, *, column: int | None = None, workers: int = 0, rows: int = ROWS) -> None:
        create = column is None
        self.fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        if create:
            os.ftruncate(self.fd, _HEAD.size + rows * (_HASH.size + _COUNT.size * workers))
            os.pwrite(self.fd, _HEAD.pack(workers, os.urandom(16)), 0)
        self.mm = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        self.cols: int
        self.cols, self.key = _HEAD.unpack_from(self.mm, 0)
        self.row = _HASH.size + _COUNT.size * self.cols
        self.rows = (len(self.mm) - _HEAD.size) // self.row
        self.column = column
        self._counts = struct.Struct(f"<{self.cols}i")
        self._hashes: dict[tuple[str, str], int] = {}

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    def _hash(self, ident: tuple[str, str]) -> int:
        h = self._hashes.get(ident)
        if h is None:
            if len(self._hashes) >= _MAX_HASHES:
                self._hashes.clear()
            material = f"{ident[0]}\0{ident[1]}".encode("utf-8", "surrogatepass")
            digest = hashlib.blake2b(material, digest_size=8, key=self.key).digest()
            h = (int.from_bytes(digest, "little") >> 1) or 1  # never 0: 0 marks a row never used
            self._hashes[ident] = h
        return h

    def _find(self, h: int, claim: bool) -> int:
        """The offset of ``h``'s row; with ``claim``, an empty or idle row taken for it; -1: none."""
        mm, size = self.mm, self.row
        i = h % self.rows
        spare = -1
        for _ in range(MAX_PROBE):
            off: int = _HEAD.size + i * size
            (sh,) = _HASH.unpack_from(mm, off)
            if sh == h:
                return off
            if sh == 0:
                if spare < 0:
                    spare = off
                break
            if spare < 0 and not any(self._counts.unpack_from(mm, off + _HASH.size)):
                spare = off  # another pair's row with nothing in flight: as good as empty
            i = (i + 1) % self.rows
        if not claim or spare < 0:
            return -1
        _HASH.pack_into(mm, spare, h)
        return spare

    def get(self, ident: tuple[str, str], default: int = 0) -> int:
        """Requests of ``ident`` in flight on the host (read without the lock: a pre-check only)."""
        off = self._find(self._hash(ident), False)
        return sum(self._counts.unpack_from(self.mm, off + _HASH.size)) if off >= 0 else default

    def acquire(self, ident: tuple[str, str], limit: int) -> bool:
        assert self.column is not None
        h = self._hash(ident)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            off = self._find(h, True)
            if off < 0:  # the table is full (MAX_PROBE rows busy in a row): refuse, as a full slot would
                return False
            counts = self._counts.unpack_from(self.mm, off + _HASH.size)
            if sum(counts) >= limit:
                return False
            at = off + _HASH.size + _COUNT.size * self.column
            _COUNT.pack_into(self.mm, at, counts[self.column] + 1)
            return True
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def release(self, ident: tuple[str, str]) -> None:
        assert self.column is not None
        h = self._hash(ident)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            off = self._find(h, False)
            if off >= 0:
                at = off + _HASH.size + _COUNT.size * self.column
                (n,) = _COUNT.unpack_from(self.mm, at)
                _COUNT.pack_into(self.mm, at, max(0, n - 1))  # 0: the supervisor cleared it meanwhile
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def clear(self, column: int) -> None:
        """A dead worker's slots, given back (the supervisor, before it starts the replacement)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            for r in range(self.rows):
                at = _HEAD.size + r * self.row + _HASH.size + _COUNT.size * column
                _COUNT.pack_into(self.mm, at, 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def slot(self, _local: object, ident: tuple[str, str], limit: int, headers: bool) -> SharedSlot:
        """``ConcurrencySlot``'s signature (the process's own counts, unused here)."""
        return SharedSlot(self, ident, limit, headers)


class SharedSlot:
    """``limits.concurrency.ConcurrencySlot`` with the host's counts."""

    __slots__ = ("headers", "ident", "limit", "table")

    def __init__(self, table: ShmInflight, ident: tuple[str, str], limit: int, headers: bool) -> None:
        self.table = table
        self.ident = ident
        self.limit = limit
        self.headers = headers

    async def __aenter__(self) -> None:
        if not self.table.acquire(self.ident, self.limit):
            raise concurrency_error(self.limit, self.headers)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.table.release(self.ident)
