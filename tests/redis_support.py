"""A real ``redis-server`` on a free port that a test can stop and start again, shared by the Redis tests."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import Running, base_config, require_binary
from redis.asyncio import Redis

from sidecar.demo import free_port

START_TIMEOUT = 10.0


class RedisProc:
    """One redis-server on a fixed port that a test can stop and start again."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not await self._pong():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT}s")
            await asyncio.sleep(0.02)

    async def _pong(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 1.0)) == b"+PONG\r\n"
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    async def client(self) -> Redis:
        return Redis.from_url(self.url)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisProc]:
    binary = require_binary("redis-server")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    proc = RedisProc(binary, free_port(), workdir)
    await proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def cfg(upstream: TestServer, tmp_path: Path, redis: RedisProc, **rate_limits: Any) -> dict[str, Any]:
    return base_config(
        str(upstream.make_url("")).rstrip("/"),
        tmp_path,
        rate_limits={"backend": "redis", "redis_url": redis.url, **rate_limits},
    )


async def get(r: Running, k: str, path: str = "/library/sections") -> Any:
    return await r.proxy.get(path, headers={"X-Plex-Token": k})
