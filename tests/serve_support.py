"""``sidecar serve`` as a real child process, shared by the process tests (serve, listener attacks,
workers: ``tests/workers/workers_support.py`` starts its supervisor through ``sidecar_process`` too)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from conftest import ADMIN_TOKEN, PLEX_TOKEN, base_config

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0  # a drain (SIGTERM) that takes longer is killed
LISTENING = r"listening on (\S+) \(admin (\S+)\)"
PROC_ENV = {"PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    proxy: str  # http://127.0.0.1:PORT
    admin: str
    log: list[str] = field(default_factory=list)  # the process's stderr so far (its workers' too)
    pids: dict[int, int] = field(default_factory=dict)  # worker index -> its current pid (workers: N)

    def vm_kib(self, field_name: str) -> int:
        """A ``/proc/PID/status`` memory figure (VmRSS, VmHWM) in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field_name} not in /proc/{self.proc.pid}/status")

    async def wait_log(self, pattern: str, after: int = 0, timeout: float = 10.0) -> re.Match[str]:
        """The first stderr line from index ``after`` on that matches (polled, with a deadline)."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            for line in self.log[after:]:
                if m := rx.search(line):
                    return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matching {pattern!r}:\n" + "\n".join(self.log[-30:]))
            await asyncio.sleep(0.02)


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in PROC_ENV and k != "SIDECAR_WORKER"}, **PROC_ENV}


def write_config(tmp_path: Path, upstream_url: str, **overrides: Any) -> Path:
    cfg = base_config(upstream_url, tmp_path, **overrides)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def create_key(config: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "keys", "create", "--name", "t", "--json", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return str(json.loads(out)["key"])


@contextlib.asynccontextmanager
async def sidecar_process(
    config: Path,
    *args: str,
    extra_env: dict[str, str] | None = None,
    listening: str = LISTENING,
    drain: bool = False,
) -> AsyncIterator[Served]:
    """``sidecar serve`` as a child process; yields once a stderr line matches ``listening``.

    Stopped with SIGKILL, or with SIGTERM (a drain, killed after ``STOP_TIMEOUT``) when ``drain``;
    every worker pid it announced is killed too, so no process outlives the test.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "-c", str(config), *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env={**_env(), **(extra_env or {})},
    )  # fmt: skip
    log: list[str] = []
    pids: dict[int, int] = {}
    ready: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            log.append(line)
            if m := re.search(r"worker (\d+) started \(pid (\d+)\)", line):
                pids[int(m.group(1))] = int(m.group(2))
            m = re.search(listening, line)
            if m and not ready.done():
                ready.set_result((m.group(1), m.group(2)))
        if not ready.done():
            ready.set_exception(AssertionError("sidecar exited before listening:\n" + "\n".join(log)))

    reader = asyncio.create_task(read_stderr())
    try:
        proxy, admin = await asyncio.wait_for(ready, START_TIMEOUT)
        yield Served(proc=proc, proxy=proxy, admin=admin, log=log, pids=pids)
    finally:
        if proc.returncode is None and drain:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await asyncio.wait_for(reader, 10)
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
