"""A "Redis" that answers something other than the limiter script's reply (a RESP proxy that
fakes commands, another server on the port): the client sees ``on_redis_error``'s designed
answer, never a 500 nor a request let through on a reply that only looked like an allowance."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, MakeSidecar
from redis_support import cfg, get

REPLIES = [b"+OK\r\n", b":5\r\n", b"*0\r\n", b"*3\r\n:1\r\n$3\r\nabc\r\n:0\r\n", b"*2\r\n:1\r\n:0\r\n"]


@pytest.fixture(params=REPLIES, ids=["ok", "int", "empty", "text", "short"])
async def fake_redis(request: pytest.FixtureRequest) -> AsyncIterator[SimpleNamespace]:
    reply: bytes = request.param

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            writer.write(reply)  # one reply per read: enough for a client that sends one command at a time
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield SimpleNamespace(url=f"redis://127.0.0.1:{port}/0")
    finally:
        server.close()
        await server.wait_closed()


async def test_a_garbage_reply_is_on_redis_error_not_a_500(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, fake_redis: SimpleNamespace
) -> None:
    r = await make_sidecar(cfg(plex_upstream, tmp_path, fake_redis, default=["100/minute"], on_redis_error="deny"))
    rec, k = await r.create_key(quota="100/day")
    resp = await get(r, k)
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["error"]["code"] == "service_unavailable"
    shown = await r.admin.get(f"/admin/keys/{rec.id}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert shown.status == 200, await shown.text()  # the quota it cannot read is marked, not a 500
    (status,) = (await shown.json())["data"]["quota_status"]
    assert status["used"] in (None, 5)  # ":5" is a count; the rest are not
