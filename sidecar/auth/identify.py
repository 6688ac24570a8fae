"""Who is calling: an API key or a JWT, told apart by shape and verified by the right party.

Kept apart from ``auth/jwt.py`` so the routes that only need to *recognise* a JWT (the
admin API refuses one; the MCP REST tool call verifies one through ``host.jwt``) do not
import joserfc. ``FailureThrottle`` is what the JWT authenticator needs of the key
verifier: one per-address failed-attempts count for every kind of credential.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..core.errors import InvalidToken, SidecarError

if TYPE_CHECKING:
    from ..core.scope import RequestScope
    from .credentials import Credential
    from .jwt import JwtAuthenticator
    from .models import KeyRecord
    from .verify import Verifier

__all__ = ["ADMIN_REFUSAL", "FailureThrottle", "IdentityHost", "key_or_jwt", "looks_like_jwt", "not_for_admin"]

ADMIN_REFUSAL = "a JWT is never accepted by the admin API: use the admin token or an API key with admin"


def looks_like_jwt(credential: Credential) -> bool:
    """A JWT in ``Authorization: Bearer``: three dot-separated parts (an API key never has a dot)."""
    return credential.forms == ("bearer",) and credential.key.count(".") == 2


def not_for_admin() -> InvalidToken:
    """The admin API's answer to a JWT: 401 ``invalid_token``, without verifying it (no JWKS fetch, no
    signature check for whoever reaches the admin listener): a JWT is never admin, valid or not."""
    return InvalidToken(ADMIN_REFUSAL, "malformed")


class FailureThrottle(Protocol):
    def refuse(self, client_ip: str, error: SidecarError) -> SidecarError:
        """Count a failed attempt of ``client_ip``; the error to answer (429 once it is throttled)."""
        ...


class IdentityHost(Protocol):
    @property
    def verifier(self) -> Verifier: ...

    @property
    def jwt(self) -> JwtAuthenticator | None: ...


async def key_or_jwt(host: IdentityHost, credential: Credential, scope: RequestScope) -> KeyRecord:
    """The record a credential proves: a JWT from a ``jwt:`` provider, else an API key.

    The same rule as the proxy pipeline's (``http/pipeline.py``), for routes outside it.
    """
    scope.credential = ",".join(credential.forms)
    if host.jwt is not None and looks_like_jwt(credential):
        scope.credential = "jwt"
        return await host.jwt.verify(credential.key, scope.client_ip)
    return await host.verifier.verify(credential.key, scope.client_ip)
