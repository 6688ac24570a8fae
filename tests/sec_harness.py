"""Shared harness for the attack suite (tests/security/test_sec_*.py).

Not a conftest (two modules named ``conftest`` would shadow each other's imports):
test files import what they use, fixtures included (``from sec_harness import threaded_sidecar``).

- ``ThreadedSidecar``: a real sidecar started through ``sidecar.app.running`` (the code
  ``sidecar serve`` runs) on its own event loop in a background thread, in front of a
  real upstream on the same loop. Synchronous callers (hypothesis properties,
  schemathesis) talk to it over real sockets; nothing is mocked.
- ``recording_upstream``: an upstream that answers everything and records exactly what
  it received (method, raw target, headers), so a test can assert that the upstream never
  saw a request the sidecar did not authorise.
- ``raw_exchange``: send bytes on a fresh TCP connection and read until the peer closes
  or goes quiet; for framing attacks a client library would refuse to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from conftest import ADMIN_TOKEN, PLEX_TOKEN, base_config
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar, bound_addresses, running
from sidecar.auth.models import KeyRecord
from sidecar.config import parse_config

T = TypeVar("T")


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str  # path and query, still percent-encoded, as on the wire
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)

    def clear(self) -> None:
        self.seen.clear()

    def __repr__(self) -> str:  # short: hypothesis prints fixtures of a failing example
        return f"Recorder({len(self.seen)} requests)"


def recording_upstream(recorder: Recorder) -> web.Server:
    """Answers every request 200 with a small XML body; records it first."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        recorder.seen.append(Seen(request.method, request.raw_path, list(request.headers.items()), body))
        return web.Response(text='<MediaContainer size="0"/>', content_type="text/xml")

    return web.Server(handler)


class ThreadedSidecar:
    """A sidecar (and its upstream) on a private event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sidecar-under-attack", daemon=True)
        self._thread.start()
        self.sc: Sidecar | None = None
        self.proxy_url = ""
        self.admin_url = ""
        self._stop: asyncio.Event | None = None
        self._done: asyncio.Future[None] | None = None
        self._upstream_runner: web.BaseRunner | None = None

    def call(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    async def _start_upstream(self, make_upstream: Callable[[], web.Server | web.Application]) -> str:
        server = make_upstream()  # aiohttp servers must be built on the loop that runs them
        runner: web.BaseRunner = (
            web.AppRunner(server) if isinstance(server, web.Application) else web.ServerRunner(server)
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._upstream_runner = runner
        return bound_addresses(runner)[0]

    def start(
        self,
        upstream: Callable[[], web.Server | web.Application],
        make_config: Callable[[str], dict[str, Any]],
        env: dict[str, str],
        base: Path,
    ) -> ThreadedSidecar:
        up_url = self.call(self._start_upstream(upstream))
        cfg = parse_config(make_config(up_url), env=env, base=base)
        started: asyncio.Future[None] = self.loop.create_future()

        async def run() -> None:
            self._stop = asyncio.Event()
            self.sc = Sidecar(cfg, registry=CollectorRegistry(), env=env)
            try:
                async with running(self.sc) as (proxy_runner, admin_runner):
                    self.proxy_url = bound_addresses(proxy_runner)[0]
                    self.admin_url = bound_addresses(admin_runner)[0]
                    started.set_result(None)
                    await self._stop.wait()
            except BaseException as e:
                if not started.done():
                    started.set_exception(e)
                raise

        async def launch() -> None:
            self._done = asyncio.ensure_future(run())
            await started

        self.call(launch())
        return self

    @property
    def proxy_addr(self) -> tuple[str, int]:
        host, port = self.proxy_url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def create_key(self, **fields: Any) -> tuple[KeyRecord, str]:
        assert self.sc is not None
        sc = self.sc

        async def make() -> tuple[KeyRecord, str]:
            fields.setdefault("name", "attack")
            rec, key = await sc.manager().create(fields, "test")
            await sc.verifier.refresh()
            return rec, key

        return self.call(make())

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._stop is not None:
                self._stop.set()
            if self._done is not None:
                with contextlib.suppress(Exception):
                    await self._done
            if self._upstream_runner is not None:
                await self._upstream_runner.cleanup()

        try:
            self.call(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def threaded_sidecar(tmp_path: Path) -> Iterator[Callable[..., ThreadedSidecar]]:
    """``start(make_upstream, make_config=None)``: a running ThreadedSidecar, stopped at the end of the test."""
    started: list[ThreadedSidecar] = []
    env = {"PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}

    def start(
        upstream: Callable[[], web.Server | web.Application],
        make_config: Callable[[str], dict[str, Any]] | None = None,
    ) -> ThreadedSidecar:
        ts = ThreadedSidecar()
        started.append(ts)
        return ts.start(upstream, make_config or (lambda url: base_config(url, tmp_path)), env, tmp_path)

    yield start
    for ts in started:
        ts.stop()


def raw_exchange(addr: tuple[str, int], data: bytes, *, quiet: float = 0.5, total: float = 5.0) -> bytes:
    """Send ``data`` on a new connection; everything the peer sends until it closes, or is
    quiet for ``quiet`` seconds after its first byte (a keep-alive answer), or ``total`` passes."""
    out = bytearray()
    deadline = time.monotonic() + total
    with socket.create_connection(addr, timeout=total) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        while time.monotonic() < deadline:
            s.settimeout(quiet if out else max(0.05, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:  # reset by peer: what came before is the answer
                break
            if not chunk:
                break
            out += chunk
    return bytes(out)


def statuses(raw: bytes) -> list[int]:
    """Every HTTP status line in a raw answer (pipelined answers give several)."""
    out = []
    for line in raw.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and len(line) >= 12 and line[9:12].isdigit():
            out.append(int(line[9:12]))
    return out
