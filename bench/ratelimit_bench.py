"""Per-check cost of Sidecar's limiter against the ``limits`` library (issue 4).

    .venv/bin/python -m bench.ratelimit_bench [--redis-url redis://127.0.0.1:6379/0] [-n 50000]

Without ``--redis-url`` a throwaway ``redis-server`` is started on a free port (and
killed at the end) when the binary is installed. Every variant sees the same traffic:
``n`` checks spread round-robin over 1000 keys, so each key stays under its budget and
every check takes the *allowed* path (the common one; it builds the response headers).

For ``limits`` one check is ``hit()`` plus ``get_window_stats()``: the second call is
what it takes to fill ``RateLimit`` / ``X-RateLimit-*`` headers (``hit`` only answers
yes or no); with Redis that is two round trips. Sidecar's ``check()`` is one call (one
``EVALSHA`` with Redis) that also returns the headers. The figure is the best of
``--repeat`` runs, in microseconds per check, on this (shared, noisy) machine.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sidecar.auth.models import KeyRecord
from sidecar.config import parse_config
from sidecar.demo import free_port
from sidecar.limits.ratelimit import RateLimiter
from sidecar.store import open_store

KEYS = 1000
LIMIT = "600/minute"


async def timed(n: int, repeat: int, one: Callable[[int], Awaitable[Any]]) -> float:
    """Best µs per call over ``repeat`` runs of ``n`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(n):
            await one(i)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


async def sidecar_check(tmp: Path, n: int, repeat: int, rate_limits: dict[str, Any], label: str) -> tuple[str, float]:
    raw = {
        "upstreams": [{"id": "api", "kind": "mcp", "url": "http://127.0.0.1:9"}],
        "store": {"path": str(tmp / f"{label.replace(' ', '_')}.db")},
        "rate_limits": rate_limits,
    }
    cfg = parse_config(raw, env={}, base=tmp)
    store = await open_store(cfg.store)
    limiter = RateLimiter(cfg, store)
    await limiter.start()
    keys = [KeyRecord(id=f"k{i:04d}", name="bench", hash="$argon2id$unused") for i in range(KEYS)]
    up = cfg.upstreams[0]
    try:
        for k in keys:  # warm: plans resolved, quota counters loaded, script loaded
            await limiter.check(k, up)

        async def one(i: int) -> None:
            d = await limiter.check(keys[i % KEYS], up)
            assert d.allowed

        return label, await timed(n, repeat, one)
    finally:
        await limiter.close()
        await store.close()


async def limits_check(storage_uri: str, strategy: str, n: int, repeat: int, label: str) -> tuple[str, float]:
    from limits import parse
    from limits.aio import strategies
    from limits.storage import storage_from_string

    kwargs = {"implementation": "redispy"} if storage_uri.startswith("async+redis") else {}
    storage = storage_from_string(storage_uri, **kwargs)
    limiter = {
        "moving": strategies.MovingWindowRateLimiter,
        "sliding": strategies.SlidingWindowCounterRateLimiter,
        "fixed": strategies.FixedWindowRateLimiter,
    }[strategy](storage)
    item = parse(LIMIT)
    names = [f"k{i:04d}" for i in range(KEYS)]

    async def one(i: int) -> None:
        name = names[i % KEYS]
        assert await limiter.hit(item, name)
        await limiter.get_window_stats(item, name)  # for the headers

    try:
        return label, await timed(n, repeat, one)
    finally:
        await storage.reset()


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )

    async def wait(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.write(b"PING\r\n")
                if await r.readline() == b"+PONG\r\n":
                    w.close()
                    return
                w.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50_000, help="checks per run (memory); redis runs use n/10")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--redis-url", help="an existing Redis (default: start redis-server on a free port)")
    args = ap.parse_args()
    n, rn = args.n, max(1000, args.n // 10)
    results: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results.append(await sidecar_check(tmp, n, args.repeat, {"default": [LIMIT]}, "sidecar memory, 1 limit"))
        results.append(
            await sidecar_check(
                tmp, n, args.repeat, {"default": ["1000/second", LIMIT], "quota": "100000/day"},
                "sidecar memory, 2 limits + quota",
            )
        )  # fmt: skip
        for strategy in ("moving", "sliding", "fixed"):
            results.append(await limits_check("async+memory://", strategy, n, args.repeat, f"limits memory {strategy}"))
        server = None
        url = args.redis_url
        if url is None and (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()):
            server = RedisServer()
            await server.wait()
            url = f"redis://127.0.0.1:{server.port}/0"
        try:
            if url:
                rl = {"backend": "redis", "redis_url": url}
                results.append(
                    await sidecar_check(tmp, rn, args.repeat, {**rl, "default": [LIMIT]}, "sidecar redis, 1 limit")
                )
                results.append(
                    await sidecar_check(
                        tmp, rn, args.repeat, {**rl, "default": ["1000/second", LIMIT], "quota": "100000/day"},
                        "sidecar redis, 2 limits + quota",
                    )
                )  # fmt: skip
                async_url = "async+" + url
                for strategy in ("moving", "sliding", "fixed"):
                    results.append(await limits_check(async_url, strategy, rn, args.repeat, f"limits redis {strategy}"))
        finally:
            if server is not None:
                server.stop()
    width = max(len(label) for label, _ in results)
    for label, us in results:
        print(f"{label:<{width}}  {us:8.1f} µs/check")


if __name__ == "__main__":
    asyncio.run(main())
