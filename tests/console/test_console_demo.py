"""``sidecar demo`` prints the console's address with a one-time sign-in link that works once."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time

import aiohttp

from sidecar.demo import free_port

START_TIMEOUT = 30.0


async def test_demo_prints_a_one_time_console_link() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PLEX_TOKEN", "SIDECAR_ADMIN_TOKEN")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "demo", "--listen", f"127.0.0.1:{free_port()}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        link = None
        deadline = time.monotonic() + START_TIMEOUT
        while link is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))).decode()
            assert line, "demo exited early"
            m = re.search(r"console:\s+(http://127\.0\.0\.1:\d+/signin/once/[A-Za-z0-9_-]+)", line)
            link = m.group(1) if m else None
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # an IP-address host
            resp = await http.get(link, allow_redirects=False)
            assert resp.status == 200
            assert "sidecar_console=" in resp.headers["Set-Cookie"]
            base = link.split("/signin/")[0]
            page = await http.get(base + "/", allow_redirects=False)  # the cookie it set signs this browser in
            assert page.status == 200 and "API Keys" in await page.text()
            assert "demo" in await page.text()  # the demo's keys are listed
        async with aiohttp.ClientSession() as other:
            again = await other.get(link, allow_redirects=False)
            assert again.status == 401 and "Set-Cookie" not in again.headers  # single use
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
