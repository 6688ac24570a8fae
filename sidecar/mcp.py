"""MCP awareness (placeholder: plain pass-through; per-tool rules come with issue 7)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .app import Sidecar

__all__ = ["McpGateway"]


class McpGateway:
    def __init__(self, sc: Sidecar) -> None:
        self.sc = sc

    def is_rest_call(self, request: web.Request) -> bool:
        return False

    async def rest_call(self, sc: Sidecar, request: web.Request, scope: Any) -> web.StreamResponse:
        raise web.HTTPNotFound()

    async def handle(self, *args: Any) -> web.StreamResponse:
        _sc, request, scope, upstream, _key, url, headers, rate_headers = args

        def on_headers(status: int, out: Any) -> None:
            out.update(rate_headers)

        return await self.sc.forwarder.forward(request, scope, upstream, url, headers, on_headers=on_headers)

    def challenge_headers(self, request: web.Request, upstream_id: str) -> dict[str, str]:
        return {}

    async def well_known(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound()

    async def close(self) -> None:
        pass
