"""``sidecar serve --workers N`` as a real child process, for the worker tests.

``serve_support.sidecar_process`` starts it; here it is ready at the supervisor's own line and
stopped with SIGTERM (a drain), killed if it does not exit. The process keeps every stderr line
(the supervisor's and its workers', which share the stream) and the workers' pids as the
supervisor announced them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from conftest import ADMIN_TOKEN
from serve_support import PROC_ENV, Served, _env, sidecar_process
from serve_support import write_config as write_config  # the worker tests' config, as the others'

from sidecar.admin.manage import KeyManager
from sidecar.config import load_config
from sidecar.store import open_store

ENV = PROC_ENV
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
Host = Served  # the supervisor's process, its stderr (workers' lines too) and the workers' pids
env = _env


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


def workers_process(
    config: Path, *args: str, extra_env: dict[str, str] | None = None
) -> contextlib.AbstractAsyncContextManager[Served]:
    """Ready at the supervisor's own line (``… with N workers``); stopped with SIGTERM, a drain."""
    return sidecar_process(
        config, *args, extra_env=extra_env, listening=r"sidecar listening on (\S+) \(admin (\S+)\) with", drain=True
    )


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
