"""``sidecar serve --workers N`` as a real child process, for the worker tests.

Yields once the supervisor logged its listening line; keeps every stderr line (the
supervisor's and its workers', which share the stream) and the workers' pids as the
supervisor announced them. Stopped with SIGTERM (a drain), killed if it does not exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from conftest import ADMIN_TOKEN, PLEX_TOKEN, base_config

from sidecar.admin.manage import KeyManager
from sidecar.config import load_config
from sidecar.store import open_store

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
ENV = {"PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Host:
    proc: asyncio.subprocess.Process
    proxy: str
    admin: str
    log: list[str] = field(default_factory=list)
    pids: dict[int, int] = field(default_factory=dict)  # worker index -> its current pid

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


def env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ENV and k != "SIDECAR_WORKER"}, **ENV}


def write_config(tmp_path: Path, upstream_url: str, **overrides: Any) -> Path:
    cfg = base_config(upstream_url, tmp_path, **overrides)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def manage(config: Path, action: str, *args: Any, **fields: Any) -> Any:
    """A key change written to the store in process, as ``sidecar keys …`` would (without its start-up)."""
    cfg = load_config(config, env=ENV)
    store = await open_store(cfg.store)
    try:
        m = KeyManager(cfg, store)
        if action == "create":
            return await m.create({"name": "t", **fields}, "test")
        return await m.revoke(args[0], "test")
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def workers_process(config: Path, *args: str, extra_env: dict[str, str] | None = None) -> AsyncIterator[Host]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "-c", str(config), *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env={**env(), **(extra_env or {})},
    )  # fmt: skip
    log: list[str] = []
    pids: dict[int, int] = {}
    listening: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            log.append(line)
            if m := re.search(r"worker (\d+) started \(pid (\d+)\)", line):
                pids[int(m.group(1))] = int(m.group(2))
            m = re.search(r"sidecar listening on (\S+) \(admin (\S+)\) with", line)
            if m and not listening.done():
                listening.set_result((m.group(1), m.group(2)))
        if not listening.done():
            listening.set_exception(AssertionError("sidecar exited before listening:\n" + "\n".join(log)))

    reader = asyncio.create_task(read_stderr())
    try:
        proxy, admin = await asyncio.wait_for(listening, START_TIMEOUT)
        yield Host(proc=proc, proxy=proxy, admin=admin, log=log, pids=pids)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.wait_for(reader, 10)
        for pid in pids.values():  # no worker outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def metric(text: str, name: str, match: Callable[[str], bool] = lambda labels: True) -> float:
    """The sum of the samples of ``name`` whose label string satisfies ``match``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            if match(series[len(name) :]):
                total += float(value)
    return total


def slow_upstream() -> web.Application:
    """``/slow`` answers after 1 s (``?s=`` other seconds); anything else at once (the token is not checked)."""

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await asyncio.sleep(float(request.query.get("s", "1.0")))
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app
