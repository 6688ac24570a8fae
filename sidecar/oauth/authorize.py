"""``/oauth/authorize``: the authorization request (GET) and the person's decision (POST).

GET checks the request in RFC 6749 §4.1.2.1's order: an unknown client or a redirect URI
that is not exactly one the client registered gets an error *page* (never a redirect);
anything else wrong is sent back to the redirect URI as ``error=…`` with ``state`` and
``iss`` (RFC 9207). PKCE S256 is required; ``resource`` (RFC 8707) must be the URL of an
MCP upstream this server protects (it may be left out when there is only one). The
validated request is stored (as a single-use ``consent`` row, so any worker can take the
POST) under a random id the page carries, with a CSRF token bound to a SameSite=Strict cookie.

POST verifies the pasted API key exactly as the proxy would (argon2, failure throttling),
narrows its permissions to the resource and the chosen tools (never wider), and answers
the redirect URI with a single-use code. The grant itself (a child key) is written when
the code is exchanged (``tokens.py``).
"""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from aiohttp import web
from authlib.oauth2.rfc7636.challenge import CODE_CHALLENGE_PATTERN  # type: ignore[import-untyped]

from ..auth.models import KeyRecord
from ..auth.permissions import tool_allowed
from ..core.errors import SidecarError
from ..store.base import OAuthToken
from .clients import Client, ClientError, redirect_matches
from .consent import consent_page, csrf_cookie, error_page
from .grants import GrantError, child_permissions, grant_refusal, new_grant_id
from .metadata import SCOPE
from .tokenformat import CODE, digest, mint

if TYPE_CHECKING:
    from .server import OAuthServer

__all__ = ["decide", "start"]

log = logging.getLogger("sidecar.oauth")

CONSENT = "consent"
MAX_TOOLS = 500  # checkboxes on the page
CONSENT_TTL = 900.0  # seconds a person has to decide
COOKIE = "sidecar_oauth_csrf"  # over http; behind https ``__Host-`` prefixed (consent.csrf_cookie)
MAX_STATE = 1024


class _Redirect(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error, self.description = error, description


def _location(server: OAuthServer, redirect_uri: str, params: dict[str, str]) -> str:
    sep = "&" if "?" in redirect_uri else "?"
    return redirect_uri + sep + urlencode({**params, "iss": server.issuer})


def _back(server: OAuthServer, redirect_uri: str, params: dict[str, str]) -> web.Response:
    """303 to the client's redirect URI with ``params`` plus ``iss`` (RFC 9207)."""
    return web.Response(status=303, headers={"Location": _location(server, redirect_uri, params),
                                             "Cache-Control": "no-store"})  # fmt: skip


async def _client_and_redirect(server: OAuthServer, request: web.Request) -> tuple[Client, str]:
    q = request.query
    try:
        client = await server.clients.get(q.get("client_id") or "", server.may_fetch(request))
    except ClientError as e:
        raise _Page(f"unknown or unusable client: {e.description}", 429 if e.error == "slow_down" else 400) from None
    redirect_uri = q.get("redirect_uri")
    if redirect_uri is None and len(client.redirect_uris) == 1:
        redirect_uri = client.redirect_uris[0]
    # Exact string match (OAuth 2.1 §2.3.1), any port on a loopback IP (RFC 8252 §7.3).
    if redirect_uri is None or not any(redirect_matches(r, redirect_uri) for r in client.redirect_uris):
        raise _Page("the redirect URI is not one this client registered")
    return client, redirect_uri


class _Page(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _resource(server: OAuthServer, value: str | None) -> str:
    if value is None:
        if len(server.protected) == 1:
            return next(iter(server.protected))
        raise _Redirect("invalid_target", "resource is required: the URL of the MCP server")
    upstream_id = server.resources.get(value)
    if upstream_id is None:
        raise _Redirect("invalid_target", "resource is not an MCP server of this authorization server")
    return upstream_id


async def start(server: OAuthServer, request: web.Request) -> web.StreamResponse:
    q = request.query
    for name in set(q):
        if len(q.getall(name)) > 1:
            return error_page(f"{name} given twice")
    try:
        client, redirect_uri = await _client_and_redirect(server, request)
    except _Page as e:
        return error_page(str(e), e.status)
    state = q.get("state")
    back = {"state": state} if state is not None else {}
    if state is not None and (len(state) > MAX_STATE or not state.isprintable()):
        return error_page("state is too long or has control characters")
    try:
        if q.get("response_type") != "code":
            raise _Redirect("unsupported_response_type", "only response_type=code")
        challenge = q.get("code_challenge") or ""
        if q.get("code_challenge_method") != "S256" or not CODE_CHALLENGE_PATTERN.match(challenge):
            raise _Redirect("invalid_request", "PKCE with code_challenge_method=S256 is required")
        upstream_id = _resource(server, q.get("resource"))
    except _Redirect as e:
        params = {"error": e.error, "error_description": e.description, **back}
        if client.kind != "configured":  # RFC 9700 §4.11.2: anyone can register a redirect URI, so an
            # error found before anyone has seen the request is a page with a link, never an automatic
            # redirect (which would make this server an open redirector for phishing links)
            return error_page(e.description, back_to=_location(server, redirect_uri, params))
        return _back(server, redirect_uri, params)
    if not server.gate.allow(server.client_ip(request)):
        return error_page("too many authorization requests from this address; try again in a minute", 429)
    request_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = server.sc.clock()
    if secrets.randbelow(100) == 0:
        await server.sc.store.oauth_forget("", now)  # now and then: expired codes, tokens, requests
    data = {"redirect_uri": redirect_uri, "code_challenge": challenge, "state": state, "resource": upstream_id,
            "client_name": client.name, "csrf": digest(csrf), "scope": SCOPE}  # fmt: skip
    ends = server.sc.expiry_clock() + CONSENT_TTL
    await server.sc.store.oauth_save(
        OAuthToken(digest(request_id), CONSENT, "-", client.client_id, upstream_id, ends, data)
    )
    return _consent(server, client, request_id, csrf, data)


def _consent(server: OAuthServer, client: Client, request_id: str, csrf: str, data: dict[str, Any],
             error: str = "", status: int = 200) -> web.Response:  # fmt: skip
    from .metadata import resource_url

    return consent_page(
        action="/oauth/authorize", request_id=request_id, csrf=csrf, client_name=client.name,
        client_id=client.client_id, vouched=client.kind == "configured", redirect_uri=data["redirect_uri"],
        resource=resource_url(server.issuer, server.protected[data["resource"]]),
        max_lifetime=server.config.max_grant_lifetime, error=error, status=status,
        secure_cookie=server.issuer.startswith("https://"),
        step="tools" if data.get("parent_id") else "key", tools=data.get("offered"),
        console_url=server.config.console_url,
    )  # fmt: skip


async def _offered(server: OAuthServer, parent: KeyRecord, upstream_id: str) -> list[str] | None:
    """The upstream's tools this key may use, for the checkboxes; None when the upstream cannot say."""
    rest = getattr(server.sc.mcp, "rest", None)
    if rest is None:
        return None
    try:
        names = [t["name"] for t in await rest.list_tools(server.protected[upstream_id])]
    except SidecarError as e:
        log.warning("consent page: could not list the tools of %s: %s", upstream_id, e.message)
        return None
    return sorted({n for n in names if tool_allowed(parent.permissions, upstream_id, n)})[:MAX_TOOLS]


async def decide(server: OAuthServer, request: web.Request) -> web.StreamResponse:
    """Step 1 (an API key and a lifetime) → step 2 (tools among the key's own) → a code."""
    from .tokens import TokenError, read_form

    try:
        form = await read_form(request, repeatable=("tool",))  # bounded: the proxy listener has no body limit
    except TokenError as e:
        return error_page(e.description)
    request_id, csrf = str(form.get("request_id") or ""), str(form.get("csrf") or "")
    store = server.sc.store
    row = await store.oauth_get(digest(request_id)) if request_id else None
    now = server.sc.clock()
    if row is None or row.kind != CONSENT or row.used_at is not None or row.expires_at <= server.sc.expiry_clock():
        return error_page("this authorization request has expired or was already answered; start again")
    cookie = request.cookies.get(csrf_cookie(server.issuer.startswith("https://")), "")
    if not (
        csrf
        and cookie
        and hmac.compare_digest(csrf.encode("utf-8", "surrogatepass"), cookie.encode("utf-8", "surrogatepass"))
        and hmac.compare_digest(digest(csrf), row.data["csrf"])
    ):
        return error_page("the form did not come from this page (CSRF check failed)", 403)
    data = dict(row.data)
    back = {"state": data["state"]} if data.get("state") is not None else {}
    try:
        client = await server.clients.get(row.client_id)
    except ClientError as e:
        return error_page(e.description)
    if form.get("decision") not in ("allow", "continue"):
        if await store.oauth_use(row.digest, now) is None:
            return error_page("this authorization request was already answered")
        return _back(server, data["redirect_uri"], {"error": "access_denied", "error_description": "denied", **back})
    try:
        if not data.get("parent_id"):
            return await _key_step(server, request, form, row, client, data, csrf, now)
        tools = _chosen(form, data)
        verifier = server.sc.verifier
        parent = verifier.table.get(data["parent_id"])
        if parent is None or verifier.state(parent, now) != "active":
            raise GrantError("the API key is no longer active")
        child_permissions(parent, data["resource"], tools)  # refuses anything wider than the key
    except (SidecarError, GrantError) as e:
        return _consent(server, client, request_id, csrf, data, error=str(e), status=400)
    used = await store.oauth_use(row.digest, now)
    if used is None or used.used_at is not None:
        return error_page("this authorization request was already answered")
    code = mint(server.prefix, CODE)
    spec = {"redirect_uri": data["redirect_uri"], "code_challenge": data["code_challenge"], "parent_id": parent.id,
            "client_id": client.client_id, "client_name": client.name, "resource": data["resource"],
            "tools": list(tools), "expires_at": now + float(data["lifetime"]), "scope": SCOPE}  # fmt: skip
    await store.oauth_save(OAuthToken(digest(code), CODE, new_grant_id(), client.client_id, data["resource"],
                                      server.sc.expiry_clock() + server.config.code_ttl, spec))  # fmt: skip
    return _back(server, data["redirect_uri"], {"code": code, **back})


def _chosen(form: Any, data: dict[str, Any]) -> tuple[str, ...]:
    """The tools ticked (or typed, when the upstream could not list them); () means all of the key's."""
    if form.get("all_tools") == "1":
        return ()
    offered = data.get("offered")
    if offered is None:
        tools = tuple(t.strip() for t in str(form.get("tools") or "").split(",") if t.strip())
    else:
        tools = tuple(dict.fromkeys(str(t) for t in form.getall("tool", ())))
        if any(t not in offered for t in tools):
            raise GrantError("choose among the listed tools")
    if not tools:
        raise GrantError("choose at least one tool, or every tool")
    return tools


async def _key_step(server: OAuthServer, request: web.Request, form: Any, row: OAuthToken, client: Client,
                    data: dict[str, Any], csrf: str, now: float) -> web.Response:  # fmt: skip
    """Verify the API key as the proxy would; on success the request moves to its tools step."""
    parent = await server.sc.verifier.verify(str(form.get("api_key") or "").strip(), server.client_ip(request))
    if parent.parent_id is not None:
        raise GrantError("an OAuth grant cannot approve another grant: use an API key")
    child_permissions(parent, data["resource"], ())  # may this key use the resource at all?
    refusal = grant_refusal(server.sc, parent.id, now, server.config.max_grants_per_key)
    if refusal is not None:
        raise GrantError(refusal)
    try:
        lifetime = min(float(str(form.get("lifetime") or "")), server.config.max_grant_lifetime)
    except ValueError:
        raise GrantError("choose a lifetime") from None
    if not lifetime > 0:
        raise GrantError("choose a lifetime")
    used = await server.sc.store.oauth_use(row.digest, now)
    if used is None or used.used_at is not None:
        raise GrantError("this authorization request was already answered")
    data = {**data, "parent_id": parent.id, "lifetime": lifetime,
            "offered": await _offered(server, parent, data["resource"])}  # fmt: skip
    request_id = secrets.token_urlsafe(32)
    await server.sc.store.oauth_save(
        OAuthToken(digest(request_id), CONSENT, "-", client.client_id, data["resource"], row.expires_at, data)
    )
    return _consent(server, client, request_id, csrf, data)
