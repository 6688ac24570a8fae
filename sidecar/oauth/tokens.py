"""``/oauth/token`` (authorization_code, refresh_token) and ``/oauth/revoke`` (RFC 7009).

- **Codes** are single-use (``Store.oauth_use`` marks them in one transaction). A code
  presented twice revokes the grant it produced (OAuth 2.1 §4.1.3): whoever replays it
  may have stolen it. PKCE S256 only, checked with authlib's ``create_s256_code_challenge``
  and a constant-time compare; ``redirect_uri`` and ``client_id`` must be the ones the
  code was issued to; a ``resource`` given must name the same MCP upstream.
- **Refresh tokens** rotate on every use. An old one presented again means two parties
  hold it: the whole grant is revoked (OAuth 2.1 §4.3.1, refresh token reuse detection).
- **Revocation** of either token revokes the grant (RFC 7009 §2.1 allows both); the
  answer is 200 whatever the token, so it tells a caller nothing.
- Confidential clients authenticate with ``client_secret_basic`` or ``client_secret_post``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aiohttp import web
from authlib.oauth2.rfc7636.challenge import CODE_VERIFIER_PATTERN, create_s256_code_challenge  # type: ignore[import-untyped]
from multidict import MultiDictProxy

from ..store import StoreError
from ..store.base import OAuthToken
from .clients import Client, ClientError
from .grants import GrantError, create_grant, revoke_grant
from .metadata import SCOPE
from .server import NO_STORE, oauth_error
from .tokenformat import ACCESS, CODE, REFRESH, digest, mint, parse, token_kind

if TYPE_CHECKING:
    from .server import OAuthServer

__all__ = ["read_json", "revoke", "token"]

MAX_BODY = 16 * 1024


class TokenError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


async def _body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise TokenError("invalid_request", "request body too large")
    raw = b""
    while len(raw) <= MAX_BODY:  # read(n) returns what has arrived so far: a body in two packets was cut short
        chunk = await request.content.read(MAX_BODY + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > MAX_BODY:
        raise TokenError("invalid_request", "request body too large")
    return raw


async def read_form(request: web.Request, repeatable: tuple[str, ...] = ()) -> MultiDictProxy[str]:
    from urllib.parse import parse_qsl

    from multidict import MultiDict

    if request.content_type != "application/x-www-form-urlencoded":
        raise TokenError("invalid_request", "send application/x-www-form-urlencoded")
    raw = await _body(request)
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise TokenError("invalid_request", "malformed form body") from None
    form: MultiDict[str] = MultiDict(pairs)
    for name in set(form):
        if name not in repeatable and len(form.getall(name)) > 1:  # RFC 6749 §3.2: parameters must not be repeated
            raise TokenError("invalid_request", f"{name} given twice")
    return MultiDictProxy(form)


async def read_json(request: web.Request) -> dict[str, Any]:
    from .clients import ClientError as _CE

    try:
        raw = await _body(request)
        data = json.loads(raw)
    except TokenError as e:
        raise _CE("invalid_client_metadata", e.description) from None
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[…" nested deeper than json can
        raise _CE("invalid_client_metadata", "the body is not JSON") from None
    if not isinstance(data, dict):
        raise _CE("invalid_client_metadata", "the body must be a JSON object")
    return data


async def _client(server: OAuthServer, request: web.Request, form: MultiDictProxy[str]) -> Client:
    """The calling client, authenticated as it registered (RFC 6749 §2.3)."""
    client_id, secret = form.get("client_id"), form.get("client_secret")
    header = request.headers.get("Authorization", "")
    if header[:6].lower() == "basic ":
        try:
            user, sep, pw = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):  # ValueError: non-ASCII text to b64decode
            raise TokenError("invalid_client", "malformed Basic credentials", 401) from None
        if not sep or (client_id and unquote(user) != client_id):
            raise TokenError("invalid_client", "malformed Basic credentials", 401)
        client_id, secret = unquote(user), unquote(pw)
    if not client_id:
        raise TokenError("invalid_client", "client_id is required", 401)
    try:
        client = await server.clients.get(client_id, server.may_fetch(request))
    except ClientError as e:
        if e.error == "slow_down":
            raise TokenError("slow_down", e.description, 429) from None
        raise TokenError("invalid_client", e.description, 401) from None
    if client.confidential:  # a configured secret may be weak: failures are throttled per address, and a
        # throttled address is refused before the check, so even the right secret cannot confirm a guess
        ip = server.client_ip(request)
        if server.secret_gate.full(ip):
            raise TokenError("slow_down", "too many failed client authentications; try again in a minute", 429)
        if not client.secret_ok(secret):
            server.secret_gate.allow(ip)
            raise TokenError("invalid_client", "client authentication failed", 401)
    return client


async def _issue(
    server: OAuthServer, key_id: str, client: Client, resource: str, grant_end: float | None
) -> dict[str, Any]:
    """A new access and refresh token for a grant (neither outlives it)."""
    cfg, now = server.config, server.sc.expiry_clock()  # the clock their ends are judged on
    end = grant_end if grant_end is not None else float("inf")
    access, refresh = mint(server.prefix, ACCESS), mint(server.prefix, REFRESH)
    access_row = OAuthToken(
        digest(access), ACCESS, key_id, client.client_id, resource, min(now + cfg.access_token_ttl, end)
    )
    refresh_row = OAuthToken(digest(refresh), REFRESH, key_id, client.client_id, resource,
                             min(now + cfg.refresh_token_ttl, end))  # fmt: skip
    await server.sc.store.oauth_save(access_row)
    await server.sc.store.oauth_save(refresh_row)
    server.remember(access_row)
    return {"access_token": access, "token_type": "Bearer", "expires_in": max(1, int(access_row.expires_at - now)),
            "refresh_token": refresh, "scope": SCOPE}  # fmt: skip


async def _held_by(server: OAuthServer, form: MultiDictProxy[str], d: str, kind: str, client: Client) -> None:
    """Refuse a code or refresh token of another client, or for another resource, *before* it is
    marked used: otherwise whoever saw one (or a client's own mistake) could burn it, and the
    rightful client's next use would look like a replay and revoke the grant."""
    row = await server.sc.store.oauth_get(d)
    if row is None or row.kind != kind or row.client_id != client.client_id:
        raise TokenError("invalid_grant", f"unknown {'authorization code' if kind == CODE else 'refresh token'}")
    _resource_ok(server, form, row.resource)


async def _revoke_for_replay(server: OAuthServer, key_id: str, why: str) -> None:
    if await server.sc.store.get(key_id) is not None:
        await revoke_grant(server.sc, key_id, f"oauth:{why}")


def _replayed(code_row: OAuthToken) -> str:
    """Where a code's replay is noted: the exchange that won reads it after writing its grant."""
    return code_row.digest + ":replayed"


async def _note_replay(server: OAuthServer, row: OAuthToken) -> None:
    """A replay seen while the first exchange may still be writing its grant (argon2 runs first):
    note it, then revoke the grant if it exists. The first exchange writes its grant, then reads the
    note. One of the two always sees the other's write, so the grant never survives a replay."""
    store = server.sc.store
    if await store.oauth_get(_replayed(row)) is None:
        try:
            await store.oauth_save(OAuthToken(_replayed(row), "replay", row.key_id, row.client_id, row.resource,
                                              row.expires_at + 86400))  # fmt: skip
        except StoreError:
            if await store.oauth_get(_replayed(row)) is None:  # not a concurrent replay's note: a failure
                raise
    await _revoke_for_replay(server, row.key_id, "code_replayed")


def _resource_ok(server: OAuthServer, form: MultiDictProxy[str], upstream_id: str) -> None:
    resource = form.get("resource")
    if resource is not None and server.resources.get(resource) != upstream_id:
        raise TokenError("invalid_target", "resource does not match the grant's resource")


async def _authorization_code(server: OAuthServer, client: Client, form: MultiDictProxy[str]) -> dict[str, Any]:
    code, verifier = form.get("code") or "", form.get("code_verifier") or ""
    if not parse(server.prefix, code, CODE):
        raise TokenError("invalid_grant", "unknown authorization code")
    now = server.sc.clock()
    await _held_by(server, form, digest(code), CODE, client)
    row = await server.sc.store.oauth_use(digest(code), now)
    if row is None or row.kind != CODE:
        raise TokenError("invalid_grant", "unknown authorization code")
    if row.used_at is not None:
        await _note_replay(server, row)
        raise TokenError("invalid_grant", "authorization code already used; its grant has been revoked")
    if row.expires_at <= server.sc.expiry_clock():  # never going back: a step back revives no code
        raise TokenError("invalid_grant", "authorization code expired")
    if row.client_id != client.client_id:
        raise TokenError("invalid_grant", "authorization code was issued to another client")
    if form.get("redirect_uri") != row.data.get("redirect_uri"):
        raise TokenError("invalid_grant", "redirect_uri does not match the authorization request")
    if not CODE_VERIFIER_PATTERN.match(verifier) or not hmac.compare_digest(
        create_s256_code_challenge(verifier), str(row.data.get("code_challenge"))
    ):
        raise TokenError("invalid_grant", "PKCE verification failed")
    try:
        grant = await create_grant(server.sc, row.key_id, str(row.data["parent_id"]), row.data, now)
    except GrantError as e:
        raise TokenError("invalid_grant", str(e)) from None
    if await server.sc.store.oauth_get(_replayed(row)) is not None:  # replayed while the grant was written
        await revoke_grant(server.sc, grant.id, "oauth:code_replayed")
        raise TokenError("invalid_grant", "authorization code already used; its grant has been revoked")
    return await _issue(server, grant.id, client, row.resource, grant.expires_at)


async def _refresh(server: OAuthServer, client: Client, form: MultiDictProxy[str]) -> dict[str, Any]:
    value = form.get("refresh_token") or ""
    if not parse(server.prefix, value, REFRESH):
        raise TokenError("invalid_grant", "unknown refresh token")
    now = server.sc.clock()
    await _held_by(server, form, digest(value), REFRESH, client)
    row = await server.sc.store.oauth_use(digest(value), now)
    if row is None or row.kind != REFRESH or row.client_id != client.client_id:
        raise TokenError("invalid_grant", "unknown refresh token")
    if row.used_at is not None:
        await _revoke_for_replay(server, row.key_id, "refresh_token_reused")
        raise TokenError("invalid_grant", "refresh token already used; the grant has been revoked")
    if row.expires_at <= server.sc.expiry_clock():  # never going back: a step back revives no token
        raise TokenError("invalid_grant", "refresh token expired")
    verifier = server.sc.verifier
    record = await server.grant_record(row.key_id)  # made on another replica since this one's poll?
    if record is None or verifier.state(record, now) != "active":
        raise TokenError("invalid_grant", "the grant has been revoked or has expired")
    if not server.allowed_now(record).permissions.upstreams:  # the approving key lost the resource since
        raise TokenError("invalid_grant", "the API key that approved this grant may no longer use its resource")
    return await _issue(server, record.id, client, row.resource, record.expires_at)


def _error_headers(e: TokenError) -> dict[str, str] | None:
    if e.status == 401:
        return {"WWW-Authenticate": 'Basic realm="sidecar"'}
    return {"Retry-After": "60"} if e.status == 429 else None


async def token(server: OAuthServer, request: web.Request) -> web.StreamResponse:
    try:
        form = await read_form(request)
        client = await _client(server, request, form)
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            answer = await _authorization_code(server, client, form)
        elif grant_type == "refresh_token":
            answer = await _refresh(server, client, form)
        else:
            raise TokenError("unsupported_grant_type", "authorization_code or refresh_token")
    except TokenError as e:
        return oauth_error(e.error, e.description, e.status, _error_headers(e))
    return web.json_response(answer, headers={**NO_STORE, "Access-Control-Allow-Origin": "*"})


async def revoke(server: OAuthServer, request: web.Request) -> web.StreamResponse:
    try:
        form = await read_form(request)
        client = await _client(server, request, form)
    except TokenError as e:
        return oauth_error(e.error, e.description, e.status, _error_headers(e))
    value = form.get("token") or ""
    kind = token_kind(server.prefix, value)
    if kind in (ACCESS, REFRESH) and parse(server.prefix, value, kind):
        row = await server.sc.store.oauth_get(digest(value))
        if row is not None and row.client_id == client.client_id and row.kind == kind:
            await _revoke_for_replay(server, row.key_id, "revoked_by_client")
    return web.Response(status=200, headers={**NO_STORE, "Access-Control-Allow-Origin": "*"})
