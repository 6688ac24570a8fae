"""Attacks on the proxy listener itself, over raw sockets (DESIGN invariant 6: unauthenticated
clients cost little; invariant 8: every bad input gets a designed error).

A slowloris head, endless header lines, a body that stops arriving, a connection that never
speaks, ``OPTIONS *`` and ``CONNECT``: each is answered with the designed JSON error (or a
silent close) within the configured bound, and a slow-but-progressing upload still works.
The memory test runs the real ``sidecar serve`` process and reads its peak RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import raw_http
from aiohttp import web
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config, log_lines
from multidict import CIMultiDict
from serve_support import sidecar_process, write_config
from yarl import URL

from sidecar.config import ConfigError, parse_config

FAST = {"header_timeout": "0.4s", "body_idle_timeout": "0.4s", "max_header_size": "16KiB"}
BOUND = 5.0  # no answer within this long is a failure (the limits above are 0.4s)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, CIMultiDict[str], bytes]:
    """One response (``raw_http.read_response``), within BOUND."""
    return await asyncio.wait_for(raw_http.read_response(reader), BOUND)


async def closed(reader: asyncio.StreamReader) -> bool:
    """True once the sidecar has closed the connection (EOF or reset)."""
    try:
        return await asyncio.wait_for(reader.read(), BOUND) == b""
    except ConnectionError:
        return True


def error_code(body: bytes) -> str:
    doc = json.loads(body)
    assert doc["success"] is False, doc
    return str(doc["error"]["code"])


async def recording_upstream(aiohttp_server: Any) -> tuple[Any, list[dict[str, Any]]]:
    """An upstream that reads whole bodies and records how each read ended."""
    seen: list[dict[str, Any]] = []

    async def any_path(request: web.Request) -> web.Response:
        entry: dict[str, Any] = {"method": request.method, "path": request.path, "headers": request.headers.copy()}
        seen.append(entry)
        try:
            body = await request.read()
        except BaseException as e:
            entry["outcome"] = type(e).__name__
            raise
        entry["outcome"], entry["size"] = "complete", len(body)
        return web.Response(text=f"got {len(body)}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    return await aiohttp_server(app), seen


async def guarded(make_sidecar: MakeSidecar, upstream_url: str, tmp_path: Path, **server: Any) -> tuple[Running, str]:
    sc = await make_sidecar(base_config(upstream_url, tmp_path, server={**FAST, **server}))
    _, key = await sc.create_key()
    return sc, key


async def connect(sc: Running) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", sc.proxy.port)


# --------------------------------------------------------------------------- the request head


async def test_slowloris_head_gets_408_and_the_connection_closes(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A head trickled a byte at a time never completes: the client sees 408 request_timeout, then EOF."""
    up, seen = await recording_upstream(aiohttp_server)
    sc, key = await guarded(make_sidecar, str(up.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    writer.write(f"GET /library HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\n".encode())
    started = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"X")  # progress, but the head never ends
                await writer.drain()
                await asyncio.sleep(0.05)

    dripping = asyncio.create_task(trickle())
    try:
        status, headers, body = await read_response(reader)
    finally:
        dripping.cancel()
    assert status == 408 and error_code(body) == "request_timeout"
    assert headers["content-type"].startswith("application/json")
    assert time.monotonic() - started < 3.0, "the whole head has 0.4s, however it trickles"
    assert await closed(reader)
    assert seen == [], "nothing reached the upstream"
    writer.close()


async def test_a_connection_that_never_speaks_is_closed(
    make_sidecar: MakeSidecar, plex_upstream: Any, tmp_path: Path
) -> None:
    """Connected and silent: closed after header_timeout, with nothing sent back."""
    sc, _ = await guarded(make_sidecar, str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    assert await asyncio.wait_for(reader.read(), BOUND) == b""
    writer.close()


async def test_idle_keepalive_between_requests_is_not_a_head_timeout(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Idle time between requests is keep-alive (server.keepalive_timeout), not a slow head."""
    up, _ = await recording_upstream(aiohttp_server)
    sc, key = await guarded(make_sidecar, str(up.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    request = f"GET /a HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\n\r\n".encode()
    writer.write(request)
    assert (await read_response(reader))[0] == 200
    await asyncio.sleep(0.8)  # twice header_timeout, idle
    writer.write(request)
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_endless_header_lines_stop_at_the_head_size_cap(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Header lines sent without end: 431 headers_too_large once the head passes max_header_size."""
    up, seen = await recording_upstream(aiohttp_server)
    sc, key = await guarded(make_sidecar, str(up.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    writer.write(f"GET /library HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\n".encode())

    async def flood() -> int:
        sent = 0
        with contextlib.suppress(ConnectionError):
            for i in range(2000):  # 8 MiB at most; aiohttp alone accepts 128 lines of any size
                writer.write(f"X-Fill-{i}: ".encode() + b"a" * 4000 + b"\r\n")
                await writer.drain()
                sent += 4000
        return sent

    flooding = asyncio.create_task(flood())
    status, _, body = await read_response(reader)
    flooding.cancel()
    assert status == 431 and error_code(body) == "headers_too_large"
    assert await closed(reader)
    assert seen == []
    writer.close()


async def test_an_oversized_head_in_one_write_is_measured_exactly(
    make_sidecar: MakeSidecar, plex_upstream: Any, tmp_path: Path
) -> None:
    """A complete 40 KiB head arriving in a single read is still over a 16 KiB cap: 431."""
    sc, key = await guarded(make_sidecar, str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    fill = "".join(f"X-Fill-{i}: {'b' * 1000}\r\n" for i in range(40))
    writer.write(f"GET /library/sections HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\n{fill}\r\n".encode())
    status, _, body = await read_response(reader)
    assert status == 431 and error_code(body) == "headers_too_large"
    writer.close()


async def test_a_header_line_over_the_line_limit_is_designed_json_and_never_logged(
    make_sidecar: MakeSidecar, plex_upstream: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own parse errors come back as designed JSON; the raw line (with a key) is not logged."""
    caplog.set_level(logging.DEBUG)
    sc, key = await guarded(make_sidecar, str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    writer.write(f"GET / HTTP/1.1\r\nHost: x\r\nX-Note: {key}{'c' * 20000}\r\n\r\n".encode())
    status, _, body = await read_response(reader)
    assert status == 431 and error_code(body) == "headers_too_large"
    assert key not in body.decode()
    writer.close()
    reader2, writer2 = await connect(sc)
    writer2.write(f"GET /\x01bad HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\n\r\n".encode())
    status, _, body = await read_response(reader2)
    assert status == 400 and error_code(body) == "bad_request"
    writer2.close()
    assert key not in caplog.text


async def test_the_head_limits_are_one_parser_per_connection_not_per_request(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Many requests on one connection, each with a fair head, all pass: the cap is per head."""
    up, seen = await recording_upstream(aiohttp_server)
    sc, key = await guarded(make_sidecar, str(up.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    fill = "".join(f"X-Fill-{i}: {'d' * 1000}\r\n" for i in range(10))  # 10 KiB each, under 16 KiB
    for i in range(5):
        writer.write(f"GET /r{i} HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\n{fill}\r\n".encode())
        assert (await read_response(reader))[0] == 200
    assert [s["path"] for s in seen] == [f"/r{i}" for i in range(5)]
    writer.close()


async def test_deep_pipelining_then_idle_is_still_keep_alive(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """40 pipelined requests (past aiohttp's queue of 32, so it pauses and re-parses what it held),
    all answered; then idle past header_timeout, and the connection still serves the next one."""
    up, seen = await recording_upstream(aiohttp_server)
    sc, key = await guarded(make_sidecar, str(up.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    writer.write(b"".join(f"GET /p{i} HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\n\r\n".encode() for i in range(40)))
    for _ in range(40):
        assert (await read_response(reader))[0] == 200
    assert len(seen) == 40
    await asyncio.sleep(0.8)
    writer.write(f"GET /last HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\n\r\n".encode())
    assert (await read_response(reader))[0] == 200
    writer.close()


# --------------------------------------------------------------------------- the request body


async def test_a_body_that_stops_is_408_and_the_upstream_request_is_aborted(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """10 of 1000 promised bytes, then silence: 408 request_timeout, Connection: close, and the
    upstream sees its request cut off (no complete body, its connection slot freed)."""
    up, seen = await recording_upstream(aiohttp_server)
    sc, key = await guarded(make_sidecar, str(up.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    writer.write(
        f"POST /upload HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\nContent-Length: 1000\r\n\r\n".encode()
        + b"0123456789"
    )
    status, headers, body = await read_response(reader)
    assert status == 408 and error_code(body) == "request_timeout"
    assert headers.get("connection", "").lower() == "close"
    assert await closed(reader)
    deadline = time.monotonic() + BOUND
    while not (seen and "outcome" in seen[0]):
        assert time.monotonic() < deadline, "the upstream request was never ended"
        await asyncio.sleep(0.02)
    assert seen[0]["outcome"] != "complete", seen[0]
    writer.close()
    logged = (await log_lines(tmp_path / "access.log"))[-1]
    assert (logged["status"], logged["error"]) == (408, "request_timeout"), logged


async def test_a_chunked_body_that_stops_is_408_too(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    up, _ = await recording_upstream(aiohttp_server)
    sc, key = await guarded(make_sidecar, str(up.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    writer.write(
        f"POST /upload HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"5\r\nhello\r\n"
    )
    status, _, body = await read_response(reader)
    assert status == 408 and error_code(body) == "request_timeout"
    writer.close()


async def test_a_slow_but_progressing_upload_still_works(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A chunk every 0.15s for 1.2s (three body idle timeouts in all): every byte arrives, 200."""
    up, seen = await recording_upstream(aiohttp_server)
    sc, key = await guarded(make_sidecar, str(up.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    writer.write(f"POST /upload HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\nContent-Length: 800\r\n\r\n".encode())
    for _ in range(8):
        await asyncio.sleep(0.15)
        writer.write(b"e" * 100)
        await writer.drain()
    status, _, body = await read_response(reader)
    assert status == 200 and body == b"got 800"
    assert seen[0]["outcome"] == "complete" and seen[0]["size"] == 800
    writer.close()


async def test_a_refused_request_with_a_stalled_body_is_not_held(
    make_sidecar: MakeSidecar, plex_upstream: Any, tmp_path: Path
) -> None:
    """No key, a body promised and never sent: 401 at once, and the connection does not linger."""
    sc, _ = await guarded(make_sidecar, str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    writer.write(b"POST /library HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\nabc")
    status, _, body = await read_response(reader)
    assert status == 401 and error_code(body) == "unauthorized"
    started = time.monotonic()
    assert await closed(reader)
    assert time.monotonic() - started < 3.0
    writer.close()


# --------------------------------------------------------------------------- request targets


@pytest.mark.parametrize(
    "line",
    [
        "OPTIONS * HTTP/1.1",
        "CONNECT example.com:443 HTTP/1.1",
        "CONNECT /library HTTP/1.1",
        "GET example.com:80 HTTP/1.1",
    ],
)
async def test_asterisk_and_authority_targets_and_connect_are_refused(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, line: str
) -> None:
    """With a valid key: 400 bad_request (``OPTIONS *`` was an unhandled 500, CONNECT was forwarded)."""
    up, seen = await recording_upstream(aiohttp_server)
    sc, key = await guarded(make_sidecar, str(up.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    writer.write(f"{line}\r\nHost: example.com\r\nX-Plex-Token: {key}\r\nConnection: close\r\n\r\n".encode())
    status, _, body = await read_response(reader)
    assert status == 400 and error_code(body) == "bad_request"
    assert seen == []
    writer.close()


async def test_absolute_form_is_still_served_by_its_path(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """RFC 9112 §3.2.2: a server accepts absolute-form; the path is what is routed and forwarded."""
    up, seen = await recording_upstream(aiohttp_server)
    sc, key = await guarded(make_sidecar, str(up.make_url("")).rstrip("/"), tmp_path)
    reader, writer = await connect(sc)
    writer.write(f"GET http://elsewhere.example/ok HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key}\r\n\r\n".encode())
    assert (await read_response(reader))[0] == 200
    assert seen[0]["path"] == "/ok"
    writer.close()


# --------------------------------------------------------------------------- memory, a real process


async def test_endless_header_lines_from_20_connections_keep_rss_bounded(aiohttp_server: Any, tmp_path: Path) -> None:
    """The reported attack on the default config: 20 connections × endless 60 KiB header lines.
    Each gets its 431 within the 64 KiB head cap; the process's peak RSS grows by a few MiB
    (it grew by ~300 MiB before the cap)."""
    up, _ = await recording_upstream(aiohttp_server)
    config = write_config(tmp_path, str(up.make_url("")).rstrip("/"))
    line = b"X-Fill: " + b"f" * (60 * 1024) + b"\r\n"

    async def attacker(host: str, port: int) -> int | None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /library HTTP/1.1\r\nHost: x\r\n")

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(200):  # 12 MiB at most per connection
                    writer.write(line)
                    await writer.drain()

        flooding = asyncio.create_task(flood())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 20)
            return int(head.split()[1])
        except (ConnectionError, asyncio.IncompleteReadError):
            return None
        finally:
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flooding
            writer.close()

    async with sidecar_process(config) as served:
        url = URL(served.proxy)
        assert url.host is not None and url.port is not None
        await attacker(url.host, url.port)  # warm: imports and the first connection settle
        baseline = served.vm_kib("VmHWM")
        statuses = await asyncio.gather(*(attacker(url.host, url.port) for _ in range(20)))
        peak = served.vm_kib("VmHWM")
    grown = (peak - baseline) / 1024
    print(f"\npeak RSS grew {grown:.1f} MiB under 20 connections of endless header lines")
    assert grown < 40, f"peak RSS grew {grown:.1f} MiB under 20 header floods"
    assert all(s in (431, None) for s in statuses), statuses
    assert statuses.count(431) >= 15, statuses


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"header_timeout": 0}, "server.header_timeout: must be greater than 0"),
        ({"body_idle_timeout": "soon"}, "server.body_idle_timeout: 'soon' is not a duration"),
        ({"keepalive_timeout": -1}, "server.keepalive_timeout: must not be negative"),
        ({"max_header_size": "100B"}, "server.max_header_size: must be at least 1KiB"),
        ({"public_url": "sidecar.example"}, "server.public_url: 'sidecar.example' is not an origin"),
        (
            {"public_url": "https://sidecar.example/mcp"},
            "server.public_url: 'https://sidecar.example/mcp': give the origin only",
        ),
    ],
)
def test_listener_limits_in_config_name_their_yaml_path(tmp_path: Path, server: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(base_config("http://127.0.0.1:1", tmp_path, server=server), env={"PLEX_TOKEN": PLEX_TOKEN})
    assert any(p.startswith(message) for p in e.value.problems), e.value.problems


def test_listener_limits_have_safe_defaults(tmp_path: Path) -> None:
    cfg = parse_config(base_config("http://127.0.0.1:1", tmp_path), env={"PLEX_TOKEN": PLEX_TOKEN})
    s = cfg.server
    assert (s.header_timeout, s.max_header_size, s.body_idle_timeout, s.keepalive_timeout) == (10, 65536, 30, 75)
    assert s.public_url is None
    custom = parse_config(
        base_config("http://127.0.0.1:1", tmp_path, server={"public_url": "https://sidecar.example:8443/"}),
        env={"PLEX_TOKEN": PLEX_TOKEN},
    )
    assert custom.server.public_url == "https://sidecar.example:8443"
