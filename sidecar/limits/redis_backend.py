"""The Redis backend of the rate limiter: one Lua script, one round trip per request.

``RedisBackend.evaluate`` runs ``GCRA_LUA`` with ``EVALSHA``: it reads every GCRA bucket
and the quota counter of one key, decides, and commits all of them or none, atomically.
Buckets are computed on Redis ``TIME`` so replicas with skewed clocks share one exact
budget (a test clock, when one was injected, is sent instead). redis-py's client runs
without retries: a retried script whose reply was lost would count a request twice.
Failures surface as ``BackendDown``; ``RateLimiter`` applies ``on_redis_error``.
"""

from __future__ import annotations

import contextlib

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .gcra import REDIS_PREFIX, BackendDown, Outcome, Plan, quota_key
from .quota import CounterKey

__all__ = ["EDIT_LOCK_TTL", "EDIT_LOCK_WAIT", "GCRA_LUA", "QUOTA_EXPIRE_SLACK", "REDIS_TIMEOUT", "RedisBackend"]

REDIS_TIMEOUT = 0.5  # seconds: connect and command timeout for the limiter's Redis calls
# One key's limit edit (its store write and carry) across replicas (``carry.EditLocks``): the lock
# expires after EDIT_LOCK_TTL (a replica that died holding it blocks no one for longer), and an edit
# waits for it at most EDIT_LOCK_WAIT — past the TTL, so only a stream of edits makes one give up.
EDIT_LOCK_TTL = 10.0
EDIT_LOCK_WAIT = EDIT_LOCK_TTL + 1.0
EDIT_LOCK_POLL = 0.05  # seconds between tries while another replica holds it
QUOTA_EXPIRE_SLACK = 86400  # quota counters outlive their window by a day (for the admin API)

# KEYS[1..n]: GCRA buckets, KEYS[n+1]: the quota counter (optional).
# ARGV: now_us (0 = Redis TIME), cost, n, then T_i and capacity_i per bucket,
#       then the quota limit and when the counter may expire, in Unix seconds (when KEYS has n+1 entries).
# The counter's TTL is relative to the script's own clock, so an injected test clock works too.
# Returns {ok, debt_1, ..., debt_n, quota_used_before (-1: none)}.
GCRA_LUA = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis < 5: TIME before writes
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local cost = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local out = {1}
local ok = 1
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i]) or 0)
  local debt = tat - now
  if debt < 0 then debt = 0 end
  out[i + 1] = debt
  if cost > 0 and debt + tonumber(ARGV[2 + 2 * i]) * cost > tonumber(ARGV[3 + 2 * i]) then ok = 0 end
end
local used = -1
if #KEYS > n then
  used = tonumber(redis.call('GET', KEYS[n + 1]) or 0)
  if cost > 0 and used + cost > tonumber(ARGV[4 + 2 * n]) then ok = 0 end
end
out[n + 2] = used
if ok == 1 then
  for i = 1, n do
    local debt = out[i + 1] + tonumber(ARGV[2 + 2 * i]) * cost
    if debt > 0 then
      local ttl = string.format('%.0f', math.ceil(debt / 1000) + 1000)
      redis.call('SET', KEYS[i], string.format('%.0f', now + debt), 'PX', ttl)
    else
      redis.call('DEL', KEYS[i])
    end
  end
  if used >= 0 then
    redis.call('INCRBY', KEYS[n + 1], cost)
    local ttl = math.ceil(tonumber(ARGV[5 + 2 * n]) - now / 1000000)
    if ttl < 1 then ttl = 1 end
    redis.call('EXPIRE', KEYS[n + 1], string.format('%.0f', ttl))
  end
end
out[1] = ok
return out
"""


def _redis_client(url: str) -> Redis:
    # No client-side retries: a retried EVALSHA whose reply was lost would count twice.
    return Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )


def _count(value: object) -> int:
    """A stored counter; anything else is the backend failing (``errors``: the caller's designed answer)."""
    if value is None:
        return 0
    if isinstance(value, bytes | str | int):
        with contextlib.suppress(ValueError):
            return int(value)
    raise RedisError(f"the rate-limit backend answered {type(value).__name__}, not a count")


class RedisBackend:
    """Buckets and quotas in Redis, shared by every replica pointed at it."""

    def __init__(self, url: str, *, send_clock: bool) -> None:
        self.errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        self.expire_slack = QUOTA_EXPIRE_SLACK
        self.client = _redis_client(url)
        self.script = self.client.register_script(GCRA_LUA)
        self.send_clock = send_clock

    async def evaluate(self, plan: Plan, now_us: int, qkey: CounterKey | None, qend: float, cost: int) -> Outcome:
        keys = list(plan.buckets)
        args: list[int | str] = [now_us if self.send_clock else 0, cost, len(plan.rates)]
        for r in plan.rates:
            args += [r.interval, r.capacity]
        if qkey is not None and plan.quota is not None:
            keys.append(quota_key(qkey))
            args += [plan.quota.limit.count, int(qend) + QUOTA_EXPIRE_SLACK]
        try:
            out = await self.script(keys=keys, args=args)
        except self.errors as e:
            raise BackendDown(f"{type(e).__name__}: {e}") from None
        # Not the script's answer (a proxy or another server speaking RESP): the backend is down, not a 500.
        if not isinstance(out, list) or len(out) != len(plan.rates) + 2 or not all(type(x) is int for x in out):
            raise BackendDown(f"the rate-limit backend answered {type(out).__name__}, not the script's reply")
        used = int(out[-1])
        return Outcome(bool(out[0]), [int(x) for x in out[1:-1]], used if used >= 0 else None)

    async def get_used(self, qkey: CounterKey) -> int:
        return _count(await self.client.get(quota_key(qkey)))

    async def set_used(self, qkey: CounterKey, ttl: int, used: int) -> int:
        await self.client.set(quota_key(qkey), used, ex=ttl)
        return used

    async def add_used(self, qkey: CounterKey, ttl: int, delta: int) -> int:
        k = quota_key(qkey)
        async with self.client.pipeline(transaction=True) as p:
            p.incrby(k, delta)
            p.expire(k, ttl)
            value, _ = await p.execute()
        return _count(value)

    def edit_lock(self, key_id: str) -> Lock:
        """redis-py's lock (a random token, an expiry, released only by its holder) on one key's limit edits."""
        name = f"{REDIS_PREFIX}:edit:{{{key_id}}}"
        return Lock(self.client, name, timeout=EDIT_LOCK_TTL, sleep=EDIT_LOCK_POLL,
                    blocking_timeout=EDIT_LOCK_WAIT, thread_local=False)  # fmt: skip

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()
