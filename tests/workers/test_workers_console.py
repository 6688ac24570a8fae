"""The console behind ``sidecar serve --workers 2``: the supervisor shows every worker's recent requests.

Requests go through the proxy port on fresh connections (so both workers serve some),
then the console on the supervisor's admin listener is read as a signed-in browser
would: the key's "last requests" and the Activity page list what both workers saw.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
from conftest import ADMIN_TOKEN
from workers_support import Host, manage, metric, slow_upstream, workers_process, write_config

BOGUS = "pmcp_0000000000000000_notarealkeynotarealkeynotarealkey"


async def through_proxy(host: Host, key: str, paths: list[str]) -> list[int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as http:

        async def one(path: str) -> int:
            async with http.get(host.proxy + path, headers={"X-Plex-Token": key}) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one(p) for p in paths)))


async def signed_in(admin: str) -> aiohttp.ClientSession:
    http = aiohttp.ClientSession(base_url=admin, cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with http.post("/signin", data={"token": ADMIN_TOKEN, "next": "/"}, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
    return http


async def test_console_shows_requests_served_by_every_worker(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await aiohttp_server(slow_upstream())
    config = write_config(tmp_path, str(up.make_url("")))
    rec, key = await manage(config, "create", rate_limits=["12/minute"])
    async with workers_process(config, "--workers", "2") as host:
        paths = [f"/library/metadata/{i}" for i in range(16)]
        statuses = await through_proxy(host, key, paths)
        assert sorted(statuses) == [200] * 12 + [429] * 4
        assert set(await through_proxy(host, BOGUS, ["/library/sections"] * 6)) == {401}
        async with aiohttp.ClientSession() as plain, plain.get(host.admin + "/metrics") as resp:
            text = await resp.text()
        per_worker = [metric(text, "sidecar_worker_requests_total", lambda s, w=w: f'worker="{w}"' in s) for w in "01"]
        assert min(per_worker) > 0 and sum(per_worker) == 22, per_worker  # both workers served some

        http = await signed_in(host.admin)
        try:
            async with http.get(f"/keys/{rec.id}") as resp:
                assert resp.status == 200
                page = await resp.text()
            shown = re.findall(r'<td class="path"><code>(/library/metadata/\d+)</code>', page)
            assert sorted(shown) == sorted(paths)  # every request of the key, from both workers, once
            assert page.count("rate_limit_exceeded") == 4
            async with http.get("/activity?window=15m") as resp:
                assert resp.status == 200
                activity = await resp.text()
        finally:
            await http.close()
        assert "Recent authentication failures <small>(6)</small>" in activity  # the bogus key, on both workers
        assert re.search(r'<td class="num">16</td>', activity)  # the key's volume: all 16 requests
        assert activity.count("rate_limit_exceeded") >= 4
        assert BOGUS not in page + activity  # a presented credential is never shown
