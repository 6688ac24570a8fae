"""What the proxy pipeline reads of the application: a narrow protocol, not the ``Sidecar`` type.

``sidecar.app.Sidecar`` satisfies it (mypy checks that where ``app.py`` hands itself to
``make_handler``); the pipeline never imports ``sidecar.app``. The same pattern as
``admin/api.py``'s ``AdminHost`` and ``upstreams/mcp/host.py``'s ``GatewayHost``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aiohttp import web

    from ..auth.jwt import JwtAuthenticator
    from ..auth.models import KeyRecord
    from ..auth.verify import Verifier
    from ..cache.response import ResponseCache
    from ..config import Config, UpstreamConfig
    from ..core.scope import RequestScope
    from ..limits.ratelimit import RateLimiter
    from ..oauth.server import OAuthServer
    from ..observe.metrics import Metrics
    from ..upstreams.transcode import TranscodeSessions
    from .forwarder import Forwarder, Networks
    from .pipeline import HitMemo, Router

__all__ = ["McpHooks", "PipelineHost"]


class McpHooks(Protocol):
    """What the pipeline calls of the MCP gateway (``upstreams/mcp/gateway.py``), which reads the
    application through its own ``GatewayHost``: hence ``sc: Any`` here."""

    def is_rest_call(self, request: web.Request) -> bool: ...
    async def rest_call(self, sc: Any, request: web.Request, scope: RequestScope) -> web.StreamResponse: ...
    async def handle(self, *args: Any) -> web.StreamResponse: ...
    async def well_known(self, request: web.Request) -> web.StreamResponse: ...


class PipelineHost(Protocol):
    @property
    def config(self) -> Config: ...
    @property
    def router(self) -> Router: ...
    @property
    def trusted_proxies(self) -> Networks: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def hit_memo(self) -> HitMemo | None: ...
    @property
    def mcp(self) -> McpHooks | None: ...
    @property
    def oauth(self) -> OAuthServer | None: ...
    @property
    def jwt(self) -> JwtAuthenticator | None: ...
    @property
    def verifier(self) -> Verifier: ...
    @property
    def transcode(self) -> TranscodeSessions: ...
    @property
    def limiter(self) -> RateLimiter: ...
    @property
    def cache(self) -> ResponseCache: ...
    @property
    def forwarder(self) -> Forwarder: ...
    def record(self, scope: RequestScope) -> None: ...
    def challenge_headers(self, request: web.Request, upstream_id: str) -> dict[str, str]: ...
    def resource_metadata(self, request: web.Request, upstream_id: str) -> str | None: ...
    def upstream_token(self, upstream: UpstreamConfig, key: KeyRecord) -> str | None: ...
