"""GCRA buckets and the limit plan: which limits apply to a key on an upstream, and the in-memory
backend that evaluates a plan atomically (integer microseconds; see ``sidecar.limits.ratelimit``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..auth.models import KeyRecord
from ..config import Config, Limit, UpstreamConfig, parse_limit
from ..core.errors import SidecarError
from .quota import CounterKey, QuotaCounter

__all__ = [
    "BackendDown",
    "BackendRefused",
    "MemoryBackend",
    "Outcome",
    "Plan",
    "QuotaRule",
    "RateDecision",
    "RateRule",
    "TableFull",
    "bucket_key",
    "budget_of",
    "decide",
    "quota_key",
    "resolve_plan",
]

US = 1_000_000  # bucket arithmetic is in integer microseconds
REDIS_PREFIX = "sidecar"
QUOTA_POLICY = "quota"
CONCURRENCY_POLICY = "concurrency"


@dataclass(slots=True)
class RateDecision:
    allowed: bool = True
    headers: dict[str, str] = field(default_factory=dict)
    error: SidecarError | None = None


# ---------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class RateRule:
    """One GCRA bucket: ``interval`` T and ``capacity`` N·T, both in microseconds."""

    limit: Limit
    scope: str
    policy: str  # name in RateLimit-Policy
    interval: int
    capacity: int
    suffix: str  # identifies the bucket among the key's: scope and index (per-tool: scope, period, count)

    @classmethod
    def build(cls, limit: Limit, scope: str, policy: str, slot: str | None = None) -> RateRule:
        """``slot`` names a key's bucket by the limit's period (``p86400``; ``p86400#1`` for a second
        limit of that period), not its count, so an edit of the count keeps what was spent (as time
        owed) instead of starting a fresh bucket: editing a spent limit to another within reach (a
        delegate can) bought a request per edit. Not by its place among the key's limits either:
        ``["1/minute", "3/day"]`` then ``["3/day"]`` (an edit, or a JWT subject's two rules) put the
        day's limit in the minute's paid-off bucket. An edit that moves a limit to another period is
        topped up by ``carry.carry_rates``."""
        interval = max(1, limit.period * US // limit.count)
        suffix = f"{scope}:{limit.period}:{limit.count}" if slot is None else f"{scope}:{slot}"
        return cls(limit, scope, policy, interval, interval * limit.count, suffix)


@dataclass(frozen=True, slots=True)
class QuotaRule:
    limit: Limit
    scope: str


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything that limits one key on one upstream, resolved once per key version."""

    rates: tuple[RateRule, ...] = ()
    quota: QuotaRule | None = None
    concurrency: int | None = None
    concurrency_scope: str = "*"
    rate_policy: str = ""  # the static part of RateLimit-Policy
    buckets: tuple[str, ...] = ()  # one storage key per rate rule (the same in memory and Redis)
    slot_ident: tuple[str, str] = ("", "*")  # (budget id, concurrency scope): the key's in-flight count

    @property
    def empty(self) -> bool:
        return not self.rates and self.quota is None and self.concurrency is None


def resolve_plan(config: Config, key: KeyRecord, upstream: UpstreamConfig) -> Plan:
    """Key, else upstream, else global — for rates, quota and concurrency independently."""
    rl = config.rate_limits
    limits: Iterable[Limit]
    if key.rate_limits:
        limits, scope = (parse_limit(x) for x in key.rate_limits), "*"
    elif upstream.rate_limits is not None:
        limits, scope = upstream.rate_limits, upstream.id
    else:
        limits, scope = rl.default, "*"
    rates: list[RateRule] = []
    names: set[str] = set()
    periods: dict[int, int] = {}  # period -> limits of that period so far (``RateRule.build``'s slot)
    for lim in limits:
        name = lim.name if lim.name not in names else lim.text
        names.add(name)
        n = periods[lim.period] = periods.get(lim.period, -1) + 1
        rates.append(RateRule.build(lim, scope, name, f"p{lim.period}" + (f"#{n}" if n else "")))
    quota: QuotaRule | None = None
    if key.quota:
        quota = QuotaRule(parse_limit(key.quota), "*")
    elif upstream.quota is not None:
        quota = QuotaRule(upstream.quota, upstream.id)
    elif rl.quota is not None:
        quota = QuotaRule(rl.quota, "*")
    conc: int | None
    if key.concurrency is not None:
        conc, cscope = key.concurrency, "*"
    elif upstream.concurrency is not None:
        conc, cscope = upstream.concurrency, upstream.id
    else:
        conc, cscope = rl.concurrency, "*"
    policy = ", ".join(f'"{r.policy}";q={r.limit.count};w={r.limit.period}' for r in rates)
    buckets = tuple(bucket_key(budget_of(key), r.suffix) for r in rates)
    return Plan(tuple(rates), quota, conc, cscope, policy, buckets, (budget_of(key), cscope))


# -------------------------------------------------------------------------- backends


@dataclass(slots=True)
class Outcome:
    """What a backend saw: each bucket's debt (TAT - now, µs) and the quota count, before this request."""

    ok: bool
    debts: list[int]
    quota_used: int | None


class BackendDown(Exception):
    """The shared backend could not be reached; ``on_redis_error`` decides."""


class BackendRefused(Exception):
    """The shared backend answered that it could not handle the question: a 503 at once.

    Not ``BackendDown``: the backend is there (no back-off, no ``on_redis_error``), and a check
    nobody could make grants nothing.
    """


class TableFull(BackendRefused):
    """A fixed bucket table (workers' shared memory) has no slot for a bucket: every slot it may take
    holds a live bucket (spent ones were reclaimed first). Not the backend down: never ``on_redis_error``
    (``allow`` let the key pass unlimited); refused as ``BackendRefused``, a 503 with ``Retry-After``."""


def budget_of(key: KeyRecord) -> str:
    """The id a key is counted under: its own, or for a rotated key's successor the chain's first."""
    return key.budget_id or key.id


def bucket_key(key_id: str, suffix: str) -> str:
    return f"{REDIS_PREFIX}:rl:{{{key_id}}}:{suffix}"  # {key id}: one cluster slot per key


def quota_key(qkey: CounterKey) -> str:
    key_id, scope, window = qkey
    return f"{REDIS_PREFIX}:q:{{{key_id}}}:{scope}:{window}"


def decide(
    plan: Plan, tats: list[int], now_us: int, counter: QuotaCounter | None, cost: int
) -> tuple[Outcome, list[int]]:
    """The GCRA decision on the stored TATs of ``plan``'s buckets (0: full) and its quota count: what
    the backend saw, and the TATs to store (0: full again, nothing to keep), none when refused. All or
    nothing: an allowed request is counted by every bucket and the quota (``counter.pending``)."""
    ok = True
    debts: list[int] = []
    for rule, tat in zip(plan.rates, tats, strict=True):
        debt = tat - now_us
        if debt < 0:
            debt = 0
        debts.append(debt)
        if cost > 0 and debt + rule.interval > rule.capacity:
            ok = False
    used = None
    if counter is not None and plan.quota is not None:
        used = counter.used
        if cost > 0 and used + cost > plan.quota.limit.count:
            ok = False
    new: list[int] = []
    if ok:
        for rule, debt in zip(plan.rates, debts, strict=True):
            grown = debt + rule.interval * cost
            new.append(now_us + grown if grown > 0 else 0)
        if counter is not None:
            counter.pending += cost
    return Outcome(ok, debts, used), new


class MemoryBackend:
    """Buckets and quota counters of this process (quotas persisted through the store)."""

    def __init__(self) -> None:
        self.tats: dict[str, int] = {}  # bucket key -> theoretical arrival time (µs)

    def evaluate(self, plan: Plan, now_us: int, counter: QuotaCounter | None, cost: int) -> Outcome:
        """Read, decide and commit in one synchronous step (nothing can interleave)."""
        tats = self.tats
        out, new = decide(plan, [tats.get(bucket, 0) for bucket in plan.buckets], now_us, counter, cost)
        for bucket, tat in zip(plan.buckets, new):  # noqa: B905 - new is empty when refused
            if tat:
                tats[bucket] = tat
            else:
                tats.pop(bucket, None)
        return out

    def sweep(self, now_us: int) -> None:
        """Forget buckets that are full again (absent and idle are the same state)."""
        for k in [k for k, tat in self.tats.items() if tat <= now_us]:
            del self.tats[k]
