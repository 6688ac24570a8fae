"""OAuth in the console (only when ``oauth.enabled``): grants on key pages, the clients page, and
approving a pending authorization request from the console (docs/oauth.md).

Grants are child keys, so they come from the verifier's in-memory table (one pass, no store
call per row). Every change goes through the admin API's code: ``oauth.grants.revoke_grant``
(as ``DELETE /admin/oauth/grants/{id}``), ``ClientRegistry.remove`` (as ``DELETE
/admin/oauth/clients/{id}``) and ``oauth.approve`` (the consent page's checks), with the
session's actor (``console`` …) in the audit log. Forms are CSRF-checked by ``routes.page``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from aiohttp import web

from ..admin.delegation import check_target, manages_all, owns
from ..auth.models import KeyRecord
from ..auth.permissions import literal_glob, tool_allowed
from ..core.errors import BadRequest, Forbidden, NotFound, SidecarError
from ..oauth.approve import Pending, answer, pending
from ..oauth.clients import ClientError
from ..oauth.consent import LIFETIMES
from ..oauth.grants import GrantError, revoke_grant
from ..observe.logfilter import redact_path_keys
from .routes import CONSOLE, CSP, Console, harden, page, see_other
from .sessions import Session

if TYPE_CHECKING:
    from ..oauth.server import OAuthServer

__all__ = ["grant_rows", "key_oauth", "mount_oauth"]

KINDS = {"configured": "config", "registered": "DCR", "metadata": "CIMD"}
MAX_KEYS_OFFERED = 500
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


def _server(console: Console) -> OAuthServer:
    if console.sc.oauth is None:
        raise NotFound("OAuth is not enabled")
    return console.sc.oauth


def _last_used(console: Console, rec: KeyRecord) -> float | None:
    """The store's time, or this process's latest request of the key when newer (not yet written)."""
    seen = console.recent.for_key(rec.id)
    latest = seen[0].at if seen else None
    return max(t for t in (rec.last_used_at, latest) if t is not None) if (rec.last_used_at or latest) else None


def _may_manage(console: Console, by: KeyRecord | None, rec: KeyRecord, now: float) -> bool:
    """The admin token and full admins: any key; a delegated admin key: keys within its reach only."""
    try:
        check_target(console.sc.config, by, rec, now)
    except Forbidden:
        return False
    return owns(by, rec)


def grant_rows(console: Console, by: KeyRecord | None, parent_id: str, now: float) -> list[dict[str, Any]]:
    """The grants a key approved, newest first, from the verifier's table (in memory)."""
    verifier = console.sc.verifier
    rows = []
    for r in verifier.table.values():
        if r.parent_id != parent_id:
            continue
        g = r.grant
        redirect = str(g.get("redirect_uri") or "")
        rows.append({
            "rec": r, "client": g.get("client_name") or g.get("client_id") or "?", "client_id": g.get("client_id", ""),
            "redirect_host": urlsplit(redirect).netloc if redirect else "", "tools": ", ".join(g.get("tools") or ())
            or "every tool the key may use", "state": verifier.state(r, now), "last_used": _last_used(console, r),
            "revocable": _may_manage(console, by, r, now),
        })  # fmt: skip
    rows.sort(key=lambda x: -x["rec"].created_at)
    return rows


def key_oauth(console: Console, session: Session, rec: KeyRecord, now: float) -> dict[str, Any]:
    """What key.html shows about OAuth: the key's grants, or the grant's parent and client."""
    if console.sc.oauth is None:
        return {"oauth": False, "grants": [], "parent": None}
    parent = console.sc.verifier.table.get(rec.parent_id) if rec.parent_id else None
    by = console.acting_key(session)
    return {"oauth": True, "grants": grant_rows(console, by, rec.id, now) if rec.parent_id is None else [],
            "parent": parent}  # fmt: skip


async def revoke_grant_view(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """POST /keys/{id}/grants/{grant}/revoke: as DELETE /admin/oauth/grants/{grant}, actor ``console``."""
    sc = console.sc
    _server(console)
    parent_id, grant_id = request.match_info["id"], request.match_info["grant"]
    grant = sc.verifier.table.get(grant_id) or await sc.store.get(grant_id)
    by = console.acting_key(session)
    if grant is None or grant.parent_id != parent_id or not owns(by, grant):
        raise NotFound(f"no OAuth grant with id {redact_path_keys(grant_id)!r} of key {redact_path_keys(parent_id)!r}")
    check_target(sc.config, by, grant, sc.clock())  # a delegated admin key: only grants within its reach
    await revoke_grant(sc, grant_id, session.actor)  # refused by the next request: the verifier is refreshed
    session.flash = f"OAuth grant for “{grant.grant.get('client_name') or grant.grant.get('client_id')}” revoked."
    return see_other(f"/keys/{parent_id}")


async def clients_page(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """Registered OAuth clients (config, DCR, CIMD) with their active grants; full admins only."""
    server = _server(console)
    if not manages_all(console.acting_key(session)):
        raise Forbidden("OAuth clients are managed with the admin token or an admin: full key")
    now = console.sc.clock()
    verifier = console.sc.verifier
    counts = Counter(
        r.grant.get("client_id") for r in verifier.table.values() if r.parent_id and verifier.state(r, now) == "active"
    )
    clients = [{**c, "how": KINDS.get(c["kind"], c["kind"]), "grants": counts.get(c["client_id"], 0)}
               for c in await server.clients.listing()]  # fmt: skip
    clients.sort(key=lambda c: (c["how"] != "config", str(c.get("client_name") or c["client_id"]).lower()))
    return console.render(request, "oauth_clients.html", session=session, clients=clients, flash=session.take_flash())


async def remove_client(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """POST /oauth/clients/remove (client_id in the form: it may be a URL): as DELETE /admin/oauth/clients/{id}."""
    server = _server(console)
    if not manages_all(console.acting_key(session)):
        raise Forbidden("OAuth clients are managed with the admin token or an admin: full key")
    client_id = str((await request.post()).get("client_id") or "")
    try:
        removed = await server.clients.remove(client_id, session.actor)
    except ClientError as e:
        raise BadRequest(e.description) from None
    if not removed:
        raise NotFound(f"no registered client {redact_path_keys(client_id)!r}")
    session.flash = f"Client {client_id} removed. Its existing grants stay until revoked."
    return see_other("/oauth/clients")


def _candidates(console: Console, session: Session, upstream_id: str, now: float) -> list[KeyRecord]:
    """Keys this session may grant from: active API keys (not grants) it owns that reach the upstream."""
    by, verifier = console.acting_key(session), console.sc.verifier
    out = [
        r for r in verifier.table.values()
        if r.parent_id is None and verifier.state(r, now) == "active"
        and ("*" in r.permissions.upstreams or upstream_id in r.permissions.upstreams)
        and _may_manage(console, by, r, now)
    ]  # fmt: skip
    out.sort(key=lambda r: r.name.lower())
    return out[:MAX_KEYS_OFFERED]


async def _consent_page(request: web.Request, console: Console, session: Session, p: Pending,
                        message: str = "", status: int = 200) -> web.Response:  # fmt: skip
    server = _server(console)
    now = console.sc.clock()
    upstream = console.sc.config.upstream(p.upstream_id)
    by = console.acting_key(session)
    try:
        tools = [
            (literal_glob(t["name"]), t["name"]) for t in await console.tools.tools(upstream)
            if by is None or tool_allowed(by.permissions, p.upstream_id, t["name"])  # as the picker: its own only
        ]  # fmt: skip
    except (SidecarError, TimeoutError):
        tools = []  # the person types names instead
    lifetimes = [(label, int(sec)) for label, sec in LIFETIMES if sec <= server.config.max_grant_lifetime]
    resp = console.render(
        request, "oauth_consent.html", session=session, status=status, p=p, message=message, tools=tools,
        request_id=request.match_info["request"],
        keys=_candidates(console, session, p.upstream_id, now), lifetimes=lifetimes,
        redirect_host=urlsplit(p.redirect_uri).netloc, vouched=p.client.kind == "configured",
    )  # fmt: skip
    parts = urlsplit(p.redirect_uri)
    target = f"{parts.scheme}://{parts.netloc}"
    if _ORIGIN.match(target):  # the decision's 303 goes there: browsers hold redirects to form-action
        resp.headers["Content-Security-Policy"] = CSP.replace("form-action 'self'", f"form-action 'self' {target}")
    return resp


async def consent(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """GET: the pending request (client, redirect host, resource) and a form; POST: the decision."""
    server = _server(console)
    try:
        p = await pending(server, request.match_info["request"])
    except GrantError as e:
        return console.error(request, 410, str(e), session)
    if request.method == "GET":
        return await _consent_page(request, console, session, p)
    form = await request.post()
    try:
        if form.get("decision") != "allow":
            location = await answer(server, p, None, (), 0.0, session.actor)
        else:
            rec = console.sc.verifier.table.get(str(form.get("key") or ""))
            # Granting from a key hands its powers to the client: a delegated admin key may grant only
            # from keys within its own reach (it could rotate those and hold them anyway).
            if rec is None or not _may_manage(console, console.acting_key(session), rec, console.sc.clock()):
                raise GrantError("choose one of the listed keys")
            if form.get("all_tools") == "1":
                tools: tuple[str, ...] = ()
            else:
                picked = [str(t) for t in form.getall("tool", ())]
                picked += [t.strip() for t in str(form.get("tools") or "").split(",") if t.strip()]
                tools = tuple(dict.fromkeys(picked))
                if not tools:
                    raise GrantError("choose at least one tool, or every tool")
            try:
                lifetime = float(str(form.get("lifetime") or ""))
            except ValueError:
                raise GrantError("choose a lifetime") from None
            location = await answer(server, p, rec, tools, lifetime, session.actor)
    except GrantError as e:
        return await _consent_page(request, console, session, p, message=str(e), status=400)
    return harden(web.Response(status=303, headers={"Location": location}))


async def _consent_entry(request: web.Request) -> web.StreamResponse:
    """Arriving from the consent page (another site, maybe): the ``SameSite=Strict`` session cookie
    is not sent on that first navigation, so a page of ours reloads it once, same-site."""
    console = request.app[CONSOLE]
    if request.method == "GET" and console.cookie(request) is None and "b" not in request.query:
        return console.render(request, "bounce.html", target=f"{quote(request.path, safe='/')}?b=1")
    return await _consent_handler(request)


_consent_handler = page(consent)


def mount_oauth(app: web.Application) -> None:
    r = app.router
    r.add_post("/keys/{id}/grants/{grant}/revoke", page(revoke_grant_view))
    r.add_get("/oauth/clients", page(clients_page))
    r.add_post("/oauth/clients/remove", page(remove_client))
    r.add_get("/oauth/consent/{request}", _consent_entry)
    r.add_post("/oauth/consent/{request}", _consent_entry)
