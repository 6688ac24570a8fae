"""The proxy handler: one request, top to bottom, in the order of the product.

route → credential → verify → authorize → rate limit → cache hit → rewrite → cache
(miss, stale, coalescing) → forward → record.

Repeat hits (``HitMemo``): a request that ended in a plain cache hit leaves behind what
its route, credential and permission stages decided, under a digest of everything those
stages read (method, raw path and query, the three credential headers). The next
identical request re-checks only what can change — the key's record is still the one
in the table (revocation, expiry, permission edits and reloads replace or expire it),
the client is not throttled, the entry is still fresh and plain — then runs the rate
limiter and answers. Anything else goes the whole way, so the memo can only skip work,
never a decision: a cache hit costs about half of what it would otherwise.
Every stage is a call into its own module; this file only decides the order, so
the order lives in exactly one place.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from aiohttp import HttpVersion11, web
from multidict import CIMultiDict, MultiDict

from ..auth.credentials import (
    CLIENT_CREDENTIAL_HEADERS,
    Credential,
    extract_credential,
    strip_credential,
)
from ..auth.models import KeyRecord
from ..auth.nested import lenient_query, nested_refusal
from ..auth.permissions import allowed
from ..cache.policy import CacheKey, origin_of, request_bypass
from ..cache.response import OnHeaders
from ..config import CredentialsConfig, UpstreamConfig
from ..core.addresses import client_ip
from ..core.errors import (
    BadRequest,
    ExpiredKey,
    Forbidden,
    InvalidKey,
    InvalidToken,
    NoRoute,
    RevokedKey,
    ServiceUnavailable,
    SidecarError,
    Unauthorized,
)
from ..core.scope import SCOPE, RequestScope
from ..limits.ratelimit import RateDecision
from ..upstreams.mcp import WELL_KNOWN
from ..upstreams.plex import inject_plex
from ..upstreams.scrub import ScrubFilter, restrict_accept_encoding
from .accesslog import redact_path
from .browser import worker_refusal
from .canonical import canonical
from .forwarder import ResponseFilter, ResponseTap, forward_headers, strip_prefix_raw, upstream_url
from .keypath import KEY_IN_PATH, key_in_path, logged_path, presented_spellings
from .listener import odd_target
from .outbound import public_origin

if TYPE_CHECKING:
    from .host import PipelineHost  # what the pipeline reads of the application (Sidecar is one)

MAX_MEMO = 50_000  # remembered repeat-hit decisions (cleared when full)

__all__ = ["Decided", "HitMemo", "Router", "client_ip", "handle", "make_handler"]


class Router:
    """Longest ``path_prefix`` wins; ``/plex`` matches ``/plex`` and ``/plex/…``, not ``/plexx``."""

    def __init__(self, upstreams: tuple[UpstreamConfig, ...]) -> None:
        self._routes = sorted(upstreams, key=lambda u: len(u.path_prefix), reverse=True)

    def match(self, path: str) -> UpstreamConfig | None:
        for up in self._routes:
            p = up.path_prefix
            if p == "/" or path == p or path.startswith(p + "/"):
                return up
        return None


def make_handler(sc: PipelineHost) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The proxy listener's one handler (MCP's RFC 9728 metadata is the only path it answers itself)."""
    mcp = sc.mcp
    oauth = sc.oauth

    async def handler(base: web.BaseRequest) -> web.StreamResponse:
        request = cast(web.Request, base)  # the listener's request factory makes web.Requests
        if "Expect" in request.headers:
            await _expect(request)
        if oauth is not None and (answer := await oauth.route(request)) is not None:
            return answer  # OAuth metadata and endpoints (sidecar/oauth/server.py): an exact-path lookup
        if mcp is not None and request.method in ("GET", "HEAD") and request.path.startswith(WELL_KNOWN):
            return await mcp.well_known(request)
        return await handle(sc, request)

    return handler


async def _expect(request: web.Request) -> None:
    """``Expect: 100-continue`` answered at once, as aiohttp's router does for an Application.

    The client may then send its body; the upstream never sees the Expect (``forward_headers``).
    """
    if request.version != HttpVersion11:
        return
    if request.headers["Expect"].strip().lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="only Expect: 100-continue is supported")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # what follows is the response proper
    await request.writer.drain()


async def handle(sc: PipelineHost, request: web.Request) -> web.StreamResponse:
    scope = RequestScope(
        method=request.method,
        path=redact_path(request.raw_path),  # as the client sent it (like nginx's $request_uri)
        client_ip=client_ip(request, sc.trusted_proxies),
    )
    request[SCOPE] = scope
    sc.metrics.in_flight.inc()
    response: web.StreamResponse | None = None
    try:
        response = await _stages(sc, request, scope)
    except SidecarError as e:
        scope.error = e.code
        if isinstance(e, Unauthorized) and scope.upstream:
            e.headers.update(sc.challenge_headers(request, scope.upstream))
        elif isinstance(e, InvalidKey | ExpiredKey | RevokedKey) and scope.upstream:  # RFC 6750 §3: every 401
            for name, value in sc.challenge_headers(request, scope.upstream).items():
                e.headers.setdefault(name, value)  # a more precise challenge (an OAuth token's error=) stays
        elif isinstance(e, InvalidToken) and scope.upstream and (meta := sc.resource_metadata(request, scope.upstream)):
            e.at_resource(meta)  # a JWT that did not verify at an MCP route: where to find its IdP (RFC 9728)
        response = e.response()
    except asyncio.CancelledError:
        scope.error = scope.error or "client_disconnected"
        scope.status = scope.status or 499
        raise
    finally:
        if response is not None:
            scope.status = scope.status or response.status
            if not response.prepared and isinstance(response, web.Response):
                scope.bytes_sent = response.content_length or 0
        sc.metrics.in_flight.dec()
        sc.record(scope)
    return response


async def _stages(sc: PipelineHost, request: web.Request, scope: RequestScope) -> web.StreamResponse:
    cfg = sc.config
    if request.method == "CONNECT" or request.raw_path[:1] != "/":  # rare: two compares on the hot path
        refusal = odd_target(request)  # CONNECT, `OPTIONS *`, authority-form: 400, never forwarded
        if refusal is not None:
            raise refusal
    canon = canonical(request)  # one form for every stage: `//` collapsed, Connection-named headers gone
    memo = sc.hit_memo if canon is request else None  # the memo is keyed by the request as sent
    request = canon
    if "Service-Worker" in request.headers and (refusal := worker_refusal(request.rel_url.raw_path)) is not None:
        raise refusal  # a worker that would control the consent page and every upstream (http/browser.py)
    memo_key = b""
    if memo is not None and request.method in ("GET", "HEAD"):
        memo_key = memo.key(request)
        repeat = await _repeat_hit(sc, memo, memo_key, request, scope)
        if repeat is not None:
            return repeat
    # 1. route
    if sc.mcp is not None and sc.mcp.is_rest_call(request):
        return await sc.mcp.rest_call(sc, request, scope)
    upstream = sc.router.match(request.path)
    if upstream is None:
        if _withhold_key_path(request, scope, cfg.credentials, "/"):  # the key there: neither echoed nor logged
            raise NoRoute("no upstream serves this path")
        raise NoRoute(f"no upstream serves {request.path}")
    scope.upstream = upstream.id
    path = request.path
    if upstream.strip_prefix and upstream.path_prefix != "/":
        try:
            strip_prefix_raw(upstream, request.rel_url.raw_path)  # 400 now if the raw prefix is not the one routed
        except BadRequest:
            _withhold_key_path(request, scope, cfg.credentials, upstream.path_prefix)
            raise
        path = path[len(upstream.path_prefix) :] or "/"

    # 2. credential, 3. verify
    credential = extract_credential(request.headers, request.query, cfg.credentials)
    if credential is not None and credential.key in scope.path:  # a key under a parameter name we do not know
        scope.path = scope.path.replace(credential.key, "REDACTED")
    if credential is not None and "%25" in scope.path and key_in_path(credential.key, scope.path):
        scope.path = logged_path(upstream.path_prefix)  # encoded twice: the log's key filter cannot see it
    in_path = credential is not None and key_in_path(
        credential.key, request.rel_url.raw_path, presented_spellings(credential.forms, request.headers)
    )
    if in_path:  # invariant 3; decided before verifying, so a 401 does not log the key either
        scope.path = logged_path(upstream.path_prefix)  # the key may be there percent-encoded: withheld
    key = await _authenticate(sc, request, scope, upstream, path, credential)
    scope.key_id, scope.key_name = key.id, key.name
    # its streams end if any of these changes (app._key_granted): the upstream identity too, as they carry its token
    scope.granted = (key.permissions, hash(key.hash), key.upstream_token_env)
    if in_path:
        raise BadRequest(KEY_IN_PATH)  # before the limits, the cache and the upstream: refusals are free

    # 4. authorize
    reason = allowed(key.permissions, upstream.id, upstream.kind, request.method, path)
    if reason:
        raise Forbidden(reason)
    sessions: tuple[str, ...] = ()
    if upstream.kind == "plex":
        if request.query:
            _nested_urls_allowed(key, upstream, path, request, credential.key if credential else "")
        raw_query = request.rel_url.raw_query_string
        query_seen = (
            lenient_query(request.query.items(), raw_query) if ";" in raw_query else request.query
        )  # `a=1;session=S` too
        sessions = sc.transcode.ids(path, query_seen, request.headers)
        sc.transcode.check(sessions, key.id)  # claimed only once the limits let the request through
        if scope.credential == "transcode_session":  # no key: authorised by the session path alone
            sc.transcode.check_keyless(sessions, key.id, scope.client_ip)

    # 5. rate limit
    decision, on_headers = await _rate_limit(sc, key, upstream, scope)

    client_key = credential.key if credential else ""
    token = sc.upstream_token(upstream, key)
    response_filter: ResponseFilter | None = None
    if upstream.kind == "plex":
        if token is None:
            raise ServiceUnavailable(f"no upstream token is configured for upstream {upstream.id!r}")
        # the key only where the client would send it back to us: origin = what it used (scrub_urls)
        origin = public_origin(request, sc.trusted_proxies) if client_key else None
        response_filter = ScrubFilter(token, client_key or "REDACTED", origin=origin)

    # 6. cache: a fresh entry answers before anything is prepared for the upstream
    identity = token or ""
    rule = sc.cache.rule_for(upstream.id, request.method, path) if upstream.kind != "mcp" else None
    if rule is not None and request_bypass(request.method, request.headers) is None:
        primary = sc.cache.primary(request, upstream.id, rule, identity, client_key)
        hit = sc.cache.hit(request, scope, primary, identity, response_filter=response_filter, on_headers=on_headers)
        if hit is not None:
            if sessions:
                sc.transcode.claim(sessions, key.id, scope.client_ip)
            await sc.limiter.served_from_cache(key, upstream)  # gives the budget back unless count_cache_hits
            if memo_key and memo is not None and not rule.vary and sc.transcode.untracked(path):
                memo.remember(memo_key, Decided(key, upstream, primary, scope.path, scope.credential))
            return hit

    # 7. rewrite credentials for the upstream
    headers: CIMultiDict[str] = CIMultiDict(request.headers)
    query: MultiDict[str] = MultiDict(request.query)
    if upstream.kind == "plex":
        assert token is not None
        strip_credential(headers, query, client_key, token, lambda p: _may_get(key, upstream, p), cfg.keys.prefix)
        inject_plex(headers, query, upstream, token)
        restrict_accept_encoding(headers)  # only codings the ScrubFilter can undo
    else:
        strip_credential(headers, query, client_key, None, key_prefix=cfg.keys.prefix)
        for name, value in upstream.headers.items():
            headers[name] = value
    raw_path = request.rel_url.raw_path
    url = upstream_url(upstream, raw_path, query)
    headers = forward_headers(request, headers, upstream, sc.trusted_proxies)

    # 8. cache (miss, stale, coalescing), 9. forward
    async with sc.limiter.slot(key, upstream):
        if sessions:
            sc.transcode.claim(sessions, key.id, scope.client_ip)  # authorised, within its rate and concurrency limits
        if upstream.kind == "mcp" and sc.mcp is not None:
            return await sc.mcp.handle(sc, request, scope, upstream, key, url, headers, decision.headers)
        if rule is not None:

            async def fetch(tap: ResponseTap | None, tagged: OnHeaders) -> web.StreamResponse:
                return await sc.forwarder.forward(
                    request, scope, upstream, url, headers, response_filter=response_filter, on_headers=tagged, tap=tap
                )

            cached = await sc.cache.serve(
                request, scope, upstream, rule, path, url, headers, identity, client_key, fetch,
                response_filter=response_filter, on_headers=on_headers, waiting=lambda: sc.forwarder.waiting(scope),
            )  # fmt: skip
            if scope.cache in ("HIT", "STALE"):
                await sc.limiter.served_from_cache(key, upstream)  # gives the budget back unless count_cache_hits
            return cached
        return await sc.forwarder.forward(
            request, scope, upstream, url, headers, response_filter=response_filter, on_headers=on_headers
        )


def _withhold_key_path(request: web.Request, scope: RequestScope, creds: CredentialsConfig, prefix: str) -> bool:
    """A request refused before its credential is read (no route, a malformed prefix) whose target holds
    that credential: its path is logged withheld (True: it is in the path, the error must not quote it)."""
    try:
        credential = extract_credential(request.headers, request.query, creds)
    except SidecarError:
        return False
    if credential is None:
        return False
    spellings = presented_spellings(credential.forms, request.headers)
    in_path = key_in_path(credential.key, request.rel_url.raw_path, spellings)
    if in_path or ("%25" in scope.path and key_in_path(credential.key, scope.path)):  # or twice encoded in the query
        scope.path = logged_path(prefix)
    return in_path


def _may_get(key: KeyRecord, upstream: UpstreamConfig, path: str) -> bool:
    return allowed(key.permissions, upstream.id, upstream.kind, "GET", path) is None


def _nested_urls_allowed(
    key: KeyRecord, upstream: UpstreamConfig, path: str, request: web.Request, client_key: str
) -> None:
    """Plex fetches a nested ``url=`` (``/photo/:/transcode``) or transcodes a ``path=`` for the
    client: where that is on Plex itself, the key must be allowed to GET it too, or Plex would be
    its deputy (``sidecar.auth.nested``)."""
    perms, pairs, raw = key.permissions, request.query.items(), request.rel_url.raw_query_string
    if reason := nested_refusal(
        perms, upstream.id, upstream.kind, path, pairs, upstream.url, client_key, raw_query=raw
    ):
        raise Forbidden(reason)


@dataclass(frozen=True, slots=True)
class Decided:
    """What the stages before the cache decided for a request that ended in a cache hit."""

    record: KeyRecord
    upstream: UpstreamConfig
    primary: CacheKey
    logged_path: str
    credential: str  # the credential form(s), for the log


class HitMemo:
    """Repeat cache hits skip the stages whose inputs they repeat (see the module docstring).

    Keyed by a salted digest, so no client key is held in it; bounded (cleared when full).
    Off when an MCP upstream exists: the MCP gateway answers some paths before routing.
    """

    def __init__(self, max_entries: int = MAX_MEMO) -> None:
        self.max_entries = max_entries
        self._salt = os.urandom(16)
        self._decided: dict[bytes, Decided] = {}
        self.served = 0  # answers given from it (for tests and the curious)

    def key(self, request: web.Request) -> bytes:
        """Everything route, credential, permission and cache key read, digested: method, raw target, credential
        headers, the forwarded origin."""
        h = request.headers
        creds = (",".join(h.getall(n, ())) for n in CLIENT_CREDENTIAL_HEADERS)
        # The origin is part of the cache key (``cache.policy.primary_key``): a memo must not cross it.
        material = "\0".join((request.method, request.raw_path, *creds, origin_of(request.scheme, h)))
        # surrogatepass: aiohttp reads a header's non-UTF-8 byte as a lone surrogate (one byte, a 500 before)
        return hashlib.blake2b(material.encode("utf-8", "surrogatepass"), key=self._salt, digest_size=16).digest()

    def get(self, key: bytes) -> Decided | None:
        return self._decided.get(key)

    def remember(self, key: bytes, decided: Decided) -> None:
        if len(self._decided) >= self.max_entries:
            self._decided.clear()
        self._decided[key] = decided


async def _repeat_hit(
    sc: PipelineHost, memo: HitMemo, memo_key: bytes, request: web.Request, scope: RequestScope
) -> web.StreamResponse | None:
    """The cache's answer for a request that repeats a decided one, or None to go the whole way."""
    decided = memo.get(memo_key)
    if decided is None:
        return None
    record, upstream = decided.record, decided.upstream
    verifier = sc.verifier
    if verifier.table.get(record.id) is not record or verifier.state(record, verifier.clock()) != "active":
        return None  # replaced, revoked or expired: the full path says so to the client
    if verifier.throttled(scope.client_ip, verifier.steady()) > 0 or request_bypass(request.method, request.headers):
        return None
    entry = sc.cache.fresh(request, decided.primary)
    if entry is None or (upstream.kind == "plex" and not entry.plain):
        return None  # a miss, or an entry the client's ScrubFilter must rewrite
    scope.upstream, scope.path, scope.credential = upstream.id, decided.logged_path, decided.credential
    scope.key_id, scope.key_name = record.id, record.name
    # 5. rate limit: as on the full path, nothing is served before it allows the request
    _, on_headers = await _rate_limit(sc, record, upstream, scope)
    response = sc.cache.answer_unfiltered(request, scope, entry, on_headers)
    await sc.limiter.served_from_cache(record, upstream)
    memo.served += 1
    return response


async def _rate_limit(
    sc: PipelineHost, key: KeyRecord, upstream: UpstreamConfig, scope: RequestScope
) -> tuple[RateDecision, OnHeaders]:
    """Raise the limiter's refusal; else its decision and the hook that puts its headers on the answer."""
    decision = await sc.limiter.check(key, upstream)
    if not decision.allowed and decision.error is not None:
        scope.rate_limited = True
        raise decision.error

    def on_headers(status: int, out: CIMultiDict[str]) -> None:
        out.update(decision.headers)

    return decision, on_headers


async def _authenticate(
    sc: PipelineHost,
    request: web.Request,
    scope: RequestScope,
    upstream: UpstreamConfig,
    path: str,
    credential: Credential | None,
) -> KeyRecord:
    if credential is not None:
        scope.credential = ",".join(credential.forms)
        if sc.jwt is not None and sc.jwt.accepts(credential):  # xxx.yyy.zzz from a jwt: provider (auth/jwt.py)
            scope.credential = "jwt"
            return await sc.jwt.verify(credential.key, scope.client_ip, scope)
        if sc.oauth is not None and sc.oauth.claims(credential.key):  # an OAuth access token (sidecar/oauth/)
            return await sc.oauth.authenticate(credential, upstream.id, scope.client_ip, scope)
        return await sc.verifier.verify(credential.key, scope.client_ip)
    if upstream.kind == "plex":
        # Transcode segments come back without any key: they belong to the key that started the session.
        sid = sc.transcode.session_of(path)
        owner = sc.transcode.keyless_owner(sid, scope.client_ip) if sid else None  # from the player's address
        rec = sc.verifier.table.get(owner) if owner else None
        if rec is not None and sc.verifier.state(rec, sc.verifier.clock()) == "active":  # wall clock, latch, parent
            scope.credential = "transcode_session"
            return rec
    raise Unauthorized("an API key is required")
