"""Key verification: the in-memory key table, argon2id off the event loop, throttling.

Hot path (a key seen before): parse + CRC-32, one dict lookup, one SHA-256 and a
constant-time compare — no argon2, no I/O. Cold path (first use of a key, or after
its record changed): argon2id in a thread, bounded by a semaphore so a flood of
bad keys cannot starve the loop or the CPU; failures are counted per client IP and
past ``failed_attempts_per_minute`` the IP gets 429 before any work is done.

The table is the whole key set, loaded at start and refreshed by polling the store,
so revocations, expiries and permission edits by any process apply within a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
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

__all__ = ["Verifier", "password_hasher"]

log = logging.getLogger("sidecar.verify")

# Argon2 runs in threads; more than the core count only queues CPU work.
ARGON2_CONCURRENCY = 2
THROTTLE_WINDOW = 60.0
MAX_TRACKED_IPS = 100_000


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
        self._failures: dict[str, deque[float]] = {}
        self._sem = asyncio.Semaphore(ARGON2_CONCURRENCY)
        self._on_change = on_change
        self._loaded_at = 0.0

    # ------------------------------------------------------------ table upkeep

    async def load(self) -> None:
        started = time.perf_counter()
        self.table = await self.store.load_all()
        self._loaded_at = time.perf_counter() - started
        log.info("loaded %d keys in %.0f ms", len(self.table), self._loaded_at * 1000)
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

    def _throttled(self, ip: str, now: float) -> float:
        """Seconds until this IP may try again, or 0."""
        q = self._failures.get(ip)
        if not q:
            return 0.0
        while q and q[0] <= now - THROTTLE_WINDOW:
            q.popleft()
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

    def parse(self, raw: str) -> ParsedKey | None:
        return parse_key(self.prefix, raw)

    async def verify(self, raw: str, client_ip: str) -> KeyRecord:
        """The key's record, or raise the contract's error (invalid/expired/revoked/429)."""
        now = self.clock()
        wait = self._throttled(client_ip, now)
        if wait > 0:
            raise TooManyFailures("too many failed key attempts from this address; slow down", wait)
        parsed = parse_key(self.prefix, raw)
        if parsed is None:
            self._fail(client_ip, now)
            raise InvalidKey("malformed API key")
        record = self.table.get(parsed.key_id)
        if record is None:
            self._fail(client_ip, now)
            raise InvalidKey("unknown API key")
        digest = hashlib.sha256(parsed.secret.encode()).digest()
        cached = self._verified.get(record.id)
        if cached is None or cached[0] != record.hash or not hmac.compare_digest(cached[1], digest):
            if not await self._argon2(record.hash, parsed.secret):
                self._fail(client_ip, now)
                raise InvalidKey("wrong API key")
            self._verified[record.id] = (record.hash, digest)
        state = record.state(now)
        if state == "revoked":
            raise RevokedKey("this API key has been revoked")
        if state == "expired":
            raise ExpiredKey("this API key has expired")
        return record

    async def _argon2(self, hashed: str, secret: str) -> bool:
        async with self._sem:
            loop = asyncio.get_running_loop()
            try:
                return bool(await loop.run_in_executor(None, self.hasher.verify, hashed, secret))
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

    def hash_secret(self, secret: str) -> str:
        return self.hasher.hash(secret)
