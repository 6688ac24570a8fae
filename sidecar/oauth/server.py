"""The authorization server and the resource-server side of OAuth, as one object on ``Sidecar``.

``route`` answers the OAuth paths before the proxy routes anything (an exact-path dict
lookup, nothing more for other requests): RFC 8414 and RFC 9728 metadata, and the
endpoints under ``/oauth/`` — also at the root paths (``/authorize``, ``/token``,
``/register``, ``/revoke``) that older clients guess, unless an upstream with a prefix of
its own, or a Plex upstream at ``/``, is routed there.

``authenticate`` is the hot path for an access token: SHA-256 of the token, a dict
lookup (the store on first sight), expiry, the resource it was issued for, then the
grant's key through the verifier's table (revocation of it or its parent within a poll).
Tokens are accepted only in ``Authorization: Bearer`` and only at their own resource.
Expiry — of codes, consent requests and tokens — is judged, and set, on ``sc.expiry_clock``
(``sidecar.clocks.HighWater``): a wall clock stepped back revives none of them. A stream a token
opened ends when that token expires (``scope.until``), whatever newer tokens its grant has.

What authlib provides here: RFC 8414 metadata validation (``metadata.py``) and the PKCE
S256 helpers (``tokens.py``). Its server classes (``AuthorizationServer`` and grants) are
built around a synchronous request/ORM model; the protocol glue for aiohttp is written
here instead, small and with every check visible.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..auth.credentials import Credential
from ..auth.models import KeyRecord
from ..auth.verify import throttle_bucket
from ..config.jwt import issuers_granting
from ..core.addresses import client_ip
from ..core.errors import ExpiredKey, InvalidKey, RevokedKey, ServiceUnavailable
from ..core.scope import RequestScope
from ..store import StoreError
from ..store.base import OAuthToken
from .clients import ClientRegistry
from .grants import allowed_now
from .metadata import (
    AS_WELL_KNOWN,
    ENDPOINTS,
    PRM_WELL_KNOWN,
    challenge,
    metadata_url,
    protected,
    resource_metadata,
    resource_url,
    server_metadata,
)
from .tokenformat import ACCESS, digest, parse, token_kind

if TYPE_CHECKING:
    from .host import OAuthHost

__all__ = ["OAuthServer", "oauth_error"]

log = logging.getLogger("sidecar.oauth")

MAX_CACHED_TOKENS = 100_000
# Unauthenticated writes (authorization requests, registrations) per client address per minute.
REQUESTS_PER_MINUTE = 30
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Endpoint = Callable[["OAuthServer", web.Request], Awaitable[web.StreamResponse]]
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache", "X-Content-Type-Options": "nosniff"}


def oauth_error(error: str, description: str, status: int = 400, headers: dict[str, str] | None = None) -> web.Response:
    """RFC 6749 §5.2 / RFC 7591 §3.2.2 error body: the shape OAuth clients parse (docs/oauth.md)."""
    body = {"error": error, "error_description": description}
    return web.json_response(body, status=status, headers={**NO_STORE, **(headers or {})})


class Gate:
    """At most ``limit`` events per client address (IPv6: per /64) in a sliding minute, in bounded memory."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self.limit, self.clock = limit, clock
        self._seen: dict[str, deque[float]] = {}

    def allow(self, ip: str) -> bool:
        now, bucket = self.clock(), throttle_bucket(ip)
        q = self._seen.get(bucket)
        if q is None:
            if len(self._seen) >= 100_000:
                self._seen.clear()
            q = self._seen[bucket] = deque(maxlen=self.limit)
        if len(q) >= self.limit and q[0] > now - 60:
            return False
        q.append(now)
        return True

    def full(self, ip: str) -> bool:
        """Would ``allow`` refuse now? (Records nothing.)"""
        q = self._seen.get(throttle_bucket(ip))
        return q is not None and len(q) >= self.limit and q[0] > self.clock() - 60


class OAuthServer:
    def __init__(self, sc: OAuthHost) -> None:
        from . import authorize, tokens  # the endpoint modules import this one for its helpers

        self.sc = sc
        self.config = sc.config.oauth
        self.issuer = self.config.issuer(sc.config.server.public_url)
        self.prefix = sc.config.keys.prefix
        self.protected = protected(self.config, sc.config.upstreams)
        # RFC 8707 resource URL -> upstream id (with and without a trailing slash)
        self.resources: dict[str, str] = {}
        for up in self.protected.values():
            url = resource_url(self.issuer, up)
            self.resources[url] = self.resources[url.rstrip("/")] = self.resources[url.rstrip("/") + "/"] = up.id
        self.clients = ClientRegistry(self.config, sc.store, clock=sc.clock)
        self._metadata = json.dumps(server_metadata(self.config, self.issuer)).encode()
        self._access: dict[str, OAuthToken] = {}  # digest -> access token row, once seen
        self._narrowed: dict[str, tuple[KeyRecord, KeyRecord, KeyRecord]] = {}  # grant id -> (grant, parent, now)
        self.gate = Gate(REQUESTS_PER_MINUTE, sc.steady)  # authorization requests
        self.register_gate = Gate(REQUESTS_PER_MINUTE, sc.steady)
        self.fetch_gate = Gate(REQUESTS_PER_MINUTE, sc.steady)  # client metadata documents fetched
        self.secret_gate = Gate(REQUESTS_PER_MINUTE, sc.steady)  # failed client authentications
        routes: dict[str, dict[str, Handler]] = {AS_WELL_KNOWN: {"GET": self._server_metadata}}
        for up in self.protected.values():
            path = PRM_WELL_KNOWN + ("" if up.path_prefix == "/" else up.path_prefix)
            idps = issuers_granting(sc.config.jwt, (up.id,))  # jwt: providers whose tokens work here too
            routes[path] = {"GET": self._resource_metadata(resource_metadata(self.issuer, up, idps))}
        endpoints: dict[str, dict[str, Endpoint]] = {
            "authorize": {"GET": authorize.start, "POST": authorize.decide},
            "token": {"POST": tokens.token},
            "revoke": {"POST": tokens.revoke},
            "register": {"POST": _register},
        }
        for name, methods in endpoints.items():
            bound = {m: self._bind(h) for m, h in methods.items()}
            routes[ENDPOINTS[name]] = bound
            root = "/" + name
            owner = sc.router.match(root)
            if owner is None or (owner.path_prefix == "/" and owner.kind == "mcp"):
                routes[root] = bound
        self._routes = routes

    def _bind(self, fn: Endpoint) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await fn(self, request)

        return handler

    # ------------------------------------------------------------------ routing

    async def route(self, request: web.Request) -> web.StreamResponse | None:
        """The answer for an OAuth path, or None (not ours: the proxy carries on)."""
        methods = self._routes.get(request.path)
        if methods is None:
            return None
        method = "GET" if request.method == "HEAD" else request.method
        if method == "OPTIONS" and not ("GET" in methods and "POST" in methods):
            # CORS preflight from browser-based clients: these endpoints use no cookies, so any origin
            # may ask. Not for the authorize endpoint: a person's browser navigates there, never fetches.
            return web.Response(status=204, headers=_PREFLIGHT)
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            return oauth_error("invalid_request", f"use {allow}", 405, {"Allow": allow})
        try:
            return await handler(request)
        except StoreError as e:  # the detail names the database: for the log, not for anonymous clients
            log.warning("OAuth endpoint %s: the store failed: %s", request.path, e)
            return oauth_error("temporarily_unavailable", "the store is unavailable; try again", 503,
                               {"Retry-After": "1"})  # fmt: skip

    async def _server_metadata(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._metadata, content_type="application/json", headers=_PUBLIC)

    @staticmethod
    def _resource_metadata(doc: dict[str, Any]) -> Handler:
        body = json.dumps(doc).encode()

        async def answer(request: web.Request) -> web.StreamResponse:
            return web.Response(body=body, content_type="application/json", headers=_PUBLIC)

        return answer

    # ------------------------------------------------------------------ resource server (hot path)

    def client_ip(self, request: web.Request) -> str:
        return client_ip(request, self.sc.trusted_proxies)

    def may_fetch(self, request: web.Request) -> Callable[[], bool]:
        """For ``ClientRegistry.get``: may this caller have one more metadata document fetched?"""
        return lambda: self.fetch_gate.allow(self.client_ip(request))

    def claims(self, value: str) -> bool:
        """Does the credential look like one of this server's tokens (prefix test only)?"""
        return token_kind(self.prefix, value) is not None

    def challenge_headers(self, upstream_id: str, error: str | None = None) -> dict[str, str]:
        up = self.protected.get(upstream_id)
        return {"WWW-Authenticate": challenge(self.issuer, up, error)} if up is not None else {}

    def metadata_url(self, upstream_id: str) -> str | None:
        """The RFC 9728 metadata URL of a protected upstream (None: not protected by this server)."""
        up = self.protected.get(upstream_id)
        return metadata_url(self.issuer, up) if up is not None else None

    async def authenticate(
        self, credential: Credential, upstream_id: str, client_ip: str, scope: RequestScope | None = None
    ) -> KeyRecord:
        """The grant (child key) an access token stands for, or the contract's 401. ``scope.until``: the
        token's expiry, so the streams it opens end with it (a refreshed token's do not carry them on)."""
        headers = self.challenge_headers(upstream_id, "invalid_token")
        if credential.forms != ("bearer",):
            raise InvalidKey("an OAuth access token is accepted only in the Authorization: Bearer header", headers)
        value = credential.key
        d = digest(value)
        tok = self._access.get(d)
        verifier = self.sc.verifier
        if tok is None:
            bucket = throttle_bucket(client_ip)
            if not parse(self.prefix, value, ACCESS):
                raise verifier._refuse(bucket, verifier.steady(), InvalidKey("malformed access token", headers))
            try:
                tok = await self.sc.store.oauth_get(d)
            except StoreError as e:
                log.warning("access token lookup: the store failed: %s", e)
                raise ServiceUnavailable("the token store is unavailable") from None
            if tok is None or tok.kind != ACCESS:
                raise verifier._refuse(bucket, verifier.steady(), InvalidKey("unknown access token", headers))
            if len(self._access) >= MAX_CACHED_TOKENS:
                self._access.clear()
            self._access[d] = tok
        if tok.resource != upstream_id or upstream_id not in self.protected:
            raise InvalidKey("this access token was issued for another resource", headers)
        if tok.expires_at <= self.sc.expiry_clock():  # never going back: a step back revives no token
            raise ExpiredKey("this access token has expired", headers)
        now = verifier.clock()
        record = await self.grant_record(tok.key_id)
        if record is None:
            raise RevokedKey("this access token's grant has been revoked", headers)
        state = verifier.state(record, now)
        if state == "revoked":
            raise RevokedKey("this access token's grant has been revoked", headers)
        if state == "expired":
            raise ExpiredKey("this access token's grant has expired", headers)
        if scope is not None:
            scope.until = tok.expires_at
        return self.allowed_now(record)

    async def grant_record(self, key_id: str) -> KeyRecord | None:
        """The grant from the verifier's table, or (a fleet: a grant another replica made since this
        one's last poll, as for keys) from the store, with its parent."""
        verifier = self.sc.verifier
        record = verifier.table.get(key_id)
        if record is None:
            record = await verifier._lookup(key_id)
            if record is not None and record.parent_id is not None and record.parent_id not in verifier.table:
                await verifier._lookup(record.parent_id)
        return record

    def allowed_now(self, grant: KeyRecord) -> KeyRecord:
        """The grant narrowed to what its parent allows now (``grants.allowed_now``), recomputed only
        when the grant's or the parent's record changes: one dict lookup and two identity tests."""
        parent = self.sc.verifier.table.get(grant.parent_id or "")
        if parent is None:  # not an OAuth grant, or its parent is gone (then ``state`` says revoked)
            return grant
        hit = self._narrowed.get(grant.id)
        if hit is not None and hit[0] is grant and hit[1] is parent:
            return hit[2]
        if len(self._narrowed) >= MAX_CACHED_TOKENS:
            self._narrowed.clear()
        now = allowed_now(grant, parent)
        self._narrowed[grant.id] = (grant, parent, now)
        return now

    def remember(self, token: OAuthToken) -> None:
        """A freshly issued access token goes straight into the hot path's table."""
        if len(self._access) >= MAX_CACHED_TOKENS:
            self._access.clear()
        self._access[token.digest] = token


_PUBLIC = {"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"}
_PREFLIGHT = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, MCP-Protocol-Version",
    "Access-Control-Max-Age": "600",
}


async def _register(server: OAuthServer, request: web.Request) -> web.StreamResponse:
    from .clients import ClientError
    from .tokens import read_json

    if not server.register_gate.allow(server.client_ip(request)):
        return oauth_error("slow_down", "too many registrations from this address; try again in a minute", 429,
                           {"Retry-After": "60"})  # fmt: skip
    try:
        body = await read_json(request)
        answer = await server.clients.register(body)
    except ClientError as e:
        return oauth_error(e.error, e.description)
    return web.json_response(answer, status=201, headers={**NO_STORE, "Access-Control-Allow-Origin": "*"})
