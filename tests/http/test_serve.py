"""The running process: both listeners, health, TLS, the SIGTERM drain, and memory while streaming.

Process tests start the real ``python -m sidecar serve -c FILE`` on ports the OS picks
(``listen: 127.0.0.1:0``; the process logs where it listens) in front of an upstream
running in the test's own event loop, and always stop what they started.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, base_config
from prometheus_client import CollectorRegistry
from serve_support import PROC_ENV, _env, create_key, sidecar_process, write_config
from tlscerts import make_tls
from yarl import URL

from sidecar.app import Sidecar, bound_addresses, running
from sidecar.config import parse_config
from sidecar.demo import free_port

MiB = 1024 * 1024
CHUNK = bytes(range(256)) * 256  # 64 KiB


async def until_refused(base: str, timeout: float = 10.0) -> None:
    """Poll until nothing accepts connections at ``base`` any more."""
    url = URL(base)
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(url.host, url.port)
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            pass  # queued just as the listener closed, then reset: the next attempt tells
        else:
            writer.close()
            await writer.wait_closed()
        assert time.monotonic() < deadline, f"{base} still accepts connections"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- health


async def test_healthz_and_readyz_with_the_upstream_up(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    sc = await make_sidecar(base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path))
    resp = await sc.admin.get("/healthz")
    assert resp.status == 200
    resp = await sc.admin.get("/readyz")
    assert resp.status == 200, await resp.text()
    # /metrics lives on the admin listener only.
    assert (await sc.admin.get("/metrics")).status == 200
    on_proxy = await sc.proxy.get("/metrics")
    assert "sidecar_requests_total" not in await on_proxy.text()


async def test_readyz_is_503_with_the_upstream_down(make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    sc = await make_sidecar(base_config(f"http://127.0.0.1:{free_port()}", tmp_path))
    assert (await sc.admin.get("/healthz")).status == 200  # alive, just not ready
    resp = await sc.admin.get("/readyz")
    assert resp.status == 503
    assert resp.headers["Content-Type"].startswith("application/json")


# --------------------------------------------------------------------------- TLS listener


async def test_tls_on_the_proxy_listener(plex_upstream: TestServer, tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    raw = base_config(
        str(plex_upstream.make_url("")).rstrip("/"), tmp_path, tls={"cert": str(tls.cert), "key": str(tls.key)}
    )
    sc = Sidecar(parse_config(raw, env=PROC_ENV, base=tmp_path), registry=CollectorRegistry(), env=PROC_ENV)
    async with running(sc) as (proxy_runner, _):
        _, key = await sc.manager().create({"name": "tls"}, "test")
        await sc.verifier.refresh()
        (base,) = bound_addresses(proxy_runner, tls=True)
        assert base.startswith("https://127.0.0.1:")
        async with aiohttp.ClientSession() as client:
            resp = await client.get(f"{base}/library/sections", headers={"X-Plex-Token": key}, ssl=tls.client_context())
            assert resp.status == 200
            assert "Movies" in await resp.text()
            with pytest.raises(aiohttp.ClientError):  # plain HTTP does not get through a TLS listener
                await client.get(base.replace("https://", "http://") + "/library/sections")
    await until_refused(base)  # leaving `running` closed the listener


# --------------------------------------------------------------------------- the real process


async def test_sigterm_drains_the_request_in_flight(aiohttp_server: Any, tmp_path: Path) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(body=b"finished after SIGTERM", content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/slow", slow)
    upstream = await aiohttp_server(app)
    config = write_config(tmp_path, str(upstream.make_url("")).rstrip("/"), server={"shutdown_grace": "20s"})
    key = await create_key(config)
    async with sidecar_process(config) as served, aiohttp.ClientSession() as client:

        async def fetch() -> tuple[int, bytes]:
            async with client.get(f"{served.proxy}/slow", headers={"X-Plex-Token": key}) as resp:
                return resp.status, await resp.read()

        in_flight = asyncio.create_task(fetch())
        try:
            await asyncio.wait_for(arrived.wait(), 10)
            started = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            await until_refused(served.proxy)  # new connections are refused at once
            ready = await client.get(f"{served.admin}/readyz")  # and readiness says so while draining
            assert ready.status == 503
            assert not in_flight.done()
            release.set()
            status, body = await asyncio.wait_for(in_flight, 10)
            assert (status, body) == (200, b"finished after SIGTERM")
            assert await asyncio.wait_for(served.proc.wait(), 20) == 0
            assert time.monotonic() - started < 20
        finally:
            release.set()
            in_flight.cancel()
    assert any("draining" in line for line in served.log)


async def test_sigterm_ends_websockets_and_event_streams_at_once(aiohttp_server: Any, tmp_path: Path) -> None:
    never = asyncio.Event()

    async def notifications(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello")
        async for _ in ws:
            pass
        return ws

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: hello\n\n")
        await never.wait()
        return resp

    app = web.Application()
    app.router.add_get("/:/websockets/notifications", notifications)
    app.router.add_get("/:/eventsource/notifications", events)
    upstream = await aiohttp_server(app)
    config = write_config(tmp_path, str(upstream.make_url("")).rstrip("/"), server={"shutdown_grace": "20s"})
    key = await create_key(config)
    try:
        async with sidecar_process(config) as served, aiohttp.ClientSession() as client:
            ws = await client.ws_connect(f"{served.proxy}/:/websockets/notifications?X-Plex-Token={key}")
            assert (await ws.receive(timeout=5)).data == "hello"
            sse = await client.get(f"{served.proxy}/:/eventsource/notifications", headers={"X-Plex-Token": key})
            assert await asyncio.wait_for(sse.content.readuntil(b"\n\n"), 5) == b"data: hello\n\n"
            started = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001  # going away: reconnect elsewhere
            with contextlib.suppress(aiohttp.ClientPayloadError):
                assert await asyncio.wait_for(sse.content.read(), 10) == b""
            assert await asyncio.wait_for(served.proc.wait(), 10) == 0
            assert time.monotonic() - started < 8  # far less than the 20 s grace
            await ws.close()
    finally:
        never.set()


async def test_sigterm_gives_up_on_a_stuck_request_after_the_grace(aiohttp_server: Any, tmp_path: Path) -> None:
    arrived = asyncio.Event()
    never = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        arrived.set()
        await never.wait()
        return web.Response(text="unreachable")

    app = web.Application()
    app.router.add_get("/stuck", stuck)
    upstream = await aiohttp_server(app)
    config = write_config(tmp_path, str(upstream.make_url("")).rstrip("/"), server={"shutdown_grace": "500ms"})
    key = await create_key(config)
    async with sidecar_process(config) as served, aiohttp.ClientSession() as client:
        in_flight = asyncio.create_task(client.get(f"{served.proxy}/stuck", headers={"X-Plex-Token": key}))
        try:
            await asyncio.wait_for(arrived.wait(), 10)
            started = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(served.proc.wait(), 15) == 0
            elapsed = time.monotonic() - started
            # aiohttp waits the grace for the handler, then up to the grace again for its cancellation.
            assert elapsed < 0.5 * 2 + 3, elapsed
            with pytest.raises(aiohttp.ClientError):
                resp = await asyncio.wait_for(in_flight, 10)
                await resp.read()
        finally:
            never.set()
            in_flight.cancel()


@pytest.mark.slow
async def test_peak_rss_while_256mib_stream_through(aiohttp_server: Any, tmp_path: Path) -> None:
    n = 256 * MiB // len(CHUNK)

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        resp.content_length = n * len(CHUNK)
        await resp.prepare(request)
        for _ in range(n):  # generated, never held: the same 64 KiB object each time
            await resp.write(CHUNK)
        return resp

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=b"warm", content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/library/parts/1/file.mp4", big)
    app.router.add_get("/identity", small)
    upstream = await aiohttp_server(app)
    config = write_config(
        tmp_path, str(upstream.make_url("")).rstrip("/"), log={"access": str(tmp_path / "access.log")}
    )
    key = await create_key(config)
    async with sidecar_process(config) as served, aiohttp.ClientSession() as client:
        warm = await client.get(f"{served.proxy}/identity", headers={"X-Plex-Token": key})
        assert await warm.read() == b"warm"  # one request first: imports, store and sessions settle
        baseline = served.vm_kib("VmRSS")
        started = time.monotonic()
        received = 0
        async with client.get(f"{served.proxy}/library/parts/1/file.mp4", headers={"X-Plex-Token": key}) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(256 * 1024):
                received += len(chunk)  # discarded
        elapsed = time.monotonic() - started
        peak_kib = served.vm_kib("VmHWM")
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0
    assert received == n * len(CHUNK)
    peak = peak_kib / 1024
    print(
        f"\nsidecar serve: peak RSS (VmHWM) {peak:.1f} MiB while 256 MiB streamed in {elapsed:.2f}s "
        f"({256 / elapsed:.0f} MiB/s); RSS before the stream {baseline / 1024:.1f} MiB"
    )
    assert peak < 100, f"peak RSS {peak:.1f} MiB"


async def test_serve_on_a_taken_port_says_so_and_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}", listen=f"127.0.0.1:{port}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve", "-c", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=_env(),
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}: " in err.decode()
    assert "Traceback" not in err.decode()
