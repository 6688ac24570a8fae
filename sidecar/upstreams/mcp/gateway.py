"""The MCP gateway: Streamable HTTP and legacy SSE through the sidecar, tool by tool.

The pipeline has already routed, verified the key, checked upstream/method/path
and the rate limit when it calls :meth:`McpGateway.handle`; what is left is what
only an MCP-aware proxy can do:

* **Authorize from the body.** A POST's JSON-RPC body (bounded by
  ``upstreams[].mcp.max_body``) is parsed and every message — each element of a
  batch — is checked. ``Mcp-Method`` / ``Mcp-Name`` headers are compared with the
  body and a disagreement is refused; they are never trusted on their own.
* **Per-tool, per-resource, per-prompt permissions** (``sidecar/upstreams/mcp/authz.py``, where
  bodies are also parsed without stalling the loop). A ``tools/call``,
  ``resources/read`` / ``subscribe`` / ``unsubscribe``, ``prompts/get`` or
  ``completion/complete`` the key may not make is answered by
  the sidecar with a JSON-RPC error carrying the request's id (HTTP 200, so the
  client's session lives on). In a batch, the allowed elements go upstream and the
  refusals are merged into the upstream's answer (JSON array or SSE stream). On the
  legacy SSE transport the answer has to come down the event stream, so the
  forbidden call is sent up as a ``ping`` with the same id and its answer is
  replaced by the refusal on the way down: ordering stays natural and nothing is
  injected out of band.
* **Filtered lists.** ``tools/list``, ``resources/list``, ``resources/templates/list``
  and ``prompts/list`` results — JSON, or events in any SSE stream of the session —
  lose what the key may not use.
* **Sessions belong to keys** (``sidecar/upstreams/mcp/sessions.py``). An ``Mcp-Session-Id`` (or
  a legacy SSE session) is bound to the key that opened it; another key presenting it,
  in any form, is refused, and ambiguous forms (repeated, empty, header and query
  disagreeing) are a 400, since the upstream sees one credential for everybody.
* **Refusals are free.** A request refused here after the rate limiter ran (another
  key's session, a body whose every message is refused) gets its budget back.
* **The sidecar is the protected resource.** The upstream's 401 becomes a 502, its
  ``WWW-Authenticate`` and OAuth metadata never reach the client; 401s on MCP routes
  point at the sidecar's own RFC 9728 metadata.
* **Redirects and endpoints stay inside the prefix.** ``Location`` and the legacy
  ``endpoint`` event are mapped back under the upstream's ``path_prefix``.
* **CORS** for browser clients, and the PlexMCP-style **REST tool call**
  (``POST /mcp`` with ``{"mcp_id", "tool", "arguments"}``).

Streams are never buffered: the forwarder relays SSE without an idle timeout, and
the rewriters hold at most one incomplete event. A client that goes away cancels
the handler (``handler_cancellation``), which closes the upstream request at once —
MCP 2026-07-28 treats that as cancellation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ...auth.credentials import extract_credential
from ...auth.identify import key_or_jwt
from ...auth.models import KeyRecord
from ...auth.permissions import allowed, tool_allowed
from ...config import DEFAULT_MCP_MAX_BODY, UpstreamConfig
from ...core.addresses import public_base
from ...core.errors import (
    BadRequest,
    Forbidden,
    InvalidToken,
    NoRoute,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UpstreamUnavailable,
)
from ...core.names import join, valid
from ...core.scope import RequestScope
from . import WELL_KNOWN, cors
from .authz import BodyJudge, McpAccess
from .discovery import Discovery
from .encoding import decoded_body
from .eventids import LAST_EVENT_ID, open_last_event_id
from .filter import JsonRewriter, PendingIds, Policy, SseRewriter, client_path
from .jsonrpc import dumps, routing_headers
from .legacy import PingBudgets, post_legacy
from .response import GatewayFilter, answer_sent, single_answer
from .rest import CREDENTIAL_REJECTED, RestClient, answer_body, open_upstream, until_revoked
from .scrub import scrubbed
from .sealing import Sealer
from .sessions import SESSION_HEADER, McpSession, SessionTable, presented_ids
from .toollimits import ToolLimiter

if TYPE_CHECKING:
    from .host import GatewayHost

__all__ = ["REST_PATH", "WELL_KNOWN", "GatewayFilter", "McpGateway", "McpSession", "RestClient", "SessionTable"]

REST_PATH = "/mcp"  # the PlexMCP-style REST tool call, unless an upstream owns this exact prefix

_OAUTH_PATHS = ("/.well-known/oauth-", "/.well-known/openid-configuration")


# ----------------------------------------------------------------------------- gateway


class McpGateway:
    """Everything MCP-specific; built by ``Sidecar.start`` when an MCP upstream exists."""

    def __init__(self, sc: GatewayHost) -> None:
        self.sc = sc
        self.sessions = SessionTable()
        self.pings = PingBudgets()  # legacy SSE: refusal pings, per key (``legacy.pings_allowed``)
        self.sealer = Sealer.from_config(sc.config.mcp_sessions)  # Mcp-Session-Id travels sealed
        self.judge = BodyJudge()  # JSON-RPC bodies parsed and authorized without stalling the loop
        self.tool_limits = ToolLimiter(sc.limiter)  # upstreams[].mcp.tool_limits, per (key, upstream, tool)
        self.rest = RestClient(sc.sessions)
        self._bare_urls: dict[str, URL] = {}  # upstreams[].url -> its URL object (``_exact_url``)
        # POST /mcp is the REST call unless an upstream owns that exact prefix, or an MCP
        # upstream would serve it anyway (prefix "/": /mcp is then its Streamable HTTP endpoint).
        owner = sc.router.match(REST_PATH)
        self._rest_enabled = not any(u.path_prefix == REST_PATH for u in sc.config.upstreams) and (
            owner is None or owner.kind != "mcp"
        )
        self.discovery = Discovery(sc.config, REST_PATH if self._rest_enabled else None)
        self._rest_limit = max(
            (u.mcp_max_body for u in sc.config.upstreams if u.kind == "mcp"), default=DEFAULT_MCP_MAX_BODY
        )

    # ------------------------------------------------------------------ hooks the pipeline calls

    def is_rest_call(self, request: web.Request) -> bool:
        """Requests the gateway answers before routing: the REST tool call and CORS preflights."""
        if request.method == "OPTIONS" and self._is_preflight(request):
            return True
        return self._rest_enabled and request.method == "POST" and request.path == REST_PATH

    async def rest_call(self, sc: GatewayHost, request: web.Request, scope: RequestScope) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return self._preflight(request)
        return await self._rest(request, scope)

    async def handle(
        self,
        sc: GatewayHost,
        request: web.Request,
        scope: RequestScope,
        upstream: UpstreamConfig,
        key: KeyRecord,
        url: URL,
        headers: CIMultiDict[str],
        rate_headers: dict[str, str],
    ) -> web.StreamResponse:
        """One request on an MCP route, after auth, permission and rate limit."""
        sub = self._upstream_path(upstream, request.path)
        if sub.startswith(_OAUTH_PATHS):
            raise NoRoute("the upstream's OAuth metadata is not served here: the sidecar is the protected resource")
        unjudged = request.headers.get("Upgrade", "").lower() == "websocket" or (
            request.method != "POST" and request.body_exists
        )  # websocket frames and bodies on other methods go up as they are: only a POST body is judged
        if unjudged and (McpAccess.cached(key.permissions, upstream.id).restricted or upstream.mcp_tool_limits):
            await self.sc.limiter.refund(key, upstream)  # refusals are free
            raise Forbidden("this key's MCP access is limited: only POST bodies are judged, no websocket or other body")
        url = self._exact_url(upstream, request, url)
        headers["Accept-Encoding"] = "identity"  # bodies may need reading (tool lists)
        headers.popall("Content-Encoding", None)  # decoded to be judged (encoding.py): it goes up as judged
        if self._cors_origin(request) is not None:
            # The sidecar already vetted this origin; the SDK's DNS-rebinding guard would refuse it.
            headers.popall("Origin", None)

        def on_headers(status: int, out: CIMultiDict[str]) -> None:
            out.update(rate_headers)

        ids = presented_ids(request.headers, request.rel_url.raw_query_string)  # 400 for ambiguous forms
        try:
            session, legacy, sid = self.sessions.resolve(
                upstream.id, key.id, ids, post=request.method == "POST",
                unseal=partial(self._unseal, upstream.id, key.id),
            )  # fmt: skip
            if LAST_EVENT_ID in request.headers:  # sealed to the key whose stream it came down (eventids.py)
                open_last_event_id(self.sealer, upstream.id, key.id, request.headers, headers)
        except (BadRequest, Forbidden, NotFound):
            await self.sc.limiter.refund(key, upstream)  # refusals are free
            raise
        if session is not None and sid is not None:
            headers[SESSION_HEADER] = sid  # the upstream gets its own id, never the sealed one
        if request.method == "POST":
            return await self._post(
                request, scope, upstream, key, url, headers, on_headers, rate_headers, session, legacy
            )
        if request.method == "GET":  # whatever its Accept (the SDK takes */*, text/*, any case): filtered
            return await self._stream(request, scope, upstream, key, url, headers, on_headers, session)
        filt = GatewayFilter(self, upstream, key, sid=ids.header, upstream_sid=sid)
        response = await self.sc.forwarder.forward(
            request, scope, upstream, url, headers, response_filter=scrubbed(upstream, filt), on_headers=on_headers
        )
        if request.method == "DELETE" and session is not None and sid and 200 <= filt.status < 300:
            self.sessions.forget(upstream.id, "http", sid)
        return response

    def _unseal(self, upstream_id: str, owner: str, token: str) -> str:
        """The upstream's session id inside a sealed ``Mcp-Session-Id`` (``403`` another key's, ``404`` bad)."""
        return self.sealer.open_for(upstream_id, token, owner).sid

    def challenge_headers(self, request: web.Request, upstream_id: str) -> dict[str, str]:
        """``WWW-Authenticate`` for a 401 on an MCP route: where the sidecar's resource metadata lives."""
        meta = self.metadata_url(request, upstream_id)
        if meta is None:
            return {}
        return {"WWW-Authenticate": f'Bearer realm="sidecar", resource_metadata="{meta}", ApiKey realm="sidecar"'}

    def metadata_url(self, request: web.Request, upstream_id: str) -> str | None:
        return self.discovery.metadata_url(self.base_url(request), upstream_id)

    async def well_known(self, request: web.Request) -> web.StreamResponse:
        """RFC 9728 metadata naming the sidecar (not the upstream) as the protected resource (discovery.py)."""
        tail = request.path[len(WELL_KNOWN) :].rstrip("/")
        body = self.discovery.document(self.base_url(request), tail)
        if body is None:
            return NoRoute(f"no MCP resource at {tail}").response()
        return web.json_response(body, headers={"Cache-Control": "public, max-age=300"})

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """CORS headers on every answer of an MCP route (errors included, so browsers can read them)."""
        origin = self._cors_origin(request)
        if origin is not None and (self._is_mcp_path(request.path) or request.path.startswith(WELL_KNOWN)):
            cors.expose(response, origin)

    async def close(self) -> None:
        self.judge.close()
        await self.rest.close(self.sc.config.upstreams)

    # ------------------------------------------------------------------ helpers

    def base_url(self, request: web.Request) -> str:
        """The sidecar's public origin: ``server.public_url``, a trusted proxy's ``X-Forwarded-*``,
        else the listener's own address — never the client's ``Host`` (``core.addresses.public_base``)."""
        return public_base(request, self.sc.config.server.public_url, self.sc.trusted_proxies)

    def client_path(self, upstream: UpstreamConfig, location: str) -> str | None:
        return client_path(
            location, upstream_url=upstream.url, prefix=upstream.path_prefix, strip_prefix=upstream.strip_prefix
        )

    @staticmethod
    def _upstream_path(upstream: UpstreamConfig, path: str) -> str:
        if upstream.strip_prefix and upstream.path_prefix != "/":
            return path[len(upstream.path_prefix) :] or "/"
        return path

    def _exact_url(self, upstream: UpstreamConfig, request: web.Request, url: URL) -> URL:
        """``/mcp/tools`` → the upstream URL itself, not ``…/mcp/`` (the SDK would answer 307 to ``…/mcp``)."""
        exact = upstream.strip_prefix and upstream.path_prefix != "/" and request.path == upstream.path_prefix
        if exact and urlsplit(upstream.url).path not in ("", "/"):
            if query := url.raw_query_string:
                return URL(upstream.url + f"?{query}", encoded=True)
            if (bare := self._bare_urls.get(upstream.url)) is None:  # built once: every POST goes there
                bare = self._bare_urls[upstream.url] = URL(upstream.url, encoded=True)
            return bare
        return url

    @staticmethod
    async def _read_body(request: web.Request, limit: int) -> bytes:
        if limit and request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"MCP request body over the {limit}-byte limit")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if limit and size > limit:
                raise PayloadTooLarge(f"MCP request body over the {limit}-byte limit")
            chunks.append(chunk)
        coding = request.headers.getall("Content-Encoding", ())
        return decoded_body(b"".join(chunks), ", ".join(coding), limit) if coding else b"".join(chunks)

    @staticmethod
    def _json(obj: Any, status: int, headers: dict[str, str]) -> web.Response:
        return web.Response(status=status, body=dumps(obj), content_type="application/json", headers=headers)

    # ------------------------------------------------------------------ POST: the JSON-RPC body

    async def _post(
        self,
        request: web.Request,
        scope: RequestScope,
        upstream: UpstreamConfig,
        key: KeyRecord,
        url: URL,
        headers: CIMultiDict[str],
        on_headers: Callable[[int, CIMultiDict[str]], None],
        rate_headers: dict[str, str],
        session: McpSession | None,
        legacy: McpSession | None,
    ) -> web.StreamResponse:
        """A JSON-RPC POST: judged message by message; what the key may not do never goes up as asked."""
        raw = await self._read_body(request, upstream.mcp_max_body)
        access = McpAccess.cached(key.permissions, upstream.id)
        d = await self.judge.judge(raw, routing_headers(request.headers), access, legacy=legacy is not None)
        limited = None
        if d.calls and upstream.mcp_tool_limits:
            limited = await self.tool_limits.check(key, upstream, d.calls)
            if limited:  # judged again with those calls refused (rare: only when a tool is over its limit)
                d = await self.judge.judge(raw, routing_headers(request.headers), access, legacy=legacy is not None,
                                           limited=limited)  # fmt: skip
        del raw  # the decision holds what goes upstream
        if d.error is not None:
            # DESIGN's 400 bad_request, spoken as JSON-RPC so MCP clients can read it (docs/mcp.md).
            scope.error = "bad_request"
            return self._json(d.error.body(code="bad_request"), 400, rate_headers)
        scope.tool = join(dict.fromkeys(d.tools))  # a name's own ',' escaped: one name stays one
        if d.lists and not access.restricted and request.headers.get("MCP-Protocol-Version", "") < "2026":
            d.lists = []  # lists this key may see whole carry no cacheScope before 2026-07-28: nothing to read
        if d.denied:
            scope.error = "insufficient_permissions" if len(d.refused) + d.dropped > len(limited or ()) else (
                "rate_limit_exceeded"
            )  # fmt: skip
            if not d.kept:
                await self.sc.limiter.refund(key, upstream)  # nothing the client asked for went up: free

        # List answers are filtered on whichever channel they come down (this POST's answer,
        # the session's GET stream after a resumption, a legacy event stream): every session
        # the request names learns the ids, so filtering never depends on the form used.
        sessions = [s for s in (session, legacy) if s is not None]
        lists = PendingIds(max(1024, len(d.lists)))  # every list of the body keeps its mark
        for rid, method in d.lists:
            lists.add(rid, method)
            for s in sessions:
                s.lists.add(rid, method)
        refusals = (legacy.refusals,) if legacy is not None else ()
        policy = Policy(access, lists=(lists, *(s.lists for s in sessions)), refusals=refusals)
        if legacy is not None:
            return await post_legacy(self, request, scope, upstream, key, url, headers, on_headers, rate_headers, d,
                                     legacy, policy)  # fmt: skip

        answers = d.refused
        if d.forward is None:
            if not answers:
                return web.Response(status=202, headers=rate_headers)
            return self._json(answers if d.batch else answers[0], 200, rate_headers)
        if answers and not d.forward_has_request:
            # Upstream will say 202 for the notifications; the refusals still need an answer.
            await self._send_only(upstream, url, headers, d.forward, scope)
            return self._json(answers, 200, rate_headers)
        want = bool(d.lists) or bool(answers)
        filt = GatewayFilter(
            self,
            upstream,
            key,
            sid=request.headers.get(SESSION_HEADER),
            upstream_sid=headers.get(SESSION_HEADER),
            sse=partial(SseRewriter, policy, extra=answers) if want else None,
            json_body=(
                partial(JsonRewriter, policy, extra=answers, own=[rid for rid, _ in d.lists], batch=d.batch)
                if want
                else None
            ),
        )
        return await self.sc.forwarder.forward(
            request, scope, upstream, url, headers, body=d.forward, response_filter=scrubbed(upstream, filt),
            on_headers=on_headers, answered=answer_sent(d.single_id),
            as_json=single_answer(d.single_id) if "application/json" in request.headers.get("Accept", "") else None,
        )  # fmt: skip  # a JSON answer only to a client that said it takes one

    async def _send_only(
        self, upstream: UpstreamConfig, url: URL, headers: CIMultiDict[str], body: bytes, scope: RequestScope
    ) -> None:
        """POST notifications upstream and wait for the (bodiless) answer."""
        headers["Content-Length"] = str(len(body))
        started = time.perf_counter()
        resp = await open_upstream(self.sc.sessions[upstream.id], upstream, "POST", url, headers, body)
        scope.upstream_seconds = time.perf_counter() - started
        async with resp:
            if resp.status == 401:
                raise UpstreamUnavailable(CREDENTIAL_REJECTED)

    # ------------------------------------------------------------------ GET: event streams

    async def _stream(
        self,
        request: web.Request,
        scope: RequestScope,
        upstream: UpstreamConfig,
        key: KeyRecord,
        url: URL,
        headers: CIMultiDict[str],
        on_headers: Callable[[int, CIMultiDict[str]], None],
        session: McpSession | None,
    ) -> web.StreamResponse:
        """A session's GET stream (answers replayed after a resumption are filtered too) or a legacy SSE stream."""
        # Any GET stream may replay answers to requests this process never saw (a resumption, a sessionless
        # server's event store): a limited key's lists are also found by their shape.
        policy = Policy(McpAccess.cached(key.permissions, upstream.id), by_shape=True)
        legacy_sid: list[str] = []

        def endpoint(data: str) -> str:
            # The legacy transport's first event names the URL to POST messages to.
            sid = parse_qs(urlsplit(data).query)
            found = (sid.get("session_id") or sid.get("sessionId") or [""])[0]
            s = self.sessions.bind(upstream.id, "sse", found, key.id) if found else None
            if s is not None:
                policy.lists, policy.refusals, policy.by_shape = (s.lists,), (s.refusals,), True  # marks are shared
                legacy_sid.append(found)
            return self.client_path(upstream, data) or data

        if session is not None:
            policy.lists = (session.lists,)
        filt = GatewayFilter(
            self,
            upstream,
            key,
            sid=request.headers.get(SESSION_HEADER),
            upstream_sid=headers.get(SESSION_HEADER),
            sse=partial(SseRewriter, policy, endpoint=None if session is not None else endpoint),
        )
        try:
            return await self.sc.forwarder.forward(
                request, scope, upstream, url, headers, response_filter=scrubbed(upstream, filt), on_headers=on_headers
            )
        finally:
            for found in legacy_sid:
                self.sessions.forget(upstream.id, "sse", found)

    # ------------------------------------------------------------------ CORS

    def _cors_origin(self, request: web.Request) -> str | None:
        return cors.allowed_origin(self.sc.config.cors, request)

    def _is_mcp_path(self, path: str) -> bool:
        if self._rest_enabled and path == REST_PATH:
            return True
        up = self.sc.router.match(path)
        return up is not None and up.kind == "mcp"

    def _is_preflight(self, request: web.Request) -> bool:
        return (
            self.sc.config.cors.enabled
            and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers
            and self._is_mcp_path(request.path)
        )

    def _preflight(self, request: web.Request) -> web.Response:
        return cors.preflight(self.sc.config.cors, request)

    # ------------------------------------------------------------------ REST tool call

    async def _rest(self, request: web.Request, scope: RequestScope) -> web.StreamResponse:
        """``POST /mcp {"mcp_id", "tool", "arguments"}``: verify, authorize, limit, call, answer JSON."""
        sc = self.sc
        credential = extract_credential(request.headers, request.query, sc.config.credentials)
        if credential is None:
            raise Unauthorized("an API key is required")
        try:
            key = await key_or_jwt(sc, credential, scope)  # a JWT works here as on the MCP routes
        except InvalidToken as e:  # point the client at the REST resource's metadata, as the MCP routes do
            raise e.at_resource(f"{self.base_url(request)}{WELL_KNOWN}{REST_PATH}") from None
        scope.key_id, scope.key_name = key.id, key.name

        raw = await self._read_body(request, self._rest_limit)
        try:
            data = await self.judge.loads(raw)  # off the loop when large; deep nesting is a ValueError too
        except ValueError:
            raise BadRequest('the body must be JSON: {"mcp_id": …, "tool": …, "arguments": {…}}') from None
        if not isinstance(data, dict):
            raise BadRequest('the body must be a JSON object: {"mcp_id": …, "tool": …, "arguments": {…}}')
        mcp_id, tool, arguments = data.get("mcp_id"), data.get("tool"), data.get("arguments", {})
        if not isinstance(mcp_id, str) or not mcp_id:
            raise BadRequest("mcp_id: required (the id of an MCP upstream)")
        if not isinstance(tool, str) or not tool:
            raise BadRequest("tool: required (the name of the tool to call)")
        if not valid(tool):  # a lone surrogate: no sink could write it (core/names.py)
            raise BadRequest("tool: not valid Unicode")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise BadRequest("arguments: expected an object")
        unknown = set(data) - {"mcp_id", "tool", "arguments"}
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
        upstream = sc.config.upstream(mcp_id)
        if upstream is None or upstream.kind != "mcp":
            raise NoRoute(f"no MCP upstream with id {mcp_id!r}")
        scope.upstream, scope.tool = upstream.id, join((tool,))

        reason = allowed(key.permissions, upstream.id, upstream.kind, "POST", "/")
        if reason:
            raise Forbidden(reason)
        if not tool_allowed(key.permissions, upstream.id, tool):
            raise Forbidden(f"this key may not call tool {tool!r}")
        decision = await sc.limiter.check(key, upstream)
        if not decision.allowed and decision.error is not None:
            scope.rate_limited = True
            raise decision.error
        plan = self.tool_limits.plan(key, upstream, tool) if upstream.mcp_tool_limits else None
        if plan is not None:
            over = await sc.limiter.check_plan(key, plan)
            if not over.allowed and over.error is not None:
                await sc.limiter.refund(key, upstream)  # the call never went up: the request's budget is back
                scope.rate_limited = True
                over.error.message = over.error.message.replace("for this key", f"for tool {tool!r} and this key")
                raise over.error
        async with sc.limiter.slot(key, upstream):
            call = self.rest.call(upstream, tool, arguments, scope, key.id)  # the key's own session
            result = await until_revoked(sc.forwarder.streams, key.id, call)  # a streamed answer can run long
        body = answer_body(upstream, result)  # scrubbed: an echoed credential
        return web.Response(status=200, body=body, content_type="application/json", headers=decision.headers)
