"""The response cache's storage: entries, LRU eviction within a byte budget, Vary bookkeeping, purge."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDict, MultiMapping

from .policy import CacheKey, Storable, compile_glob, variant_key

__all__ = ["ENTRY_OVERHEAD", "Entry", "EntryStore"]

ENTRY_OVERHEAD: Final = 256  # bytes charged per entry on top of body, headers and key
# Never stored with an entry: recomputed per answer, or meaningless once stored.
_UNSTORED = frozenset({"content-length", "age", "x-cache-status"})


@dataclass(slots=True, eq=False)
class Entry:
    key: CacheKey
    primary: CacheKey
    upstream: str
    path: str
    status: int
    headers: CIMultiDict[str]
    body: bytes
    stored_at: float
    age: int  # the upstream's Age when stored
    fresh_until: float
    stale_revalidate_until: float
    stale_error_until: float
    size: int
    plain: bool  # neither body nor headers hold the upstream token, and the body is not encoded


class EntryStore:
    """The stored answers: LRU order, the byte budget, the Vary names per primary key, purges.

    ``ResponseCache`` (``sidecar.cache.response``) serves, coalesces and refreshes on top of it.
    """

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.max_bytes = max_bytes
        self.size = 0  # bytes charged, never above max_bytes
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()
        self._variants: dict[CacheKey, tuple[str, ...]] = {}  # primary key -> the upstream's Vary names
        self._per_primary: dict[CacheKey, int] = {}  # entries per primary key (to forget its Vary)
        self._generation = 0  # bumped by purge: fills started before it are not stored

    def __len__(self) -> int:
        return len(self._entries)

    def _store(
        self,
        primary: CacheKey,
        upstream: str,
        path: str,
        status: int,
        headers: CIMultiDict[str],
        body: bytes,
        verdict: Storable,
        client_headers: MultiMapping[str],
        token: bytes,
    ) -> bool:
        stored = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _UNSTORED)
        key = variant_key(primary, verdict.vary, client_headers)
        size = len(body) + sum(len(k) + len(v) + 4 for k, v in stored.items()) + _key_size(key) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        age = headers.get("Age", "")
        tok = token.decode()
        plain = (
            bool(token)
            and token not in body
            and not any(tok in k or tok in v for k, v in stored.items())
            and stored.get("Content-Encoding", "identity").strip().lower() in ("identity", "")
        )
        now = self.clock()
        self._set_variants(primary, verdict.vary)
        self._remove(key)
        fresh = now + verdict.ttl
        entry = Entry(
            key=key, primary=primary, upstream=upstream, path=path, status=status, headers=stored,
            body=body, stored_at=now, age=int(age) if age.isdigit() else 0, fresh_until=fresh,
            stale_revalidate_until=fresh + verdict.stale_while_revalidate,
            stale_error_until=fresh + verdict.stale_if_error, size=size, plain=plain,
        )  # fmt: skip
        self._entries[key] = entry
        self._per_primary[primary] = self._per_primary.get(primary, 0) + 1
        self.size += size
        while self.size > self.max_bytes and self._entries:
            self._remove(next(iter(self._entries)))
        return True

    def _set_variants(self, primary: CacheKey, vary: tuple[str, ...]) -> None:
        if vary:
            self._variants[primary] = vary
        else:
            self._variants.pop(primary, None)

    def _drop(self, entry: Entry) -> None:
        """Remove this entry, unless it has been replaced meanwhile."""
        if self._entries.get(entry.key) is entry:
            self._remove(entry.key)

    def _remove(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.size -= entry.size
        left = self._per_primary.get(entry.primary, 1) - 1
        if left > 0:
            self._per_primary[entry.primary] = left
        else:
            self._per_primary.pop(entry.primary, None)
            self._variants.pop(entry.primary, None)

    def purge(self, upstream: str | None = None, path_glob: str | None = None) -> int:
        """Drop entries (all, one upstream's, or those whose path matches a glob); return how many."""
        self._generation += 1
        pattern = compile_glob(path_glob) if path_glob else None
        doomed = [
            k
            for k, e in self._entries.items()
            if (upstream is None or e.upstream == upstream) and (pattern is None or pattern.match(e.path))
        ]
        for k in doomed:
            self._remove(k)
        return len(doomed)


def _key_size(part: object) -> int:
    """Bytes a cache key holds, the same whatever its digests' values: ``len(repr(key))`` was not
    (a digest's ``repr`` is 19 to 67 characters, by how many of its bytes need escapes)."""
    if isinstance(part, tuple):
        return 2 + sum(_key_size(p) for p in part)
    if isinstance(part, str | bytes):
        return 2 + len(part)
    return 8
