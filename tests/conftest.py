"""Shared fixtures: real in-process upstreams and sidecars, built the same way everywhere.

``make_sidecar`` builds a full ``Sidecar`` (own SQLite store in tmp_path, own
Prometheus registry, cheap argon2) from a config dict, starts both listeners on
free ports through pytest-aiohttp's ``aiohttp_client``, and closes everything at the
end of the test. Nothing is mocked: the upstream is a real aiohttp server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar, create_apps
from sidecar.auth.models import KeyRecord
from sidecar.config import Config, parse_config
from sidecar.demo import plex_like_app

if TYPE_CHECKING:
    from mcp_server import McpUpstream

PLEX_TOKEN = "real-plex-token-0123456789"
ADMIN_TOKEN = "admin-token-for-tests"

# Hypothesis profiles for tests/security/test_sec_fuzz.py. Registered here, in the root
# conftest, because `--hypothesis-profile=deep` is applied at pytest_configure, before
# conftests of subfolders load. "ci" (default): fixed seed, no example database, bounded
# so the whole fuzz file stays well under a minute on 2 cores; "deep": for local hunts.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", max_examples=400, derandomize=True, database=None, deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
    settings.register_profile("deep", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis comes with the `test` extra; without it only the fuzz tests fail
    pass


def require_binary(name: str) -> str:
    """Path of a server binary the test needs; under CI=true a missing one fails, elsewhere skips."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path:
        return path
    msg = f"{name} is not installed (scripts/test installs it as root via apt-get)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


async def log_lines(path: Path, want: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The access log's JSON lines, once at least ``want`` are there (the line follows the last byte)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if len(lines) >= want or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.02)


class ProxyTestServer(BaseTestServer):
    """Serves the proxy listener's ``web.Server`` as ``serve`` does (aiohttp's own test servers
    build an Application or a fresh Server)."""

    def __init__(self, server: web.Server, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._proxy = server

    async def _make_runner(self, **kwargs: Any) -> web.ServerRunner:
        return web.ServerRunner(self._proxy, **kwargs)


@dataclass
class Running:
    sc: Sidecar
    proxy: TestClient[web.Request, web.Application]
    admin: TestClient[web.Request, web.Application]
    config: Config
    env: dict[str, str] = field(default_factory=dict)

    async def create_key(self, **fields: Any) -> tuple[KeyRecord, str]:
        fields.setdefault("name", "test")
        rec, key = await self.sc.manager().create(fields, "test")
        await self.sc.verifier.refresh()
        return rec, key

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def base_config(upstream_url: str, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": "SIDECAR_ADMIN_TOKEN"},
        "store": {"kind": "sqlite", "path": str(tmp_path / "sidecar.db")},
        "keys": {"argon2": "cheapest"},
        "upstreams": [{"id": "plex", "kind": "plex", "url": upstream_url, "token_env": "PLEX_TOKEN"}],
        "log": {"access": str(tmp_path / "access.log")},
    }
    cfg.update(overrides)
    return cfg


MakeSidecar = Callable[..., Awaitable[Running]]


@pytest.fixture
def env() -> dict[str, str]:
    return {"PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}


@pytest.fixture
async def plex_upstream(aiohttp_server: Any) -> TestServer:
    """A Plex-like upstream that accepts only PLEX_TOKEN; ``app[SEEN]`` records requests."""
    return await aiohttp_server(plex_like_app(PLEX_TOKEN))


@pytest.fixture
async def upstream() -> AsyncIterator[McpUpstream]:
    """The MCP SDK's own server (tests/mcp_server.py) on a free port; test files with a plain HTTP
    upstream define their own ``upstream`` fixture, which wins."""
    from mcp_server import McpUpstream as Server  # the SDK is imported only by the tests that use it

    up = Server().start()
    yield up
    await up.stop()


@pytest.fixture
async def started() -> AsyncIterator[list[Sidecar]]:
    """Sidecars a test builds by hand (``Sidecar(cfg)``): closed at the end, whatever happened."""
    out: list[Sidecar] = []
    yield out
    for sc in out:
        await sc.close()


@pytest.fixture
async def make_sidecar(aiohttp_client: Any, tmp_path: Path, env: dict[str, str]) -> AsyncIterator[MakeSidecar]:
    started: list[Sidecar] = []

    async def make(config: dict[str, Any], *, extra_env: dict[str, str] | None = None, **kw: Any) -> Running:
        full_env = {**env, **(extra_env or {})}
        cfg = parse_config(config, env=full_env, base=tmp_path)
        sc = Sidecar(cfg, registry=CollectorRegistry(), env=full_env, **kw)
        await sc.start()
        started.append(sc)
        proxy_app, admin_app = create_apps(sc)
        proxy = await aiohttp_client(ProxyTestServer(proxy_app))
        admin = await aiohttp_client(admin_app)
        return Running(sc=sc, proxy=proxy, admin=admin, config=cfg, env=full_env)

    yield make
    for sc in started:
        await sc.close()


@pytest.fixture
async def plex_sidecar(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> Running:
    """A sidecar in front of the Plex-like upstream, with the default config."""
    return await make_sidecar(base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path))
