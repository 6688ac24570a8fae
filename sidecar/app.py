"""The application object: builds and owns everything, and runs both listeners.

``Sidecar`` holds the stores, verifier, limiter, cache, metrics, sessions and logs —
no globals, so tests build as many independent sidecars as they like, each with its
own Prometheus registry and clock. ``create_apps`` returns the proxy listener's
``web.Server`` and the admin ``web.Application``; ``serve`` runs them with a graceful
SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry

from .admin.manage import KeyManager
from .auth.models import KeyRecord
from .auth.verify import Verifier, reload_error_metric
from .cache.response import ResponseCache
from .clocks import HighWater, steady_clock
from .config import Config, UpstreamConfig
from .config.postgres import dsn_secrets
from .core.errors import SidecarError
from .core.redaction import url_secrets
from .core.scope import RequestScope
from .http.accesslog import AccessLog
from .http.forwarder import Forwarder, make_session
from .http.listener import GuardedAppRunner, guarded_server
from .http.pipeline import HitMemo, Router, make_handler
from .http.pool import ConnectionPool, pooled
from .http.streams import StreamRegistry
from .limits.carry import EditLocks
from .limits.ratelimit import RateLimiter
from .observe import logfilter
from .observe.looplag import LoopLag
from .observe.metrics import Metrics
from .observe.usage import UsageRecorder
from .store import Store, open_store
from .upstreams.mcp.scrub import mcp_secrets
from .upstreams.plex import TranscodeSessions

if TYPE_CHECKING:
    from .auth.jwt import JwtAuthenticator
    from .oauth.server import OAuthServer

__all__ = ["Sidecar", "bound_addresses", "create_apps", "running", "serve"]

log = logging.getLogger("sidecar")


class Sidecar:
    """Everything one running sidecar owns. Build with ``Sidecar(config)``, then ``await start()``."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        steady: Callable[[], float] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock  # wall: expiry, quota windows, audit and usage times
        self.steady = steady_clock(clock, steady)  # intervals: rate buckets, throttling, TTLs (sidecar.clocks)
        self.expiry_clock = HighWater(clock)  # never back: OAuth codes and tokens, JWTs, their streams' ends
        self.env = env if env is not None else dict(os.environ)
        self.metrics = Metrics(
            registry,
            max_key_series=config.metrics.max_key_series,
            clock=clock,
            upstreams=[u.id for u in config.upstreams],
            cached_upstreams=sorted({r.upstream for r in config.cache.rules}),
        )
        self.router = Router(config.upstreams)
        self.transcode = TranscodeSessions(clock=self.steady)
        self.trusted_proxies = tuple(ipaddress.ip_network(n, strict=False) for n in config.server.trusted_proxies)
        self.access_log = AccessLog(config.log.access)
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.cache = ResponseCache(config.cache, clock=self.steady, sessions=self.sessions)
        self.pools: dict[str, ConnectionPool] = {}  # plain-HTTP MCP upstreams: the lean client (http/pool.py)
        self.forwarder = Forwarder(self.sessions, self.pools)
        # Open streams per key, ended within a sweep of their key's revocation or expiry.
        self.streams = StreamRegistry(self._key_state, self.metrics.registry, self._key_granted)
        self.streams.clock = self.expiry_clock  # a stream's own end (an access token's, a JWT's): scope.until
        self.forwarder.streams = self.streams
        logfilter.install(self._secrets())
        # No repeat-hit shortcuts next to an MCP gateway: it answers some paths before routing.
        mcp = any(u.kind == "mcp" for u in config.upstreams)
        self.hit_memo: HitMemo | None = HitMemo() if config.cache.rules and not mcp else None
        self.mcp: McpGatewayLike | None = None
        self.jwt: JwtAuthenticator | None = None  # JWTs from identity providers (jwt:, auth/jwt.py)
        self.oauth: OAuthServer | None = None  # the OAuth authorization server (oauth.enabled)
        self._store: Store | None = None
        self._verifier: Verifier | None = None
        self._limiter: RateLimiter | None = None
        self.edit_locks = EditLocks()  # one key's limit edits one after another (limits.carry)
        self._usage: UsageRecorder | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.loop_lag = LoopLag(self.metrics.registry)  # sidecar_event_loop_lag_seconds
        self.ready = False
        self.shared_limits: Any = None  # a worker: the host's limiter state (sidecar.workers.limits)

    # Owned parts that exist only once started.
    @property
    def store(self) -> Store:
        assert self._store is not None, "Sidecar.start() first"
        return self._store

    @property
    def verifier(self) -> Verifier:
        assert self._verifier is not None, "Sidecar.start() first"
        return self._verifier

    @property
    def limiter(self) -> RateLimiter:
        assert self._limiter is not None, "Sidecar.start() first"
        return self._limiter

    @property
    def usage(self) -> UsageRecorder:
        assert self._usage is not None, "Sidecar.start() first"
        return self._usage

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background job owned by the app (cancelled on close)."""
        self._tasks.append(asyncio.create_task(coro))

    def limits_of(self, rec: KeyRecord) -> KeyRecord:
        """``rec`` with the limits that hold for it, for display: an OAuth grant's are its parent's now."""
        parent = self.verifier.table.get(rec.parent_id) if rec.parent_id else None
        if parent is None:
            return rec
        from .oauth.grants import with_parent_limits

        return with_parent_limits(rec, parent)

    def manager(self) -> KeyManager:
        return KeyManager(self.config, self.store, clock=self.clock, limiter=self._limiter, edit_locks=self.edit_locks)

    async def start(self) -> None:
        self._store = await open_store(self.config.store, max_lifetime=self.config.keys.max_lifetime, clock=self.clock)
        self._verifier = Verifier(
            self.store, self.config.keys, clock=self.clock, steady=self.steady, on_change=self._keys_changed
        )
        await self.verifier.load()
        reload_error_metric(self.verifier, self.config.store.kind, self.metrics.registry)
        self._limiter = RateLimiter(
            self.config,
            self.store,
            clock=self.clock,
            steady=self.steady,
            registry=self.metrics.registry,
            shared=self.shared_limits,
        )
        await self.limiter.start()
        self.metrics.quota_levels = self.limiter.quota_levels
        self.metrics.store_write_failures = self.store.write_failures
        self._usage = UsageRecorder(self.store, clock=self.clock, interval=self.config.store.usage_flush_interval)
        self.usage.start()
        for up in self.config.upstreams:
            self.sessions[up.id] = make_session(up)
            if pooled(up):
                self.pools[up.id] = ConnectionPool(up)
        if any(u.kind == "mcp" for u in self.config.upstreams):
            from .upstreams.mcp.gateway import McpGateway  # imported only when an MCP upstream exists

            self.mcp = McpGateway(self)
        if self.config.jwt:
            from .auth.jwt import JwtAuthenticator  # imported only when jwt: providers are configured

            self.jwt = JwtAuthenticator(
                self.config.jwt,
                env=self.env,
                clock=self.clock,
                steady=self.steady,
                registry=self.metrics.registry,
                throttle=self.verifier,  # bad tokens count against the address like bad keys
                expiry=self.expiry_clock,
            )
            self.jwt.start()
        if self.config.oauth.enabled:
            from .oauth.server import OAuthServer

            self.oauth = OAuthServer(self)
        self._tasks.append(asyncio.create_task(self.verifier.watch(self.config.store.poll_interval)))
        self._tasks.append(asyncio.create_task(self.streams.run(self.config.keys.stream_check_interval)))
        self._tasks.append(asyncio.create_task(self.loop_lag.run()))
        self._tasks.append(asyncio.create_task(self.metrics.watch_upstreams(self.config.upstreams)))
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.streams.close()
        if self.mcp is not None:
            await self.mcp.close()
        if self.jwt is not None:
            await self.jwt.close()
        await self.cache.close()
        for s in self.sessions.values():
            await s.close()
        self.sessions.clear()
        for pool in self.pools.values():
            await pool.close()
        self.pools.clear()
        if self._usage is not None:
            await self._usage.close()
        if self._limiter is not None:
            await self._limiter.close()
        if self._store is not None:
            await self._store.close()
        self.access_log.close()

    # ------------------------------------------------------------------ hooks

    def _keys_changed(self, records: list[KeyRecord], full: bool) -> None:
        if self._verifier is not None:
            self.metrics.set_keys(self._verifier.table.values(), self.clock())
        else:
            self.metrics.set_keys(records, self.clock())

    def record(self, scope: RequestScope) -> None:
        """Metrics, usage and the access log for one finished request."""
        self.metrics.observe(scope)
        if self._usage is not None:
            self._usage.record(scope)
        self.access_log.write(scope)

    def upstream_token(self, upstream: UpstreamConfig, key: KeyRecord) -> str | None:
        """The upstream credential for this key: its own mapped token (a Plex managed user) or the default.

        A mapped variable must be on ``keys.upstream_token_envs``: any other (a record written
        before the allow-list, or by hand into a YAML store) gets no token (503), never the
        variable's value — which could be any secret of the process.
        """
        env_name = key.upstream_token_env.get(upstream.id)
        if env_name:
            if not self.config.keys.token_env_allowed(env_name):
                return None
            return self.env.get(env_name) or None
        return upstream.token

    def _key_state(self, key_id: str) -> str:
        """``active``, ``revoked`` or ``expired`` as the verifier's table says now (gone counts as revoked)."""
        if self.jwt is not None and key_id.startswith("jwt:"):
            return self.jwt.state(key_id)  # a JWT subject: active while its latest token is
        record = self.verifier.table.get(key_id)
        if record is None:
            return "revoked"
        now = self.clock()
        return self.verifier.state(record, now)  # an OAuth grant's streams end with their token: scope.until

    def _key_granted(self, key_id: str) -> object:
        """What the key may reach now and with which secret, as the pipeline authorised it (``scope.granted``)."""
        record = self.verifier.table.get(key_id)
        if record is not None and record.parent_id is not None and self.oauth is not None:
            record = self.oauth.allowed_now(record)
        # hash(): a secret replaced under the same id (a keys-file edit) ends the old secret's streams;
        # Python's str hash, not the argon2 text, so no secret material sits in the request scope.
        # upstream_token_env: a stream relays with the upstream token of the identity it was opened under
        return (record.permissions, hash(record.hash), record.upstream_token_env) if record is not None else None

    def _secrets(self) -> list[str | None]:
        """Every secret this sidecar holds, for the log redactor."""
        out: list[str | None] = [self.config.admin.token]
        for up in self.config.upstreams:
            out.append(up.token)
            for name, value in up.headers.items():
                if any(w in name.lower() for w in ("auth", "token", "key", "secret", "cookie", "pass")):
                    out.extend((value, value.rpartition(" ")[2]))  # "Bearer xyz": the header and its token
            out.extend(mcp_secrets(up))  # every header the MCP answer scrubber counts as a credential, any name
        out.extend(v for k, v in self.env.items() if self.config.keys.token_env_allowed(k))
        out.extend(self.env.get(p.secret_env) for p in self.config.jwt if p.secret_env)  # HS* shared secrets
        out.extend(c.client_secret for c in self.config.oauth.clients)  # pre-registered OAuth clients
        out.extend(dsn_secrets(self.config.store.dsn))  # a postgres store's DSN and its password
        out.extend(self.config.mcp_sessions.texts)  # MCP session sealing keys, current and previous
        out.extend(url_secrets(self.config.rate_limits.redis_url))  # a Redis URL's password
        out.extend(s for p in self.config.jwt for s in url_secrets(p.jwks_url))  # a JWKS URL's password
        return out

    def challenge_headers(self, request: web.Request, upstream_id: str) -> dict[str, str]:
        if self.oauth is not None and (oauth := self.oauth.challenge_headers(upstream_id)):
            return oauth
        if self.mcp is not None:
            return self.mcp.challenge_headers(request, upstream_id)
        return {}

    def resource_metadata(self, request: web.Request, upstream_id: str) -> str | None:
        """The RFC 9728 metadata URL of an MCP upstream (an invalid JWT's 401 points at it), or None."""
        if self.oauth is not None and (url := self.oauth.metadata_url(upstream_id)):
            return url
        return self.mcp.metadata_url(request, upstream_id) if self.mcp is not None else None


class McpGatewayLike(Protocol):  # the piece of sidecar.upstreams.mcp.gateway the core relies on
    def is_rest_call(self, request: web.Request) -> bool: ...
    async def rest_call(self, sc: Sidecar, request: web.Request, scope: RequestScope) -> web.StreamResponse: ...
    async def handle(self, *args: Any) -> web.StreamResponse: ...
    def challenge_headers(self, request: web.Request, upstream_id: str) -> dict[str, str]: ...
    def metadata_url(self, request: web.Request, upstream_id: str) -> str | None: ...
    async def well_known(self, request: web.Request) -> web.StreamResponse: ...
    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None: ...
    async def close(self) -> None: ...


def create_apps(sc: Sidecar) -> tuple[web.Server, web.Application]:
    """The proxy listener (clients) and the admin app (metrics, health, admin API).

    The proxy has a single route (everything goes through the pipeline), so it runs on
    aiohttp's low-level ``web.Server``: no Application, router or match info to build
    per request, about 25 µs less per request on the bench machine (a tenth of a cache
    hit). ``handler_cancellation``: a client that goes away cancels its request, which
    closes the upstream request at once (MCP 2026-07-28 treats that as cancellation).
    """
    from .admin.api import create_admin_app

    # Head and body deadlines, the head-size cap and keep-alive: server.* (sidecar/http/listener.py).
    proxy = guarded_server(
        sc.config.server,
        make_handler(sc),
        request_factory=_request_factory(sc),
        handler_cancellation=True,
        access_log=None,
        # Request bodies go up as sent (DESIGN: no decompression). aiohttp decoded a gzip body and the
        # forwarder sent it with the client's Content-Encoding and Content-Length: cut and mislabelled.
        # The MCP gateway, which must read the JSON, decodes a copy itself (upstreams/mcp/jsonrpc.py).
        auto_decompress=False,
    )
    admin = create_admin_app(sc)
    if sc.config.console.enabled:
        from .console import mount  # the web console at / of the admin listener (docs/console.md)

        mount(admin, sc)
    if sc.oauth is not None:
        from .oauth.adminroutes import add_routes

        add_routes(admin, sc)  # grants and clients under /admin/oauth/
    return proxy, admin


def _request_factory(sc: Sidecar) -> Callable[..., web.Request]:
    """``web.Request``s with no app behind them; MCP's CORS hook runs as each response is prepared."""
    hook = sc.mcp.on_response_prepare if sc.mcp is not None else None

    class ProxyRequest(web.Request):
        async def _prepare_hook(self, response: web.StreamResponse) -> None:
            # Not aiohttp's "Python/3.x aiohttp/3.x" (versions help nobody but a scanner; aiohttp
            # has set it by now); an upstream's own Server header, relayed, stays.
            if response.headers.get("Server") == SERVER_SOFTWARE:
                response.headers["Server"] = "sidecar"
            if hook is not None:
                await hook(self, response)

    def make(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.Request:
        # client_max_size=0: bodies stream through; upstreams[].max_body is the limit.
        return ProxyRequest(message, payload, protocol, writer, task, protocol._loop, client_max_size=0)

    return make


class ProxyRunner(web.ServerRunner):
    """Closes websockets and event streams once the listener is closed, before the drain waits:
    they never finish by themselves, so they would hold the drain for its whole grace."""

    def __init__(self, server: web.Server, sc: Sidecar, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._sc = sc

    async def shutdown(self) -> None:
        await self._sc.forwarder.end_streams()


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


@contextlib.asynccontextmanager
async def running(sc: Sidecar, worker: Any = None) -> AsyncIterator[tuple[web.BaseRunner, web.AppRunner]]:
    """Start both listeners; on exit stop accepting, drain, and close everything.

    The drain follows what a load balancer expects: ``/readyz`` turns 503 first, the proxy
    listener closes (new connections are refused), requests in flight get up to
    ``server.shutdown_grace`` to finish, and only then do the admin listener, the upstream
    sessions and the store close.
    """
    proxy_runner: ProxyRunner | None = None
    admin_runner: web.AppRunner | None = None
    try:
        await sc.start()
        proxy, admin = create_apps(sc)
        if worker is not None:
            worker.started(sc, admin)  # host-wide concurrency slots; the console's recent requests
        proxy_runner = ProxyRunner(proxy, sc, shutdown_timeout=sc.config.server.shutdown_grace)
        admin_runner = GuardedAppRunner(admin, sc.config.server, access_log=None, shutdown_timeout=1.0)
        await proxy_runner.setup()
        await admin_runner.setup()
        ssl_ctx = None
        if sc.config.tls is not None:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(str(sc.config.tls.cert), str(sc.config.tls.key))
        host, port = _host_port(sc.config.listen)
        ahost, aport = _host_port(sc.config.admin.listen)
        if worker is not None:  # one of several processes on the port: sidecar.workers.worker
            await worker.bind(proxy_runner, admin_runner, host, port, ssl_ctx)
        for runner, where, h, p, ctx in (
            (proxy_runner, sc.config.listen, host, port, ssl_ctx),
            (admin_runner, sc.config.admin.listen, ahost, aport, None),
        )[: 0 if worker is not None else 2]:  # a worker has bound its own
            try:
                await web.TCPSite(runner, h, p, ssl_context=ctx, reuse_address=True).start()
            except OSError as e:
                raise SidecarError(f"cannot listen on {where}: {e.strerror or e}") from None
        yield proxy_runner, admin_runner
    finally:
        sc.ready = False  # /readyz says 503 while the proxy drains
        if proxy_runner is not None:
            await proxy_runner.cleanup()
        if admin_runner is not None:
            await admin_runner.cleanup()
        await sc.close()


def bound_addresses(runner: web.BaseRunner, tls: bool = False) -> list[str]:
    """``http://host:port`` for every socket a runner listens on (the real port when 0 was asked for)."""
    scheme = "https" if tls else "http"
    out = []
    for addr in runner.addresses:
        host, port = addr[0], addr[1]
        out.append(f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}")
    return out


async def serve(config: Config, *, ready: Callable[[Sidecar], None] | None = None, worker: Any = None) -> None:
    """Run until SIGTERM/SIGINT; then drain in-flight requests (up to the grace period) and return.

    ``worker``: this process is one of ``workers: N`` (``sidecar.workers.worker.WorkerRole``)."""
    sc = Sidecar(config)
    if worker is not None:
        worker.attach(sc)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, lambda: sc.spawn(sc.verifier.refresh(force=True)))
    banner = "sidecar listening on %s (admin %s)" if worker is None else f"worker {worker.index} listening on %s%.0s"
    try:
        async with running(sc, worker) as (proxy_runner, admin_runner):
            log.info(
                banner,
                ", ".join(bound_addresses(proxy_runner, tls=config.tls is not None)),
                ", ".join(bound_addresses(admin_runner)),
            )
            # What exists now (modules, config, the key table) lives as long as the process:
            # frozen, it is never walked again by the collector's full passes.
            gc.freeze()
            if ready:
                ready(sc)
            await stop.wait()
            log.info("shutting down: draining in-flight requests (up to %gs)", config.server.shutdown_grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
