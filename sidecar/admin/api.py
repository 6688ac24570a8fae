"""The admin listener: health, readiness, /metrics, and the admin API under /admin/.

Kept off the proxy listener entirely (its own app and port, loopback by default),
so /metrics and key management are never reachable by proxy clients. The admin API
takes the bearer admin token from the environment, or a key with ``admin``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler

from ..auth.credentials import extract_credential
from ..auth.identify import looks_like_jwt, not_for_admin
from ..auth.models import KeyRecord, iso
from ..config import UpstreamConfig, parse_duration
from ..config.json_schema import config_json_schema
from ..core.addresses import client_ip, foreign_page
from ..core.errors import BadRequest, Forbidden, NotFound, ServiceUnavailable, SidecarError, Unauthorized, error_body
from ..core.names import loads_unicode
from ..observe.logfilter import redact_path_keys
from ..observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..observe.usage import MAX_DAYS
from ..observe.usage import report as usage_report
from ..store import ReadOnlyStore, StoreBusy, StoreError
from ..store.base import AuditEvent
from ..upstreams import health as upstream_health
from .bodies import KeyInput, QuotaChange, Rotate, parse
from .delegation import manages_all, owns
from .hostguard import host_guard
from .openapi import MAX_AUDIT_LIMIT, openapi_spec

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..auth.verify import Verifier
    from ..cache.response import ResponseCache
    from ..config import Config
    from ..http.outbound import Networks
    from ..limits.ratelimit import RateLimiter
    from ..observe.metrics import Metrics
    from ..observe.usage import UsageRecorder
    from ..store import Store
    from .manage import KeyManager

__all__ = ["create_admin_app", "openapi_spec"]

ACTOR = web.RequestKey("admin_actor", str)
ACTOR_KEY = web.RequestKey("admin_actor_key", KeyRecord)  # absent for the admin token
UPSTREAM_CHECK_TIMEOUT = 1.0
# With workers: what the supervisor purged from every worker's cache before the admin API's purge ran.
PURGED_ELSEWHERE = web.RequestKey("admin_purged_elsewhere", int)
PUBLIC = frozenset({"/admin/openapi.json", "/admin/config.schema.json"})  # documents without secrets: no auth


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """A whole-number query parameter, given at most once, within [lo, hi]; 400 otherwise
    (never a 500 from a 30-digit number or a negative SQL ``LIMIT`` that means "all")."""
    values = request.query.getall(name, [])
    if not values:
        return default
    if len(values) > 1:
        raise BadRequest(f"{name}: give it once")
    v = values[0]
    if not (v.isascii() and v.isdigit() and len(v) <= 12 and lo <= int(v) <= hi):
        raise BadRequest(f"{name}: expected a whole number from {lo} to {hi}")
    return int(v)


def query_str(request: web.Request, name: str) -> str | None:
    """A text query parameter given at most once (a repeated one is ambiguous: 400)."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"{name}: give it once")
    return values[0] if values else None


def acting_key(request: web.Request) -> KeyRecord | None:
    """The key making an admin request, None for the admin token (sidecar.admin.delegation)."""
    return request.get(ACTOR_KEY)


def require_full_admin(request: web.Request) -> None:
    if not manages_all(acting_key(request)):
        raise Forbidden("this needs the admin token or a key with admin: full")


def ok(data: Any, status: int = 200) -> web.Response:
    # no-store: keys (shown once), key lists and audit are nobody's cache's business (as RFC 6749 §5.1 for tokens)
    return web.json_response({"success": True, "data": data}, status=status, headers={"Cache-Control": "no-store"})


class AdminHost(Protocol):
    """What the admin listener needs of the running application (``sidecar.app.Sidecar`` is one)."""

    @property
    def config(self) -> Config: ...
    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def ready(self) -> bool: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def store(self) -> Store: ...
    @property
    def verifier(self) -> Verifier: ...
    @property
    def limiter(self) -> RateLimiter: ...
    @property
    def usage(self) -> UsageRecorder: ...
    @property
    def cache(self) -> ResponseCache: ...
    @property
    def trusted_proxies(self) -> Networks: ...  # behind an ingress: failures counted per client, not per ingress
    def manager(self) -> KeyManager: ...
    def limits_of(self, rec: KeyRecord) -> KeyRecord: ...


log = logging.getLogger("sidecar.admin")
ROUTER_ERRORS = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def create_admin_app(sc: AdminHost) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except SidecarError as e:
            return e.response()
        except ReadOnlyStore as e:
            return web.json_response({"success": False, "error": {"code": "conflict", "message": str(e)}}, status=409)
        except StoreBusy as e:
            return ServiceUnavailable(str(e), {"Retry-After": "1"}).response()
        except StoreError as e:
            return ServiceUnavailable(str(e)).response()
        except web.HTTPException as e:  # aiohttp's own (no route, wrong method, body too big): the designed JSON
            if e.status not in ROUTER_ERRORS:
                raise
            body = error_body(ROUTER_ERRORS[e.status], e.reason)
            resp = web.Response(status=e.status, body=body, content_type="application/json")
            resp.headers["X-Content-Type-Options"] = "nosniff"
            if "Allow" in e.headers:
                resp.headers["Allow"] = e.headers["Allow"]
            return resp
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # a bug of ours: logged (redacted, as every record is), and the designed JSON 500
            log.exception("admin: %s %s failed", request.method, request.path)
            return SidecarError("internal error").response()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/admin/") or request.path in PUBLIC:
            return await handler(request)
        if foreign_page(request, sc.trusted_proxies):  # credentials a browser adds by itself (Basic) never act
            raise Forbidden("the admin API does not answer pages of other origins")
        token = sc.config.admin.token
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if (
            token
            and scheme.lower() == "bearer"
            and hmac.compare_digest(value.strip().encode("utf-8", "surrogatepass"), token.encode())
        ):
            request[ACTOR] = "admin"
            return await handler(request)
        cred = extract_credential(request.headers, request.query, sc.config.credentials)
        if cred is None:
            if not token:
                # Not "off": keys with the admin permission still manage keys (a deployment
                # without a master secret); only the token's way in is closed.
                raise ServiceUnavailable(
                    f"the admin token is not set ({sc.config.admin.token_env}): only a key with the admin"
                    " permission can use the admin API"
                )
            raise Unauthorized("the admin token (Authorization: Bearer …) is required", {"WWW-Authenticate": "Bearer"})
        ip = client_ip(request, sc.trusted_proxies)
        if looks_like_jwt(cred):  # never verified here: a JWT is never admin (counted like a forged key)
            raise sc.verifier.refuse(ip, not_for_admin())
        key = await sc.verifier.verify(cred.key, ip)
        if not key.permissions.admin:
            raise Forbidden("this key does not have the admin permission")
        request[ACTOR] = f"key:{key.id}"
        request[ACTOR_KEY] = key
        return await handler(request)

    guard = host_guard(sc.config.admin.listen, sc.config.admin.allowed_hosts)  # DNS rebinding (admin/hostguard.py)
    app = web.Application(middlewares=[*([guard] if guard else []), errors, auth])
    r = app.router

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        checks: dict[str, str] = {"config": "ok", "store": "ok" if sc.ready else "not loaded"}

        async def probe(up: UpstreamConfig) -> None:
            # Fresh on every call (name, TCP, TLS as a request would): nothing cached to go stale.
            result = checks[f"upstream:{up.id}"] = await upstream_health.check(up, UPSTREAM_CHECK_TIMEOUT)
            sc.metrics.set_upstream_up(up.id, 1 if result == "ok" else 0)

        await asyncio.gather(*(probe(up) for up in sc.config.upstreams))
        ready = all(v == "ok" for v in checks.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503
        )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=sc.metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def body_of(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        if (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):  # JSON is UTF-8 (RFC 8259 §8.1)
            raise BadRequest("the body is not valid JSON: send it as UTF-8")  # an unknown charset was a 500
        try:
            data = await request.json(loads=loads_unicode)  # a lone surrogate stored was a 500 (pages, CLI)
        except (ValueError, RecursionError):  # bad JSON or UTF-8, an int past Python's digits limit; [[[[…]]]]
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data

    async def applied() -> None:
        """Make a write visible to this process's hot path now, not at the next poll."""
        await sc.verifier.refresh()

    async def visible_key(request: web.Request) -> KeyRecord:
        """The key named in the path, if the caller may see it (a delegated key: its owner's only)."""
        rec = await sc.manager().get(request.match_info["id"])
        if not owns(acting_key(request), rec):
            raise NotFound(f"no key with id {rec.id!r}")
        return rec

    async def create_key(request: web.Request) -> web.Response:
        fields = await body_of(request)
        parse(KeyInput, fields)  # the shape; KeyManager judges the values, as for the CLI
        rec, key = await sc.manager().create(fields, request[ACTOR], by=acting_key(request))
        await applied()
        data = rec.public_dict()
        data["key"] = key
        return ok(data, 201)

    async def list_keys(request: web.Request) -> web.Response:
        by = acting_key(request)
        return ok([sc.limits_of(r).public_dict() for r in await sc.store.list_keys() if owns(by, r)])

    async def show_key(request: web.Request) -> web.Response:
        rec = sc.limits_of(await visible_key(request))  # a grant: its parent's limits and budget, which hold
        return ok({**rec.public_dict(), "quota_status": await sc.limiter.quota_status(rec)})

    async def key_quota(request: web.Request) -> web.Response:
        rec = await visible_key(request)
        require_full_admin(request)  # a reset widens what a key may spend, its own included
        body = await body_of(request)
        parse(QuotaChange, body)
        if not manages_all(await sc.manager().current_actor(acting_key(request), sc.clock())):  # after a slow body
            raise Forbidden("this needs the admin token or a key with admin: full")
        status = await sc.limiter.adjust_quota(rec, body)  # {"used": 0} resets, {"add": -500} tops up
        await sc.store.audit(AuditEvent(sc.clock(), request[ACTOR], "quota_adjusted", rec.id, body))
        return ok({"id": rec.id, "quota_status": status})

    async def patch_key(request: web.Request) -> web.Response:
        await visible_key(request)
        by = acting_key(request)
        fields = await body_of(request)
        parse(KeyInput, fields)
        rec = await sc.manager().patch(request.match_info["id"], fields, request[ACTOR], by=by)
        await applied()
        return ok(rec.public_dict())

    async def revoke_key(request: web.Request) -> web.Response:
        await visible_key(request)
        rec = await sc.manager().revoke(request.match_info["id"], request[ACTOR], by=acting_key(request))
        await applied()
        return ok(rec.public_dict())

    async def rotate_key(request: web.Request) -> web.Response:
        await visible_key(request)
        body = parse(Rotate, await body_of(request))
        try:
            grace = parse_duration(body.grace)
        except (ValueError, OverflowError) as e:
            raise BadRequest(f"grace: {e}") from None
        rec, key = await sc.manager().rotate(request.match_info["id"], request[ACTOR], grace, by=acting_key(request))
        await applied()
        data = rec.public_dict()
        data["key"] = key
        return ok(data, 201)

    async def key_usage(request: web.Request) -> web.Response:
        days = query_int(request, "days", 30, 1, MAX_DAYS)
        await sc.usage.flush()  # what was counted but not yet written: the answer is up to date
        rec = await visible_key(request)  # read after the flush: last_used is in the record
        try:
            data = await usage_report(sc.store, rec.id, days, sc.clock())
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return ok({"id": rec.id, "name": rec.name, "last_used_at": iso(rec.last_used_at),
                   "last_used_ip": rec.last_used_ip, **data})  # fmt: skip

    async def audit(request: web.Request) -> web.Response:
        limit = query_int(request, "limit", 100, 1, MAX_AUDIT_LIMIT)
        key_id = query_str(request, "key")
        by = acting_key(request)
        if key_id and not manages_all(by):
            rec = await sc.store.get(key_id)
            if rec is None or not owns(by, rec):
                raise NotFound(f"no key with id {redact_path_keys(key_id)!r}")  # a key given for its id: not echoed
        events = await sc.store.audit_log(key_id, limit)
        if not manages_all(by):  # a delegated key sees the trail of its owner's keys only
            mine = {r.id for r in await sc.store.list_keys() if owns(by, r)}
            events = [e for e in events if e.key_id in mine]
        return ok(
            [{"at": iso(e.at), "actor": e.actor, "action": e.action, "key": e.key_id, **e.detail} for e in events]
        )

    async def purge_cache(request: web.Request) -> web.Response:
        require_full_admin(request)
        upstream, path = query_str(request, "upstream"), query_str(request, "path")
        n = sc.cache.purge(upstream, path) + request.get(PURGED_ELSEWHERE, 0)
        detail = {k: v for k, v in (("upstream", upstream), ("path", path)) if v} | {"purged": n}
        await sc.store.audit(AuditEvent(sc.clock(), request[ACTOR], "cache_purged", None, detail))  # who emptied it
        return ok({"purged": n})

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_spec())

    async def config_schema(request: web.Request) -> web.Response:
        return web.json_response(config_json_schema())

    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_post("/admin/keys", create_key)
    r.add_get("/admin/keys", list_keys)
    r.add_get("/admin/keys/{id}", show_key)
    r.add_patch("/admin/keys/{id}", patch_key)
    r.add_delete("/admin/keys/{id}", revoke_key)
    r.add_post("/admin/keys/{id}/rotate", rotate_key)
    r.add_post("/admin/keys/{id}/quota", key_quota)
    r.add_get("/admin/keys/{id}/usage", key_usage)
    r.add_get("/admin/audit", audit)
    r.add_delete("/admin/cache", purge_cache)
    r.add_get("/admin/openapi.json", openapi)
    r.add_get("/admin/config.schema.json", config_schema)
    return app
