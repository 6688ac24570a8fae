"""MCP behind ``sidecar serve --workers 2`` with no configured sealing key (issue 19 §1 and §3).

The supervisor draws one sealing key and hands it to its workers through an inherited
pipe, so a session opened on one worker is served by the other. The SDK's own client
talks to the host through a balancer that opens a new connection for every request, so
``SO_REUSEPORT`` spreads them over both workers (read back from ``/metrics``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from conftest import base_config
from mcp_server import MCP_TOKEN, McpUpstream
from workers_support import AUTH, metric, workers_process

TOOLS = {"upstreams": ["*"], "tools": {"*": ["search", "fetch"]}}


def mcp_config(tmp_path: Path, upstream: McpUpstream) -> Path:
    cfg = base_config(upstream.url, tmp_path)
    cfg["upstreams"] = [
        {"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools",
         "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}},
    ]  # fmt: skip
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def balancer(target: str, http: aiohttp.ClientSession) -> web.Application:
    """Forwards each request to ``target`` on a connection of its own (the session has force_close)."""

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with http.request(request.method, target, headers=headers, data=await request.read()) as up:
            skip = ("content-length", "transfer-encoding")
            resp = web.StreamResponse(
                status=up.status, headers={k: v for k, v in up.headers.items() if k.lower() not in skip}
            )
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_route("*", "/mcp", forward)
    return app


def served(text: str) -> dict[str, float]:
    return {w: metric(text, "sidecar_worker_requests_total", lambda s, w=w: f'worker="{w}"' in s) for w in "01"}


async def test_one_sdk_session_spread_over_both_workers(
    tmp_path: Path, upstream: McpUpstream, aiohttp_server: Any
) -> None:
    import httpx2
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    config = mcp_config(tmp_path, upstream)
    async with (
        workers_process(config, "--workers", "2", extra_env={"MCP_TOKEN": MCP_TOKEN}) as host,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), auto_decompress=False) as http,
    ):
        key = await create_key(host.admin, permissions=TOOLS)
        await host.wait_log(r"sealed with a random key this supervisor drew and shared with its workers")
        assert not any("random key of this process" in line for line in host.log)  # no worker drew its own
        lb = await aiohttp_server(balancer(host.proxy + "/mcp/tools", http))
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as hc,
            streamable_http_client(str(lb.make_url("/mcp")), http_client=hc) as (read, write),
            ClientSession(read, write) as s,
        ):
            await s.initialize()
            for i in range(16):
                found = await s.call_tool("search", {"query": f"q{i}"})
                assert found.content[0].text == f"results for q{i}"  # type: ignore[union-attr]
            assert [t.name for t in (await s.list_tools()).tools] == ["search", "fetch"]
        async with aiohttp.ClientSession() as admin, admin.get(host.admin + "/metrics") as resp:
            per_worker = served(await resp.text())
        assert min(per_worker.values()) > 0, per_worker  # both workers served this one session
        assert metric(await _metrics(host.admin), "sidecar_requests_total", lambda s: 'code="404"' in s) == 0
        if sys.platform == "linux":  # the key came through a pipe: not in the worker's environment, pipe closed
            for pid in host.pids.values():
                role = json.loads(_environ(pid)["SIDECAR_WORKER"])
                assert isinstance(role["seal"], int) and set(role) == {"index", "dir", "port", "fd", "limits", "seal"}
                fd = Path(f"/proc/{pid}/fd/{role['seal']}")
                assert not fd.exists() or not os.readlink(fd).startswith("pipe:")
    upstream_sids = {v for r in upstream.rec.requests if (v := r.header("mcp-session-id"))}
    assert len(upstream_sids) == 1  # one upstream session, whichever worker served each request


async def create_key(admin: str, **fields: Any) -> str:
    """A key made through the supervisor's admin API (the workers see it within the store's poll)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(admin + "/admin/keys", json={"name": "agent", **fields}, headers=AUTH) as resp,
    ):
        assert resp.status == 201, await resp.text()
        key: str = (await resp.json())["data"]["key"]
    return key


async def _metrics(admin: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(admin + "/metrics") as resp:
        return await resp.text()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
