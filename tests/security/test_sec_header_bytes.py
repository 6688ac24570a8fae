"""One byte that is not UTF-8 in a request header: a designed answer, never a 500.

aiohttp reads header values with ``surrogateescape``: the byte ``\\xff`` becomes the lone surrogate
``\\udcff``, which ``str.encode()`` refuses. Before, wherever the sidecar hashed or compared a header as
bytes, that one byte was a 500 with a traceback in the log, from any client, keyless or not: the
decision memo of every proxied request (credential headers, ``X-Forwarded-*``), the cache key's digest
of ``Cookie``, the admin listener's token comparison (DESIGN invariant 8).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config, plex_like_app
from raw_http import read_response

KEYED = b"X-Plex-Token: %s\r\n\r\n"
PROXY = {
    "cookie on a cached path": b"GET /library/sections HTTP/1.1\r\nHost: x\r\nCookie: a=\xff\r\n" + KEYED,
    "X-Forwarded-Proto": b"GET /library/sections HTTP/1.1\r\nHost: x\r\nX-Forwarded-Proto: \xff\r\n" + KEYED,
    "X-Forwarded-Host": b"GET /identity HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: \xff\r\n" + KEYED,
    "X-Plex-Token": b"GET /identity HTTP/1.1\r\nHost: x\r\nX-Plex-Token: \xff%s\r\n\r\n",
    "Authorization": b"GET /identity HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n\r\n",
}
ADMIN = b"GET /admin/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\r\n\r\n"


@pytest.fixture
async def gw(aiohttp_server: Any, make_sidecar: MakeSidecar, tmp_path: Path) -> Running:
    up = await aiohttp_server(plex_like_app(PLEX_TOKEN))
    rules = [{"upstream": "plex", "path": "/library/*", "ttl": "60s"}]
    return await make_sidecar(base_config(str(up.make_url("")).rstrip("/"), tmp_path, cache={"rules": rules}))


async def exchange(host: str, port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    return status, body


@pytest.mark.parametrize("where", list(PROXY))
async def test_a_non_utf8_header_byte_gets_a_designed_answer(gw: Running, where: str) -> None:
    _, key = await gw.create_key(name="k", permissions={"upstreams": ["*"]})
    status, body = await exchange(gw.proxy.server.host, gw.proxy.server.port, PROXY[where].replace(b"%s", key.encode()))
    assert status != 500, body
    if status >= 400:
        assert json.loads(body)["error"]["code"] in ("bad_request", "invalid_key", "unauthorized")


async def test_the_admin_token_check_reads_any_byte(gw: Running) -> None:
    status, body = await exchange(gw.admin.server.host, gw.admin.server.port, ADMIN)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_key"
