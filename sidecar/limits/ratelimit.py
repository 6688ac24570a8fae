"""Per-key rate limits (GCRA), quotas and concurrency, in memory or shared through Redis.

The pipeline calls, in this order, after authentication and authorization::

    decision = await limiter.check(key, upstream)      # 429 / 503, or headers for the response
    async with limiter.slot(key, upstream): ...        # concurrency, held for the whole stream

**Which limits.** A key's own ``rate_limits`` / ``quota`` / ``concurrency`` win; otherwise
its upstream's; otherwise the global ``rate_limits.default`` / ``quota`` / ``concurrency``.
Where a limit comes from decides what it counts: a key's own and the global ones count the
key across all upstreams (scope ``*``), an upstream's counts the key on that upstream only.

**Rate algorithm: GCRA** (the generic cell rate algorithm, a token bucket kept as one
timestamp). ``N/period`` means one request every ``T = period/N`` on average with bursts
up to ``N``: each bucket stores its theoretical arrival time (TAT); a request is allowed
when ``max(TAT, now) + T - now <= N·T``. No window edges, so no 2× burst at a boundary;
one integer per (key, limit), O(1) per check in memory and in Redis. Time is kept in
integer microseconds so ``r`` and ``t`` are exact.

**All or nothing.** A request is counted by every limit and the quota, or by none.

**Headers** (IETF httpapi draft -10): ``RateLimit-Policy`` lists every policy;
``RateLimit`` and the ``X-RateLimit-*`` trio describe the most restrictive one (fewest
remaining; ties go to the longest reset). ``t`` / ``X-RateLimit-Reset`` is the number of
seconds until that policy's full quota is back; ``Retry-After`` on a 429 the number of
seconds until a request would pass.

**Redis** (``rate_limits.backend: redis``): one ``EVALSHA`` per request checks and commits
every bucket and the quota atomically. Buckets use Redis ``TIME`` (one clock for all
replicas) unless a test clock was injected. When Redis cannot be reached,
``on_redis_error`` applies (``allow``: pass without headers; ``deny``: 503 with
``Retry-After``), the outage is logged once, every such request is counted in
``sidecar_ratelimit_backend_errors_total``, and Redis is retried with a short back-off.
Concurrency is always per process (see docs/ratelimits.md for why).

**Clocks** (``sidecar.clocks``). Memory buckets measure on the steady clock: a step of the
wall clock neither refills them (forward) nor refuses everything until the wall clock
catches up (back). Quota windows are calendar windows on the wall clock: a step moves the
window with it, the counts of each window stay its own (a step back counts on in the
earlier window from its stored total, never from zero, and never twice). Redis buckets use
Redis ``TIME``: that host's clock, one for all replicas.

Quota windows and persisted counters: ``limits.quota``; the Redis script: ``limits.redis_backend``;
plans, GCRA and the memory backend: ``limits.gcra``; slots: ``limits.concurrency``. This module
is the facade the pipeline and the admin API call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from ..auth.models import KeyRecord, iso
from ..clocks import steady_clock
from ..config import Config, Limit, UpstreamConfig
from ..core.errors import BadRequest, Conflict, QuotaExceeded, RateLimited, ServiceUnavailable, SidecarError
from ..store import Store, StoreError
from . import gcra
from .charged import window_moment
from .concurrency import NO_SLOT, ConcurrencySlot, RefundingSlot, concurrency_error
from .gcra import QUOTA_POLICY, US, BackendDown, MemoryBackend, Outcome, Plan, QuotaRule, RateDecision, resolve_plan
from .quota import CounterKey, QuotaBook, quota_metrics, window_bounds, window_id

if TYPE_CHECKING:
    from .redis_backend import RedisBackend

__all__ = ["RateDecision", "RateLimiter", "read_quota_status", "resolve_plan"]

log = logging.getLogger("sidecar.ratelimit")

SWEEP_INTERVAL = 30.0  # seconds between sweeps of idle in-memory buckets
REDIS_BACKOFF_MIN = 0.1  # seconds before the first retry after Redis failed
REDIS_BACKOFF_MAX = 2.0  # cap on the doubling back-off while Redis stays down
DENY_RETRY_AFTER = "1"  # Retry-After on the 503 when on_redis_error is deny
MAX_QUOTA_ADJUST = 10**15  # what an admin quota change may set or add


class RateLimiter:
    """Rate limits, quotas and concurrency for one sidecar. See the module docstring."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        steady: Callable[[], float] | None = None,
        registry: CollectorRegistry | None = None,
        shared: Any = None,
    ) -> None:
        self.config = config
        self.rl = config.rate_limits
        self.store = store
        self.clock = clock  # wall: quota windows
        self.steady = steady_clock(clock, steady)  # memory buckets
        self.registry = registry if registry is not None else CollectorRegistry()
        self.backend_errors = Counter(
            "sidecar_ratelimit_backend_errors",
            "Rate-limit checks decided by on_redis_error because the backend was unreachable",
            ["backend"],
            registry=self.registry,
        )
        self.backend_errors.labels(self.rl.backend)
        self.book = QuotaBook(store, clock=clock, interval=self.rl.quota_flush_interval)
        self.memory = MemoryBackend()
        self.redis: RedisBackend | None = None
        if self.rl.backend == "redis":
            assert self.rl.redis_url, "config validation requires redis_url for the redis backend"
            # A test clock is sent with each call; otherwise Redis TIME is every replica's clock.
            from .redis_backend import RedisBackend  # redis-py is imported only when used

            self.redis = RedisBackend(self.rl.redis_url, send_clock=clock is not time.time)
        elif shared is not None:  # a worker: the host's buckets and quotas (sidecar.workers.limits)
            self.redis = shared
        quota_metrics(self.book if self.redis is None else None, self.registry, self.rl.quota_flush_interval)
        self._plans: dict[tuple[str, str], tuple[KeyRecord, Plan]] = {}
        self._windows: dict[Limit, tuple[float, float, str]] = {}
        self._inflight: dict[tuple[str, str], int] = {}
        self.held: Any = self._inflight  # concurrency counts read by ``check``; with workers, the host's
        self.make_slot: Any = ConcurrencySlot  # (sidecar.workers.inflight)
        self.host_buckets: Any = None  # a supervisor of workers: the host's GCRA table (ShmBuckets; limits.carry)
        # (key id, quota scope) -> (limit, used, window end) as last seen, for the
        # sidecar_quota_limit / sidecar_quota_remaining gauges (read at scrape time only).
        self.quota_levels: dict[tuple[str, str], tuple[int, int, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None  # monotonic time Redis was first seen down
        self._retry_at = 0.0
        self._backoff = REDIS_BACKOFF_MIN
        self._down_count = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._task = asyncio.create_task(self._background())
        if self.redis is not None:
            try:
                await self.redis.ping()
            except Exception as e:  # not fatal: the first requests apply on_redis_error
                self._mark_down(e)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.book.flush()
        if self.redis is not None:
            await self.redis.close()

    async def _background(self) -> None:
        ticks_per_sweep = max(1, int(SWEEP_INTERVAL / self.book.interval))
        tick = 0
        while True:
            await asyncio.sleep(self.book.interval)
            try:
                await self.book.flush()
                tick += 1
                if tick % ticks_per_sweep == 0:
                    self.memory.sweep(int(self.steady() * US))
            except Exception:  # keep counting; the next round retries
                log.exception("rate-limit housekeeping failed")

    # ---------------------------------------------------------------- hot path

    def plan(self, key: KeyRecord, upstream: UpstreamConfig) -> Plan:
        ident = (key.id, upstream.id)
        cached = self._plans.get(ident)
        if cached is not None and cached[0] is key:
            return cached[1]
        plan = resolve_plan(self.config, key, upstream)
        self._plans[ident] = (key, plan)
        return plan

    def _window(self, limit: Limit, now: float) -> tuple[float, float, str]:
        w = self._windows.get(limit)
        if w is None or not w[0] <= now < w[1]:
            start, end = window_bounds(limit, now)
            w = self._windows[limit] = (start, end, window_id(limit, start))
        return w

    async def check(self, key: KeyRecord, upstream: UpstreamConfig) -> RateDecision:
        plan = self.plan(key, upstream)
        if plan.empty:
            return RateDecision()
        if plan.concurrency is not None and self.held.get(plan.slot_ident, 0) >= plan.concurrency:
            return RateDecision(False, error=concurrency_error(plan.concurrency, self.rl.headers))
        if not plan.rates and plan.quota is None:
            return RateDecision()
        if self.redis is None and plan.quota is None and len(plan.rates) == 1:
            fast = self._single_allowed(plan, self.steady())
            if fast is not None:
                return fast
        return await self._evaluate(key, plan, self.clock(), 1)

    def _single_allowed(self, plan: Plan, now: float) -> RateDecision | None:
        """The common case — one limit, memory backend, allowed — without the general loops.

        Same arithmetic and headers as ``MemoryBackend.evaluate`` + ``_decide`` (the tests
        hold both to the same answers); None when refused, which the general path then
        decides and explains (nothing was committed here).
        """
        rule, bucket = plan.rates[0], plan.buckets[0]
        now_us = int(now * US)
        tats = self.memory.tats
        debt = tats.get(bucket, 0) - now_us
        after = (debt if debt > 0 else 0) + rule.interval
        if after > rule.capacity:
            return None
        tats[bucket] = now_us + after
        if not self.rl.headers:
            return RateDecision()
        rs, ts = str((rule.capacity - after) // rule.interval), str(-(-after // US))
        return RateDecision(
            True,
            {
                "RateLimit-Policy": plan.rate_policy,
                "RateLimit": f'"{rule.policy}";r={rs};t={ts}',
                "X-RateLimit-Limit": str(rule.limit.count),
                "X-RateLimit-Remaining": rs,
                "X-RateLimit-Reset": ts,
            },
        )

    def slot(self, key: KeyRecord, upstream: UpstreamConfig) -> AbstractAsyncContextManager[Any]:
        plan = self.plan(key, upstream)
        if plan.concurrency is None:
            return NO_SLOT
        inner: Any = self.make_slot(self._inflight, plan.slot_ident, plan.concurrency, self.rl.headers)
        return RefundingSlot(inner, partial(self.refund, key, upstream)) if plan.rates or plan.quota else inner

    def in_flight(self, key_id: str) -> int:
        """Slots this key holds in this process (all scopes)."""
        return sum(n for (kid, _), n in self._inflight.items() if kid == key_id)

    async def served_from_cache(self, key: KeyRecord, upstream: UpstreamConfig) -> None:
        """A cache hit: give the budget back unless ``rate_limits.count_cache_hits``."""
        if self.rl.count_cache_hits:
            return
        await self.refund(key, upstream)

    async def refund(self, key: KeyRecord, upstream: UpstreamConfig) -> None:
        """Give back what ``check`` spent on a request that was then refused or not served upstream.

        Refusals are free (DESIGN invariant 12): the MCP gateway can only judge a JSON-RPC
        body after the limiter ran, so a refused ``tools/call`` (or resource, prompt, or
        another key's session) is handed back here, rates and quota alike.
        """
        plan = self.plan(key, upstream)
        if not plan.rates and plan.quota is None:
            return
        if self.redis is None and plan.quota is None:
            self.memory.evaluate(plan, int(self.steady() * US), None, -1)  # buckets only: nothing to wait for
            return
        await self._evaluate(key, plan, self.clock(), -1)

    async def check_plan(self, key: KeyRecord, plan: Plan) -> RateDecision:
        """One request against a plan built elsewhere (per-tool MCP limits): same backends, same headers."""
        return await self._evaluate(key, plan, self.clock(), 1)

    async def _evaluate(self, key: KeyRecord, plan: Plan, now: float, cost: int) -> RateDecision:
        qkey: CounterKey | None = None
        qstart = qend = now
        if plan.quota is not None:
            qstart, qend, wid = self._window(plan.quota.limit, window_moment(key.budget_id or key.id, now, cost))
            qkey = (key.budget_id or key.id, plan.quota.scope, wid)
        now_us = int(now * US)
        outcome: Outcome | None = None
        try:
            if self.redis is not None:
                outcome = await self._redis_evaluate(plan, now_us, qkey, qend, cost)
                if outcome is None:
                    return RateDecision() if cost < 0 else self._backend_down_decision()
            else:
                counter = None
                if qkey is not None:
                    counter = self.book.peek(qkey)
                    if counter is None or not counter.loaded:
                        counter = await self.book.counter(qkey, qend)  # once per key and window
                outcome = self.memory.evaluate(plan, int(self.steady() * US), counter, cost)
        except StoreError as e:  # fail closed: a quota nobody can count is not granted (workers: the owner's)
            msg = f"the quota store is unavailable: {e}"
            return RateDecision(False, error=ServiceUnavailable(msg, {"Retry-After": DENY_RETRY_AFTER}))
        except gcra.BackendRefused as e:  # workers: the owner could not read the question (a bug), or TableFull
            log.warning("rate-limit check refused by the backend: %s", e)
            msg = "the rate limiter could not check this request; try again shortly"
            return RateDecision(False, error=ServiceUnavailable(msg, {"Retry-After": DENY_RETRY_AFTER}))
        if plan.quota is not None and qkey is not None and outcome.quota_used is not None:
            used = outcome.quota_used + cost if outcome.ok else outcome.quota_used
            self.quota_levels[(key.id, qkey[1])] = (plan.quota.limit.count, used, qend)
        if cost < 0:
            return RateDecision()
        return self._decide(plan, outcome, now, qstart, qend)

    async def _redis_evaluate(
        self, plan: Plan, now_us: int, qkey: CounterKey | None, qend: float, cost: int
    ) -> Outcome | None:
        assert self.redis is not None
        loop_now = asyncio.get_running_loop().time()
        if self._down_since is not None and loop_now < self._retry_at:
            return None
        try:
            outcome = await self.redis.evaluate(plan, now_us, qkey, qend, cost)
        except BackendDown as e:
            self._mark_down(e)
            return None
        if self._down_since is not None:
            log.warning(
                "rate-limit backend redis is back after %.1fs; %d request(s) were decided by on_redis_error=%s",
                loop_now - self._down_since, self._down_count, self.rl.on_redis_error,
            )  # fmt: skip
            self._down_since = None
            self._backoff = REDIS_BACKOFF_MIN
            self._down_count = 0
        return outcome

    def _mark_down(self, e: BaseException) -> None:
        now = asyncio.get_running_loop().time()
        if self._down_since is None:
            self._down_since = now
            self._backoff = REDIS_BACKOFF_MIN
            log.warning(
                "rate-limit backend redis is unreachable (%s); on_redis_error=%s applies until it is back",
                e, self.rl.on_redis_error,
            )  # fmt: skip
        else:
            self._backoff = min(REDIS_BACKOFF_MAX, self._backoff * 2)
        self._retry_at = now + self._backoff

    def _backend_down_decision(self) -> RateDecision:
        self.backend_errors.labels(self.rl.backend).inc()
        self._down_count += 1
        if self.rl.on_redis_error == "allow":
            return RateDecision()
        return RateDecision(
            False,
            error=ServiceUnavailable(
                "the rate-limit backend is unreachable; try again shortly", {"Retry-After": DENY_RETRY_AFTER}
            ),
        )

    def _decide(self, plan: Plan, out: Outcome, now: float, qstart: float, qend: float) -> RateDecision:
        """Turn what the backend saw into headers and, when refused, the 429.

        Allowed: the policy with the fewest remaining is shown, ties going to the longer
        reset. Refused: only the policies that refused compete, the longest wait winning,
        and that wait is the Retry-After (every policy must pass for a request to pass).
        """
        ok = out.ok
        best_rank: tuple[float, float] | None = None  # larger is more restrictive
        best: tuple[str, int, int, int] = ("", 0, 0, 0)  # name, q, r, t
        retry = 0.0
        refused: list[str] = []
        for rule, debt in zip(plan.rates, out.debts, strict=True):
            if ok:
                after = debt + rule.interval
                r = (rule.capacity - after) // rule.interval
                rank = (float(-r), after / US)
            else:
                wait = debt + rule.interval - rule.capacity
                if wait <= 0:
                    continue
                after, r = debt, 0
                rank = (wait / US, after / US)
                retry = max(retry, wait / US)
                refused.append(rule.limit.text)
            if best_rank is None or rank > best_rank:
                best_rank, best = rank, (rule.policy, rule.limit.count, r, -(-after // US))
        policy = plan.rate_policy
        quota_refused = False
        quota = plan.quota
        if quota is not None and out.quota_used is not None:
            count = quota.limit.count
            left = qend - now
            qpolicy = f'"{QUOTA_POLICY}";q={count};w={round(qend - qstart)}'
            policy = f"{policy}, {qpolicy}" if policy else qpolicy
            qrank: tuple[float, float] | None = None
            if ok:
                r = count - out.quota_used - 1
                qrank = (float(-r), left)
            elif out.quota_used + 1 > count:
                quota_refused, r, qrank = True, 0, (left, left)
                retry = max(retry, left)
            if qrank is not None and (best_rank is None or qrank > best_rank):
                best_rank, best = qrank, (QUOTA_POLICY, count, r, max(1, math.ceil(left)))
        headers: dict[str, str] = {}
        if best_rank is not None and self.rl.headers:
            name, q, rs, ts = best[0], best[1], str(best[2]), str(best[3])
            headers = {
                "RateLimit-Policy": policy,
                "RateLimit": f'"{name}";r={rs};t={ts}',
                "X-RateLimit-Limit": str(q),
                "X-RateLimit-Remaining": rs,
                "X-RateLimit-Reset": ts,
            }
        if ok:
            return RateDecision(True, headers)
        error: SidecarError
        if quota_refused:
            assert quota is not None
            error = QuotaExceeded(
                f"the quota of {quota.limit.text} for this key is used up until {iso(qend)}", retry, headers
            )
        else:
            error = RateLimited(f"rate limit of {', '.join(refused)} exceeded for this key", retry, headers)
        return RateDecision(False, headers, error)

    # ---------------------------------------------------------------- quota admin

    def _quota_targets(self, rec: KeyRecord, upstream_id: str | None = None) -> list[tuple[QuotaRule, str]]:
        """The distinct quotas that apply to a key: (rule, an upstream it applies on)."""
        out: dict[str, tuple[QuotaRule, str]] = {}
        for up in self.config.upstreams:
            if upstream_id is not None and up.id != upstream_id:
                continue
            if "*" not in rec.permissions.upstreams and up.id not in rec.permissions.upstreams:
                continue
            q = self.plan(rec, up).quota
            if q is not None:
                out.setdefault(q.scope, (q, up.id))
        return list(out.values())

    async def quota_status(self, rec: KeyRecord) -> list[dict[str, Any]] | None:
        """Used and remaining quota, per scope, as this process counts it (pending included)."""
        targets = self._quota_targets(rec)
        if not targets:
            return None
        now = self.clock()
        out = []
        for rule, _ in targets:
            start, end, wid = self._window(rule.limit, now)
            qkey = (rec.budget_id or rec.id, rule.scope, wid)
            if self.redis is None:
                out.append(_status(rule, (await self.book.counter(qkey, end)).used, start, end))
                continue
            try:
                out.append(_status(rule, await self.redis.get_used(qkey), start, end))
            except self.redis.errors as e:
                out.append(_status(rule, None, start, end) | {"error": f"rate-limit backend unreachable: {e}"})
        return out

    async def adjust_quota(self, rec: KeyRecord, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Admin reset (``{"used": 0}``) or top-up (``{"add": -500}``) of the current window."""
        unknown = set(body) - {"used", "add", "upstream"}
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        if ("used" in body) == ("add" in body):
            raise BadRequest('give exactly one of "used" (set the count, e.g. 0) or "add" (e.g. -500 to top up)')
        field_name = "used" if "used" in body else "add"
        value = body[field_name]
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (field_name == "used" and value < 0)
            or abs(value) > MAX_QUOTA_ADJUST  # SQLite and Redis hold 64-bit integers
        ):
            low = "0" if field_name == "used" else f"-{MAX_QUOTA_ADJUST}"
            raise BadRequest(f"{field_name}: expected a whole number from {low} to {MAX_QUOTA_ADJUST}")
        upstream = body.get("upstream")
        if upstream is not None and (not isinstance(upstream, str) or self.config.upstream(upstream) is None):
            raise BadRequest(f"upstream: no upstream with id {upstream!r}")
        targets = self._quota_targets(rec, upstream)
        if not targets:
            raise Conflict("no quota applies to this key" + (f" on upstream {upstream!r}" if upstream else ""))
        now = self.clock()
        out = []
        for rule, _ in targets:
            start, end, wid = self._window(rule.limit, now)
            qkey = (rec.budget_id or rec.id, rule.scope, wid)
            if self.redis is not None:
                ttl = max(1, math.ceil(end - now)) + self.redis.expire_slack
                if field_name == "used":
                    used = await self.redis.set_used(qkey, ttl, value)
                else:
                    used = await self.redis.add_used(qkey, ttl, value)
            elif field_name == "used":
                used = await self.book.set_used(qkey, end, value)
            else:
                used = await self.book.add_used(qkey, end, value)
            out.append(_status(rule, used, start, end))
        return out


def _status(rule: QuotaRule, used: int | None, start: float, end: float) -> dict[str, Any]:
    return {
        "scope": rule.scope,
        "quota": rule.limit.text,
        "used": used,
        "remaining": None if used is None else max(0, rule.limit.count - used),
        "window_start": iso(start),
        "resets_at": iso(end),
    }


async def read_quota_status(
    config: Config, store: Store, rec: KeyRecord, *, clock: Callable[[], float] = time.time
) -> list[dict[str, Any]] | None:
    """Quota status for a process that is not serving (the CLI): the store, or Redis.

    A running memory-backend sidecar flushes every ``rate_limits.quota_flush_interval``, so this
    can lag the live count by that much; the admin API answers from the live counters.
    """
    limiter = RateLimiter(config, store, clock=clock)
    try:
        return await limiter.quota_status(rec)
    finally:
        if limiter.redis is not None:
            await limiter.redis.close()
