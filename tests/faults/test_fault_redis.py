"""Redis restarted or frozen under load (issue 15), with a real ``redis-server``.

While 16 clients keep requesting, Redis is killed and started again on the same port, or
frozen with SIGSTOP (a black hole: connections open, nothing answers) and thawed. Throughout:
no request waits longer than the limiter's Redis timeout plus a little slack, every answer
is 200 or the designed ``on_redis_error`` one (``deny``: 503 ``service_unavailable``), no
exception escapes into the logs, and afterwards the limits are exact again on the same
connection pool (reconnected without a sidecar restart, no stale reply read from a
connection that timed out).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running
from redis_support import RedisProc, cfg, get, redis_server

from sidecar.limits.redis_backend import REDIS_TIMEOUT

__all__ = ["redis_server"]  # the fixture, re-exported for pytest

SLACK = 0.6  # seconds over the Redis timeout a request may take (2 shared cores, a loaded loop)
CLIENTS = 16


class Load:
    """CLIENTS tasks requesting in a loop; records (status, code, seconds) of every answer."""

    def __init__(self, r: Running, key: str) -> None:
        self.r, self.key = r, key
        self.seen: list[tuple[int, str, float]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            resp = await get(self.r, self.key)
            body = await resp.read()
            code = "" if resp.status == 200 else (await resp.json())["error"]["code"]
            self.seen.append((resp.status, code, time.monotonic() - started))
            assert body is not None

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(CLIENTS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)  # a client's failure (an exception) fails the test here

    async def until(self, more: int) -> None:
        """Wait until ``more`` further answers came in (bounded)."""
        want = len(self.seen) + more
        deadline = time.monotonic() + 10
        while len(self.seen) < want:
            assert time.monotonic() < deadline, "the load stalled"
            await asyncio.sleep(0.01)


async def limits_enforced_again(r: Running, timeout: float = 10.0) -> None:
    """A fresh key with 3/minute: once Redis answers again, exactly 3 pass and the 4th is 429."""
    _, k = await r.create_key(rate_limits=["3/minute"])
    deadline = time.monotonic() + timeout
    while "RateLimit" not in (first := await get(r, k)).headers:
        assert time.monotonic() < deadline, "the limiter never went back to Redis"
        await asyncio.sleep(0.05)
    assert first.status == 200 and first.headers["RateLimit"].startswith('"minute";r=2;')
    rest = [await get(r, k) for _ in range(3)]
    assert [x.status for x in rest] == [200, 200, 429]
    assert [x.headers["X-RateLimit-Remaining"] for x in rest] == ["1", "0", "0"]


def escaped(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that mean an exception got away (asyncio's "never retrieved", aiohttp's 500s)."""
    return [
        rec.getMessage()
        for rec in caplog.records
        if rec.levelno >= logging.ERROR or rec.exc_info or "never retrieved" in rec.getMessage()
    ]


@pytest.mark.parametrize("mode", ["allow", "deny"])
async def test_redis_killed_and_restarted_under_load(
    make_sidecar: MakeSidecar,
    plex_upstream: TestServer,
    tmp_path: Path,
    redis_server: RedisProc,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    """Clients see 200 (``allow``) or 200/503 ``service_unavailable`` (``deny``), each within the Redis
    timeout; limits are exact again once Redis is back on the same port."""
    caplog.set_level(logging.WARNING)
    r = await make_sidecar(cfg(plex_upstream, tmp_path, redis_server, default=["100000/minute"], on_redis_error=mode))
    _, k = await r.create_key()
    load = Load(r, k)
    load.start()
    try:
        await load.until(50)
        redis_server.stop()  # kill -9
        down_at = len(load.seen)
        await load.until(100)
        await redis_server.start()  # same port, empty
        await load.until(100)
    finally:
        await load.stop()
    await limits_enforced_again(r)
    allowed = {(200, "")} | ({(503, "service_unavailable")} if mode == "deny" else set())
    assert {(s, c) for s, c, _ in load.seen} <= allowed
    if mode == "deny":
        assert (503, "service_unavailable") in {(s, c) for s, c, _ in load.seen[down_at:]}
    slowest = max(t for _, _, t in load.seen)
    assert slowest <= REDIS_TIMEOUT + SLACK, f"a request took {slowest:.2f}s"
    errors = r.sc.metrics.registry.get_sample_value("sidecar_ratelimit_backend_errors_total", {"backend": "redis"})
    assert errors is not None and errors > 0
    assert not escaped(caplog), escaped(caplog)


async def test_redis_frozen_under_load_times_out_then_recovers_exactly(
    make_sidecar: MakeSidecar,
    plex_upstream: TestServer,
    tmp_path: Path,
    redis_server: RedisProc,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGSTOP: connections stay open and nothing answers. Each client waits at most the Redis timeout
    (then ``allow`` lets it through); after SIGCONT the timed-out connections' late replies are never
    taken for a later request's answer: the counts are exact."""
    caplog.set_level(logging.WARNING)
    r = await make_sidecar(
        cfg(plex_upstream, tmp_path, redis_server, default=["100000/minute"], on_redis_error="allow")
    )
    _, k = await r.create_key()
    load = Load(r, k)
    load.start()
    proc = redis_server.proc
    assert proc is not None
    try:
        await load.until(50)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            await load.until(3 * CLIENTS)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        await load.until(100)
    finally:
        await load.stop()
    assert {(s, c) for s, c, _ in load.seen} == {(200, "")}
    slowest = max(t for _, _, t in load.seen)
    assert slowest <= REDIS_TIMEOUT + SLACK, f"a request took {slowest:.2f}s"
    await limits_enforced_again(r)
    for _ in range(3):  # more keys through the same pool: every reply is this request's own
        await limits_enforced_again(r)
    assert not escaped(caplog), escaped(caplog)
