"""A key's quota moved to another scope keeps what the window has spent (DESIGN invariant 10).

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
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from ..auth.models import KeyRecord
from ..store import StoreError
from .gcra import QuotaRule, budget_of, resolve_plan
from .quota import CounterKey, window_bounds, window_id

if TYPE_CHECKING:
    from .ratelimit import RateLimiter

__all__ = ["carry_quota"]

log = logging.getLogger("sidecar.ratelimit")


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
