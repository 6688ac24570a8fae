"""``sidecar demo``: it starts, prints working curl lines with a key, serves them, and stops cleanly."""

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


async def test_demo_serves_its_printed_curl_lines_and_stops_on_sigint() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PLEX_TOKEN", "SIDECAR_ADMIN_TOKEN")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "demo", "--listen", f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out: list[str] = []
    err: list[str] = []

    async def drain(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        async for raw in stream:
            into.append(raw.decode(errors="replace").rstrip("\n"))

    readers = [asyncio.create_task(drain(proc.stdout, out)), asyncio.create_task(drain(proc.stderr, err))]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        curls: list[str] = []
        while not any("/admin/keys" in c for c in curls):  # the last curl line of the banner
            assert proc.returncode is None, "demo exited early:\n" + "\n".join(out + err)
            assert time.monotonic() < deadline, "no curl lines within the deadline:\n" + "\n".join(out + err)
            await asyncio.sleep(0.05)
            curls = [line.strip() for line in out if line.strip().startswith("curl ")]
        first = curls[0]
        m = re.fullmatch(r"curl -s (http://127\.0\.0\.1:(\d+))(/\S+) -H 'X-Plex-Token: (pmcp_[0-9a-z]+)'", first)
        assert m, first
        base, printed_port, path, key = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        assert printed_port == port  # --listen is honoured
        async with aiohttp.ClientSession() as client:
            resp = await client.get(base + path, headers={"X-Plex-Token": key})
            assert resp.status == 200
            assert "Movies" in await resp.text()
            resp = await client.get(base + path, headers={"X-Plex-Token": "pmcp_nope"})
            assert resp.status in (400, 401)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert "Traceback" not in "\n".join(err), "\n".join(err)
    assert "Stopping the demo." in out
