"""``DELETE /admin/cache`` with ``sidecar serve --workers 2``: every worker's cache, not the supervisor's.

Hole found: the admin listener is the supervisor's, whose response cache is always empty (it
proxies nothing). An operator purging an answer that must go (a page that leaked, content
taken down) was told ``{"purged": 0}`` and every worker kept serving it until its TTL. The
supervisor now purges each worker's cache over its private admin socket, and the answer and
the audit line count what was purged on the host.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from workers_support import AUTH, Host, manage, metric, workers_process, write_config

TRIES = 12  # fresh connections: the chance that all land on one worker of two is 2**-11
RULES = [{"upstream": "plex", "path": "/library/*", "ttl": "60s"}]


async def version(http: aiohttp.ClientSession, host: Host, key: str) -> int:
    async with http.get(host.proxy + "/library/page", headers={"X-Plex-Token": key}) as resp:
        assert resp.status == 200
        return int((await resp.json())["v"])


async def test_a_purge_empties_every_workers_cache(tmp_path: Path, aiohttp_server: Any) -> None:
    current = {"v": 1}

    async def page(request: web.Request) -> web.Response:
        return web.json_response(current)

    app = web.Application()
    app.router.add_get("/library/page", page)
    up = await aiohttp_server(app)
    config = write_config(tmp_path, str(up.make_url("")), cache={"rules": RULES})
    _, key = await manage(config, "create")
    connector = aiohttp.TCPConnector(force_close=True, limit=0)  # a new connection, so a new worker, every time
    async with workers_process(config, "--workers", "2") as host, aiohttp.ClientSession(connector=connector) as http:
        assert await asyncio.gather(*(version(http, host, key) for _ in range(TRIES))) == [1] * TRIES
        async with http.get(host.admin + "/metrics") as resp:
            text = await resp.text()
        per_worker = [metric(text, "sidecar_worker_requests_total", lambda s, w=w: f'worker="{w}"' in s) for w in "01"]
        assert min(per_worker) > 0, per_worker  # both workers cached the page
        current["v"] = 2  # the page changed (or must go): the operator purges it
        async with http.delete(host.admin + "/admin/cache", params={"path": "/library/*"}, headers=AUTH) as resp:
            assert resp.status == 200
            assert (await resp.json())["data"]["purged"] == 2  # one entry on each worker
        assert await asyncio.gather(*(version(http, host, key) for _ in range(TRIES))) == [2] * TRIES
        async with http.delete(host.admin + "/admin/cache", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401  # the workers' caches are purged only for the full admin
        async with http.get(host.admin + "/admin/audit", headers=AUTH) as resp:
            audit = (await resp.json())["data"]
        assert [e["purged"] for e in audit if e["action"] == "cache_purged"] == [2]
