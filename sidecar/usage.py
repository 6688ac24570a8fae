"""Per-key usage (daily buckets) and last-used time/IP, written to the store in batches.

The hot path only bumps in-memory counters; a background task flushes them every
few seconds in one transaction each, and ``close`` flushes what is left, so usage
survives a restart without a write per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .scope import RequestScope
from .store import Store
from .store.base import UsageRow

__all__ = ["UsageRecorder"]

log = logging.getLogger("sidecar.usage")
FLUSH_INTERVAL = 5.0


class UsageRecorder:
    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time, interval: float = FLUSH_INTERVAL):
        self.store = store
        self.clock = clock
        self.interval = interval
        self._usage: dict[tuple[str, str], UsageRow] = {}
        self._last_used: dict[str, tuple[float, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._day_cache: tuple[int, str] = (-1, "")

    def _day(self, now: float) -> str:
        d = int(now // 86400)
        if d != self._day_cache[0]:
            self._day_cache = (d, time.strftime("%Y-%m-%d", time.gmtime(now)))
        return self._day_cache[1]

    def record(self, scope: RequestScope) -> None:
        if not scope.key_id:
            return
        now = self.clock()
        k = (scope.key_id, self._day(now))
        row = self._usage.get(k)
        if row is None:
            row = self._usage[k] = UsageRow()
        row.requests += 1
        row.bytes += scope.bytes_sent
        if scope.status >= 400 or scope.error:
            row.errors += 1
        if scope.rate_limited:
            row.rate_limited += 1
        self._last_used[scope.key_id] = (now, scope.client_ip)

    async def flush(self) -> None:
        usage, self._usage = self._usage, {}
        last, self._last_used = self._last_used, {}
        try:
            await self.store.add_usage(usage)
            await self.store.record_last_used(last)
        except Exception as e:
            # Put the counts back so a locked database loses nothing; next flush retries.
            log.warning("usage flush failed, will retry: %s", e)
            for k, row in usage.items():
                cur = self._usage.setdefault(k, UsageRow())
                cur.requests += row.requests
                cur.errors += row.errors
                cur.bytes += row.bytes
                cur.rate_limited += row.rate_limited
            for kid, v in last.items():
                self._last_used.setdefault(kid, v)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()
