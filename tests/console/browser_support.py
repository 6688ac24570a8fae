"""A whole stack for the console's browser tests (and docs/console/shoot.py): a Plex-like upstream,
the SDK's MCP server, a sidecar in front of both serving its real listeners, and headless Chromium.

Chromium is Debian's (``/usr/bin/chromium``, installed by scripts/test) driven by Playwright
for Python; Playwright's own browser download is not used. Under ``CI=true`` a missing
browser is a failure, elsewhere a skip with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import ADMIN_TOKEN, PLEX_TOKEN
from mcp_server import MCP_TOKEN, McpUpstream
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar, bound_addresses, running
from sidecar.config import parse_config
from sidecar.console import CONSOLE, Console
from sidecar.demo import free_port, plex_like_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
KEY_RE = re.compile(r"pmcp_[0-9a-z]{20,}")


def chromium_problem() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (scripts/test installs Debian's chromium as root)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright (Python) is not installed (pip install -e '.[test]')"
    return None


@contextlib.asynccontextmanager
async def launched_browser() -> AsyncIterator[Any]:
    """Debian's Chromium driven by Playwright; without it a failure under CI=true, else a skip."""
    problem = chromium_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@dataclass
class Stack:
    sc: Sidecar
    console: Console
    proxy: str  # http://127.0.0.1:port of the proxy listener
    admin: str  # ... and of the admin listener (the console)
    mcp: McpUpstream


@contextlib.asynccontextmanager
async def start_stack(tmp: Path, **overrides: Any) -> AsyncIterator[Stack]:
    """Upstreams and a sidecar on free ports; everything stopped on exit."""
    plex = web.AppRunner(plex_like_app(PLEX_TOKEN), access_log=None)
    await plex.setup()
    plex_port = free_port()
    await web.TCPSite(plex, "127.0.0.1", plex_port).start()
    mcp = McpUpstream(json_response=True).start()
    env = {"PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN, "MCP_TOKEN": MCP_TOKEN}
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "store": {"kind": "sqlite", "path": str(tmp / "sidecar.db")},
        "keys": {"argon2": "cheapest"},
        "log": {"access": "off"},
        "upstreams": [
            {"id": "plex", "kind": "plex", "url": f"http://127.0.0.1:{plex_port}", "token_env": "PLEX_TOKEN"},
            {"id": "tools", "kind": "mcp", "url": f"{mcp.url}/mcp", "path_prefix": "/mcp/tools",
             "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}},
        ],
    }  # fmt: skip
    raw.update(overrides)
    sc = Sidecar(parse_config(raw, env=env, base=tmp), registry=CollectorRegistry(), env=env)
    try:
        async with running(sc) as (proxy_runner, admin_runner):
            console = admin_runner.app[CONSOLE]
            proxy = bound_addresses(proxy_runner)[0]
            console.proxy_url = proxy
            yield Stack(sc, console, proxy, bound_addresses(admin_runner)[0], mcp)
    finally:
        await mcp.stop()
        await plex.cleanup()


async def mcp_tools(proxy: str, key: str) -> tuple[list[str], dict[str, Any]]:
    """Through the sidecar with ``key``: the tool names ``tools/list`` shows, and a forbidden call's answer."""
    url = f"{proxy}/mcp/tools"
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}  # fmt: skip
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25",
            "capabilities": {}, "clientInfo": {"name": "browser-test", "version": "1"}}}  # fmt: skip
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url, headers=headers, data=json.dumps(init))
        assert resp.status == 200, await resp.text()
        sid = resp.headers["Mcp-Session-Id"]
        headers = {**headers, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await http.post(url, headers=headers, data=json.dumps(note))).status == 202
        listed = await (await http.post(url, headers=headers, data=json.dumps(
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))).json()  # fmt: skip
        call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "delete_everything",
                "arguments": {}}}  # fmt: skip
        refused = await (await http.post(url, headers=headers, data=json.dumps(call))).json()
    return [t["name"] for t in listed["result"]["tools"]], refused


async def nav_metrics(page: Any) -> dict[str, float]:
    """What the browser measured for the page now shown: bytes and milliseconds (Navigation/Resource Timing)."""
    result: dict[str, float] = await page.evaluate(
        """() => {
        const n = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource');
        const sum = (f) => res.reduce((a, r) => a + (r[f] || 0), 0);
        return {html_bytes: n.encodedBodySize, html_transfer: n.transferSize,
                assets_bytes: sum('encodedBodySize'), assets: res.length,
                ttfb_ms: n.responseStart - n.requestStart, dcl_ms: n.domContentLoadedEventEnd,
                load_ms: n.loadEventEnd};
    }"""
    )
    return result


def random_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"
