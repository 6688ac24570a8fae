"""What the MCP gateway reads of the application: a narrow protocol, not the ``Sidecar`` type.

``Sidecar`` satisfies it; the gateway never imports ``sidecar.app`` (nor needs the rest of it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import aiohttp

    from ...auth.jwt import JwtAuthenticator
    from ...auth.verify import Verifier
    from ...config import Config
    from ...http.forwarder import Forwarder, Networks
    from ...http.pipeline import Router
    from ...limits.ratelimit import RateLimiter

__all__ = ["GatewayHost"]


class GatewayHost(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def router(self) -> Router: ...

    @property
    def trusted_proxies(self) -> Networks: ...

    @property
    def sessions(self) -> dict[str, aiohttp.ClientSession]: ...

    @property
    def forwarder(self) -> Forwarder: ...

    @property
    def limiter(self) -> RateLimiter: ...

    @property
    def verifier(self) -> Verifier: ...

    @property
    def jwt(self) -> JwtAuthenticator | None: ...
