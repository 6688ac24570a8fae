"""A hostile or broken peer on the host's private sockets: the limits owner keeps answering the others.

The owner's socket lives in the supervisor's 0700 directory, so a peer is a worker of the
same user; a worker with a bug (or one killed mid-write) must still not take the supervisor's
limits down for every other worker, nor make it buffer without bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, base_config
from workers_support import slow_upstream, workers_process, write_config

from sidecar.app import create_apps
from sidecar.limits.gcra import MemoryBackend
from sidecar.limits.quota import QuotaBook
from sidecar.store import SqliteStore
from sidecar.workers.limits import BAD_QUESTION, MAX_LINE, LimitsOwner
from sidecar.workers.recent import RECENT_PATH
from sidecar.workers.supervisor import PRIVATE_PREFIX, WorkerPool, _console, _host_metrics, _host_recent
from sidecar.workers.worker import admin_socket

OWNERS: dict[str, LimitsOwner] = {}


@pytest.fixture
async def owner_path(tmp_path: Path) -> AsyncIterator[str]:
    """The path of a real owner's socket (the owner itself: ``OWNERS[path]``)."""
    store = SqliteStore(tmp_path / "keys.db")
    await store.open()
    owner = LimitsOwner(MemoryBackend(), QuotaBook(store), {})
    path = str(tmp_path / "limits.sock")
    await owner.start(path)
    OWNERS[path] = owner
    try:
        yield path
    finally:
        del OWNERS[path]
        await owner.close()
        await store.close()


async def _ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rid: int) -> list[object]:
    writer.write(json.dumps([rid, "ping"]).encode() + b"\n")
    await writer.drain()
    return json.loads(await asyncio.wait_for(reader.readline(), 5))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "junk",
    [
        b"{not json\n",
        b"5\n",
        b'"ping"\n',
        b"[]\n",
        b'[1, "nope"]\n',  # an unknown op
        b'[2, "e", 999, 1, 0, null, 0]\n',  # a plan id never registered
        b'[3, "e", 1]\n',  # wrong arity
        b'[0, "p", 1, ["b"], [["not a limit", 1, 1]], null]\n',
        b"\xff\xfe\n",  # not UTF-8
    ],
)
async def test_a_malformed_question_is_refused_and_the_connection_still_answers(owner_path: str, junk: bytes) -> None:
    """One with a readable id gets its error reply at once (its asker need not wait out its timeout);
    one without is dropped; either way the next question on the connection is answered."""
    reader, writer = await asyncio.open_unix_connection(owner_path)
    try:
        writer.write(junk)
        if junk[:3] in (b"[1,", b"[2,", b"[3,"):
            reply = json.loads(await asyncio.wait_for(reader.readline(), 1))
            assert reply[:2] == [int(junk[1:2]), None] and reply[2].startswith(BAD_QUESTION), reply
        assert await _ping(reader, writer, 7) == [7, 1]
    finally:
        writer.close()


async def test_an_endless_line_is_cut_off_and_others_are_still_served(owner_path: str) -> None:
    """A peer writing without a newline used to be buffered without bound (and re-split each read)."""
    _, writer = await asyncio.open_unix_connection(owner_path)
    other_r, other_w = await asyncio.open_unix_connection(owner_path)
    try:
        chunk = b"x" * 65536
        with pytest.raises(ConnectionError):  # the owner hung up on it
            for _ in range(MAX_LINE // len(chunk) + 64):
                writer.write(chunk)
                await writer.drain()
        assert await _ping(other_r, other_w, 1) == [1, 1]
    finally:
        writer.close()
        other_w.close()


async def test_a_flood_of_plans_is_bounded_on_the_owner(owner_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_PLANS was only the client's promise: a peer registering plans and never clearing them
    grew the owner's table without bound. Now the owner starts over itself (a conforming worker,
    which clears at the same count, never sees it)."""
    from sidecar.workers import limits

    monkeypatch.setattr(limits, "MAX_PLANS", 50)
    reader, writer = await asyncio.open_unix_connection(owner_path)
    try:
        for pid in range(1, 201):
            writer.write(json.dumps([0, "p", pid, [f"b{pid}"], [["5/minute", 12_000_000, 60_000_000]], None]).encode())
            writer.write(b"\n")
        assert await _ping(reader, writer, 1) == [1, 1]
        (conn,) = OWNERS[owner_path].conns
        assert len(conn.plans) <= 50
        writer.write(json.dumps([2, "e", 200, 1, 0, None, 0]).encode() + b"\n")  # the newest plan still answers
        reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert reply[0] == 2 and reply[1] is True
    finally:
        writer.close()


async def test_the_hosts_private_directory_is_its_users_only(tmp_path: Path, aiohttp_server: Any) -> None:
    """Invariant 11 on a running host: another local user reaches neither the limits owner nor a
    worker's admin socket (per-key metrics, quota resets), nor reads the bucket tables."""
    up = await aiohttp_server(slow_upstream())
    config = write_config(tmp_path, str(up.make_url("")))
    old = os.umask(0o022)  # an ordinary umask: what the sidecar makes must not depend on it
    try:
        async with workers_process(config, "--workers", "2") as host:
            dirs = [d for base in ("/dev/shm", tempfile.gettempdir()) for d in Path(base).glob(PRIVATE_PREFIX + "*")]
            found = [d for d in dirs if (d / "supervisor.pid").is_file()
                     and (d / "supervisor.pid").read_text() == str(host.proc.pid)]  # fmt: skip
            assert len(found) == 1
            assert stat.S_IMODE(found[0].stat().st_mode) == 0o700
            kinds = {}
            for f in found[0].iterdir():
                mode = f.lstat().st_mode
                kinds[f.name] = "socket" if stat.S_ISSOCK(mode) else "file"
                if stat.S_ISREG(mode):
                    assert stat.S_IMODE(mode) & 0o077 == 0, (f.name, oct(mode))
            assert list(kinds.values()).count("socket") >= 3  # the owner's and each worker's admin socket
    finally:
        os.umask(old)
    assert not found[0].exists()  # removed at a clean stop


async def test_an_anonymous_console_page_scrapes_no_worker(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, aiohttp_client: Any
) -> None:
    """The supervisor merged every worker's recent requests into a console page before the console
    knew who asked: each anonymous GET of /activity or /keys/ID (answered with a sign-in redirect)
    cost a scrape of every worker's rings (and a walk of the key table)."""
    r = await make_sidecar(base_config(str(plex_upstream.make_url("")), tmp_path))
    hits: list[str] = []

    async def rings(request: web.Request) -> web.Response:
        hits.append(request.path_qs)
        return web.json_response({"keys": {}})

    worker = web.Application()
    worker.router.add_get(RECENT_PATH, rings)
    runner = web.AppRunner(worker)
    await runner.setup()
    directory = tmp_path / "host"
    directory.mkdir()
    await web.UnixSite(runner, admin_socket(str(directory), 0)).start()
    sock = socket.socket()
    pool = WorkerPool(1, "unused.yaml", str(directory), sock, inherit=False)
    try:
        _, admin = create_apps(r.sc)
        admin.middlewares.append(_host_metrics(r.sc, pool, _host_recent(admin), _console(admin)))
        client = await aiohttp_client(admin)
        for path in ("/activity", "/keys/abc"):
            resp = await client.get(path, allow_redirects=False)
            assert resp.status in (302, 303, 401), (path, resp.status)
        assert hits == []
    finally:
        pool.inflight.close()
        sock.close()
        await runner.cleanup()
