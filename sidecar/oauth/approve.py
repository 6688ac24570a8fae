"""Answering a pending authorization request from the console (docs/oauth.md, "Approving from the console").

The consent page lives on the proxy listener; the console on the admin listener, another
origin whose session cookie the consent page never sees. So the consent page links to
``<oauth.console_url>/oauth/consent/<request id>``, and a signed-in console user answers the
very request the proxy stored (``authorize.start``): same single-use row, same checks on the
approving key (``child_permissions``, ``max_grants_per_key``), same code and redirect as
the consent page's POST. The grant itself is still written when the code is exchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from ..auth.models import KeyRecord
from ..store.base import AuditEvent, OAuthToken
from .authorize import CONSENT
from .clients import Client, ClientError
from .grants import GrantError, child_permissions, grant_refusal, new_grant_id
from .metadata import SCOPE, resource_url
from .tokenformat import CODE, digest, mint

if TYPE_CHECKING:
    from .server import OAuthServer

__all__ = ["Pending", "answer", "pending"]


@dataclass(frozen=True, slots=True)
class Pending:
    """An authorization request waiting for a decision, as the console shows it."""

    row: OAuthToken
    client: Client
    resource_url: str

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.row.data)

    @property
    def upstream_id(self) -> str:
        return str(self.row.data["resource"])

    @property
    def redirect_uri(self) -> str:
        return str(self.row.data["redirect_uri"])


async def pending(server: OAuthServer, request_id: str) -> Pending:
    """The open request under ``request_id``; ``GrantError`` (a message to show) when there is none."""
    now = server.sc.expiry_clock()  # never going back: a step back revives no request
    row = await server.sc.store.oauth_get(digest(request_id)) if 0 < len(request_id) <= 100 else None
    if row is None or row.kind != CONSENT or row.used_at is not None or row.expires_at <= now:
        raise GrantError("this authorization request has expired or was already answered: start again in the app")
    try:
        client = await server.clients.get(row.client_id)
    except ClientError as e:
        raise GrantError(e.description) from None
    return Pending(row, client, resource_url(server.issuer, server.protected[row.resource]))


def _location(server: OAuthServer, p: Pending, params: dict[str, str]) -> str:
    state = p.row.data.get("state")
    back = {**params, **({"state": state} if state is not None else {}), "iss": server.issuer}
    sep = "&" if "?" in p.redirect_uri else "?"
    return p.redirect_uri + sep + urlencode(back)


async def answer(
    server: OAuthServer, p: Pending, parent: KeyRecord | None, tools: tuple[str, ...], lifetime: float, actor: str
) -> str:
    """Spend the request and return where to send the browser: a code, or ``access_denied`` when
    ``parent`` is None. ``GrantError`` when the key cannot grant this (nothing is spent then)."""
    sc, now = server.sc, server.sc.clock()
    if parent is not None:
        if parent.parent_id is not None:
            raise GrantError("an OAuth grant cannot approve another grant: choose an API key")
        if sc.verifier.state(parent, now) != "active":
            raise GrantError("that API key is not active")
        child_permissions(parent, p.upstream_id, tools)  # never wider than the key
        refusal = grant_refusal(sc, parent.id, now, server.config.max_grants_per_key)
        if refusal is not None:
            raise GrantError(refusal)
        if not 0 < lifetime <= server.config.max_grant_lifetime:
            raise GrantError("choose a lifetime")
    used = await sc.store.oauth_use(p.row.digest, now)
    if used is None or used.used_at is not None:
        raise GrantError("this authorization request was already answered")
    if parent is None:
        await sc.store.audit(AuditEvent(now, actor, "oauth_denied", None, {"client_id": p.client.client_id}))
        return _location(server, p, {"error": "access_denied", "error_description": "denied"})
    code = mint(server.prefix, CODE)
    spec = {"redirect_uri": p.redirect_uri, "code_challenge": p.row.data["code_challenge"], "parent_id": parent.id,
            "client_id": p.client.client_id, "client_name": p.client.name, "resource": p.upstream_id,
            "tools": list(tools), "expires_at": now + lifetime, "scope": SCOPE}  # fmt: skip
    grant_id = new_grant_id()
    await sc.store.oauth_save(OAuthToken(digest(code), CODE, grant_id, p.client.client_id, p.upstream_id,
                                         sc.expiry_clock() + server.config.code_ttl, spec))  # fmt: skip
    detail = {"client_id": p.client.client_id, "grant": grant_id, "tools": list(tools), "lifetime": lifetime}
    await sc.store.audit(AuditEvent(now, actor, "oauth_approved", parent.id, detail))
    return _location(server, p, {"code": code})
