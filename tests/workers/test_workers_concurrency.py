"""``concurrency`` with ``sidecar serve --workers 2``: the host's in-flight count, not N times it.

A key with ``concurrency: 2`` sends slow requests on fresh connections (spread over both
workers by ``SO_REUSEPORT``): two are served, the rest refused with the designed 429,
whichever worker each lands on. A worker killed while holding slots gives them back:
the supervisor clears its column before starting the replacement.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from workers_support import Host, manage, metric, slow_upstream, workers_process, write_config


async def get(http: aiohttp.ClientSession, host: Host, key: str, path: str) -> int:
    async with http.get(host.proxy + path, headers={"X-Plex-Token": key}) as resp:
        body = await resp.read()
        if resp.status == 429:
            assert b"too many concurrent requests" in body and resp.headers["X-RateLimit-Limit"] == "2"
        return resp.status


async def scrape(host: Host) -> str:
    async with aiohttp.ClientSession() as http, http.get(host.admin + "/metrics") as resp:
        return await resp.text()


async def wait_until_held(host: Host, n: int) -> None:
    """Until ``n`` requests are in flight on the host (read from /metrics: a probe request would take a slot)."""
    deadline = time.monotonic() + 5
    while metric(await scrape(host), "sidecar_in_flight_requests") < n:
        assert time.monotonic() < deadline, "the slow requests never got in flight"
        await asyncio.sleep(0.02)


async def test_concurrency_is_the_hosts_and_a_dead_workers_slots_come_back(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await aiohttp_server(slow_upstream())
    config = write_config(tmp_path, str(up.make_url("")))
    _, key = await manage(config, "create", concurrency=2)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with workers_process(config, "--workers", "2") as host, aiohttp.ClientSession(connector=connector) as http:
        statuses = await asyncio.gather(*(get(http, host, key, "/slow?s=0.4") for _ in range(8)))
        assert sorted(statuses) == [200, 200] + [429] * 6  # 2 on the host, not 2 per worker
        per_worker = [
            metric(await scrape(host), "sidecar_worker_requests_total", lambda s, w=w: f'worker="{w}"' in s)
            for w in "01"
        ]
        assert min(per_worker) > 0, per_worker  # both workers took some (and refused by the host's count)
        assert await get(http, host, key, "/quick") == 200  # every slot given back

        # Both workers die holding the key's two slots; their replacements must not inherit them.
        held = [asyncio.create_task(get(http, host, key, "/slow")) for _ in range(2)]
        await wait_until_held(host, 2)
        assert await get(http, host, key, "/quick") == 429  # both slots held
        mark = len(host.log)
        victims = dict(host.pids)
        for pid in victims.values():
            os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*held, return_exceptions=True)
        for i, pid in victims.items():
            await host.wait_log(rf"worker {i} \(pid {pid}\) exited with signal SIGKILL; restarting", mark)
        deadline = time.monotonic() + 15
        while metric(await scrape(host), "sidecar_workers") != 2 or set(host.pids.values()) & set(victims.values()):
            assert time.monotonic() < deadline, "the workers did not come back"
            await asyncio.sleep(0.05)
        statuses = await asyncio.gather(*(get(http, host, key, "/slow?s=0.3") for _ in range(2)))
        assert statuses == [200, 200]  # the dead workers' slots were cleared
