"""A key's limits moved to another scope keep what was spent (DESIGN invariant 10).

Which quota counts a key on an upstream decides its counter (``gcra.resolve_plan``): a quota of
the key's own (or the global default) is one counter across all upstreams, scope ``*``; an
upstream's quota a counter per upstream, scope = the upstream's id. Setting or removing a key's
own quota therefore moves the key to other counters — before this module, fresh ones: a key
that had spent its upstream's ``3/day`` got a quota of its own of ``3/day`` (a delegate may give
that to a key of its owner, itself included) and 3 more requests, and back again.

**Carried, not refused.** After an edit that changes the key's ``quota``, each counter that now
applies is raised to at least the sum of the counters that applied before on the upstreams it
covers, in the same window (same window id; a quota moved to another period, ``/day`` to
``/month``, starts that period's counter where it stands). Refusing the edit (409) while the
window has spending was the other choice; it would block an operator's reorganisation for up to
a month, and carrying is as safe: by induction every applying counter stays at least what the
key spent in the window on its upstreams, however often it moves. From the key's own quota to
per-upstream ones each upstream's counter gets the whole count: the key's own counter does not
say on which upstream it was spent, so each is assumed (never fewer than were served).

The raise is an atomic add (store, Redis or the worker host), so counts made meanwhile are never
lost, only possibly counted twice. It runs right after the edit's write, before this process's
hot path sees the edit; what another process (worker, replica) counts in the old scope before
it sees the edit (its poll, at most ``store.poll_interval``) — and, with the memory backend on
several replicas, what they have not flushed yet (``rate_limits.quota_flush_interval``) — is
not carried. A counter that cannot be reached then (Redis down) is logged, not carried: the
edit is already written, and the key is then limited as ``on_redis_error`` says anyway.

**Rate limits** have the same two scopes (a bucket is named by its scope and its limit's
period, ``gcra.RateRule``): setting or removing a key's own ``rate_limits`` moved it
from the upstream's buckets to fresh ones and back to the spent ones refilled meanwhile, about
twice the rate. Within one scope, a limit moved to another period (``3/day`` spent, then
``3/week``) is another bucket, and a limit that stays in its bucket keeps its debt as time, a
fraction of a longer limit (buckets were named by place, so ``["1/minute", "3/day"]`` spent,
then ``["3/day"]``, also put the day's limit in the minute's paid-off bucket; the global default
and a list of the key's own share scope ``*``). So after any edit of
``rate_limits``, ``carry_rates`` charges each bucket whose limit changed (another limit, or a
bucket it did not have) with what the buckets it replaces owe, as requests: the most any of an
upstream's old buckets owes (a ``2/minute`` owing 60 s owes 2 requests, which a ``100/day``
then owes as 2 × 864 s), summed over the old scopes it covers, never past the new bucket's
burst; what a bucket already owes is kept (the charge only tops it up), and a bucket whose
limit is unchanged is left alone. Charged through the backend's own check (cost n),
so it is as atomic as a request. Concurrency has scopes too; a move leaves in-flight requests
counted in the old scope until they end (they are few and short-lived, not a budget over time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..auth.models import KeyRecord
from ..core.errors import ServiceUnavailable
from ..store import StoreError
from .gcra import US, BackendDown, BackendRefused, Outcome, Plan, QuotaRule, RateRule, budget_of, resolve_plan
from .quota import CounterKey, window_bounds, window_id

if TYPE_CHECKING:
    from .ratelimit import RateLimiter

__all__ = ["EditLocks", "carry_quota", "carry_rates"]

log = logging.getLogger("sidecar.ratelimit")


class EditLocks:
    """One lock per key whose limits are being edited: one edit's write and carry end before the next begins.

    Why: two edits racing (``A -> B`` and ``B -> C``) let the second read ``B``'s buckets and counters
    before the first had charged them, so up to a burst went uncarried, every time; a delegate could
    repeat it at will. Held by the application (every admin API and console edit of this process).
    With ``rate_limits.backend: redis`` the edit also holds a lock in Redis (``RedisBackend.edit_lock``:
    redis-py's ``Lock``, a random token, a 10 s expiry, released only by its holder), so two replicas
    editing one key at the same instant run one after the other too. An edit that cannot have it
    within ``EDIT_LOCK_WAIT`` (a stream of edits of that key elsewhere) is ``503 service_unavailable``,
    nothing written. Redis unreachable: the edit goes ahead under this process's lock, logged — as its
    carry does then (module docstring), the admin client sees its 200.
    """

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}  # holders and waiters per key: the lock goes with the last
        self._elsewhere: dict[str, int] = {}  # edits of this process waiting for the replicas' lock

    @contextlib.asynccontextmanager
    async def hold(self, key_id: str, limiter: RateLimiter | None = None) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key_id, asyncio.Lock())
        self._waiting[key_id] = self._waiting.get(key_id, 0) + 1
        try:
            async with lock:
                if limiter is None or limiter.rl.backend != "redis" or limiter.redis is None:
                    yield
                else:
                    async with self._across_replicas(limiter, key_id):
                        yield
        finally:
            left = self._waiting.pop(key_id) - 1
            if left:
                self._waiting[key_id] = left
            else:
                del self._locks[key_id]

    @contextlib.asynccontextmanager
    async def _across_replicas(self, limiter: RateLimiter, key_id: str) -> AsyncIterator[None]:
        assert limiter.redis is not None
        errors = limiter.redis.errors
        shared = limiter.redis.edit_lock(key_id)
        self._elsewhere[key_id] = self._elsewhere.get(key_id, 0) + 1
        try:
            got: bool | None = await shared.acquire()
        except errors as e:
            why = "an edit of it on another replica at this instant may leave a debt uncarried"
            log.warning("key %s: its limits are edited without the replicas' lock, Redis is unreachable (%s): %s",
                        key_id, e, why)  # fmt: skip
            got = None
        finally:
            self._elsewhere[key_id] -= 1
            if not self._elsewhere[key_id]:
                del self._elsewhere[key_id]
        if got is False:
            raise ServiceUnavailable(
                "another replica is editing this key's limits; try again shortly", {"Retry-After": "1"}
            )
        try:
            yield
        finally:
            if got:
                try:
                    await shared.release()
                except errors as e:  # expired first (the edit outlived EDIT_LOCK_TTL), or Redis went away
                    log.warning("key %s: the replicas' lock on its limit edit was not released cleanly: %s", key_id, e)

    def waiting(self, key_id: str) -> int:
        """Edits of ``key_id`` under way or queued (tests see an edit queue behind another)."""
        return self._waiting.get(key_id, 0)

    def waiting_elsewhere(self, key_id: str) -> int:
        """Edits of ``key_id`` in this process waiting for another replica's (tests see them queue)."""
        return self._elsewhere.get(key_id, 0)


async def carry_quota(limiter: RateLimiter, before: KeyRecord, after: KeyRecord) -> None:
    """Raise the counters ``after`` is counted on to what ``before``'s counters spent (module docstring)."""
    if before.quota == after.quota:
        return  # the only field of an edit that moves a key between quota scopes
    now = limiter.clock()
    feeds: dict[CounterKey, tuple[float, set[CounterKey]]] = {}  # new counter -> (window end, old ones)
    for up in limiter.config.upstreams:
        old, new = resolve_plan(limiter.config, before, up).quota, resolve_plan(limiter.config, after, up).quota
        if old is None or new is None:
            continue  # nothing was counted here before (no quota applied), or nothing is now
        (old_key, _), (new_key, end) = _counter(before, old, now), _counter(after, new, now)
        if old_key[2] == new_key[2]:  # the same window: only then are the counts comparable
            feeds.setdefault(new_key, (end, set()))[1].add(old_key)
    errors: tuple[type[BaseException], ...] = (StoreError, *(limiter.redis.errors if limiter.redis else ()))
    for new_key, (end, olds) in feeds.items():
        if olds == {new_key}:
            continue
        try:
            spent = 0
            for k in olds:
                spent += await _used(limiter, k, end)
            short = spent - await _used(limiter, new_key, end)
            if short > 0:
                await _add(limiter, new_key, end, short, now)
        except errors as e:  # the edit is written; an unreachable counter is no reason for a 500
            log.warning("key %s: its quota spent in scope(s) %s was not carried over to scope %s: %s",
                        after.id, ", ".join(sorted(k[1] for k in olds)), new_key[1], e)  # fmt: skip


async def carry_rates(limiter: RateLimiter, before: KeyRecord, after: KeyRecord) -> None:
    """Charge the buckets ``after`` is limited by with what ``before``'s buckets owe (module docstring)."""
    if before.rate_limits == after.rate_limits:
        return  # the only field of an edit that changes which limits apply to the key, or which buckets
    feeds: dict[str, tuple[RateRule, dict[tuple[str, ...], float]]] = {}  # new bucket -> (rule, owed per old scope)
    try:
        for up in limiter.config.upstreams:
            old, new = resolve_plan(limiter.config, before, up), resolve_plan(limiter.config, after, up)
            if not old.rates or not new.rates:
                continue  # nothing was limited, or nothing is now
            kept = {b: (r.interval, r.capacity) for r, b in zip(old.rates, old.buckets, strict=True)}
            changed = [(r, b) for r, b in zip(new.rates, new.buckets, strict=True)
                       if kept.get(b) != (r.interval, r.capacity)]  # fmt: skip
            if not changed:
                continue  # the same limits in the same buckets (the global default and an equal list of the key's own)
            debts = (await _evaluate(limiter, old, 0)).debts
            owed = max(debt / rule.interval for rule, debt in zip(old.rates, debts, strict=True))  # requests
            for rule, bucket in changed:
                feeds.setdefault(bucket, (rule, {}))[1][old.buckets] = owed
        for bucket, (rule, olds) in feeds.items():
            one = Plan(rates=(rule,), buckets=(bucket,))
            debt = (await _evaluate(limiter, one, 0)).debts[0]
            want = min(rule.capacity, math.ceil(sum(olds.values()) * rule.interval))  # never past its burst
            cost = min(math.ceil((want - debt) / rule.interval), (rule.capacity - debt) // rule.interval)
            if cost > 0:
                await _evaluate(limiter, one, cost)
    except (BackendDown, BackendRefused, StoreError) as e:  # the edit is written: no reason for a 500 (a full table)
        log.warning("key %s: its rate limits' debt was not carried over to its new limits: %s", after.id, e)


async def _evaluate(limiter: RateLimiter, plan: Plan, cost: int) -> Outcome:
    """A plan without a quota on the limiter's backend (cost 0: read the debts, change nothing)."""
    if limiter.redis is not None:
        return await limiter.redis.evaluate(plan, int(limiter.clock() * US), None, 0.0, cost)
    if limiter.host_buckets is not None:  # the supervisor of workers: their table, on its clock (workers.limits)
        return limiter.host_buckets.evaluate(plan, int(time.monotonic() * US), None, cost)  # type: ignore[no-any-return]
    return limiter.memory.evaluate(plan, int(limiter.steady() * US), None, cost)


def _counter(key: KeyRecord, rule: QuotaRule, now: float) -> tuple[CounterKey, float]:
    start, end = window_bounds(rule.limit, now)
    return (budget_of(key), rule.scope, window_id(rule.limit, start)), end


async def _used(limiter: RateLimiter, qkey: CounterKey, end: float) -> int:
    if limiter.redis is not None:
        return int(await limiter.redis.get_used(qkey))
    return (await limiter.book.counter(qkey, end)).used


async def _add(limiter: RateLimiter, qkey: CounterKey, end: float, delta: int, now: float) -> None:
    if limiter.redis is not None:
        await limiter.redis.add_used(qkey, max(1, math.ceil(end - now)) + limiter.redis.expire_slack, delta)
    else:
        await limiter.book.add_used(qkey, end, delta)
