"""Slow and partial requests against the admin listener (DESIGN invariant 6: unauthenticated
clients cost little), started the way ``sidecar serve`` starts it (``sidecar.app.running``).

The proxy listener's own deadlines are tested in test_sec_listener.py. The admin listener
(admin API, console sign-in, metrics) is reachable without a token too: a head trickled a
byte at a time, a connection that never speaks and a body that stops arriving must each be
ended within ``server.header_timeout`` / ``server.body_idle_timeout``, not held forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import raw_http
from conftest import ADMIN_TOKEN, base_config
from prometheus_client import CollectorRegistry
from yarl import URL

from sidecar.app import Sidecar, bound_addresses, running
from sidecar.config import parse_config

FAST = {"header_timeout": "0.4s", "body_idle_timeout": "0.4s", "max_header_size": "16KiB"}
BOUND = 5.0  # no answer within this long is a failure (the limits above are 0.4s)


@pytest.fixture
async def admin_addr(plex_upstream: Any, tmp_path: Path, env: dict[str, str]) -> AsyncIterator[tuple[str, int]]:
    """The admin listener of a sidecar started through ``running`` (the real runners)."""
    cfg = parse_config(
        base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, server=FAST), env=env, base=tmp_path
    )
    sc = Sidecar(cfg, registry=CollectorRegistry(), env=env)
    async with running(sc) as (_, admin_runner):
        url = URL(bound_addresses(admin_runner)[0])
        assert url.host is not None and url.port is not None
        yield url.host, url.port


async def read_response(reader: asyncio.StreamReader) -> tuple[int, Any, bytes]:
    return await asyncio.wait_for(raw_http.read_response(reader), BOUND)


async def closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), BOUND) == b""
    except ConnectionError:
        return True


async def test_admin_slowloris_head_gets_408_and_closes(admin_addr: tuple[str, int]) -> None:
    """A head trickled a byte every 50 ms never completes: 408 request_timeout within the bound, then EOF."""
    reader, writer = await asyncio.open_connection(*admin_addr)
    writer.write(b"GET /admin/keys HTTP/1.1\r\nHost: localhost\r\n")
    started = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.05)

    dripping = asyncio.create_task(trickle())
    try:
        status, headers, body = await read_response(reader)
    finally:
        dripping.cancel()
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert headers["content-type"].startswith("application/json")
    assert time.monotonic() - started < 3.0
    assert await closed(reader)
    writer.close()


async def test_admin_connection_that_never_speaks_is_closed(admin_addr: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*admin_addr)
    assert await asyncio.wait_for(reader.read(), BOUND) == b""
    writer.close()


async def test_admin_body_that_stops_is_408(admin_addr: tuple[str, int]) -> None:
    """An authenticated POST that promises 1000 bytes and sends 10: 408, not a handler held forever."""
    reader, writer = await asyncio.open_connection(*admin_addr)
    writer.write(
        b"POST /admin/keys HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode()
        + b'{"name": "'
    )
    status, _, body = await read_response(reader)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert await closed(reader)
    writer.close()


async def test_admin_head_over_the_size_cap_is_431(admin_addr: tuple[str, int]) -> None:
    """Header lines (each under the line limit) stop at server.max_header_size (16 KiB here) with 431."""
    reader, writer = await asyncio.open_connection(*admin_addr)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")

    async def flood() -> None:
        with contextlib.suppress(ConnectionError):
            for i in range(2000):  # 8 MiB at most
                writer.write(f"X-Fill-{i}: ".encode() + b"a" * 4000 + b"\r\n")
                await writer.drain()

    flooding = asyncio.create_task(flood())
    status, _, body = await read_response(reader)
    flooding.cancel()
    assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large", body
    writer.close()


async def test_admin_listener_still_serves_after_the_attacks(admin_addr: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*admin_addr)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == 200
    writer.close()


async def test_admin_refusal_with_a_stalled_body_is_not_held(admin_addr: tuple[str, int]) -> None:
    """No token, a body promised and never sent: 401 at once, and the connection ends within the bound."""
    reader, writer = await asyncio.open_connection(*admin_addr)
    started = time.monotonic()
    writer.write(b"POST /admin/keys HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n" + b"{")
    status, _, body = await read_response(reader)
    assert status == 401 and json.loads(body)["error"]["code"] in ("invalid_key", "missing_key", "unauthorized")
    assert await closed(reader)
    assert time.monotonic() - started < 3.0
    writer.close()


async def test_many_idle_admin_connections_are_all_closed(admin_addr: tuple[str, int]) -> None:
    """200 connections that connect and say nothing: every one is closed by header_timeout."""
    conns = [await asyncio.open_connection(*admin_addr) for _ in range(200)]
    started = time.monotonic()
    ends = await asyncio.gather(*(asyncio.wait_for(r.read(), BOUND) for r, _ in conns))
    assert ends == [b""] * 200
    assert time.monotonic() - started < 3.0
    for _, w in conns:
        w.close()
