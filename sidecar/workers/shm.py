"""GCRA buckets in memory shared by every worker of a host: one table, one lock, no round trip.

A GCRA bucket is one integer (its theoretical arrival time, µs), so the host's buckets
fit a fixed table of ``(hash, tat)`` slots in a file the supervisor creates in its
private directory and every worker maps (``mmap``, ``MAP_SHARED``): open addressing on a
64-bit BLAKE2b hash of the bucket key (collisions between 2^64 values are not a concern
next to the table size), linear probing. The hash is keyed with a random key the supervisor
writes at the start of the file: bucket names are partly the client's (``tools/call`` names
under a tool-limit glob, key ids, JWT identity ids anyone can compute), and with a public hash
a client picked ~64 names whose slots fill the probe window of a chosen bucket — its own (the
check is then "table full", and ``on_redis_error: allow`` let it pass unlimited) or another
key's (refused for as long as the names' buckets lived). A slot whose bucket is full again (``tat <=
now``) is as good as empty and is reused in place, so the table needs no sweep.

A bucket whose probe window is all live buckets (none full again: the table is genuinely full there)
is ``TableFull``: the request is refused, ``503 service_unavailable`` with ``Retry-After: 1``, whatever
``on_redis_error`` says. It was ``BackendDown``, so ``on_redis_error: allow`` let the key pass with
no limit at all (and the worker's back-off then decided every key's check the same way for a while).

One ``flock`` on the file serialises checks across processes (the kernel drops it if a
worker dies holding it); inside, a check reads, decides and commits every bucket of the
plan, all or nothing — the same arithmetic as ``MemoryBackend.evaluate`` (the tests hold
both to the same answers). Times are ``time.monotonic()`` microseconds: one clock for
every process of the host.

A plan with a quota goes to the supervisor (``sidecar.workers.limits``), which evaluates
its buckets in this same table under the same lock and its quota in the host's one
``QuotaBook``: a key's buckets live in one place whatever its plan.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct

from ..limits.gcra import Outcome, Plan, TableFull, decide
from ..limits.quota import QuotaCounter

__all__ = ["SLOTS", "TABLE_FULL", "ShmBuckets"]

SLOTS = 1 << 18  # 4 MiB: a quarter of a million buckets in use at once before probes run long
MAX_PROBE = 64
TABLE_FULL = "the shared rate-limit table is full"  # TableFull's message (the owner's reply to a worker too)
_SLOT = struct.Struct("<qq")  # hash, tat (µs; 0: full, i.e. free to take)
_MAX_HASHES = 100_000  # cached bucket hashes per process before the cache starts over
_HEADER = 32  # the hash key (16 random bytes), then padding; the slots follow
_HASH_KEY = 16


class ShmBuckets:
    """The host's GCRA table; ``evaluate`` has ``MemoryBackend.evaluate``'s contract."""

    def __init__(self, path: str, *, create: bool = False, slots: int = SLOTS) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(path, flags, 0o600)
        if create:
            os.ftruncate(self.fd, _HEADER + slots * _SLOT.size)
        size = os.fstat(self.fd).st_size
        self.mm = mmap.mmap(self.fd, size)
        if create:
            self.mm[:_HASH_KEY] = os.urandom(_HASH_KEY)
        self.key = bytes(self.mm[:_HASH_KEY])
        self.mask = (size - _HEADER) // _SLOT.size - 1
        self._hashes: dict[str, int] = {}

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    def _hash(self, bucket: str) -> int:
        h = self._hashes.get(bucket)
        if h is None:
            if len(self._hashes) >= _MAX_HASHES:
                self._hashes.clear()
            digest = hashlib.blake2b(bucket.encode("utf-8", "surrogatepass"), digest_size=8, key=self.key).digest()
            h = (int.from_bytes(digest, "little") >> 1) or 1  # 63 bits, never 0 (0 marks an empty slot)
            self._hashes[bucket] = h
        return h

    def _slot(self, h: int, now_us: int, taken: list[tuple[int, int]]) -> tuple[int, int]:
        """(offset, tat) of ``h``'s slot, claiming an empty or spent one when it has none — never one
        of ``taken`` (this plan's other buckets': a claimed slot or a full bucket looks spent, and
        two buckets in one slot lost the first's limit)."""
        mm, mask, unpack = self.mm, self.mask, _SLOT.unpack_from
        i = h & mask
        spare = -1
        for _ in range(MAX_PROBE):
            off = _HEADER + i * 16
            sh, tat = unpack(mm, off)
            if sh == h:
                return off, tat
            if sh == 0:  # the end of the chain: h is not in the table
                if spare < 0:
                    spare = off
                break
            if spare < 0 and tat <= now_us and all(off != o for o, _ in taken):  # full again: as good as empty
                spare = off
            i = (i + 1) & mask
        if spare < 0:
            raise TableFull(TABLE_FULL)  # every slot h may take is a live bucket: refused, never on_redis_error
        _SLOT.pack_into(mm, spare, h, 0)  # claimed: a second bucket of this plan cannot take it too
        return spare, 0

    def evaluate(self, plan: Plan, now_us: int, counter: QuotaCounter | None, cost: int) -> Outcome:
        """Read, decide and commit in one step under the table's lock (see ``MemoryBackend.evaluate``)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            slots: list[tuple[int, int]] = []
            tats: list[int] = []
            for bucket in plan.buckets:
                h = self._hash(bucket)
                off, tat = self._slot(h, now_us, slots)
                slots.append((off, h))
                tats.append(tat)
            out, new = decide(plan, tats, now_us, counter, cost)
            for (off, h), tat in zip(slots, new):  # noqa: B905 - new is empty when refused
                _SLOT.pack_into(self.mm, off, h, tat)
            return out
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
