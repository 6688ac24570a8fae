"""Crash and kill (issue 15): ``kill -9`` of a real ``sidecar serve`` while it counts, then a restart.

What a hard kill may lose is bounded by two intervals, each for its own table:

- usage (daily ``usage`` buckets and ``last_used``): ``store.usage_flush_interval`` (default 5 s);
- quota counters: ``rate_limits.quota_flush_interval`` (default 2 s).

Audit events and key changes are written in the request that makes them (nothing batched).
The test sends requests one after another, notes when each was answered, kills the process
with SIGKILL at a moment that is not aligned with the flushes, restarts it on the same ports
and compares: the requests lost are at most those answered within one interval (plus
``SLACK`` for the flush's own write) before the kill, and none is counted twice. The kill
leaves the WAL behind with committed frames that were never checkpointed: the restarted
process has to recover them (SQLite WAL recovery) and must answer a proxied request again.
How fast is the benchmark's business (``bench/run restart``, goal ≤ 1 s): a timed assert here
failed on a loaded machine, so the test only bounds it generously (it comes back) and prints it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, PLEX_TOKEN, base_config

from sidecar.config import ConfigError, parse_config
from sidecar.demo import free_port

INTERVAL = 0.5  # both flush intervals in this test
SLACK = 0.25  # a flush's own write time, on a loaded 2-core machine
RUN = 1.8  # seconds of traffic before the kill: several flushes, and not a multiple of INTERVAL
COMES_BACK = 15.0  # process start to first 200 after an unclean stop: liveness, not speed (bench/run restart)
HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _env() -> dict[str, str]:
    return {**os.environ, "PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}


async def run(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@contextlib.asynccontextmanager
async def serve(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "-c", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=_env(),
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def first_answer(http: aiohttp.ClientSession, url: str, key: str, timeout: float = 30.0) -> int:
    """Poll until the proxy answers; returns how many polls got an HTTP answer (each is a counted request)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with http.get(url, headers={"X-Plex-Token": key}) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
                return 1
        except aiohttp.ClientConnectionError:
            assert time.monotonic() < deadline, "the sidecar did not start"
            await asyncio.sleep(0.005)


async def test_kill_9_loses_at_most_one_flush_interval_and_a_restart_serves_again(
    plex_upstream: TestServer, tmp_path: Path
) -> None:
    """The client's view: every request answered 200 until the kill; after the restart GET
    /admin/keys/{id}/usage and the key's quota_status report every request answered before the
    last flush, i.e. all but at most one interval's worth, and never more than were sent."""
    port, admin_port = free_port(), free_port()
    db = tmp_path / "sidecar.db"
    cfg: dict[str, Any] = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["listen"], cfg["admin"]["listen"] = f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}"
    cfg["store"].update(usage_flush_interval=f"{int(INTERVAL * 1000)}ms")
    cfg["rate_limits"] = {"quota": "1000000/day", "quota_flush_interval": f"{int(INTERVAL * 1000)}ms"}
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump(cfg))
    created = json.loads(await run("keys", "create", "--name", "crash", "--json", "-c", str(config)))
    key, key_id = created["key"], created["id"]
    url, admin = f"http://127.0.0.1:{port}/identity", f"http://127.0.0.1:{admin_port}"

    async with aiohttp.ClientSession() as http:
        async with serve(config) as proc:
            await first_answer(http, url, key)  # up; this request is counted and flushed like the rest
            async with http.post(f"{admin}/admin/keys", json={"name": "made-before-the-kill"}, headers=HEADERS) as resp:
                assert resp.status == 201
                made = (await resp.json())["data"]
            answered: list[float] = [time.monotonic()]
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set():
                    try:
                        async with http.get(url, headers={"X-Plex-Token": key}) as resp:
                            await resp.read()
                            assert resp.status == 200
                            answered.append(time.monotonic())
                    except aiohttp.ClientError:
                        return  # the process is gone

            sender = asyncio.create_task(client())
            await asyncio.sleep(RUN)
            killed_at = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            stop.set()
            await sender
        sent = len(answered) + 1  # at most one more was in flight at the kill
        at_stake = sum(1 for t in answered if t > killed_at - INTERVAL - SLACK)
        wal = db.with_name(db.name + "-wal")
        assert wal.exists() and wal.stat().st_size > 0, "the kill left committed frames in the WAL"

        started = time.monotonic()
        async with serve(config):
            probes = await first_answer(http, url, key)
            restart = time.monotonic() - started
            async with http.get(f"{admin}/admin/keys/{key_id}/usage", headers=HEADERS) as resp:
                usage = (await resp.json())["data"]["total"]["requests"] - probes
            async with http.get(f"{admin}/admin/keys/{key_id}", headers=HEADERS) as resp:
                quota = (await resp.json())["data"]["quota_status"][0]["used"] - probes
            # Key changes and their audit events are written before the answer: none is lost.
            async with http.get(url, headers={"X-Plex-Token": made["key"]}) as resp:
                assert resp.status == 200, "a key created before the kill works after it"
            async with http.get(f"{admin}/admin/audit", headers=HEADERS) as resp:
                assert ("created", made["id"]) in {(e["action"], e["key"]) for e in (await resp.json())["data"]}

    figures = (f"answered {len(answered)}, answered in the last interval {at_stake}, usage kept {usage}, "
               f"quota kept {quota}, restart to first 200 {restart * 1000:.0f} ms")  # fmt: skip
    print(figures)
    for what, kept in (("usage", usage), ("quota", quota)):
        assert kept <= sent, f"{what}: counted twice? {figures}"
        assert len(answered) - kept <= at_stake, f"{what}: lost more than one flush interval: {figures}"
    assert restart < COMES_BACK, f"a restart after kill -9 serves again: {figures}"


def test_the_flush_interval_and_busy_timeout_are_validated_options(tmp_path: Path) -> None:
    cfg = base_config("http://127.0.0.1:9", tmp_path)
    env = {"PLEX_TOKEN": "x"}
    assert parse_config(cfg, env=env, base=tmp_path).store.usage_flush_interval == 5.0  # the default
    cfg["store"]["usage_flush_interval"] = "500ms"
    assert parse_config(cfg, env=env, base=tmp_path).store.usage_flush_interval == 0.5
    assert parse_config(cfg, env=env, base=tmp_path).store.busy_timeout == 5.0
    for field, bad in (("usage_flush_interval", "0s"), ("usage_flush_interval", "1h"), ("busy_timeout", "0"),
                       ("busy_timeout", "10m"), ("busy_timeout", True)):  # fmt: skip
        cfg["store"] = {"kind": "sqlite", "path": str(tmp_path / "sidecar.db"), field: bad}
        with pytest.raises(ConfigError) as e:
            parse_config(cfg, env=env, base=tmp_path)
        assert any(p.startswith(f"store.{field}") for p in e.value.problems), e.value.problems
