"""Quota windows and the in-memory quota book that persists through the store.

A quota (``10000/month``, ``500/day``) is a budget per *calendar* window in UTC, not a
rate: it resets at a moment an operator can name and a client can plan for — minute,
hour and day boundaries, Monday 00:00 for weeks, the 1st of the month for months.
``PERIOD_SECONDS["month"]`` (30 days) is only used for rate-limit periods; a
``/month`` quota follows the calendar (28-31 days), so ``RateLimit-Policy`` reports the
real window length. Multiples (``1000/2days``, ``100/15minutes``) are aligned to the
Unix epoch (months: to January 1970).

``QuotaBook`` is the memory backend's counter table. The hot path only touches memory:
a counter is loaded once per (key, scope, window) from ``Store.quota_used``, requests
bump ``pending``, and a background flush (every ``rate_limits.quota_flush_interval``,
default 2 s, and on close) adds ``pending`` to the store with ``Store.add_quota`` and
re-reads the total, so a change made by another process (an admin reset) is seen within
one interval. A hard kill loses at most one interval of counts: anything that can crash
the process (OOM, kill -9) is a partial quota reset, which is why the memory and
connection bounds matter for quotas too. ``quota_metrics`` exposes the bound
(``sidecar_quota_flush_interval_seconds``) and what is at stake
(``sidecar_quota_unflushed``, ``sidecar_quota_unflushed_max``) from start-up.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Gauge

from ..config import PERIOD_SECONDS, Limit
from ..store import Store

__all__ = ["QUOTA_FLUSH_INTERVAL", "QuotaBook", "QuotaCounter", "quota_metrics", "window_bounds", "window_id"]

log = logging.getLogger("sidecar.quota")

QUOTA_FLUSH_INTERVAL = 2.0  # seconds between flushes of pending quota counts to the store
_NAME_RE = re.compile(r"^(\d*)(second|minute|hour|day|week|month)$")
_MONDAY_OFFSET = 4 * 86400  # 1970-01-01 was a Thursday; 1970-01-05 the first Monday


def window_bounds(limit: Limit, now: float) -> tuple[float, float]:
    """The calendar window (start, end) in Unix seconds, UTC, that ``now`` falls in."""
    m = _NAME_RE.match(limit.name)
    if m is None:  # not from parse_limit: fall back to epoch-aligned periods
        start = now // limit.period * limit.period
        return start, start + limit.period
    mult = int(m.group(1) or 1)
    unit = m.group(2)
    if unit == "month":
        dt = datetime.fromtimestamp(now, UTC)
        index = (dt.year - 1970) * 12 + dt.month - 1
        first = index // mult * mult
        return _month_start(first), _month_start(first + mult)
    size = PERIOD_SECONDS[unit] * mult
    offset = _MONDAY_OFFSET if unit == "week" else 0
    start = (now - offset) // size * size + offset
    return start, start + size


def _month_start(index: int) -> float:
    return float(calendar.timegm((1970 + index // 12, index % 12 + 1, 1, 0, 0, 0)))


def window_id(limit: Limit, start: float) -> str:
    """The store's window column: the period name and the UTC start, e.g. ``month:2025-06-01T00:00:00Z``."""
    return f"{limit.name}:{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(start))}"


@dataclass(slots=True)
class QuotaCounter:
    """One (key, scope, window) counter: ``base`` as last read from the store plus local ``pending``."""

    end: float  # window end; the counter is dropped after it
    base: int = 0
    pending: int = 0
    loaded: bool = False

    @property
    def used(self) -> int:
        return self.base + self.pending


CounterKey = tuple[str, str, str]  # (key id, scope, window id) — the store's quota key


class QuotaBook:
    """Quota counters for one process, persisted in batches through the store."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        interval: float = QUOTA_FLUSH_INTERVAL,
    ) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self._counters: dict[CounterKey, QuotaCounter] = {}
        self._loading: dict[CounterKey, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()  # one flush or admin change at a time
        self.max_unflushed = 0  # the largest batch a flush has written: what a crash then would have lost

    @property
    def unflushed(self) -> int:
        """Counts in memory, not yet in the store: what a crash right now would forget."""
        return sum(c.pending for c in self._counters.values())

    async def counter(self, key: CounterKey, end: float) -> QuotaCounter:
        """The loaded counter (one store read the first time a process sees it)."""
        c = self._counters.get(key)
        if c is not None and c.loaded:
            return c
        if c is None:
            c = self._counters[key] = QuotaCounter(end=end)
        waiting = self._loading.get(key)
        if waiting is not None:
            await asyncio.shield(waiting)
            return c
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            c.base = await self.store.quota_used(*key)
            c.loaded = True
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._loading[key]
        return c

    def peek(self, key: CounterKey) -> QuotaCounter | None:
        return self._counters.get(key)

    async def flush(self) -> None:
        """Write pending counts, then re-read totals so other processes' changes show up.

        Shielded: a cancel (shutdown stopping the flush task) lets the flush finish, so its
        batch is written or put back, never dropped halfway."""
        await asyncio.shield(self._locked_flush())

    async def _locked_flush(self) -> None:
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        # The batch moves into ``base`` before the write, not out of the count: while the store
        # writes and is re-read, requests must still see it (a quota of N let N more through).
        batch: dict[CounterKey, int] = {}
        for k, c in self._counters.items():
            if c.pending:
                batch[k] = c.pending
                c.base += c.pending
                c.pending = 0
        self.max_unflushed = max(self.max_unflushed, sum(batch.values()))
        try:
            await self.store.add_quota(batch)
        except Exception as e:
            log.warning("quota flush failed, will retry: %s", e)
            for k, n in batch.items():
                back = self._counters.get(k)
                if back is not None:
                    back.base -= n
                    back.pending += n
            return
        now = self.clock()
        for k, c in list(self._counters.items()):
            if c.end <= now and not c.pending:
                del self._counters[k]
            elif k in batch and c.loaded:
                try:
                    c.base = await self.store.quota_used(*k)
                except Exception as e:  # the write went through (base holds it); corrected next time
                    log.warning("quota re-read failed: %s", e)

    async def set_used(self, key: CounterKey, end: float, used: int) -> int:
        """Admin reset: the window's count becomes ``used`` everywhere this store reaches."""
        async with self._lock:
            await self._flush()
            await self.store.set_quota(*key, used)
            c = self._counters.setdefault(key, QuotaCounter(end=end))
            c.base, c.loaded = used, True
            return c.used

    async def add_used(self, key: CounterKey, end: float, delta: int) -> int:
        """Admin top-up (negative ``delta``) or charge; atomic in the store."""
        async with self._lock:
            await self._flush()
            await self.store.add_quota({key: delta})
            c = self._counters.setdefault(key, QuotaCounter(end=end))
            c.base, c.loaded = await self.store.quota_used(*key), True
            return c.used

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()


def quota_metrics(book: QuotaBook | None, registry: CollectorRegistry, flush_interval: float) -> None:
    """Gauges, present from start-up, of what a crash could cost the quotas (none with Redis: ``book`` None)."""
    Gauge(
        "sidecar_quota_flush_interval_seconds",
        "Seconds between writes of quota counts to the store: a crash forgets at most this long of counting "
        "(0: counted in Redis, nothing to lose)",
        registry=registry,
    ).set(flush_interval if book is not None else 0)
    Gauge(
        "sidecar_quota_unflushed",
        "Quota counts in memory and not yet in the store: what a crash now would forget",
        registry=registry,
    ).set_function(lambda: book.unflushed if book is not None else 0)
    Gauge(
        "sidecar_quota_unflushed_max",
        "The most quota counts one flush has written since start: the most a crash would have forgotten",
        registry=registry,
    ).set_function(lambda: book.max_unflushed if book is not None else 0)
