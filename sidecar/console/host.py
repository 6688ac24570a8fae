"""What the web console reads of the application: a narrow protocol, not the ``Sidecar`` type.

``sidecar.app.Sidecar`` satisfies it (mypy checks it where ``app.py`` mounts the console);
``console/`` never imports ``sidecar.app``. It includes ``oauth.host.GrantHost``: the console
revokes grants through the OAuth server's own code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..oauth.host import GrantHost

if TYPE_CHECKING:
    from collections.abc import Callable

    import aiohttp

    from ..http.accesslog import AccessLog
    from ..http.outbound import Networks
    from ..limits.ratelimit import RateLimiter
    from ..oauth.server import OAuthServer
    from ..observe.usage import UsageRecorder

__all__ = ["ConsoleHost"]


class ConsoleHost(GrantHost, Protocol):
    @property
    def steady(self) -> Callable[[], float]: ...
    @property
    def access_log(self) -> AccessLog: ...
    @property
    def sessions(self) -> dict[str, aiohttp.ClientSession]: ...
    @property
    def oauth(self) -> OAuthServer | None: ...
    @property
    def limiter(self) -> RateLimiter: ...
    @property
    def usage(self) -> UsageRecorder: ...
    @property
    def trusted_proxies(self) -> Networks: ...  # an ingress in front: its client's address and scheme count
