"""Key verification: the in-memory key table, argon2id off the event loop, throttling.

Hot path (a key seen before): one SHA-256 of the presented key and a dict lookup of
that fingerprint, filled only once the key has passed the full check (so it cannot be
reached by guessing) and trusted only while the table still holds the very record it
names (a reload, rotation or revocation replaces it) — no argon2, no I/O. Warm path
(the fingerprint forgotten or the record replaced): parse + CRC-32, one dict lookup,
one SHA-256 and a constant-time compare against the cached verification. Cold path (first use of a key, or after
its record changed): argon2id in a thread, bounded by a semaphore so a flood of
bad keys cannot starve the loop or the CPU, and run once for many requests that
bring the same new key together; failures are counted per client IP and past
``failed_attempts_per_minute`` the IP gets 429 before any work is done.

The table is the whole key set, loaded at start and refreshed by polling the store,
so revocations, expiries and permission edits by any process apply within a second.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import hashlib
import hmac
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .config import KeysConfig
from .errors import ExpiredKey, InvalidKey, RevokedKey, TooManyFailures
from .keys import ParsedKey, parse_key
from .models import KeyRecord
from .store import Store

__all__ = ["Verifier", "argon2_pool", "password_hasher"]

log = logging.getLogger("sidecar.verify")

THROTTLE_WINDOW = 60.0
GC_FREEZE_KEYS = 10_000  # tables this big are frozen out of the cyclic GC (see _settle)
MAX_TRACKED_IPS = 100_000
MAX_FINGERPRINTS = 200_000  # presented keys remembered for the hot path (cleared when full)
# Argon2 runs in threads; more than the core count only queues CPU work.
ARGON2_CONCURRENCY = 2
# argon2 threads run at a lower CPU priority than the event loop (Linux: per thread), so
# a flood of wrong keys queues behind the requests being served instead of starving them.
ARGON2_NICENESS = 10
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ARGON2_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def argon2_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's argon2 threads: CPU is per process, so one small pool serves every verifier."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(
            ARGON2_CONCURRENCY, thread_name_prefix="sidecar-argon2", initializer=_lower_priority
        )
    return _pool


def _settle(table: dict[str, KeyRecord]) -> None:
    """Keep a big key table out of the garbage collector's way.

    With 100 000 keys loaded every full collection walks ~150 000 more objects, a pause of
    ~150 ms on the event loop. The records hold no reference cycles (replaced ones are freed
    by reference counting), so moving what exists now to the permanent generation is safe.
    """
    if len(table) >= GC_FREEZE_KEYS:
        gc.freeze()


def password_hasher(profile: str = "rfc9106_low_memory") -> argon2.PasswordHasher:
    """argon2id with RFC 9106's low-memory profile (64 MiB, t=3), or the cheapest for tests."""
    params = argon2.profiles.CHEAPEST if profile == "cheapest" else argon2.profiles.RFC_9106_LOW_MEMORY
    return argon2.PasswordHasher.from_parameters(params)


class Verifier:
    def __init__(
        self,
        store: Store,
        config: KeysConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[list[KeyRecord], bool], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.prefix = config.prefix
        self.clock = clock
        self.hasher = password_hasher(config.argon2_profile)
        self.table: dict[str, KeyRecord] = {}
        # key id -> (argon2 hash it was verified against, sha256 of the secret)
        self._verified: dict[str, tuple[str, bytes]] = {}
        # sha256 of a whole presented key -> the record it passed as (the hot path)
        self._known: dict[bytes, KeyRecord] = {}
        self._failures: dict[str, deque[float]] = {}
        self._sem = asyncio.Semaphore(ARGON2_CONCURRENCY)
        self._pending: dict[tuple[str, str, bytes], asyncio.Future[bool]] = {}
        # Counters for tests, benchmarks and the curious: how often the slow paths ran.
        self.argon2_runs = 0
        self.store_lookups = 0
        self._on_change = on_change
        self._loaded_at = 0.0

    # ------------------------------------------------------------ table upkeep

    async def load(self) -> None:
        started = time.perf_counter()
        self.table = await self.store.load_all()
        self._loaded_at = time.perf_counter() - started
        log.info("loaded %d keys in %.0f ms", len(self.table), self._loaded_at * 1000)
        _settle(self.table)
        if self._on_change:
            self._on_change(list(self.table.values()), True)

    async def refresh(self, force: bool = False) -> bool:
        """Apply changes made by any process; True when something changed."""
        changes = await self.store.poll(force=force)
        if changes is None:
            return False
        if changes.full:
            self.table = {r.id: r for r in changes.records}
            self._verified = {k: v for k, v in self._verified.items() if k in self.table}
            self._known = {}
            _settle(self.table)
        else:
            for rec in changes.records:
                self.table[rec.id] = rec
        if self._on_change:
            self._on_change(changes.records, changes.full)
        return True

    async def watch(self, interval: float) -> None:
        """Poll the store forever (run as a task); errors are logged, never fatal."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception as e:  # a locked or vanished DB must not kill the server
                log.warning("key store poll failed, keeping current keys: %s", e)

    # ------------------------------------------------------------ verification

    def throttled(self, ip: str, now: float) -> float:
        """Seconds until this IP may try again, or 0."""
        q = self._failures.get(ip)
        if not q:
            return 0.0
        while q and q[0] <= now - THROTTLE_WINDOW:
            q.popleft()
        if not q:
            del self._failures[ip]
            return 0.0
        if len(q) >= self.config.failed_attempts_per_minute:
            return q[0] + THROTTLE_WINDOW - now
        return 0.0

    def _fail(self, ip: str, now: float) -> None:
        q = self._failures.get(ip)
        if q is None:
            if len(self._failures) >= MAX_TRACKED_IPS:
                self._failures.clear()  # bounded memory beats perfect bookkeeping under attack
            q = self._failures[ip] = deque()
        q.append(now)

    def _too_many(self, wait: float) -> TooManyFailures:
        return TooManyFailures("too many failed key attempts from this address; slow down", wait)

    def parse(self, raw: str) -> ParsedKey | None:
        return parse_key(self.prefix, raw)

    async def verify(self, raw: str, client_ip: str) -> KeyRecord:
        """The key's record, or raise the contract's error (invalid/expired/revoked/429).

        Order: throttle → format and checksum (a typo stops here, before any lookup) →
        in-memory table (then the store, for a key another process created since the
        last poll) → cached verification or argon2id in a thread → revoked/expired.
        """
        now = self.clock()
        wait = self.throttled(client_ip, now)
        if wait > 0:
            raise self._too_many(wait)
        fingerprint = hashlib.sha256(raw.encode()).digest()
        known = self._known.get(fingerprint)
        if known is not None and self.table.get(known.id) is known:
            return self._usable(known, now)
        parsed = parse_key(self.prefix, raw)
        if parsed is None:
            self._fail(client_ip, now)
            raise InvalidKey("malformed API key")
        record = self.table.get(parsed.key_id)
        if record is None:
            record = await self._lookup(parsed.key_id)
            if record is None:
                self._fail(client_ip, now)
                raise InvalidKey("unknown API key")
        digest = hashlib.sha256(parsed.secret.encode()).digest()
        cached = self._verified.get(record.id)
        fresh = cached is not None and cached[0] == record.hash and hmac.compare_digest(cached[1], digest)
        if not fresh and not await self._check_secret(record, parsed.secret, digest, client_ip):
            raise InvalidKey("wrong API key")  # the failure was counted where argon2 ran
        if len(self._known) >= MAX_FINGERPRINTS:
            self._known.clear()
        self._known[fingerprint] = record
        return self._usable(record, self.clock())

    @staticmethod
    def _usable(record: KeyRecord, now: float) -> KeyRecord:
        state = record.state(now)
        if state == "revoked":
            raise RevokedKey("this API key has been revoked")
        if state == "expired":
            raise ExpiredKey("this API key has expired")
        return record

    async def _lookup(self, key_id: str) -> KeyRecord | None:
        """A well-formed key missing from the table: created by another process since the last poll?"""
        self.store_lookups += 1
        try:
            record = await self.store.get(key_id)
        except Exception as e:  # a locked store must not turn into a 500
            log.warning("key store lookup failed: %s", e)
            return None
        if record is not None and record.id not in self.table:
            self.table[record.id] = record
        return self.table.get(key_id)

    async def _check_secret(self, record: KeyRecord, secret: str, digest: bytes, client_ip: str) -> bool:
        """argon2id, once per (key, secret) however many requests arrive together."""
        token = (record.id, record.hash, digest)
        pending = self._pending.get(token)
        if pending is None:
            pending = asyncio.ensure_future(self._argon2(record.hash, secret, client_ip))
            self._pending[token] = pending

            def done(fut: asyncio.Future[bool]) -> None:
                self._pending.pop(token, None)
                if not fut.cancelled():
                    fut.exception()  # retrieved here, so a result nobody waits for is not logged

            pending.add_done_callback(done)
        ok = await asyncio.shield(pending)
        if ok:
            self._verified[record.id] = (record.hash, digest)
        return ok

    async def _argon2(self, hashed: str, secret: str, client_ip: str) -> bool:
        async with self._sem:
            # Re-check after queueing: a burst of wrong guesses from one address must
            # not all reach argon2 just because they passed the door together.
            wait = self.throttled(client_ip, self.clock())
            if wait > 0:
                raise self._too_many(wait)
            self.argon2_runs += 1
            loop = asyncio.get_running_loop()
            try:
                return bool(await loop.run_in_executor(argon2_pool(), self.hasher.verify, hashed, secret))
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                # Counted before the slot is released, so the next guess in line sees it.
                self._fail(client_ip, self.clock())
                return False

    def hash_secret(self, secret: str) -> str:
        return self.hasher.hash(secret)
