"""Exact rate limits and quotas across the workers of one host, without Redis.

Two places hold the host's state, each where it is cheapest to keep exact:

- **GCRA buckets** live in a table in shared memory (``sidecar.workers.shm``): a worker
  checks a plan without a quota there itself, under a ``flock``, with no round trip —
  a few µs, the common case (``rate_limits`` without ``quota``).
- **Quotas** live in the supervisor, the owner process: its one ``QuotaBook`` loads a
  counter from the store once, counts, flushes once for the host, and applies admin
  resets to the live count. A plan with a quota is one round trip to it over a unix
  socket in the supervisor's private directory; the owner checks the plan's buckets in
  the same shared table and its quota in one synchronous, all-or-nothing step.

The wire is as small as the question: a plan (buckets, GCRA interval and capacity, quota
limit) is sent once per key version (``[0, "p", pid, buckets, rates, quota]``), then named
by its number; a check is ``[rid, "e", pid, cost, now_us, qkey, qend]`` and its answer
``[rid, ok, debts, quota_used]`` — the ``Outcome`` a one-process limiter computes, by the
same arithmetic, so headers cannot drift. Questions written in one event-loop turn leave
in one ``write`` (pipelined, answered by id), and the owner answers a batch with one.
A question the owner cannot handle is answered at once ``[rid, None, BAD_QUESTION…]``:
the worker's 503 then, not after its timeout.

Why not everything in the owner: a round trip costs the worker ~20-35 µs of CPU and the
owner ~15-25 µs per check (bench/workers_bench.py), which the 2-worker bench felt; why
not quotas in shared memory too: their first read and flush need the store, and admin
resets must reach the live count, which ``QuotaBook`` already does right in one process.
The client quacks like ``RedisBackend``, so ``RateLimiter`` treats it as its shared
backend: an unreachable owner is ``on_redis_error``, with the same back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any, cast

from ..config import parse_limit
from ..limits.gcra import US, BackendDown, BackendRefused, MemoryBackend, Outcome, Plan, QuotaRule, RateRule, TableFull
from ..limits.quota import CounterKey, QuotaBook
from ..store import StoreError
from .shm import TABLE_FULL, ShmBuckets

__all__ = ["LimitsOwner", "SharedLimits"]

log = logging.getLogger("sidecar.workers")

TIMEOUT = 0.5  # seconds an answer may take before the check is decided by on_redis_error
# A question with a quota may wait on the supervisor's store (a counter's first read; a locked
# SQLite file waits up to store.busy_timeout, 5 s by default): as long as one process would wait
# for its own store, then a 503 as there. Deciding it by on_redis_error after TIMEOUT let a spent
# quota pass under "allow".
QUOTA_TIMEOUT = 6.0
STORE_DOWN = "the quota store is unavailable"  # the owner's answer when it cannot read a quota: fail closed
# The owner's answer to a question it cannot handle (unknown plan, wrong shape): at once, so the
# asker gets its 503 now rather than silence until its timeout.
BAD_QUESTION = "the limiter owner could not handle the question"
_QUESTION_ID = re.compile(rb"\[\s*(\d+)\s*,")  # a question's id, read even when the rest is not JSON
MAX_PLANS = 50_000  # plans one worker may have registered before both sides start over
MAX_LINE = 1 << 20  # bytes of one question: a peer sending more without a newline is cut off, not buffered


def _dumps(msg: list[Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


# ------------------------------------------------------------------------------- owner


class LimitsOwner:
    """The supervisor's side: answers every worker from one memory backend and quota book."""

    def __init__(
        self,
        buckets: MemoryBackend | ShmBuckets,
        book: QuotaBook,
        quota_levels: dict[tuple[str, str], tuple[int, int, float]],
        *,
        steady: Callable[[], float] = time.monotonic,
    ) -> None:
        self.buckets = buckets  # the host's shared table (the workers check plans without a quota there)
        self.book = book
        self.quota_levels = quota_levels  # the supervisor's sidecar_quota_* gauges: the host's count
        self.steady = steady  # the table's clock: time.monotonic, one for every process of the host
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[_OwnerConn] = set()
        self.checks = 0

    async def start(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(lambda: _OwnerConn(self), path)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in list(self.conns):
                if conn.transport is not None:
                    conn.transport.close()
            await self.server.wait_closed()

    def evaluate(self, plan: Plan, cost: int, now_us: int, qkey: CounterKey | None, qend: float) -> list[Any] | None:
        """The synchronous check; None when the quota counter must be read from the store first."""
        counter = None
        if qkey is not None:
            counter = self.book.peek(qkey)
            if counter is None or not counter.loaded:
                return None
        out = self.buckets.evaluate(plan, now_us or int(self.steady() * US), counter, cost)
        self.checks += 1
        if qkey is not None and plan.quota is not None and out.quota_used is not None:
            used = out.quota_used + cost if out.ok else out.quota_used
            self.quota_levels[(qkey[0], qkey[1])] = (plan.quota.limit.count, used, qend)
        return [out.ok, out.debts, -1 if out.quota_used is None else out.quota_used]

    async def evaluate_loading(
        self, plan: Plan, cost: int, now_us: int, qkey: CounterKey, qend: float
    ) -> list[Any] | str:
        try:
            await self.book.counter(qkey, qend)
        except StoreError as e:
            return f"{STORE_DOWN}: {e}"
        try:
            result = self.evaluate(plan, cost, now_us, qkey, qend)
        except TableFull:
            return TABLE_FULL  # the worker's TableFull (a 503), not a BackendDown (on_redis_error)
        return result if result is not None else "quota counter not loaded"

    async def admin(self, op: str, qkey: CounterKey, end: float, value: int) -> int:
        if op == "g":
            c = self.book.peek(qkey)
            return c.used if c is not None and c.loaded else await self.book.store.quota_used(*qkey)
        if op == "s":
            return await self.book.set_used(qkey, end, value)
        return await self.book.add_used(qkey, end, value)


class _OwnerConn(asyncio.Protocol):
    """One worker's connection: its registered plans and its half-read line."""

    def __init__(self, owner: LimitsOwner) -> None:
        self.owner = owner
        self.plans: dict[int, Plan] = {}
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.owner.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        lines = (self.buf + data).split(b"\n")
        self.buf = lines.pop()
        if len(self.buf) > MAX_LINE and self.transport is not None:  # memory and re-split time stay bounded
            log.warning("workers: a limiter peer sent a line over %d bytes; disconnected", MAX_LINE)
            self.buf = b""
            self.transport.abort()
            return
        out: list[bytes] = []
        for line in lines:
            if line:
                try:
                    self._handle(json.loads(line), out)
                except Exception as e:  # a malformed question never takes the owner down, nor waits
                    log.exception("workers: bad limiter request")
                    m = _QUESTION_ID.match(line)
                    if m is not None and int(m.group(1)):  # id 0 ("p", "c") has nobody waiting
                        out.append(_dumps([int(m.group(1)), None, f"{BAD_QUESTION}: {type(e).__name__}: {e}"[:300]]))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _handle(self, msg: list[Any], out: list[bytes]) -> None:
        rid, op = msg[0], msg[1]
        if op == "e":
            _, _, pid, cost, now_us, qk, qend = msg
            plan = self.plans[pid]
            qkey = (qk[0], qk[1], qk[2]) if qk is not None else None
            try:
                result = self.owner.evaluate(plan, cost, now_us, qkey, qend)
            except TableFull:  # not a bad question: the worker refuses the request (shm.TableFull)
                out.append(_dumps([rid, None, TABLE_FULL]))
                return
            if result is not None:
                out.append(_dumps([rid, *result]))
            else:
                assert qkey is not None
                self._later(rid, self.owner.evaluate_loading(plan, cost, now_us, qkey, qend))
        elif op == "p":
            _, _, pid, buckets, rates, quota = msg
            rules = tuple(RateRule(parse_limit(t), "", "", iv, cap, "") for t, iv, cap in rates)
            q = QuotaRule(parse_limit(quota), "") if quota is not None else None
            if pid not in self.plans and len(self.plans) >= MAX_PLANS:  # a peer that never says "c"
                self.plans.clear()
            self.plans[pid] = Plan(rules, q, None, "*", "", tuple(buckets))
        elif op == "c":
            self.plans.clear()
        elif op in ("g", "s", "a"):
            _, _, qk, end, value = msg
            self._later(rid, self.owner.admin(op, (qk[0], qk[1], qk[2]), end, value))
        elif op == "ping":
            out.append(_dumps([rid, 1]))
        else:
            raise ValueError(f"unknown operation {op!r}")

    def _later(self, rid: int, coro: Any) -> None:
        async def run() -> None:
            try:
                result = await coro
            except Exception as e:
                result = f"{type(e).__name__}: {e}"
            if self.transport is not None:
                if isinstance(result, str):
                    reply = [rid, None, result]
                elif isinstance(result, int):
                    reply = [rid, result]
                else:
                    reply = [rid, *result]
                self.transport.write(_dumps(reply))

        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


# ------------------------------------------------------------------------------ client


class SharedLimits:
    """A worker's side: ``RateLimiter``'s shared backend, in place of ``RedisBackend``."""

    def __init__(
        self,
        path: str,
        buckets: ShmBuckets | None = None,
        *,
        send_clock: bool = False,
        quota_timeout: float = QUOTA_TIMEOUT,
        steady: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.steady = steady  # the shared table's clock, as the owner's (tests move both to expire buckets)
        self.quota_timeout = quota_timeout
        self.buckets = buckets  # plans without a quota are checked here, in shared memory, with no round trip
        self.send_clock = send_clock
        self.errors: tuple[type[BaseException], ...] = (BackendDown, OSError)
        self.expire_slack = 0  # ttl = window end - now: the owner needs the window end, not a TTL
        self._proto: _ClientConn | None = None
        self._connecting: asyncio.Lock | None = None
        self._plans: dict[int, tuple[Plan, int]] = {}
        self._next_pid = 1

    async def _conn(self) -> _ClientConn:
        proto = self._proto
        if proto is not None and proto.open:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            current = self._proto
            if current is not None and current.open:
                return current  # another caller connected meanwhile
            loop = asyncio.get_running_loop()
            try:
                _, fresh = await asyncio.wait_for(loop.create_unix_connection(_ClientConn, self.path), TIMEOUT)
            except (TimeoutError, OSError) as e:
                raise BackendDown(f"the limiter owner (supervisor) is unreachable: {e}") from None
            self._proto = fresh
            self._plans.clear()  # a new connection knows no plan
            return fresh

    async def evaluate(self, plan: Plan, now_us: int, qkey: CounterKey | None, qend: float, cost: int) -> Outcome:
        if qkey is None and self.buckets is not None:
            return self.buckets.evaluate(plan, int(self.steady() * US), None, cost)
        conn = self._proto
        if conn is None or not conn.open:
            conn = await self._conn()
        entry = self._plans.get(id(plan))
        if entry is None or entry[0] is not plan:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
                conn.send([0, "c"])
            pid = self._next_pid
            self._next_pid += 1
            rates = [[r.limit.text, r.interval, r.capacity] for r in plan.rates]
            quota = plan.quota.limit.text if plan.quota is not None else None
            conn.send([0, "p", pid, list(plan.buckets), rates, quota])
            self._plans[id(plan)] = (plan, pid)
        else:
            pid = entry[1]
        msg = ["e", pid, cost, now_us if self.send_clock else 0, list(qkey) if qkey is not None else None, qend]
        reply = await (conn.ask(msg) if qkey is None else conn.ask(msg, self.quota_timeout, StoreError))
        if reply[0] is None:
            if str(reply[1]).startswith(STORE_DOWN):  # the owner is there, its store is not: as one process
                raise StoreError(str(reply[1]).removeprefix(f"{STORE_DOWN}: "))
            if reply[1] == TABLE_FULL:  # refused, as a worker's own check of the table (never on_redis_error)
                raise TableFull(TABLE_FULL)
            if str(reply[1]).startswith(BAD_QUESTION):  # e.g. a plan it lost: registered again next time
                self._plans.clear()
                raise BackendRefused(str(reply[1]))
            raise BackendDown(str(reply[1]))
        used = int(reply[2])
        return Outcome(bool(reply[0]), reply[1], used if used >= 0 else None)

    async def _admin(self, op: str, qkey: CounterKey, end: float, value: int) -> int:
        reply = await (await self._conn()).ask([op, list(qkey), end, value])
        if reply[0] is None:
            raise BackendDown(str(reply[1]))
        return int(reply[0])

    async def get_used(self, qkey: CounterKey) -> int:
        return await self._admin("g", qkey, 0.0, 0)

    async def set_used(self, qkey: CounterKey, ttl: int, used: int) -> int:
        return await self._admin("s", qkey, time.time() + ttl, used)

    async def add_used(self, qkey: CounterKey, ttl: int, delta: int) -> int:
        return await self._admin("a", qkey, time.time() + ttl, delta)

    async def ping(self) -> None:
        await (await self._conn()).ask(["ping"])

    async def close(self) -> None:
        if self._proto is not None:
            self._proto.close()
            self._proto = None


class _ClientConn(asyncio.Protocol):
    """Pipelined questions: written once per loop turn, answered by id, timed out by a watchdog."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        # id -> (answer, when it is late, what its lateness raises)
        self.waiting: dict[int, tuple[asyncio.Future[list[Any]], float, type[Exception]]] = {}
        self.out: list[bytes] = []
        self.next_id = 1
        self.buf = b""
        self.watchdog: asyncio.TimerHandle | None = None

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.watchdog = self.loop.call_later(TIMEOUT / 2, self._expire)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.watchdog is not None:
            self.watchdog.cancel()
        self._fail_all(BackendDown("the limiter owner (supervisor) closed the connection"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send(self, msg: list[Any]) -> None:
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(_dumps(msg))

    def _flush(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    async def ask(self, msg: list[Any], within: float = TIMEOUT, late: type[Exception] = BackendDown) -> list[Any]:
        if self.transport is None:
            raise BackendDown("the limiter owner (supervisor) closed the connection")
        rid = self.next_id
        self.next_id = rid + 1
        fut: asyncio.Future[list[Any]] = self.loop.create_future()
        self.waiting[rid] = (fut, self.loop.time() + within, late)
        self.send([rid, *msg])
        return await fut

    def data_received(self, data: bytes) -> None:
        lines = (self.buf + data).split(b"\n")
        self.buf = lines.pop()
        for line in lines:
            if not line:
                continue
            reply = json.loads(line)
            entry = self.waiting.pop(reply[0], None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(reply[1:])

    def _expire(self) -> None:
        """Fail questions past their time (one timer for all, not one per request)."""
        now = self.loop.time()
        late = [rid for rid, (_, due, _) in self.waiting.items() if due < now]
        for rid in late:
            fut, _, error = self.waiting.pop(rid)
            if not fut.done():
                what = "the limiter owner" if error is BackendDown else "the quota store (through the supervisor)"
                fut.set_exception(error(f"{what} did not answer in time"))
        # A late answer finds no waiter (ids are never reused) and is dropped.
        self.watchdog = self.loop.call_later(TIMEOUT / 2, self._expire)

    def _fail_all(self, e: BaseException) -> None:
        for fut, _, _ in self.waiting.values():
            if not fut.done():
                fut.set_exception(e)
                with contextlib.suppress(BaseException):
                    fut.exception()
        self.waiting.clear()
