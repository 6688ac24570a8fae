"""Two workers, one access-log pipe, long client-written paths: every line whole (issue: PIPE_BUF).

``sidecar serve --workers 2`` logs to a named pipe the test reads, as a log shipper reads a
container's stdout. The pipe is shrunk to one page, so a write over ``PIPE_BUF`` must wait for
room, and the kernel lets the other worker's write in meanwhile: a line over 4096 bytes came out
cut through by the other worker's line. Clients flood both workers with 6-10 KiB paths and
queries; every line read must parse, and there is one per request.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import random
from pathlib import Path
from typing import Any

import aiohttp
from workers_support import slow_upstream, workers_process, write_config

CLIENTS = 4
PER_CLIENT = 25


def long_path(rng: random.Random, n: int) -> str:
    """6-10 KiB of path and query, some of it multi-byte (percent-encoded as a client sends it)."""
    size = rng.randint(6 * 1024, 10 * 1024)
    segment = "/library/metadata/%C3%A9t%C3%A9-%E2%9C%93"
    path = f"/r{n:04d}" + (segment * (size // len(segment) // 2))[: size // 2]
    query = "&".join(f"f{i}=v%C3%A9{i}" for i in range(size // 20))[: size - len(path)]
    return f"{path}?{query}"


async def test_long_lines_from_two_workers_never_interleave(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await aiohttp_server(slow_upstream())
    fifo = tmp_path / "access.pipe"
    os.mkfifo(fifo, 0o600)
    # Read and write ends in one descriptor: the workers' open never blocks, and no EOF between them.
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 4096)
    received = bytearray()
    loop = asyncio.get_running_loop()

    def drain() -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            received.extend(data)

    loop.add_reader(fd, drain)
    config = write_config(tmp_path, str(up.make_url("")), log={"access": str(fifo)})
    rng = random.Random(7)
    paths = [long_path(rng, n) for n in range(CLIENTS * PER_CLIENT)]
    try:
        async with workers_process(config, "--workers", "2") as host:

            async def client(mine: list[str]) -> list[int]:
                conn = aiohttp.TCPConnector(force_close=True, limit=0)  # fresh connections: both workers
                async with aiohttp.ClientSession(connector=conn) as http:

                    async def one(p: str) -> int:
                        async with http.get(host.proxy + p) as resp:  # no key: a 401, logged all the same
                            await resp.read()
                            return resp.status

                    return list(await asyncio.gather(*(one(p) for p in mine)))

            chunks = [paths[i::CLIENTS] for i in range(CLIENTS)]
            statuses = [s for got in await asyncio.gather(*(client(c) for c in chunks)) for s in got]
            assert statuses == [401] * len(paths)
        # The supervisor drained its workers: every pending line is written.
        drain()
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    lines = bytes(received).split(b"\n")
    assert lines.pop() == b""  # ends with a newline
    entries = []
    for line in lines:
        assert len(line) + 1 <= 4096, len(line)
        entries.append(json.loads(line))  # a line cut through by another raises here
    assert len(entries) == len(paths)
    assert all(e["truncated"] is True and e["path"].endswith("…") and e["status"] == 401 for e in entries)
    logged = sorted(entries, key=lambda e: str(e["path"]))
    for entry, sent in zip(logged, paths, strict=True):  # each request's own line, its path cut, not mixed
        assert sent.startswith(entry["path"][:-1]) and len(entry["path"]) > 1000
