"""Key verification: the in-memory key table, argon2id off the event loop, throttling.

Hot path (a key seen before): one SHA-256 of the presented key and a dict lookup of
that fingerprint, filled only once the key has passed the full check (so it cannot be
reached by guessing) and trusted only while the table still holds the very record it
names (a reload, rotation or revocation replaces it) — no argon2, no I/O. Warm path
(the fingerprint forgotten or the record replaced): parse + CRC-32, one dict lookup,
one SHA-256 and a constant-time compare against the cached verification. Cold path (first use of a key, or after
its record changed): argon2id in a thread, handed out by a fair queue (``FairSlots``)
so a flood of bad keys cannot starve the loop, the CPU or other clients, and run once
for many requests that bring the same new key together.

Throttling refuses *failures*, never keys that verify. Failures are counted per client
address (IPv6 per /64), per key id and per (address, key id) "lane". Past
``failed_attempts_per_minute`` an address's failures answer 429 instead of 401, it gets
no store lookups, and a lane that already failed gets no more argon2 — but a key that
verified before (hot and warm paths) always passes, and a new key from a throttled
address (a NAT shared with an attacker) is still checked. The queue serves lanes whose
address and key id have the fewest recent failures first, then round robin, with at
most ``LANE_DEPTH`` checks per lane: one client's flood delays another client's first
verification by about one argon2 run, not by the length of the flood.

The table is the whole key set, loaded at start and refreshed by polling the store,
so revocations, expiries and permission edits by any process apply within a second.

Clocks (``sidecar.clocks``): expiry and revocation are moments on the wall clock, so a
key expiring at T is refused from wall time T on, never before — a step forward of the
clock past T ends it, as it should. A step *back* does not revive it: a record seen
revoked or expired (when the table loads it, or when it is presented) stays so until the
record itself changes (``state``). Failure throttling measures its one-minute windows on
the steady clock, so a step back neither throttles an address for an hour nor a step
forward forgives its failures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import hashlib
import hmac
import ipaddress
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..clocks import steady_clock
from ..config import KeysConfig
from ..core.errors import ExpiredKey, InvalidKey, RevokedKey, SidecarError, TooManyFailures
from .keys import ParsedKey, parse_key
from .latch import Ended, carried, carry, current
from .models import KeyRecord

if TYPE_CHECKING:  # the verifier reads a store; it never depends on store/ at run time
    from ..store import Store

__all__ = ["FairSlots", "Verifier", "argon2_pool", "password_hasher", "reload_error_metric", "throttle_bucket"]

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
LANE_DEPTH = 2  # argon2 checks of distinct secrets per (address, key id) at once; a real client sends one
MAX_WAITING = 1024  # argon2 checks waiting in all; past it new checks get 429 (memory stays bounded)
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


def throttle_bucket(ip: str) -> str:
    """The unit failures are counted in: the address, or its /64 for IPv6 (one host owns a whole /64).

    An IPv4-mapped address (``::ffff:a.b.c.d``: a dual-stack socket, as ``workers: N`` binds for
    ``[::]``, or an ingress reporting one) is its IPv4 address: its /64 is ``::/64``, every IPv4
    client's, so one attacker's failures would throttle them all.
    """
    if ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip)
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    except ValueError:
        return ip


Lane = tuple[str, str]  # (throttle bucket, key id)


class _LaneQueue:
    __slots__ = ("created", "last", "waiters")

    def __init__(self, created: int) -> None:
        self.created = created
        self.last = 0  # dispatch sequence of its last grant (0: never served): round robin
        self.waiters: deque[asyncio.Future[None]] = deque()


class FairSlots:
    """``slots`` argon2 slots granted fairly between lanes instead of first come, first served.

    A free slot goes to the waiting lane with the lowest ``penalty`` (recent failures of
    its address and key id), then the one served longest ago, then the oldest. A new
    client is thus next in line behind at most the checks already running.
    """

    def __init__(self, slots: int, penalty: Callable[[Lane], int]) -> None:
        self.free = slots
        self.penalty = penalty
        self._lanes: dict[Lane, _LaneQueue] = {}
        self._seq = itertools.count(1)
        self.waiting = 0

    async def acquire(self, lane: Lane) -> None:
        if self.free > 0 and not self._lanes:
            self.free -= 1
            return
        q = self._lanes.get(lane)
        if q is None:
            q = self._lanes[lane] = _LaneQueue(next(self._seq))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        q.waiters.append(fut)
        self.waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._lanes:
            lane = min(self._lanes, key=self._rank)
            q = self._lanes[lane]
            fut = q.waiters.popleft()
            self.waiting -= 1
            if not q.waiters:
                del self._lanes[lane]
            if fut.done():  # its caller was cancelled while waiting
                continue
            q.last = next(self._seq)
            fut.set_result(None)
            return
        self.free += 1

    def _rank(self, lane: Lane) -> tuple[int, int, int]:
        q = self._lanes[lane]
        return self.penalty(lane), q.last, q.created


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
        steady: Callable[[], float] | None = None,
        on_change: Callable[[list[KeyRecord], bool], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.prefix = config.prefix
        self.clock = clock  # wall: expiry and revocation
        self.steady = steady_clock(clock, steady)  # intervals: failure throttling
        # key id -> (record, state, own end) once seen ended: a wall clock stepped back revives nothing (``latch``)
        self._ended: dict[str, Ended] = {}
        self.hasher = password_hasher(config.argon2_profile)
        self.table: dict[str, KeyRecord] = {}
        # key id -> (argon2 hash it was verified against, sha256 of the secret)
        self._verified: dict[str, tuple[str, bytes]] = {}
        # sha256 of a whole presented key -> the record it passed as (the hot path)
        self._known: dict[bytes, KeyRecord] = {}
        # failure times per address bucket, per "#<key id>" and per "<bucket> <key id>" lane
        self._failures: dict[str, deque[float]] = {}
        self._slots = FairSlots(ARGON2_CONCURRENCY, self._penalty)
        self._load: dict[Lane, int] = {}  # argon2 checks queued or running per lane
        self._pending: dict[tuple[str, str, bytes], asyncio.Future[bool]] = {}
        # Counters for tests, benchmarks and the curious: how often the slow paths ran.
        self.argon2_runs = 0
        self.store_lookups = 0
        self.poll_errors = 0  # polls that failed and kept the current keys (sidecar_store_reload_errors_total)
        self._on_change = on_change
        self._refreshing = asyncio.Lock()
        self._loaded_at = 0.0

    # ------------------------------------------------------------ table upkeep

    async def load(self) -> None:
        started = time.perf_counter()
        self.table = await self.store.load_all()
        self._note_ended(self.table.values())
        self._loaded_at = time.perf_counter() - started
        log.info("loaded %d keys in %.0f ms", len(self.table), self._loaded_at * 1000)
        _settle(self.table)
        if self._on_change:
            self._on_change(list(self.table.values()), True)

    async def refresh(self, force: bool = False) -> bool:
        """Apply changes made by any process; True when something changed. One re-read at a time: a
        full one (SIGHUP) applied after a poll that saw a newer revocation would undo it for good."""
        async with self._refreshing:
            return await self._refresh(force)

    async def _refresh(self, force: bool) -> bool:
        changes = await self.store.poll(force=force)
        if changes is None:
            return False
        if changes.full:
            self.table = {r.id: r for r in changes.records}
            self._verified = {k: v for k, v in self._verified.items() if k in self.table}
            self._known = {}
            self._ended = {k: kept for k, v in self._ended.items() if (kept := carried(v, self.table.get(k)))}
            _settle(self.table)
        else:
            for rec in changes.records:
                self.table[rec.id] = rec
                carry(self._ended, rec)
        self._note_ended(changes.records)
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
                self.poll_errors += 1
                log.warning("key store poll failed, keeping current keys: %s", e)

    def _note_ended(self, records: Iterable[KeyRecord]) -> None:
        now = self.clock()
        for rec in records:
            if (rec.revoked_at is not None and rec.revoked_at <= now) or (
                rec.expires_at is not None and rec.expires_at <= now
            ):
                self.state(rec, now)

    def state(self, record: KeyRecord, now: float) -> str:
        """``record.state(now)``, except that a record once seen revoked or expired stays so.

        The latch holds while ``revoked_at`` and ``expires_at`` stay as they were, across re-reads too
        (``latch.carried``): an admin who extends or un-revokes a key changes them. One dict lookup.
        """
        state = own = record.state(now)
        if state == "active" and record.parent_id is not None:  # an OAuth grant ends with its parent key
            parent = self.table.get(record.parent_id)
            state = "revoked" if parent is None or parent.parent_id is not None else self.state(parent, now)
        if state != "active":
            self._ended[record.id] = (record, state, own != "active")
            return state
        if self._ended:
            ended = self._ended.get(record.id)
            if ended is not None and ended[0] is record:
                return ended[1]
        return state

    # ------------------------------------------------------------ verification

    def _recent(self, name: str, now: float) -> int:
        """Failures recorded under ``name`` within the window (expired ones forgotten)."""
        q = self._failures.get(name)
        if not q:
            return 0
        while q and q[0] <= now - THROTTLE_WINDOW:
            q.popleft()
        if not q:
            del self._failures[name]
        return len(q)

    def throttled(self, ip: str, now: float) -> float:
        """Seconds until failures from this address answer 401 again instead of 429, or 0 (``now``: ``steady()``)."""
        bucket = throttle_bucket(ip)
        if self._recent(bucket, now) >= self.config.failed_attempts_per_minute:
            return self._failures[bucket][0] + THROTTLE_WINDOW - now
        return 0.0

    def _fail(self, ip: str, now: float, key_id: str | None = None) -> None:
        names = [ip] if key_id is None else [ip, "#" + key_id, f"{ip} {key_id}"]
        for name in names:
            q = self._failures.get(name)
            if q is None:
                if len(self._failures) >= MAX_TRACKED_IPS:
                    self._failures.clear()  # bounded memory beats perfect bookkeeping under attack
                # Only the newest `failed_attempts_per_minute` matter (``throttled`` reads the oldest of
                # them): a flood from one address costs constant memory, not rate × window.
                q = self._failures[name] = deque(maxlen=max(1, self.config.failed_attempts_per_minute))
            q.append(now)

    def _penalty(self, lane: Lane) -> int:
        """How far back in the argon2 queue a lane goes: recent failures of its address and key id."""
        now = self.steady()
        return self._recent(lane[0], now) + self._recent("#" + lane[1], now)

    def _too_many(self, wait: float) -> TooManyFailures:
        return TooManyFailures("too many failed key attempts from this address; slow down", wait)

    def refuse(self, client_ip: str, error: SidecarError) -> SidecarError:
        """Count a failure of another credential kind (a JWT that does not verify, a JWT at the admin
        API) against the address, like a forged key's; past the threshold the answer is 429, not 401."""
        return self._refuse(throttle_bucket(client_ip), self.steady(), error)

    def _refuse(self, bucket: str, now: float, error: SidecarError, key_id: str | None = None) -> SidecarError:
        """Count a failure; past the threshold the answer is 429 rather than 401."""
        wait = self.throttled(bucket, now)
        self._fail(bucket, now, key_id)
        return self._too_many(wait) if wait > 0 else error

    def parse(self, raw: str) -> ParsedKey | None:
        return parse_key(self.prefix, raw)

    async def verify(self, raw: str, client_ip: str) -> KeyRecord:
        """The key's record, or raise the contract's error (invalid/expired/revoked/429).

        Order: remembered key (always passes, throttled address or not) → format and
        checksum (a typo stops here, before any lookup) → in-memory table (then the store,
        for a key another process created since the last poll; not for throttled addresses)
        → cached verification or argon2id through the fair queue → revoked/expired.
        """
        # surrogateescape: header bytes that are not UTF-8 arrive as lone surrogates (a 500 before).
        fingerprint = hashlib.sha256(raw.encode("utf-8", "surrogateescape")).digest()
        known = self._known.get(fingerprint)
        if known is not None and self.table.get(known.id) is known:
            return self._usable(known, self.clock())
        now = self.steady()  # failure windows (the wall clock is only for expiry)
        bucket = throttle_bucket(client_ip)
        parsed = parse_key(self.prefix, raw)
        if parsed is None:
            raise self._refuse(bucket, now, InvalidKey("malformed API key"))
        record = self.table.get(parsed.key_id)
        if record is None:
            if self.throttled(bucket, now) <= 0:
                record = await self._lookup(parsed.key_id)
            if record is None:
                raise self._refuse(bucket, now, InvalidKey("unknown API key"))
        digest = hashlib.sha256(parsed.secret.encode()).digest()
        cached = self._verified.get(record.id)
        fresh = cached is not None and cached[0] == record.hash and hmac.compare_digest(cached[1], digest)
        if not fresh and not await self._check_secret(record, parsed.secret, digest, bucket):
            raise InvalidKey("wrong API key")  # the failure was counted where argon2 ran
        if not fresh:
            record = current(self.table, record)  # argon2 queued: revoked or replaced meanwhile?
        if len(self._known) >= MAX_FINGERPRINTS:
            self._known.clear()
        self._known[fingerprint] = record
        return self._usable(record, self.clock())

    def _usable(self, record: KeyRecord, now: float) -> KeyRecord:
        state = self.state(record, now)
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

    def _lane_closed(self, lane: Lane, now: float) -> float:
        """Seconds of 429 for a throttled address's lane that already failed (no more argon2 there), or 0."""
        wait = self.throttled(lane[0], now)
        if wait > 0 and self._recent(f"{lane[0]} {lane[1]}", now):
            return wait
        return 0.0

    async def _check_secret(self, record: KeyRecord, secret: str, digest: bytes, bucket: str) -> bool:
        """argon2id, once per (key, secret) however many requests arrive together."""
        token = (record.id, record.hash, digest)
        pending = self._pending.get(token)
        if pending is None:
            lane = (bucket, record.id)
            now = self.steady()
            wait = self._lane_closed(lane, now)
            if wait > 0:
                raise self._too_many(wait)
            load = self._load.get(lane, 0)
            # len(_pending), not the slots' waiting count: checks scheduled in this loop iteration have
            # not reached the queue yet, and a burst of connections read together would all pass.
            if load >= LANE_DEPTH or len(self._pending) >= MAX_WAITING + ARGON2_CONCURRENCY:
                # Distinct secrets for one key from one address at once: guesses, not a client.
                raise self._too_many(max(self.throttled(bucket, now), 1.0))
            self._load[lane] = load + 1
            pending = asyncio.ensure_future(self._argon2(record.hash, secret, lane))
            self._pending[token] = pending

            def done(fut: asyncio.Future[bool]) -> None:
                self._pending.pop(token, None)
                left = self._load.get(lane, 1) - 1
                if left > 0:
                    self._load[lane] = left
                else:
                    self._load.pop(lane, None)
                if not fut.cancelled():
                    fut.exception()  # retrieved here, so a result nobody waits for is not logged

            pending.add_done_callback(done)
        ok = await asyncio.shield(pending)
        if ok:
            self._verified[record.id] = (record.hash, digest)
        return ok

    async def _argon2(self, hashed: str, secret: str, lane: Lane) -> bool:
        await self._slots.acquire(lane)
        try:
            # Re-check after queueing: guesses that queued together must not all reach
            # argon2 once the first of them has failed and the address is throttled.
            wait = self._lane_closed(lane, self.steady())
            if wait > 0:
                raise self._too_many(wait)
            self.argon2_runs += 1
            loop = asyncio.get_running_loop()
            try:
                return bool(await loop.run_in_executor(argon2_pool(), self.hasher.verify, hashed, secret))
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                # Counted before the slot is released, so the next guess in line sees it.
                now = self.steady()
                wait = self.throttled(lane[0], now)
                self._fail(lane[0], now, lane[1])
                if wait > 0:
                    raise self._too_many(wait) from None
                return False
        finally:
            self._slots.release()

    def hash_secret(self, secret: str) -> str:
        return self.hasher.hash(secret)

    @property
    def reload_errors(self) -> int:
        """Reloads of the key set that failed and kept the last good set in force."""
        return self.poll_errors + int(getattr(self.store, "reload_errors", 0))


class _ReloadErrors(Collector):
    def __init__(self, verifier: Verifier, store_kind: str) -> None:
        self.verifier = verifier
        self.store_kind = store_kind

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "sidecar_store_reload_errors",
            "Reloads of the key set that failed (a broken, half-written or missing keys file, an unreadable "
            "store); the last good key set stayed in force",
            labels=["store"],
        )
        family.add_metric([self.store_kind], self.verifier.reload_errors)
        yield family


def reload_error_metric(verifier: Verifier, store_kind: str, registry: CollectorRegistry) -> None:
    """Register ``sidecar_store_reload_errors_total{store}`` (read at scrape time: nothing per poll)."""
    registry.register(_ReloadErrors(verifier, store_kind))
