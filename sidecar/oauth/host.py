"""What the OAuth server reads of the application: narrow protocols, not the ``Sidecar`` type.

``sidecar.app.Sidecar`` satisfies both (mypy checks it where ``app.py`` builds the server and
adds its admin routes); ``oauth/`` never imports ``sidecar.app``. ``GrantHost`` is the part
that grant bookkeeping needs, so the console can revoke a grant with its own host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..admin.manage import KeyManager
    from ..auth.models import KeyRecord
    from ..auth.verify import Verifier
    from ..config import Config
    from ..http.forwarder import Networks
    from ..http.pipeline import Router
    from ..store import Store
    from .server import OAuthServer

__all__ = ["GrantHost", "OAuthHost"]


class GrantHost(Protocol):
    @property
    def config(self) -> Config: ...
    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def store(self) -> Store: ...
    @property
    def verifier(self) -> Verifier: ...
    def manager(self) -> KeyManager: ...
    def limits_of(self, rec: KeyRecord) -> KeyRecord: ...


class OAuthHost(GrantHost, Protocol):
    @property
    def steady(self) -> Callable[[], float]: ...
    @property
    def expiry_clock(self) -> Callable[[], float]: ...  # judges and sets codes' and tokens' ends (clocks.HighWater)
    @property
    def router(self) -> Router: ...
    @property
    def trusted_proxies(self) -> Networks: ...
    @property
    def mcp(self) -> object | None: ...  # its REST client lists tools for the consent page (authorize.py)
    @property
    def oauth(self) -> OAuthServer | None: ...
