"""Per-tool rate limits: ``tools/call`` counted per ``(key, upstream, tool)`` (issue 19 §3).

Declared on the upstream (``upstreams[].mcp.tool_limits``: tool name or glob -> limits,
the first glob in file order that matches a tool decides), so one place says what a tool
costs; every key gets its own budget for every tool (``search: [60/minute]`` is 60 calls
a minute for each key). A glob's limit applies to each tool it matches separately.

They run on the limiter the rest of the sidecar uses (``limits/ratelimit.py``), memory or
Redis: a tool's bucket is one more GCRA bucket of the key (Redis key
``sidecar:rl:{KEY}:UPSTREAM/tool/TOOL:PERIOD:COUNT``, in the key's cluster slot), so
replicas sharing Redis share the budget exactly.

A call over its limit is refused like a forbidden one — a JSON-RPC error with the
request's id (``-32011``, HTTP 200, so the session lives on; the upstream never sees
the call, and on legacy SSE the refusal comes down the stream) — whose ``data`` carries
what the rate-limit headers would: ``limit``, ``remaining``, ``reset``, ``retry_after``,
``policy`` (``RateLimit-Policy``) and ``ratelimit`` (``RateLimit``). Refused calls spend
nothing: a tool's bucket is only charged for calls that go up, and a body whose every
message was refused gives the request's budget back (DESIGN invariant 12).

Tool names come from the client, so a glob's per-name buckets are bounded: a key holds at
most ``MAX_TOOL_BUCKETS`` names with a bucket of their own per upstream at once (a name's
slot lasts as long as its bucket can, the rule's longest period after its last call). Names
past that also count in one bucket per glob, which is only ever stricter (and still in their own,
which another worker may be counting them in: a tool's budget is never its own plus the glob's).
Without the bound one batch of made-up ``delete_<random>`` names under ``"delete_*": 1/hour``
was 15 000 hour-long buckets.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from typing import Any

from ...auth.models import KeyRecord
from ...config import UpstreamConfig
from ...limits.gcra import Plan, RateRule, bucket_key, budget_of
from ...limits.ratelimit import RateLimiter

__all__ = ["ToolLimiter"]

MAX_PLANS = 10_000  # cached (key, upstream, tool) plans; cleared when full (rebuilt on demand)
LONG_NAME = 64  # longer tool names are hashed in bucket keys
MAX_TOOL_BUCKETS = 256  # names under globs with a bucket of their own, per (key budget, upstream), at once
MAX_BUDGETS = 10_000  # (key budget, upstream) pairs whose names are remembered; the least recent forgotten
_GLOB_CHARS = frozenset("*?[")


class ToolLimiter:
    """Checks the ``tools/call``s of a request against their per-tool limits."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self._plans: dict[tuple[str, str, str], tuple[KeyRecord, Plan] | None] = {}
        # names matched by a glob: (key, own plan, shared plan, the rule's longest period)
        self._globbed: dict[tuple[str, str, str], tuple[KeyRecord, Plan, Plan, int]] = {}
        # (key budget, upstream) -> names matched by a glob that have their own bucket -> until (steady)
        # (JWT subjects are budgets too: without the bound, one entry per subject ever seen, kept for good)
        self._named: OrderedDict[tuple[str, str], OrderedDict[str, float]] = OrderedDict()

    def plan(self, key: KeyRecord, upstream: UpstreamConfig, tool: str) -> Plan | None:
        # Cached under the bucket's name (a digest past LONG_NAME): a body may carry a 1 MiB name, and
        # MAX_PLANS full names (or MAX_TOOL_BUCKETS per key) kept in memory were gigabytes.
        name = _bucket_name(tool)
        ident = (key.id, upstream.id, name)
        cached = self._plans.get(ident)
        if cached is not None and cached[0] is key:
            return cached[1]
        globbed = self._globbed.get(ident)
        if globbed is not None and globbed[0] is key:
            mine = self._own_bucket(budget_of(key), upstream.id, name, globbed[3])
            return globbed[1] if mine else globbed[2]
        rule = upstream.mcp_tool_limits.for_tool(tool)
        if rule is None:
            self._remember(ident, None)
            return None
        glob, limits = rule
        budget = budget_of(key)  # a rotation's chain
        if _GLOB_CHARS.isdisjoint(glob):  # an exact name: the config bounds these
            plan = _plan(budget, upstream.id, name, limits)
            self._remember(ident, (key, plan))
            return plan
        # Whether the name (still) holds a bucket of its own is asked on every call.
        period = max(lim.period for lim in limits)
        own, shared = (
            _plan(budget, upstream.id, name, limits),
            _plan(budget, upstream.id, _shared_name(glob), limits),
        )
        # Past the bound a name counts in the shared bucket *and* its own: its own may exist (another
        # worker, or this one before the bound filled) and must not be skipped, or a tool's budget was
        # its own plus the glob's. A refused check writes no bucket, so own buckets still grow only as
        # fast as the shared one lets calls through.
        shared = dataclasses.replace(shared, rates=own.rates + shared.rates, buckets=own.buckets + shared.buckets)
        if len(self._globbed) >= MAX_PLANS:
            self._globbed.clear()
        self._globbed[ident] = (key, own, shared, period)
        return own if self._own_bucket(budget, upstream.id, name, period) else shared

    def _remember(self, ident: tuple[str, str, str], entry: tuple[KeyRecord, Plan] | None) -> None:
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[ident] = entry

    def _own_bucket(self, budget: str, upstream_id: str, tool: str, period: int) -> bool:
        """May this glob-matched name (still) count in a bucket of its own? Takes or renews its slot."""
        now = self.limiter.steady()
        names = self._named.get((budget, upstream_id))
        if names is None:
            if len(self._named) >= MAX_BUDGETS:
                self._named.popitem(last=False)
            names = self._named[(budget, upstream_id)] = OrderedDict()
        else:
            self._named.move_to_end((budget, upstream_id))
        if tool in names:
            names[tool] = now + period
            names.move_to_end(tool)
            return True
        while names and next(iter(names.values())) <= now:  # slots whose bucket is surely gone
            names.popitem(last=False)
        if len(names) >= MAX_TOOL_BUCKETS:
            return False
        names[tool] = now + period
        return True

    async def check(
        self, key: KeyRecord, upstream: UpstreamConfig, calls: list[tuple[int, str]]
    ) -> dict[int, tuple[str, dict[str, Any]]]:
        """Message index -> (message, data) for each call over its limit; the others are counted."""
        over: dict[int, tuple[str, dict[str, Any]]] = {}
        for index, tool in calls:
            plan = self.plan(key, upstream, tool)
            if plan is None:
                continue
            decision = await self.limiter.check_plan(key, plan)
            if decision.allowed or decision.error is None:
                continue
            over[index] = refusal(tool, decision.error.message, decision.error.headers)
        return over


def refusal(tool: str, message: str, headers: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """The JSON-RPC error's message and data: the rate-limit headers' information, as fields."""
    data: dict[str, Any] = {"code": "rate_limit_exceeded", "tool": tool}
    for field, header in (("limit", "X-RateLimit-Limit"), ("remaining", "X-RateLimit-Remaining"),
                          ("reset", "X-RateLimit-Reset"), ("retry_after", "Retry-After")):  # fmt: skip
        value = headers.get(header)
        if value is not None and value.isdigit():
            data[field] = int(value)
    for field, header in (("policy", "RateLimit-Policy"), ("ratelimit", "RateLimit")):
        if header in headers:
            data[field] = headers[header]
    return message.replace("for this key", f"for tool {tool!r} and this key"), data


def _bucket_name(tool: str) -> str:
    return (
        tool
        if len(tool) <= LONG_NAME
        else "sha256-" + hashlib.sha256(tool.encode("utf-8", "surrogatepass")).hexdigest()
    )


def _shared_name(glob: str) -> str:
    """The bucket of a glob's overflow names: longer than LONG_NAME, so no tool name is it."""
    return "shared-" + hashlib.sha256(glob.encode()).hexdigest()


def _plan(key_id: str, upstream_id: str, name: str, limits: tuple[Any, ...]) -> Plan:
    scope = f"{upstream_id}/tool/{name}"
    rates: list[RateRule] = []
    names: set[str] = set()
    for lim in limits:
        policy = lim.name if lim.name not in names else lim.text
        names.add(policy)
        rates.append(RateRule.build(lim, scope, policy))
    policy_text = ", ".join(f'"{r.policy}";q={r.limit.count};w={r.limit.period}' for r in rates)
    return Plan(tuple(rates), rate_policy=policy_text, buckets=tuple(bucket_key(key_id, r.suffix) for r in rates))
