"""Admin API for OAuth: grants (which are keys) and clients, under ``/admin/oauth/``.

Added to the admin app by ``create_apps`` when ``oauth.enabled``; the admin app's own
middleware authenticates (admin token or an admin key) and turns errors into JSON.
Managing grants and clients is for the admin token and ``admin: full`` keys.

- ``GET /admin/oauth/grants[?key=ID][&client=CLIENT_ID]`` — grants, as key records
- ``DELETE /admin/oauth/grants/{id}`` — revoke a grant (and delete its tokens)
- ``GET /admin/oauth/clients`` · ``DELETE /admin/oauth/clients/{client_id}``
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..admin.api import ACTOR, ok, query_str, require_full_admin
from ..core.errors import BadRequest, NotFound
from ..observe.logfilter import redact_path_keys
from .clients import ClientError
from .grants import revoke_grant

if TYPE_CHECKING:
    from .host import OAuthHost

__all__ = ["add_routes"]


def add_routes(app: web.Application, sc: OAuthHost) -> None:
    async def list_grants(request: web.Request) -> web.Response:
        require_full_admin(request)
        found = await sc.store.list_grants(query_str(request, "key"), query_str(request, "client"))
        return ok([r.public_dict() for r in found])

    async def delete_grant(request: web.Request) -> web.Response:
        require_full_admin(request)
        rec = await revoke_grant(sc, request.match_info["id"], request[ACTOR])
        return ok(rec.public_dict())

    async def list_clients(request: web.Request) -> web.Response:
        require_full_admin(request)
        assert sc.oauth is not None
        return ok(await sc.oauth.clients.listing())

    async def delete_client(request: web.Request) -> web.Response:
        require_full_admin(request)
        assert sc.oauth is not None
        client_id = request.match_info["client_id"]
        try:
            removed = await sc.oauth.clients.remove(client_id, request[ACTOR])
        except ClientError as e:
            raise BadRequest(e.description) from None
        if not removed:
            raise NotFound(f"no registered client {redact_path_keys(client_id)!r}")  # a secret given for an id
        return ok({"client_id": client_id, "removed": True})

    app.router.add_get("/admin/oauth/grants", list_grants)
    app.router.add_delete("/admin/oauth/grants/{id}", delete_grant)
    app.router.add_get("/admin/oauth/clients", list_clients)
    app.router.add_delete("/admin/oauth/clients/{client_id:.+}", delete_client)
