"""The config file, declared once: every section and option as a typed, frozen pydantic model.

Validation, the "unknown option (expected one of: …)" hints and the JSON Schema
(``config.schema.json``, ``sidecar config schema``) all come from these classes. They hold
what the file *says*; ``loading`` builds from them what the sidecar *runs* on (``schema``).
Attribute docstrings become the schema's descriptions, which editors show.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from . import schema
from .console import ConsoleConfig
from .hosts import parse_allowed_host
from .jwt import JwtProvider, check_jwt
from .mcp_scale import McpSessionsSection, ToolLimits, parse_tool_limits
from .models import (
    BLANK_IS_DEFAULT,
    DURATION_SCHEMA,
    ONE_OR_MANY,
    SIZE_SCHEMA,
    Count,
    Duration,
    EnvName,
    ExistingFile,
    Item,
    LimitList,
    LimitValue,
    PositiveDuration,
    RelPath,
    Section,
    Size,
    Text,
    TextList,
    Wording,
    problem_at,
)
from .oauth import OAuthConfig, check_oauth
from .units import (
    check_prefix,
    parse_busy_timeout,
    parse_flush_interval,
    parse_header_size,
    parse_network,
    parse_public_url,
)
from .workers import WorkerCount

ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token
TOKEN_ENV_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")  # a name, or a prefix and one trailing *


def _checked(check: Any) -> Any:
    """An AfterValidator from ``check(value) -> problem or None``."""

    def run(value: Any) -> Any:
        problem = check(value)
        if problem:
            raise ValueError(problem)
        return value

    return AfterValidator(run)


def _listen(value: str) -> str | None:
    _, sep, port = value.rpartition(":")
    return None if sep and port.isdigit() and 0 <= int(port) <= 65535 else f"{value!r} is not host:port"


def _url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as e:
        raise ValueError(f"not a valid URL: {url!r} ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"must not carry a query or fragment: {url!r}")
    if "@" in parts.netloc:
        # A password here would be a secret in the file, sent in the clear as Host by accident,
        # and not among the values scrubbed from answers (those are upstreams[].headers).
        raise ValueError(
            "must not carry credentials (user:password@): put them in upstreams[].headers "
            "(Authorization: Basic ${VAR}), which come from the environment and are scrubbed from answers"
        )
    return url.rstrip("/")


def _prefix(prefix: str) -> str:
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"must start with '/': {prefix!r}")
    return "/" + prefix.strip("/")


def _header_value(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("a header value cannot contain a line break")
    if any((c < " " and c != "\t") or c == "\x7f" for c in value):  # RFC 9110 §5.5; both clients refuse a NUL
        raise ValueError("a header value cannot contain a control character")
    return value


def _methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    for m in methods:
        if m not in ("GET", "HEAD"):
            raise ValueError(f"only GET and HEAD are cacheable, not {m}")
    return methods


def _vary(headers: tuple[str, ...]) -> tuple[str, ...]:
    for h in headers:
        if h in schema.PER_CLIENT_HEADERS:
            raise ValueError(f"{h} is set per client by the sidecar: an answer varying on it cannot be shared")
    return headers


def _token_env_pattern(pattern: str) -> str | None:
    if TOKEN_ENV_PATTERN.match(pattern):
        return None
    return "expected a variable name or a prefix glob such as PLEX_TOKEN_*"


def _header_name(name: str) -> str | None:
    return None if HEADER_NAME_RE.match(name) else f"{name!r} is not a valid header name"


Listen = Annotated[Text, _checked(_listen), BLANK_IS_DEFAULT]
_ID_PROBLEM = "{input!r} must be lowercase letters, digits, '-' or '_'"
UpstreamId = Annotated[Text, Field(pattern=ID_RE.pattern, json_schema_extra={"pattern": ID_RE.pattern}),
                       Wording({"string_pattern_mismatch": _ID_PROBLEM})]  # fmt: skip
Headers = dict[Annotated[str, _checked(_header_name)], Annotated[str, AfterValidator(_header_value)]]
BusyTimeout = Annotated[float, BeforeValidator(parse_busy_timeout), DURATION_SCHEMA]
FlushInterval = Annotated[float, BeforeValidator(parse_flush_interval), DURATION_SCHEMA]
HeaderSize = Annotated[int, BeforeValidator(parse_header_size), SIZE_SCHEMA]
Status = Annotated[int, Field(ge=100, le=599)]
_NOT_STATUSES = ("tuple_type", "int_type", "greater_than_equal", "less_than_equal")
Network = Annotated[Item, AfterValidator(parse_network)]
Upper = Annotated[Item, AfterValidator(str.upper)]
Lower = Annotated[Item, AfterValidator(str.lower)]
OrDefault = Annotated[Text, BLANK_IS_DEFAULT]


class TlsSection(Section):
    """TLS on the proxy listener (PEM files). Off unless given."""

    cert: Annotated[ExistingFile, Wording({"missing": "required when tls is set"})]
    """Certificate (chain), PEM."""
    key: Annotated[ExistingFile, Wording({"missing": "required when tls is set"})]
    """Its private key, PEM, unencrypted."""


class AdminSection(Section):
    """The admin listener: /metrics, /healthz, /readyz and the admin API under /admin/."""

    listen: Listen = schema.DEFAULT_ADMIN_LISTEN
    """host:port of the admin listener (never the proxy's)."""
    token_env: OrDefault = schema.DEFAULT_ADMIN_TOKEN_ENV
    """Environment variable holding the admin API's bearer token; unset: the admin API answers 503."""
    console: ConsoleConfig = ConsoleConfig()
    """The web console at / of the admin listener (docs/console.md)."""
    allowed_hosts: Annotated[tuple[Annotated[Item, AfterValidator(parse_allowed_host)], ...], ONE_OR_MANY] = ()
    """Host names (or host:port) the admin listener answers to besides loopback names (DNS rebinding guard):
    the public name a proxy in front forwards as Host. Empty: loopback names only on a loopback listener."""


class StoreSection(Section):
    """Where keys live, and the state (usage, quotas, audit) beside them."""

    kind: Literal["sqlite", "yaml", "postgres"] = "sqlite"
    """sqlite (read-write), yaml (read-only keys file) or postgres (a fleet's shared store, docs/postgres.md)."""
    path: RelPath | None = None
    """The SQLite database or the YAML keys file. Default ./sidecar.db or ./keys.yaml."""
    state_path: RelPath | None = None
    """Mutable state. Default: the database itself (sqlite), ./sidecar-state.db (yaml)."""
    poll_interval: PositiveDuration | None = None
    """How often changes made by another process are picked up. Default 0.5s (postgres: 0.1s, a memory check
    until a NOTIFY arrives)."""
    busy_timeout: BusyTimeout = 5.0
    """How long a write waits for another writer's lock (10ms to 5m)."""
    usage_flush_interval: FlushInterval = 5.0
    """Time between writes of usage counts (100ms to 5m)."""
    # kind: postgres only (checked by config/postgres.py's postgres_options, which gives their defaults)
    dsn_env: str | None = None
    """postgres: the environment variable holding the postgresql:// DSN. Default SIDECAR_DATABASE_URL."""
    auto_migrate: bool | None = None
    """postgres: apply schema migrations at start. Default true."""
    resync_interval: PositiveDuration | None = None
    """postgres: full comparison with the database, the safety net behind LISTEN/NOTIFY. Default 60s."""
    pool_size: int | None = None
    """postgres: connections in the pool (1-100). Default 4."""
    connect_timeout: PositiveDuration | None = None
    """postgres: time to connect. Default 5s."""


class KeysSection(Section):
    """Keys: their prefix and the bounds on them."""

    prefix: Annotated[Text, _checked(check_prefix), BLANK_IS_DEFAULT] = schema.DEFAULT_KEY_PREFIX
    """Prefix of every key (1-16 lowercase letters, digits, '_'; never containing "http")."""
    max_lifetime: Duration | None = None
    """Longest lifetime a key may have, from its creation. Default: unlimited."""
    max_keys_per_owner: Count | None = None
    """Most active keys one owner may hold. Default: unlimited."""
    failed_attempts_per_minute: Count = 30
    """Failed key checks allowed per client address per minute before 429."""
    argon2: Literal["rfc9106_low_memory", "cheapest"] = "rfc9106_low_memory"
    """argon2id parameters: rfc9106_low_memory (production) or cheapest (tests only)."""
    upstream_token_envs: Annotated[tuple[Annotated[Item, _checked(_token_env_pattern)], ...], ONE_OR_MANY] = ()
    """Variables a key's upstream_token_env may name: names or a prefix with one trailing *."""
    stream_check_interval: PositiveDuration = 1.0
    """How often open streams are checked against the key table."""


class CredentialsSection(Section):
    """Which client credential forms are accepted."""

    apikey: bool = True
    """Authorization: ApiKey <key>"""
    bearer: bool = True
    """Authorization: Bearer <key>"""
    basic: bool = True
    """Authorization: Basic base64(anything:<key>)"""
    x_api_key: bool = True
    """x-api-key: <key>"""
    plex_header: bool = True
    """X-Plex-Token: <key>"""
    plex_query: bool = True
    """?X-Plex-Token=<key>"""


class PlexSection(Section):
    """Identity sent to Plex when the client sent none of its own."""

    client_identifier: OrDefault = schema.DEFAULT_PLEX_CLIENT_ID
    product: OrDefault = schema.DEFAULT_PLEX_PRODUCT
    version: OrDefault = schema.DEFAULT_PLEX_VERSION


class TimeoutsSection(Section):
    """Upstream timeouts."""

    connect: PositiveDuration = schema.DEFAULT_CONNECT_TIMEOUT
    """To open a connection (else 504)."""
    read: PositiveDuration = schema.DEFAULT_READ_TIMEOUT
    """Idle time between chunks, never a total."""


class UpstreamTlsSection(Section):
    """How an https upstream's certificate is checked."""

    verify: bool = True
    ca_file: ExistingFile | None = None
    """CA bundle (PEM) instead of the system's."""


class McpSection(Section):
    """Options of an MCP upstream."""

    max_body: Size = schema.DEFAULT_MCP_MAX_BODY
    """Largest JSON-RPC body (read whole to authorize it)."""
    tool_limits: Annotated[
        dict[str, Any],
        WithJsonSchema({"type": "object", "additionalProperties": {"anyOf": [
            {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}),
        Wording({"dict_type": "expected a mapping of tool name or glob to limits, got {type}"}),
    ] = Field(default_factory=dict)  # fmt: skip
    """Rate limits on tools/call per (key, upstream, tool): tool name or glob -> a limit or a list of them
    (e.g. search: 60/minute, "delete_*": 1/hour); the first matching glob, in file order, decides."""

    _tool_rules: ToolLimits = PrivateAttr(default_factory=ToolLimits)

    @model_validator(mode="after")
    def _tool_limits(self) -> McpSection:
        problems: list[str] = []
        self._tool_rules = parse_tool_limits(self.tool_limits, "tool_limits", problems)
        if problems:
            where, _, message = problems[0].partition(": ")
            raise problem_at(where, message)
        return self

    @property
    def tool_rules(self) -> ToolLimits:
        """``tool_limits`` as parsed (and checked) when the file was read: once, not again at build."""
        return self._tool_rules


class UpstreamSection(Section):
    """A server the sidecar fronts."""

    id: UpstreamId
    """Lowercase letters, digits, '-', '_'; unique."""
    kind: Literal["plex", "mcp"] = "plex"
    url: Annotated[Text, AfterValidator(_url)]
    """http(s)://host:port[/base path]; no query string."""
    path_prefix: Annotated[Text, AfterValidator(_prefix)] = "/"
    """Requests under this path go here; the longest matching prefix wins."""
    strip_prefix: bool = True
    """Drop path_prefix before forwarding."""
    token_env: EnvName | None = None
    """Environment variable with the upstream's real token (required for plex)."""
    token: Text | None = None
    """The same, written as ${VAR} (a literal secret is refused)."""
    headers: Headers = Field(default_factory=dict)
    """Extra headers sent upstream (values may use ${VAR})."""
    plex: PlexSection = PlexSection()
    timeouts: TimeoutsSection = TimeoutsSection()
    tls: UpstreamTlsSection = UpstreamTlsSection()
    max_body: Size = schema.DEFAULT_MAX_BODY
    """Largest request body; 0 = unlimited."""
    rate_limits: LimitList | None = None
    """Rate limits for keys that carry none of their own (overrides rate_limits.default)."""
    quota: LimitValue | None = None
    """Per-key quota on this upstream (overrides rate_limits.quota)."""
    concurrency: Count | None = None
    """Requests in flight per key on this upstream."""
    mcp: McpSection = McpSection()

    @model_validator(mode="after")
    def _plex_needs_a_token(self) -> UpstreamSection:
        if self.kind == "plex" and self.token_env is None and self.token is None:
            raise ValueError("a plex upstream needs token_env (the environment variable holding its X-Plex-Token)")
        return self


class RateLimitsSection(Section):
    """Default limits, and where their counters live."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: Text | None = None
    """Required for backend redis."""
    on_redis_error: Literal["allow", "deny"] = "allow"
    default: LimitList = ()
    """Limits for keys that carry none of their own."""
    quota: LimitValue | None = None
    concurrency: Count | None = None
    headers: bool = True
    """RateLimit-Policy, RateLimit and X-RateLimit-* on responses."""
    count_cache_hits: bool = True
    quota_flush_interval: FlushInterval = 2.0
    """Memory backend: time between writes of quota counts (100ms to 5m)."""

    @model_validator(mode="after")
    def _redis_needs_a_url(self) -> RateLimitsSection:
        if self.backend == "redis" and not self.redis_url:
            raise problem_at("redis_url", "required when backend is redis")
        return self


class CacheRuleSection(Section):
    """What may be cached: an upstream and a path glob."""

    upstream: Text
    """Upstream id."""
    path: Text
    """Glob over the path the upstream sees."""
    ttl: Duration
    """Freshness when the upstream's Cache-Control gives no max-age."""
    methods: Annotated[tuple[Upper, ...], ONE_OR_MANY, AfterValidator(_methods)] = ("GET", "HEAD")
    statuses: Annotated[
        tuple[Status, ...], Wording(dict.fromkeys(_NOT_STATUSES, "expected a list of HTTP status codes"))
    ] = schema.DEFAULT_CACHE_STATUSES
    max_object_bytes: Size = schema.DEFAULT_CACHE_MAX_OBJECT
    vary: Annotated[tuple[Lower, ...], ONE_OR_MANY, AfterValidator(_vary)] = ()
    """Request headers that vary an entry, besides the upstream's Vary."""
    stale_while_revalidate: Duration = 0.0
    stale_if_error: Duration = 0.0


class CacheSection(Section):
    """The response cache (nothing is cached unless a rule says so)."""

    max_bytes: Size = schema.DEFAULT_CACHE_MAX_BYTES
    rules: Annotated[tuple[CacheRuleSection, ...], BLANK_IS_DEFAULT] = ()
    """First matching rule wins."""


class MetricsSection(Section):
    max_key_series: Count = schema.DEFAULT_METRICS_MAX_KEYS
    """Keys beyond this many share the label key="other"."""


class LogSection(Section):
    access: OrDefault = "stdout"
    """stdout, off, or a file path."""
    level: Literal["debug", "info", "warning", "error"] = "info"


class ServerSection(Section):
    """Connection limits, shutdown, and what the sidecar believes of proxies."""

    shutdown_grace: Duration = schema.DEFAULT_SHUTDOWN_GRACE
    trusted_proxies: Annotated[tuple[Network, ...], ONE_OR_MANY] = ()
    """Proxies whose X-Forwarded-For is believed (CIDRs or addresses)."""
    header_timeout: PositiveDuration = schema.DEFAULT_HEADER_TIMEOUT
    max_header_size: HeaderSize = schema.DEFAULT_MAX_HEADER_SIZE
    body_idle_timeout: PositiveDuration = schema.DEFAULT_BODY_IDLE_TIMEOUT
    keepalive_timeout: PositiveDuration = schema.DEFAULT_KEEPALIVE_TIMEOUT
    public_url: Annotated[Text, AfterValidator(parse_public_url)] | None = None
    """The origin clients reach the sidecar at."""


class CorsSection(Section):
    enabled: bool = False
    origins: TextList = ("*",)


class ConfigFile(Section):
    """Sidecar's configuration file (sidecar.yaml)."""

    model_config = ConfigDict(title="Sidecar configuration")

    listen: Listen = schema.DEFAULT_LISTEN
    """Proxy listener for clients (host:port)."""
    tls: TlsSection | None = None
    admin: AdminSection = AdminSection()
    store: StoreSection = StoreSection()
    keys: KeysSection = KeysSection()
    credentials: CredentialsSection = CredentialsSection()
    rate_limits: RateLimitsSection = RateLimitsSection()
    upstreams: Annotated[
        tuple[UpstreamSection, ...],
        Field(json_schema_extra={"minItems": 1}),
        _checked(lambda ups: None if ups else "at least one upstream is required"),
        Wording({"missing": "at least one upstream is required",
                 "tuple_type": "expected a list of upstreams, got {type}",
                 "model_type": "expected an upstream mapping, got {type}"}),
    ]  # fmt: skip
    """What the sidecar fronts; at least one."""
    cache: CacheSection = CacheSection()
    metrics: MetricsSection = MetricsSection()
    log: LogSection = LogSection()
    server: ServerSection = ServerSection()
    cors: CorsSection = CorsSection()
    jwt: Annotated[tuple[JwtProvider, ...], Wording({"tuple_type": "expected a list of providers, got {type}"})] = ()
    """Identity providers whose JWTs are accepted as Bearer credentials (docs/jwt.md)."""
    oauth: OAuthConfig = OAuthConfig()
    """Sidecar as the OAuth 2.1 authorization server of its MCP upstreams (docs/oauth.md)."""
    mcp_sessions: McpSessionsSection = McpSessionsSection()
    """Keys that seal the Mcp-Session-Id handed to clients, so any worker or replica serves a session (docs/mcp.md)."""
    workers: WorkerCount = 1
    """Worker processes sharing the proxy port (auto: one per available CPU); 1: one process, no supervisor."""

    @field_validator("tls", mode="before")
    @classmethod
    def _empty_tls_is_none(cls, value: Any) -> Any:
        return value or None


def _upstreams(raw: dict[str, Any]) -> list[Any]:
    ups = raw.get("upstreams")
    return ups if isinstance(ups, list) else []


def literal_secrets(raw: dict[str, Any], problems: list[str]) -> None:
    """An upstream ``token`` must be ``${VAR}`` (before expansion): a literal would leak it into the file."""
    for i, up in enumerate(_upstreams(raw)):
        token = up.get("token") if isinstance(up, dict) else None
        if isinstance(token, str) and not re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", token.strip()):
            problems.append(f"upstreams[{i}].token: secrets come from the environment: use token_env: VAR or ${{VAR}}")


def duplicates(raw: dict[str, Any], problems: list[str]) -> None:
    """Upstream ids and path prefixes are unique (read from the raw file, so a broken upstream still counts)."""
    seen_ids: set[object] = set()
    seen_prefixes: dict[str, object] = {}
    for i, up in enumerate(_upstreams(raw)):
        if not isinstance(up, dict):
            continue
        uid = up.get("id") if isinstance(up.get("id"), str) else None
        given = up.get("path_prefix")
        prefix = "/" + (str(given) if isinstance(given, str | int | float) and given != "" else "/").strip("/")
        if uid is not None and uid in seen_ids:
            problems.append(f"upstreams[{i}].id: duplicate id {uid!r}")
        seen_ids.add(uid)
        if prefix in seen_prefixes:
            owner = seen_prefixes[prefix]
            problems.append(f"upstreams[{i}].path_prefix: {prefix!r} is already used by upstream {owner!r}")
        seen_prefixes[prefix] = uid


def cross_checks(f: ConfigFile, problems: list[str], env: Mapping[str, str]) -> None:
    """What one section alone cannot tell: checks across sections of a valid file."""
    if f.admin.listen == f.listen and not f.listen.endswith(":0"):
        problems.append(
            f"admin.listen: {f.listen!r} is also the proxy listener (listen); give the admin API its own port"
        )
    for i, pattern in enumerate(f.keys.upstream_token_envs):
        if fnmatchcase(f.admin.token_env, pattern):
            problems.append(
                f"keys.upstream_token_envs[{i}]: {pattern!r} allows the admin token's variable {f.admin.token_env}"
            )
    check_jwt(f.jwt, {u.id: u.kind for u in f.upstreams}, problems, env)
    check_oauth(f.oauth, [u.id for u in f.upstreams if u.kind == "mcp"], f.server.public_url, f.store.kind, problems)
    ids = {u.id for u in f.upstreams}
    for i, rule in enumerate(f.cache.rules):
        if rule.upstream not in ids:
            problems.append(f"cache.rules[{i}].upstream: no upstream with id {rule.upstream!r}")
