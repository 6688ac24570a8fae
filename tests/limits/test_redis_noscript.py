"""A Redis that lost the limiter's script (restarted, SCRIPT FLUSH, failover to a replica that
never loaded it) answers NOSCRIPT: the script is loaded again and the request counted once."""

from __future__ import annotations

from redis_support import RedisProc, redis_server

from sidecar.config import parse_limit
from sidecar.limits.gcra import Plan, QuotaRule, RateRule, bucket_key, quota_key
from sidecar.limits.redis_backend import RedisBackend

__all__ = ["redis_server"]  # the fixture, re-exported for pytest


async def test_a_flushed_script_is_reloaded_and_counts_once(redis_server: RedisProc) -> None:
    rule = RateRule.build(parse_limit("3/minute"), "*", "3/minute", "p60")
    plan = Plan((rule,), QuotaRule(parse_limit("10/day"), "*"), buckets=(bucket_key("kid", rule.suffix),))
    qkey = ("kid", "*", "d1")
    backend = RedisBackend(redis_server.url, send_clock=False)
    admin = await redis_server.client()
    try:
        assert (await backend.evaluate(plan, 0, qkey, 2e9, 1)).ok
        await admin.script_flush()
        out = await backend.evaluate(plan, 0, qkey, 2e9, 1)
        assert out.ok and out.quota_used == 1
        assert int(await admin.get(quota_key(qkey)) or 0) == 2  # each request counted once
        assert (await backend.evaluate(plan, 0, qkey, 2e9, 1)).ok
        assert not (await backend.evaluate(plan, 0, qkey, 2e9, 1)).ok  # the 3/minute bucket held through it
    finally:
        await backend.close()
        await admin.aclose()
