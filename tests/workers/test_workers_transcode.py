"""Plex transcode sessions with ``sidecar serve --workers 2`` (DESIGN invariant 4).

Hole found: each worker kept its own table of session owners. Key A started ``Sess1`` on one
worker; key B (any other playback key, e.g. one that read the id from ``/status/sessions``)
named ``Sess1`` on a fresh connection, landed on the other worker half of the time, found no
owner there, was forwarded and claimed it: B watched and drove A's stream. And A's own
player, fetching segments without a key, was refused (401) on every worker but the one that
saw ``start.m3u8``. The owners are now the host's (``sidecar.workers.transcode``): every
worker sees every claim.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from workers_support import Host, manage, metric, slow_upstream, workers_process, write_config

from sidecar.core.errors import Forbidden, ServiceUnavailable
from sidecar.workers.transcode import ShmTranscode

START = "/video/:/transcode/universal/start.m3u8?session=Sess1&path=/library/metadata/1"
SEGMENT = "/video/:/transcode/universal/session/Sess1/base/00001.ts"
TRIES = 12  # fresh connections: the chance that all land on one worker of two is 2**-11


async def get(http: aiohttp.ClientSession, host: Host, path: str, key: str | None = None) -> int:
    async with http.get(host.proxy + path, headers={"X-Plex-Token": key} if key else {}) as resp:
        await resp.read()
        return resp.status


async def test_a_session_is_the_owners_on_every_worker(tmp_path: Path, aiohttp_server: Any) -> None:
    up = await aiohttp_server(slow_upstream())
    config = write_config(tmp_path, str(up.make_url("")))
    _, a = await manage(config, "create")
    _, b = await manage(config, "create")
    connector = aiohttp.TCPConnector(force_close=True, limit=0)  # a new connection, so a new worker, every time
    async with workers_process(config, "--workers", "2") as host, aiohttp.ClientSession(connector=connector) as http:
        assert await get(http, host, START, a) == 200  # A's claim, on one worker
        stolen = await asyncio.gather(*(get(http, host, SEGMENT, b) for _ in range(TRIES)))
        assert stolen == [403] * TRIES  # B never gets A's session, on whichever worker it lands
        stolen = await asyncio.gather(*(get(http, host, f"{START}&X-Plex-Token={b}") for _ in range(TRIES)))
        assert stolen == [403] * TRIES  # nor by restarting it
        played = await asyncio.gather(*(get(http, host, SEGMENT) for _ in range(TRIES)))
        assert played == [200] * TRIES  # A's player, without its key, on every worker
        async with http.get(host.admin + "/metrics") as resp:
            text = await resp.text()
        per_worker = [metric(text, "sidecar_worker_requests_total", lambda s, w=w: f'worker="{w}"' in s) for w in "01"]
        assert min(per_worker) > 0, per_worker  # both workers were tried


def test_two_workers_tables_are_one(tmp_path: Path) -> None:
    """The table as two workers map it: a claim on one is seen, checked and kept on the other; a full
    bucket gives a key only its own slots, never another key's live session."""
    path = str(tmp_path / "transcode")
    first = ShmTranscode(path, create=True, buckets=1, per_key=3)  # one bucket of 8 slots: fills at once
    second = ShmTranscode(path, per_key=3)
    try:
        first.claim(["Sess1"], "aaaaaaaaaaaa", "10.0.0.1")
        assert second.owner("sess1") == "aaaaaaaaaaaa"
        with pytest.raises(Forbidden):
            second.check(["SESS1"], "bbbbbbbbbbbb")
        with pytest.raises(Forbidden):
            second.claim(["x", "sess1"], "bbbbbbbbbbbb", "10.0.0.2")
        assert second.owner("x") is None  # all or nothing
        assert second.keyless_owner("Sess1", "10.0.0.1") == "aaaaaaaaaaaa"
        assert second.keyless_owner("Sess1", "10.0.0.2") is None
        second.claim([f"b{i}" for i in range(7)], "bbbbbbbbbbbb", "10.0.0.2")  # at most 3 kept per key and worker
        assert [second.owner(f"b{i}") for i in range(7)] == [None] * 4 + ["bbbbbbbbbbbb"] * 3
        assert first.owner("sess1") == "aaaaaaaaaaaa"  # B's flood pushed out only B's own
        first.claim([f"c{i}" for i in range(3)], "cccccccccccc", "10.0.0.3")
        second.claim(["e"], "eeeeeeeeeeee", "10.0.0.5")  # the bucket is full now
        with pytest.raises(ServiceUnavailable):
            second.claim(["d"], "dddddddddddd", "10.0.0.4")  # a key without a slot there: refused
        second.claim(["b7"], "bbbbbbbbbbbb", "10.0.0.2")  # a key with one: takes its own
        assert first.owner("sess1") == "aaaaaaaaaaaa" and len(first) == 8
    finally:
        first.close()
        second.close()


def test_a_flood_on_every_worker_keeps_only_the_flooders_newest(tmp_path: Path) -> None:
    """As one process's table (test_sec_exhaustion_tables): a key claiming thousands of sessions on two
    workers holds at most ``per_key`` on each, and pushes out nobody else's."""
    path = str(tmp_path / "transcode")
    first = ShmTranscode(path, create=True, buckets=1024)
    second = ShmTranscode(path)
    try:
        first.claim(["victim-session"], "vvvvvvvvvvvv", "10.0.0.1")
        for i in range(2500):
            (first, second)[i % 2].claim([f"a{i}"], "aaaaaaaaaaaa", "10.0.0.2")
        assert len(first) == 1 + 2 * 100
        assert second.owner("victim-session") == "vvvvvvvvvvvv"
        assert first.owner("a2499") == first.owner("a2498") == "aaaaaaaaaaaa" and first.owner("a2000") is None
        long_id = "jwt:" + "x" * 40  # too long to keep: owns and is checked, but is never a keyless owner
        first.claim(["j"], long_id, "10.0.0.3")
        with pytest.raises(Forbidden):
            second.check(["j"], "aaaaaaaaaaaa")
        second.check(["j"], long_id)
        assert second.keyless_owner("j", "10.0.0.3") is None
    finally:
        first.close()
        second.close()
