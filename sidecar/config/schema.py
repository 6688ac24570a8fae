"""The config file's typed, frozen objects and their defaults (what the rest of the sidecar reads)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import urlsplit

from .console import ConsoleConfig
from .jwt import JwtProvider
from .mcp_scale import McpSessions, ToolLimits
from .oauth import OAuthConfig
from .postgres import PostgresStoreOptions, dsn_secrets
from .units import Limit

DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9188"
DEFAULT_ADMIN_TOKEN_ENV = "SIDECAR_ADMIN_TOKEN"
DEFAULT_KEY_PREFIX = "pmcp_"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 300.0
DEFAULT_MAX_BODY = 16 * 1024**3  # 16 GiB: camera uploads are large; 0 = unlimited
DEFAULT_MCP_MAX_BODY = 1024**2  # JSON-RPC bodies are read and parsed to authorize them (sidecar/upstreams/mcp/authz.py)
DEFAULT_SHUTDOWN_GRACE = 30.0
DEFAULT_HEADER_TIMEOUT = 10.0  # a whole request head, from its first byte (sidecar/http/listener.py)
DEFAULT_MAX_HEADER_SIZE = 64 * 1024  # a whole request head: request line and every header line
DEFAULT_BODY_IDLE_TIMEOUT = 30.0  # a request body that stops arriving for this long is a 408
DEFAULT_KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this
DEFAULT_CACHE_MAX_BYTES = 64 * 1024**2
DEFAULT_CACHE_MAX_OBJECT = 8 * 1024**2
DEFAULT_METRICS_MAX_KEYS = 1000
DEFAULT_CACHE_STATUSES = (200, 203, 204, 300, 301, 404, 410)
DEFAULT_PLEX_PRODUCT = "Sidecar"
DEFAULT_PLEX_VERSION = "1.0"
DEFAULT_PLEX_CLIENT_ID = "sidecar"

# Headers the sidecar sets from the client's address: an answer varying on them is per-client.
PER_CLIENT_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"})


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path


MIN_ADMIN_TOKEN = 32  # characters; openssl rand -hex 32 gives 64


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: str = DEFAULT_ADMIN_LISTEN
    token_env: str = DEFAULT_ADMIN_TOKEN_ENV
    # Host names besides loopback ones the admin listener answers to (admin/hostguard.py), normalized.
    allowed_hosts: tuple[str, ...] = ()
    # Resolved from the environment at load; None disables the admin API (health and metrics stay).
    token: str | None = field(default=None, repr=False)

    def weak_token(self) -> str | None:
        """Why the admin token is too short to resist guessing, or None. It is compared before the failed-attempt
        throttle, so that a throttled address (a NAT shared with an attacker) never locks the operator out; a
        guesser then learns from every answer, however throttled, and only the token's length protects it."""
        if self.token is None or len(self.token) >= MIN_ADMIN_TOKEN:
            return None
        return (
            f"the admin token ({self.token_env}) has {len(self.token)} characters: it must resist guessing on its own "
            f"(an operator is never throttled out); use {MIN_ADMIN_TOKEN} or more random ones (openssl rand -hex 32)"
        )


@dataclass(frozen=True, slots=True)
class StoreConfig:
    kind: str = "sqlite"  # sqlite | yaml | postgres
    path: Path = Path("./sidecar.db")
    # Mutable state (last used, usage, quotas, audit) always lives in SQLite: for a sqlite
    # store it is the same file; for a yaml store (often a read-only ConfigMap) a file of its own.
    state_path: Path = Path("./sidecar-state.db")
    # How often a running sidecar looks for changes made by another process (CLI, edit).
    poll_interval: float = 0.5
    # How long a write waits for another writer's lock (CLI, second sidecar) before it fails.
    busy_timeout: float = 5.0
    # Seconds between writes of usage counts and last-used times: a kill -9 forgets at most this long.
    usage_flush_interval: float = 5.0
    # kind postgres: its options (sidecar/config/postgres.py) and the DSN read from store.dsn_env.
    postgres: PostgresStoreOptions | None = None
    dsn: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class CredentialsConfig:
    """Which client credential forms are accepted (all on by default)."""

    apikey: bool = True  # Authorization: ApiKey <key>
    bearer: bool = True  # Authorization: Bearer <key>
    basic: bool = True  # Authorization: Basic base64(any:<key>)
    x_api_key: bool = True  # x-api-key: <key>
    plex_header: bool = True  # X-Plex-Token: <key>
    plex_query: bool = True  # ?X-Plex-Token=<key>


@dataclass(frozen=True, slots=True)
class KeysConfig:
    prefix: str = DEFAULT_KEY_PREFIX
    max_lifetime: float | None = None  # seconds; caps `expires` at creation
    max_keys_per_owner: int | None = None
    # Failed verifications allowed per client IP per minute before 429.
    failed_attempts_per_minute: int = 30
    # argon2id parameters; tests use the CHEAPEST profile.
    argon2_profile: str = "rfc9106_low_memory"  # or "cheapest" for tests
    # Variables a key's upstream_token_env may name (names or globs such as PLEX_TOKEN_*); none by default.
    upstream_token_envs: tuple[str, ...] = ()
    stream_check_interval: float = 1.0  # seconds between sweeps that end open streams of revoked keys

    def token_env_allowed(self, name: str) -> bool:
        """Only allow-listed variables may become an upstream credential (never the admin token's)."""
        return any(fnmatchcase(name, pattern) for pattern in self.upstream_token_envs)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    id: str
    kind: str  # plex | mcp
    url: str
    path_prefix: str = "/"
    # Remove path_prefix before forwarding (default for prefixes other than "/").
    strip_prefix: bool = True
    token: str | None = field(default=None, repr=False)  # plex: the real X-Plex-Token
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # injected upstream
    plex_client_identifier: str = DEFAULT_PLEX_CLIENT_ID
    plex_product: str = DEFAULT_PLEX_PRODUCT
    plex_version: str = DEFAULT_PLEX_VERSION
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT  # idle time between chunks, never total
    tls_verify: bool = True
    tls_ca_file: Path | None = None
    max_body: int = DEFAULT_MAX_BODY
    rate_limits: tuple[Limit, ...] | None = None  # overrides the global default
    quota: Limit | None = None
    concurrency: int | None = None  # max in-flight requests per key
    mcp_max_body: int = DEFAULT_MCP_MAX_BODY
    mcp_tool_limits: ToolLimits = field(default_factory=ToolLimits)  # per (key, upstream, tool) limits on tools/call

    @property
    def host(self) -> str:
        """The ``Host`` header (a URL with ``user:password@`` is refused at load)."""
        return _host(self.url)


@functools.lru_cache(maxsize=256)
def _host(url: str) -> str:
    """Cached: every forwarded request sets ``Host`` from it."""
    return urlsplit(url).netloc


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    backend: str = "memory"  # memory | redis
    redis_url: str | None = field(default=None, repr=False)
    on_redis_error: str = "allow"  # allow | deny
    default: tuple[Limit, ...] = ()
    quota: Limit | None = None
    concurrency: int | None = None
    headers: bool = True  # RateLimit-* and X-RateLimit-* on responses
    count_cache_hits: bool = True
    # Memory backend: seconds between writes of quota counts to the store. A crash (kill -9,
    # OOM, power loss) forgets at most this long of counting: the bound on a quota reset.
    quota_flush_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class CacheRule:
    upstream: str
    path: str  # glob
    ttl: float
    methods: tuple[str, ...] = ("GET", "HEAD")
    statuses: tuple[int, ...] = DEFAULT_CACHE_STATUSES
    max_object_bytes: int = DEFAULT_CACHE_MAX_OBJECT
    vary: tuple[str, ...] = ()  # request headers that vary the entry, besides the upstream's Vary
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    rules: tuple[CacheRule, ...] = ()


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    max_key_series: int = DEFAULT_METRICS_MAX_KEYS  # more keys fold into key="other"


@dataclass(frozen=True, slots=True)
class LogConfig:
    access: str = "stdout"  # stdout | off | a file path
    level: str = "info"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For is believed
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    body_idle_timeout: float = DEFAULT_BODY_IDLE_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    public_url: str | None = None  # the origin clients use (RFC 9728 metadata, WWW-Authenticate)


@dataclass(frozen=True, slots=True)
class CorsConfig:
    enabled: bool = False
    origins: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class Config:
    upstreams: tuple[UpstreamConfig, ...]
    listen: str = DEFAULT_LISTEN
    tls: TlsConfig | None = None
    admin: AdminConfig = AdminConfig()
    store: StoreConfig = StoreConfig()
    keys: KeysConfig = KeysConfig()
    credentials: CredentialsConfig = CredentialsConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    cache: CacheConfig = CacheConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    server: ServerConfig = ServerConfig()
    cors: CorsConfig = CorsConfig()
    oauth: OAuthConfig = field(default_factory=OAuthConfig)  # the OAuth 2.1 authorization server (sidecar/oauth/)
    source: Path | None = None
    jwt: tuple[JwtProvider, ...] = ()  # identity providers whose JWTs are accepted (config/jwt.py, docs/jwt.md)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)  # admin.console (sidecar/config/console.py)
    workers: int = 1  # worker processes on the proxy port (sidecar.workers); 1: no supervisor
    mcp_sessions: McpSessions = field(
        default_factory=McpSessions
    )  # keys that seal Mcp-Session-Id (upstreams/mcp/sealing.py)

    def upstream(self, upstream_id: str) -> UpstreamConfig | None:
        for u in self.upstreams:
            if u.id == upstream_id:
                return u
        return None


def iter_secrets(config: Config) -> Iterator[str]:
    """Every secret the config holds, so tests and log scrubbers can look for leaks."""
    if config.admin.token:
        yield config.admin.token
    yield from dsn_secrets(config.store.dsn)
    for u in config.upstreams:
        if u.token:
            yield u.token
        yield from (v for v in u.headers.values() if v)
    yield from config.mcp_sessions.texts
