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
"""

from __future__ import annotations

import hashlib
from typing import Any

from ...auth.models import KeyRecord
from ...config import UpstreamConfig
from ...limits.gcra import Plan, RateRule, bucket_key, budget_of
from ...limits.ratelimit import RateLimiter

__all__ = ["ToolLimiter"]

MAX_PLANS = 10_000  # cached (key, upstream, tool) plans; cleared when full (rebuilt on demand)
LONG_NAME = 64  # longer tool names are hashed in bucket keys


class ToolLimiter:
    """Checks the ``tools/call``s of a request against their per-tool limits."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self._plans: dict[tuple[str, str, str], tuple[KeyRecord, Plan] | None] = {}

    def plan(self, key: KeyRecord, upstream: UpstreamConfig, tool: str) -> Plan | None:
        ident = (key.id, upstream.id, tool)
        cached = self._plans.get(ident)
        if cached is not None and cached[0] is key:
            return cached[1]
        rule = upstream.mcp_tool_limits.for_tool(tool)
        plan = None if rule is None else _plan(budget_of(key), upstream.id, tool, rule[1])  # a rotation's chain
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[ident] = (key, plan) if plan is not None else None
        return plan

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


def _plan(key_id: str, upstream_id: str, tool: str, limits: tuple[Any, ...]) -> Plan:
    name = tool if len(tool) <= LONG_NAME else "sha256-" + hashlib.sha256(tool.encode()).hexdigest()
    scope = f"{upstream_id}/tool/{name}"
    rates: list[RateRule] = []
    names: set[str] = set()
    for lim in limits:
        policy = lim.name if lim.name not in names else lim.text
        names.add(policy)
        rates.append(RateRule.build(lim, scope, policy))
    policy_text = ", ".join(f'"{r.policy}";q={r.limit.count};w={r.limit.period}' for r in rates)
    return Plan(tuple(rates), rate_policy=policy_text, buckets=tuple(bucket_key(key_id, r.suffix) for r in rates))
