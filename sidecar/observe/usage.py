"""Per-key usage (daily buckets) and last-used time/IP, written to the store in batches.

The hot path only bumps in-memory counters; a background task flushes them every
``interval`` seconds (``store.usage_flush_interval``, default 5 s; one transaction per
table), and ``close`` stops that task *between* flushes and writes what is left, so usage
survives a restart without a write per request. A flush that fails (database locked by
the CLI, disk full, read-only) puts its counts back for the next one: nothing is lost
while the process lives, nothing is counted twice. A ``kill -9`` forgets what was counted
since the last flush: at most one interval (tests/faults/test_fault_crash.py). Each flush
also retries the audit events the store held back (``Store.flush_pending``).

A day bucket (UTC, ``YYYY-MM-DD``) holds, for requests made with a verified key:

- ``requests``: every request, whatever its answer;
- ``errors``: answered with a status >= 400, or cut short by an upstream failure
  (a client that goes away is not an error: 499 and ``client_disconnected`` are not counted);
- ``bytes``: response body bytes sent to the client (as ``sidecar_response_bytes_total``);
- ``rate_limited``: refused by a rate limit or quota (429).

Requests without a verified key (401s) are in Prometheus, not here: there is no key
to charge them to. ``report`` is what ``GET /admin/keys/{id}/usage`` and
``sidecar keys usage`` print.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ..core.scope import RequestScope
from ..store import Store
from ..store.base import UsageRow

__all__ = ["FLUSH_INTERVAL", "MAX_DAYS", "UsageRecorder", "day_of", "report"]

log = logging.getLogger("sidecar.usage")
FLUSH_INTERVAL = 5.0
MAX_DAYS = 3660  # what ``days=`` may ask for: ten years of daily buckets


def day_of(t: float) -> str:
    """The UTC day bucket of a Unix time."""
    return time.strftime("%Y-%m-%d", time.gmtime(t))


class UsageRecorder:
    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time, interval: float = FLUSH_INTERVAL):
        self.store = store
        self.clock = clock
        self.interval = interval
        self._usage: dict[tuple[str, str], UsageRow] = {}
        self._last_used: dict[str, tuple[float, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()  # one flush at a time: the loop's and an admin read's
        self._day_cache: tuple[int, str] = (-1, "")

    def _day(self, now: float) -> str:
        d = int(now // 86400)
        if d != self._day_cache[0]:
            self._day_cache = (d, day_of(now))
        return self._day_cache[1]

    def record(self, scope: RequestScope) -> None:
        """Count one finished request (hot path: dict updates only)."""
        if not scope.key_id:
            return
        now = self.clock()
        k = (scope.key_id, self._day(now))
        row = self._usage.get(k)
        if row is None:
            row = self._usage[k] = UsageRow()
        row.requests += 1
        row.bytes += scope.bytes_sent
        status = scope.status
        if (status >= 400 and status != 499) or (scope.error and scope.error != "client_disconnected"):
            row.errors += 1
        if scope.rate_limited:
            row.rate_limited += 1
        self._last_used[scope.key_id] = (now, scope.client_ip)

    @property
    def pending(self) -> int:
        """Requests counted but not yet written."""
        return sum(r.requests for r in self._usage.values())

    async def flush(self) -> None:
        """Write what was counted since the last flush; on failure keep it for the next one."""
        async with self._lock:
            usage, self._usage = self._usage, {}
            last, self._last_used = self._last_used, {}
            try:
                await self.store.add_usage(usage)
            except Exception as e:
                log.warning("usage flush failed, will retry: %s", e)
                self._restore_usage(usage)
            try:
                await self.store.record_last_used(last)
            except Exception as e:
                log.warning("last-used flush failed, will retry: %s", e)
                for kid, v in last.items():
                    cur = self._last_used.get(kid)
                    if cur is None or cur[0] < v[0]:
                        self._last_used[kid] = v
            await self.store.flush_pending()  # never raises: what fails stays held

    def _restore_usage(self, usage: dict[tuple[str, str], UsageRow]) -> None:
        for k, row in usage.items():
            cur = self._usage.setdefault(k, UsageRow())
            cur.requests += row.requests
            cur.errors += row.errors
            cur.bytes += row.bytes
            cur.rate_limited += row.rate_limited

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
            try:
                await self.flush()
            except Exception:  # whatever a store does, the loop must outlive it (counts are kept)
                log.exception("usage flush failed")

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop the loop (never in the middle of a write) and flush what is left."""
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            await asyncio.gather(task, return_exceptions=True)
        await self.flush()


async def report(store: Store, key_id: str, days: int, now: float) -> dict[str, Any]:
    """Usage of one key over the last ``days`` UTC days (today included), oldest first, and totals.

    Only days with traffic are listed.
    """
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days: expected a whole number from 1 to {MAX_DAYS}")
    first = day_of(now - (days - 1) * 86400)
    # The store returns the ``days`` most recent buckets; those before ``first`` are older than asked.
    rows = [r for r in await store.usage(key_id, days) if r["day"] >= first]
    total = {f: sum(int(r[f]) for r in rows) for f in ("requests", "errors", "bytes", "rate_limited")}
    return {"from": first, "to": day_of(now), "days": rows, "total": total}
