"""``sidecar serve --workers 2`` for real (issue 19): one port, two workers, one host.

Each test starts the supervisor as a child process on free ports in front of a real
aiohttp upstream, and talks to it as a client would: requests on fresh connections (so
``SO_REUSEPORT`` spreads them over both workers), the admin API and ``/metrics`` of the
supervisor, and signals. Which worker answered is read from ``/metrics``
(``sidecar_worker_requests_total``), never from a header.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from tlscerts import make_tls
from workers_support import AUTH, Host, env, manage, metric, slow_upstream, workers_process, write_config

PATH = "/library/sections"


async def upstream(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(slow_upstream())
    return server


async def new_key(config: Path, **fields: Any) -> tuple[str, str]:
    rec, key = await manage(config, "create", **fields)
    return rec.id, key


async def fan_out(host: Host, key: str, n: int, path: str = PATH) -> list[int]:
    """``n`` concurrent requests, each on its own connection."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as http:

        async def one() -> int:
            async with http.get(host.proxy + path, headers={"X-Plex-Token": key}) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def scrape(host: Host) -> str:
    async with aiohttp.ClientSession() as http, http.get(host.admin + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def served(text: str) -> dict[str, float]:
    return {w: metric(text, "sidecar_worker_requests_total", lambda s, w=w: f'worker="{w}"' in s) for w in "01"}


async def test_exact_limit_spread_over_workers_and_one_metrics(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await upstream(aiohttp_server)
    config = write_config(tmp_path, str(up.make_url("")))
    _, key = await new_key(config, rate_limits=["10/minute"])
    async with workers_process(config, "--workers", "2") as host:
        statuses = await fan_out(host, key, 30)
        assert sorted(statuses) == [200] * 10 + [429] * 20  # the host's budget, not 10 per worker
        text = await scrape(host)
        assert metric(text, "sidecar_requests_total") == 30  # each request counted once, both workers summed
        assert metric(text, "sidecar_requests_total", lambda s: 'code="429"' in s) == 20
        assert metric(text, "sidecar_rate_limited_total") == 20
        assert metric(text, "sidecar_workers") == 2
        per_worker = served(text)
        assert sum(per_worker.values()) == 30 and min(per_worker.values()) > 0, per_worker
        assert metric(text, "process_resident_memory_bytes", lambda s: 'worker="supervisor"' in s) > 0
        assert metric(text, "sidecar_keys", lambda s: 'state="active"' in s) == 1  # the key table, not N times
        async with aiohttp.ClientSession() as http, http.get(host.admin + "/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["checks"]["workers"] == "ok"
    # Both workers wrote the one access log: every request once, every line whole.
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert sorted(json.loads(line)["status"] for line in lines) == [200] * 10 + [429] * 20


async def test_inherited_socket_when_no_reuseport(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await upstream(aiohttp_server)
    config = write_config(tmp_path, str(up.make_url("")), workers=2)
    _, key = await new_key(config)
    async with workers_process(config, extra_env={"SIDECAR_WORKERS_SOCKET": "inherit"}) as host:
        assert any("(one inherited socket)" in line for line in host.log)
        assert await fan_out(host, key, 20) == [200] * 20
        assert metric(await scrape(host), "sidecar_requests_total") == 20


async def test_tls_on_the_shared_port(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await upstream(aiohttp_server)
    tls = make_tls(tmp_path)
    config = write_config(tmp_path, str(up.make_url("")), tls={"cert": str(tls.cert), "key": str(tls.key)})
    _, key = await new_key(config)
    async with workers_process(config, "--workers", "2") as host:
        assert host.proxy.startswith("https://")
        connector = aiohttp.TCPConnector(force_close=True, ssl=tls.client_context())
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one() -> int:
                async with http.get(host.proxy + PATH, headers={"X-Plex-Token": key}) as resp:
                    return resp.status

            assert await asyncio.gather(*(one() for _ in range(20))) == [200] * 20
        assert min(served(await scrape(host)).values()) > 0


async def test_killed_worker_is_restarted_and_serves(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await upstream(aiohttp_server)
    config = write_config(tmp_path, str(up.make_url("")))
    _, key = await new_key(config)
    async with workers_process(config, "--workers", "2") as host:
        assert await fan_out(host, key, 30) == [200] * 30
        assert metric(await scrape(host), "sidecar_requests_total") == 30
        victim = host.pids[0]
        mark = len(host.log)
        os.kill(victim, signal.SIGKILL)
        await host.wait_log(rf"worker 0 \(pid {victim}\) exited with signal SIGKILL; restarting", mark)
        await host.wait_log(r"worker 0 listening on", mark)
        assert host.pids[0] != victim
        deadline = time.monotonic() + 10
        while True:  # the supervisor sees it answer on its admin socket
            text = await scrape(host)
            if metric(text, "sidecar_workers") == 2:
                break
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.05)
        assert metric(text, "sidecar_worker_restarts_total", lambda s: 'worker="0"' in s) == 1
        assert await fan_out(host, key, 30) == [200] * 30
        text = await scrape(host)
        assert min(served(text).values()) > 0  # the new worker 0 takes its share
        # The dead worker's counts stay in the host's sums (as last read): no step down, nothing twice.
        assert metric(text, "sidecar_requests_total") == 60


async def test_sigterm_drains_requests_in_flight(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await upstream(aiohttp_server)
    config = write_config(tmp_path, str(up.make_url("")), server={"shutdown_grace": "10s"})
    _, key = await new_key(config)
    async with workers_process(config, "--workers", "2") as host:
        slow = asyncio.create_task(fan_out(host, key, 6, "/slow"))
        deadline = time.monotonic() + 10
        while metric(await scrape(host), "sidecar_in_flight_requests") < 6:  # summed over both workers
            assert time.monotonic() < deadline and not slow.done()
            await asyncio.sleep(0.02)
        host.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(slow, 10) == [200] * 6  # every request in flight finished
        assert await asyncio.wait_for(host.proc.wait(), 10) == 0
        assert any("draining 2 workers" in line for line in host.log)
        for pid in host.pids.values():
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


async def test_sighup_reload_reaches_every_worker(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await upstream(aiohttp_server)
    # No store poll within the test: only the SIGHUP can make the workers see the revocation.
    config = write_config(tmp_path, str(up.make_url("")), store={"kind": "sqlite", "poll_interval": "1h"})
    key_id, key = await new_key(config)
    async with workers_process(config, "--workers", "2") as host:
        assert await fan_out(host, key, 10) == [200] * 10
        await manage(config, "revoke", key_id)
        assert await fan_out(host, key, 10) == [200] * 10  # not polled: the workers do not know yet
        host.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while set(statuses := await fan_out(host, key, 20)) != {401}:
            assert time.monotonic() < deadline, statuses
            await asyncio.sleep(0.05)
        before = served(await scrape(host))
        assert await fan_out(host, key, 30) == [401] * 30
        after = served(await scrape(host))
        assert all(after[w] > before[w] for w in "01"), (before, after)  # both workers reloaded


async def test_revoked_key_refused_by_every_worker_within_a_second(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await upstream(aiohttp_server)
    config = write_config(tmp_path, str(up.make_url("")))
    key_id, key = await new_key(config)
    async with workers_process(config, "--workers", "2") as host:
        assert await fan_out(host, key, 10) == [200] * 10
        async with (
            aiohttp.ClientSession() as http,
            http.delete(f"{host.admin}/admin/keys/{key_id}", headers=AUTH) as resp,
        ):
            assert resp.status == 200, await resp.text()
        revoked = time.monotonic()
        while set(statuses := await fan_out(host, key, 10)) != {401}:
            assert time.monotonic() - revoked < 1.0, statuses
            await asyncio.sleep(0.02)
        before = served(await scrape(host))
        assert set(await fan_out(host, key, 30)) == {401}
        after = served(await scrape(host))
        assert all(after[w] > before[w] for w in "01"), (before, after)  # both workers refuse it


async def test_bad_worker_counts_are_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", workers=0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "-c", str(config), "--workers", "lots",
        stderr=asyncio.subprocess.PIPE, env=env(),
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and "--workers: expected a whole number from 1 to 256, or auto" in err.decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "config", "check", "-c", str(config),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, env=env(),
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and "workers: expected a whole number from 1 to 256, or auto; got 0" in err.decode()


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await upstream(aiohttp_server)
    config = write_config(tmp_path, str(up.make_url("")))
    async with workers_process(config, "--workers", "2") as host:
        workers = list(host.pids.values())
        host.proc.kill()
        await host.proc.wait()
        deadline = time.monotonic() + 5
        while alive := [pid for pid in workers if _running(pid)]:  # no orphan keeps the port
            assert time.monotonic() < deadline, alive
            await asyncio.sleep(0.05)
    # Its private directory (sockets, bucket table) outlived it; the next supervisor removes it.
    stale = [d for d in _private_dirs() if _pid_file(d) == str(host.proc.pid)]
    assert len(stale) == 1
    async with workers_process(config, "--workers", "2"):
        assert not stale[0].exists()


def _pid_file(d: Path) -> str:
    try:
        return (d / "supervisor.pid").read_text()
    except OSError:
        return ""


def _private_dirs() -> list[Path]:
    return [d for base in ("/dev/shm", tempfile.gettempdir(), "/tmp") for d in Path(base).glob("sidecar-w-*")]


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
