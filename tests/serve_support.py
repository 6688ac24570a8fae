"""``sidecar serve`` as a real child process, shared by the process tests (serve, listener attacks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from conftest import ADMIN_TOKEN, PLEX_TOKEN, base_config

START_TIMEOUT = 30.0
PROC_ENV = {"PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    proxy: str  # http://127.0.0.1:PORT
    admin: str
    log: list[str] = field(default_factory=list)  # the process's stderr so far

    def vm_kib(self, field_name: str) -> int:
        """A ``/proc/PID/status`` memory figure (VmRSS, VmHWM) in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field_name} not in /proc/{self.proc.pid}/status")


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in PROC_ENV}, **PROC_ENV}


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
async def sidecar_process(config: Path) -> AsyncIterator[Served]:
    """``sidecar serve`` as a child process; yields once it logged its listening addresses."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "-c", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    log: list[str] = []
    listening: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            log.append(line)
            m = re.search(r"listening on (\S+) \(admin (\S+)\)", line)
            if m and not listening.done():
                listening.set_result((m.group(1), m.group(2)))
        if not listening.done():
            listening.set_exception(AssertionError("sidecar exited before listening:\n" + "\n".join(log)))

    reader = asyncio.create_task(read_stderr())
    try:
        proxy, admin = await asyncio.wait_for(listening, START_TIMEOUT)
        yield Served(proc=proc, proxy=proxy, admin=admin, log=log)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await asyncio.wait_for(reader, 10)
