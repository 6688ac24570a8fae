"""SIGHUP (re-read the key table) sent while a worker is starting must not kill it.

A fresh worker process has not installed its SIGHUP handler yet for the time Python takes
to import the sidecar; SIGHUP's default action is to terminate. A reload sent by an operator
(or a config tool) while a worker restarts after a crash killed the replacement, again and
again, and at start-up a worker that died three times aborted the whole host.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from workers_support import workers_process, write_config


async def test_sighup_while_a_worker_restarts_does_not_kill_it(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await aiohttp_server(web.Application())
    config = write_config(tmp_path, str(up.make_url("")))
    async with workers_process(config, "--workers", "2") as host:
        victim = host.pids[0]
        mark = len(host.log)
        os.kill(victim, signal.SIGKILL)
        await host.wait_log(rf"worker 0 \(pid {victim}\) exited with signal SIGKILL", mark)
        deadline = time.monotonic() + 6
        while not any("worker 0 listening" in line for line in host.log[mark:]):
            assert time.monotonic() < deadline, "\n".join(host.log[mark:])
            host.proc.send_signal(signal.SIGHUP)  # an operator reloading, over and over
            await asyncio.sleep(0.02)
        died = [line for line in host.log[mark:] if "exited with signal SIGHUP" in line]
        assert not died, died
