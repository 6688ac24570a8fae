"""Configuration: one YAML file parsed once into frozen, typed objects.

Why hand-rolled instead of pydantic: the dependency budget is small, and what
operators need most is one message listing *every* problem with its YAML path
(``upstreams[1].url: not an http(s) URL``), as oauth2-proxy's validation does.
The small ``_Reader`` below collects problems instead of raising on the first.

Secrets never live in the file: ``token_env: NAME`` names an environment
variable, and any string may use ``${NAME}``; a missing variable is an error
that names it (never its value).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..auth.keys import check_prefix

__all__ = [
    "AdminConfig",
    "CacheConfig",
    "CacheRule",
    "Config",
    "ConfigError",
    "CorsConfig",
    "CredentialsConfig",
    "KeysConfig",
    "LogConfig",
    "MetricsConfig",
    "RateLimitConfig",
    "ServerConfig",
    "StoreConfig",
    "TlsConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_limit",
    "parse_network",
    "parse_positive_duration",
    "parse_size",
]

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

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOKEN_ENV_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")  # a name, or a prefix and one trailing *
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|TiB|K|M|G)?\s*$", re.IGNORECASE)
_LIMIT_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+\s*)?(second|minute|hour|day|week|month)s?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "k": 1024, "m": 1024**2, "g": 1024**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
PERIOD_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 604800,
    "month": 2592000,  # 30 days for rate-limit periods; a /month quota follows the calendar (sidecar/limits/quota.py)
}


class ConfigError(Exception):
    """Every problem found in a config file, one per line, each with its YAML path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def parse_duration(value: object) -> float:
    """``"30s"``, ``"5m"``, ``"90d"``, ``"250ms"`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 1h, 90d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration such as 30s, 5m, 1h, 90d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_positive_duration(value: object) -> float:
    """A duration that must be more than zero (timeouts, poll intervals)."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than 0")
    return seconds


def parse_public_url(value: object) -> str:
    """An origin such as ``https://sidecar.example``; returned without a trailing slash."""
    parts = urlsplit(str(value))
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None:
        raise ValueError(f"{value!r} is not an origin such as https://sidecar.example")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{value!r}: give the origin only (scheme, host and port), no path or query")
    return f"{parts.scheme}://{parts.netloc}"


def parse_header_size(value: object) -> int:
    """A request-head size cap: at least 1KiB (a smaller one refuses ordinary clients)."""
    size = parse_size(value)
    if size < 1024:
        raise ValueError("must be at least 1KiB")
    return size


def _busy_timeout(value: object) -> float:
    """``store.busy_timeout``: 10 ms to 5 minutes."""
    seconds = parse_duration(value)
    if not 0.01 <= seconds <= 300:
        raise ValueError("expected a duration from 10ms to 5m")
    return seconds


def _flush_interval(value: object) -> float:
    """``rate_limits.quota_flush_interval``, ``store.usage_flush_interval``: 100 ms to 5 minutes."""
    seconds = parse_duration(value)
    if not 0.1 <= seconds <= 300:
        raise ValueError("expected a duration from 100ms to 5m")
    return seconds


def parse_network(value: object) -> str:
    """A CIDR such as ``10.0.0.0/8`` or a single address; returned as written."""
    try:
        ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network such as 10.0.0.0/8 or 192.168.1.10") from None
    return str(value)


def parse_size(value: object) -> int:
    """``"64MiB"``, ``"1GB"``, ``"512KiB"`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size such as 512KiB, 64MiB, 1GiB")
    size = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    if size >= 2**63:  # "9999…9" would be inf, which int() refuses with OverflowError
        raise ValueError(f"{value!r} is too large")
    return int(size)


@dataclass(frozen=True, slots=True)
class Limit:
    """``count`` requests per ``period`` seconds; ``name`` is the policy name in headers."""

    count: int
    period: int
    name: str
    text: str


def parse_limit(value: object) -> Limit:
    """``"10/second"``, ``"600/minute"``, ``"10000/month"``, ``"5/10minutes"``."""
    m = _LIMIT_RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a limit such as 10/second, 600/minute, 10000/day")
    count = int(m.group(1))
    mult = int(m.group(2)) if m.group(2) else 1
    unit = m.group(3)
    if count <= 0 or mult <= 0:
        raise ValueError(f"{value!r}: the count and the period must be positive")
    name = unit if mult == 1 else f"{mult}{unit}"
    return Limit(count=count, period=PERIOD_SECONDS[unit] * mult, name=name, text=str(value).strip())


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: str = DEFAULT_ADMIN_LISTEN
    token_env: str = DEFAULT_ADMIN_TOKEN_ENV
    # Resolved from the environment at load; None disables the admin API (health and metrics stay).
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    kind: str = "sqlite"  # sqlite | yaml
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

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


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
    source: Path | None = None

    def upstream(self, upstream_id: str) -> UpstreamConfig | None:
        for u in self.upstreams:
            if u.id == upstream_id:
                return u
        return None


# --------------------------------------------------------------------------- parsing


class _Reader:
    """Walks a YAML mapping, collecting problems with their paths instead of raising."""

    def __init__(self, env: Mapping[str, str], base: Path) -> None:
        self.env = env
        self.base = base
        self.problems: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}" if path else msg)

    def mapping(self, value: object, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        return value

    def check_keys(self, data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for k in data:
            if k not in allowed:
                hint = ", ".join(sorted(allowed))
                self.err(_join(path, str(k)) or repr(k), f"unknown option (expected one of: {hint})")

    def expand(self, value: str, path: str) -> str:
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in self.env:
                self.err(path, f"environment variable {name} is not set")
                return ""
            return self.env[name]

        return _ENV_RE.sub(sub, value)

    def string(self, data: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str | None:
        if key not in data or data[key] is None:
            return default
        v = data[key]
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            self.err(_join(path, key), f"expected a string, got {type(v).__name__}")
            return default
        return self.expand(str(v), _join(path, key))

    def boolean(self, data: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        if key not in data or data[key] is None:
            return default
        v = data[key]
        if not isinstance(v, bool):
            self.err(_join(path, key), f"expected true or false, got {v!r}")
            return default
        return v

    def integer(
        self, data: Mapping[str, Any], key: str, path: str, default: int | None, minimum: int = 0
    ) -> int | None:
        if key not in data or data[key] is None:
            return default
        v = data[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            self.err(_join(path, key), f"expected a whole number >= {minimum}, got {v!r}")
            return default
        return v

    def choice(self, data: Mapping[str, Any], key: str, path: str, default: str, options: tuple[str, ...]) -> str:
        v = self.string(data, key, path, default)
        if v not in options:
            self.err(_join(path, key), f"expected one of {', '.join(options)}, got {v!r}")
            return default
        return v

    def parsed(self, data: Mapping[str, Any], key: str, path: str, fn: Any, default: Any) -> Any:
        if key not in data or data[key] is None:
            return default
        try:
            return fn(data[key])
        except ValueError as e:
            self.err(_join(path, key), str(e))
            return default

    def str_list(self, data: Mapping[str, Any], key: str, path: str) -> list[str]:
        if key not in data or data[key] is None:
            return []
        v = data[key]
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            self.err(_join(path, key), "expected a list")
            return []
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, str | int) or isinstance(item, bool):
                self.err(f"{_join(path, key)}[{i}]", "expected a string")
                continue
            out.append(self.expand(str(item), f"{_join(path, key)}[{i}]"))
        return out

    def limits(self, data: Mapping[str, Any], key: str, path: str) -> tuple[Limit, ...] | None:
        if key not in data or data[key] is None:
            return None
        out = []
        for i, item in enumerate(self.str_list(data, key, path)):
            try:
                out.append(parse_limit(item))
            except ValueError as e:
                self.err(f"{_join(path, key)}[{i}]", str(e))
        return tuple(out)

    def secret_env(self, data: Mapping[str, Any], key: str, path: str) -> str | None:
        """Resolve ``<key>: VAR`` naming an environment variable holding a secret."""
        name = self.string(data, key, path)
        if name is None:
            return None
        if name not in self.env:
            self.err(_join(path, key), f"environment variable {name} is not set")
            return None
        return self.env[name]

    def path_value(self, data: Mapping[str, Any], key: str, path: str, default: Path | None) -> Path | None:
        s = self.string(data, key, path)
        if s is None:
            return default
        try:
            p = Path(s).expanduser()
        except RuntimeError:  # ~user that does not exist, or no home directory
            self.err(_join(path, key), f"cannot expand {s!r}: no such home directory")
            return default
        return p if p.is_absolute() else self.base / p


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_listen(r: _Reader, value: str, path: str) -> None:
    _, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        r.err(path, f"{value!r} is not host:port")


def _upstream(r: _Reader, raw: object, path: str, rl_default: RateLimitConfig) -> UpstreamConfig | None:
    if not isinstance(raw, dict):
        r.err(path, f"expected an upstream mapping, got {type(raw).__name__}")
        return None
    d = r.mapping(raw, path)
    r.check_keys(
        d,
        path,
        {
            "id", "kind", "url", "path_prefix", "strip_prefix", "token_env", "token", "headers",
            "plex", "timeouts", "tls", "max_body", "rate_limits", "quota", "concurrency", "mcp",
        },
    )  # fmt: skip
    uid = r.string(d, "id", path)
    if uid is None:
        r.err(_join(path, "id"), "required")
        uid = "?"
    elif not _ID_RE.match(uid):
        r.err(_join(path, "id"), f"{uid!r} must be lowercase letters, digits, '-' or '_'")
    kind = r.choice(d, "kind", path, "plex", ("plex", "mcp"))
    url = r.string(d, "url", path)
    if url is None:
        r.err(_join(path, "url"), "required")
        url = "http://invalid"
    else:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
        except ValueError as e:
            r.err(_join(path, "url"), f"not a valid URL: {url!r} ({e})")
            parts = urlsplit("http://invalid")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            r.err(_join(path, "url"), f"not an http(s) URL: {url!r}")
        elif parts.query or parts.fragment or "?" in url or "#" in url:
            r.err(_join(path, "url"), f"must not carry a query or fragment: {url!r}")
        url = url.rstrip("/")
    prefix = r.string(d, "path_prefix", path, "/") or "/"
    if not prefix.startswith("/"):
        r.err(_join(path, "path_prefix"), f"must start with '/': {prefix!r}")
    prefix = "/" + prefix.strip("/")
    strip = r.boolean(d, "strip_prefix", path, True)
    token = r.secret_env(d, "token_env", path)
    if "token" in d:
        # Only ${VAR} may put a secret here; a literal would leak it into the file.
        raw_token = d["token"]
        if isinstance(raw_token, str) and not _ENV_RE.fullmatch(raw_token.strip()):
            r.err(_join(path, "token"), "secrets come from the environment: use token_env: VAR or ${VAR}")
        else:
            token = r.string(d, "token", path)
    if kind == "plex" and not token and "token_env" not in d and "token" not in d:
        r.err(path, "a plex upstream needs token_env (the environment variable holding its X-Plex-Token)")
    headers: dict[str, str] = {}
    hd = r.mapping(d.get("headers"), _join(path, "headers"))
    for hk, hv in hd.items():
        hp = f"{_join(path, 'headers')}.{hk}"
        if not _HEADER_NAME_RE.match(str(hk)):
            r.err(hp, f"{str(hk)!r} is not a valid header name")
            continue
        if not isinstance(hv, str):
            r.err(hp, "expected a string")
            continue
        value = r.expand(hv, hp)
        if "\r" in value or "\n" in value:
            r.err(hp, "a header value cannot contain a line break")
            continue
        headers[str(hk)] = value
    plex = r.mapping(d.get("plex"), _join(path, "plex"))
    r.check_keys(plex, _join(path, "plex"), {"client_identifier", "product", "version"})
    timeouts = r.mapping(d.get("timeouts"), _join(path, "timeouts"))
    r.check_keys(timeouts, _join(path, "timeouts"), {"connect", "read"})
    tls = r.mapping(d.get("tls"), _join(path, "tls"))
    r.check_keys(tls, _join(path, "tls"), {"verify", "ca_file"})
    mcp = r.mapping(d.get("mcp"), _join(path, "mcp"))
    r.check_keys(mcp, _join(path, "mcp"), {"max_body"})
    ca = r.path_value(tls, "ca_file", _join(path, "tls"), None)
    if ca is not None and not ca.is_file():
        r.err(_join(path, "tls.ca_file"), f"no such file: {ca}")
    plex_path = _join(path, "plex")
    tpath = _join(path, "timeouts")
    return UpstreamConfig(
        id=uid,
        kind=kind,
        url=url,
        path_prefix=prefix,
        strip_prefix=strip,
        token=token,
        headers=headers,
        plex_client_identifier=r.string(plex, "client_identifier", plex_path, DEFAULT_PLEX_CLIENT_ID)
        or DEFAULT_PLEX_CLIENT_ID,
        plex_product=r.string(plex, "product", plex_path, DEFAULT_PLEX_PRODUCT) or DEFAULT_PLEX_PRODUCT,
        plex_version=r.string(plex, "version", plex_path, DEFAULT_PLEX_VERSION) or DEFAULT_PLEX_VERSION,
        connect_timeout=r.parsed(timeouts, "connect", tpath, parse_positive_duration, DEFAULT_CONNECT_TIMEOUT),
        read_timeout=r.parsed(timeouts, "read", tpath, parse_positive_duration, DEFAULT_READ_TIMEOUT),
        tls_verify=r.boolean(tls, "verify", _join(path, "tls"), True),
        tls_ca_file=ca,
        max_body=r.parsed(d, "max_body", path, parse_size, DEFAULT_MAX_BODY),
        rate_limits=r.limits(d, "rate_limits", path),
        quota=r.parsed(d, "quota", path, parse_limit, None),
        concurrency=r.integer(d, "concurrency", path, None, minimum=1),
        mcp_max_body=r.parsed(mcp, "max_body", _join(path, "mcp"), parse_size, DEFAULT_MCP_MAX_BODY),
    )


def parse_config(
    data: object, env: Mapping[str, str] | None = None, base: Path | None = None, source: Path | None = None
) -> Config:
    """Validate a loaded YAML document; raise ConfigError listing every problem."""
    r = _Reader(os.environ if env is None else env, base or Path.cwd())
    top = r.mapping(data, "")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(r.problems)
    r.check_keys(
        top,
        "",
        {
            "listen", "tls", "admin", "store", "keys", "credentials", "upstreams", "rate_limits",
            "cache", "metrics", "log", "server", "cors",
        },
    )  # fmt: skip

    listen = r.string(top, "listen", "", DEFAULT_LISTEN) or DEFAULT_LISTEN
    _check_listen(r, listen, "listen")

    tls: TlsConfig | None = None
    if top.get("tls"):
        td = r.mapping(top["tls"], "tls")
        r.check_keys(td, "tls", {"cert", "key"})
        cert = r.path_value(td, "cert", "tls", None)
        key = r.path_value(td, "key", "tls", None)
        for name, file in (("cert", cert), ("key", key)):
            if file is None:
                r.err(f"tls.{name}", "required when tls is set")
            elif not file.is_file():
                r.err(f"tls.{name}", f"no such file: {file}")
        if cert and key:
            tls = TlsConfig(cert=cert, key=key)

    ad = r.mapping(top.get("admin"), "admin")
    r.check_keys(ad, "admin", {"listen", "token_env"})
    admin_listen = r.string(ad, "listen", "admin", DEFAULT_ADMIN_LISTEN) or DEFAULT_ADMIN_LISTEN
    _check_listen(r, admin_listen, "admin.listen")
    if admin_listen == listen and not admin_listen.endswith(":0"):
        r.err("admin.listen", f"{admin_listen!r} is also the proxy listener (listen); give the admin API its own port")
    token_env = r.string(ad, "token_env", "admin", DEFAULT_ADMIN_TOKEN_ENV) or DEFAULT_ADMIN_TOKEN_ENV
    # A missing admin token is not an error: the admin API then answers 503 (health and metrics stay up).
    admin = AdminConfig(listen=admin_listen, token_env=token_env, token=r.env.get(token_env) or None)

    sd = r.mapping(top.get("store"), "store")
    r.check_keys(sd, "store", {"kind", "path", "state_path", "poll_interval", "busy_timeout", "usage_flush_interval"})
    skind = r.choice(sd, "kind", "store", "sqlite", ("sqlite", "yaml"))
    spath = r.path_value(sd, "path", "store", None)
    if spath is None:
        spath = r.base / ("sidecar.db" if skind == "sqlite" else "keys.yaml")
    state_path = r.path_value(sd, "state_path", "store", None)
    if state_path is None:
        state_path = spath if skind == "sqlite" else r.base / "sidecar-state.db"
    store = StoreConfig(
        kind=skind,
        path=spath,
        state_path=state_path,
        poll_interval=r.parsed(sd, "poll_interval", "store", parse_positive_duration, 0.5),
        busy_timeout=r.parsed(sd, "busy_timeout", "store", _busy_timeout, 5.0),
        usage_flush_interval=r.parsed(sd, "usage_flush_interval", "store", _flush_interval, 5.0),
    )

    kd = r.mapping(top.get("keys"), "keys")
    r.check_keys(kd, "keys", {"prefix", "max_lifetime", "max_keys_per_owner", "failed_attempts_per_minute", "argon2",
                              "upstream_token_envs", "stream_check_interval"})  # fmt: skip
    token_envs = r.str_list(kd, "upstream_token_envs", "keys")
    for i, pattern in enumerate(token_envs):
        if not _TOKEN_ENV_PATTERN.match(pattern) or not pattern.strip("*"):
            r.err(f"keys.upstream_token_envs[{i}]", "expected a variable name or a prefix glob such as PLEX_TOKEN_*")
        elif fnmatchcase(token_env, pattern):
            r.err(f"keys.upstream_token_envs[{i}]", f"{pattern!r} allows the admin token's variable {token_env}")
    prefix = r.string(kd, "prefix", "keys", DEFAULT_KEY_PREFIX) or DEFAULT_KEY_PREFIX
    prefix_problem = check_prefix(prefix)
    if prefix_problem:
        r.err("keys.prefix", prefix_problem)
    keys = KeysConfig(
        prefix=prefix,
        max_lifetime=r.parsed(kd, "max_lifetime", "keys", parse_duration, None),
        max_keys_per_owner=r.integer(kd, "max_keys_per_owner", "keys", None, minimum=1),
        failed_attempts_per_minute=r.integer(kd, "failed_attempts_per_minute", "keys", 30, minimum=1) or 30,
        argon2_profile=r.choice(kd, "argon2", "keys", "rfc9106_low_memory", ("rfc9106_low_memory", "cheapest")),
        upstream_token_envs=tuple(token_envs),
        stream_check_interval=r.parsed(kd, "stream_check_interval", "keys", parse_positive_duration, 1.0),
    )

    cd = r.mapping(top.get("credentials"), "credentials")
    r.check_keys(cd, "credentials", {"apikey", "bearer", "basic", "x_api_key", "plex_header", "plex_query"})
    credentials = CredentialsConfig(
        **{f: r.boolean(cd, f, "credentials", True) for f in CredentialsConfig.__dataclass_fields__ if f in cd}
    )

    rd = r.mapping(top.get("rate_limits"), "rate_limits")
    r.check_keys(
        rd,
        "rate_limits",
        {
            "backend",
            "redis_url",
            "on_redis_error",
            "default",
            "quota",
            "concurrency",
            "headers",
            "count_cache_hits",
            "quota_flush_interval",
        },
    )
    backend = r.choice(rd, "backend", "rate_limits", "memory", ("memory", "redis"))
    redis_url = r.string(rd, "redis_url", "rate_limits")
    if backend == "redis" and not redis_url:
        r.err("rate_limits.redis_url", "required when backend is redis")
    rate_limits = RateLimitConfig(
        backend=backend,
        redis_url=redis_url,
        on_redis_error=r.choice(rd, "on_redis_error", "rate_limits", "allow", ("allow", "deny")),
        default=r.limits(rd, "default", "rate_limits") or (),
        quota=r.parsed(rd, "quota", "rate_limits", parse_limit, None),
        concurrency=r.integer(rd, "concurrency", "rate_limits", None, minimum=1),
        headers=r.boolean(rd, "headers", "rate_limits", True),
        count_cache_hits=r.boolean(rd, "count_cache_hits", "rate_limits", True),
        quota_flush_interval=r.parsed(rd, "quota_flush_interval", "rate_limits", _flush_interval, 2.0),
    )

    ups_raw = top.get("upstreams")
    upstreams: list[UpstreamConfig] = []
    if ups_raw is not None and not isinstance(ups_raw, list):
        r.err("upstreams", f"expected a list of upstreams, got {type(ups_raw).__name__}")
    elif not ups_raw:
        r.err("upstreams", "at least one upstream is required")
    else:
        for i, u in enumerate(ups_raw):
            up = _upstream(r, u, f"upstreams[{i}]", rate_limits)
            if up is not None:
                upstreams.append(up)
        seen_ids: set[str] = set()
        seen_prefixes: dict[str, str] = {}
        for i, up in enumerate(upstreams):
            if up.id in seen_ids:
                r.err(f"upstreams[{i}].id", f"duplicate id {up.id!r}")
            seen_ids.add(up.id)
            if up.path_prefix in seen_prefixes:
                r.err(
                    f"upstreams[{i}].path_prefix",
                    f"{up.path_prefix!r} is already used by upstream {seen_prefixes[up.path_prefix]!r}",
                )
            seen_prefixes[up.path_prefix] = up.id

    from ..cache.policy import PER_CLIENT_HEADERS  # imported here: cachepolicy imports this module

    cad = r.mapping(top.get("cache"), "cache")
    r.check_keys(cad, "cache", {"max_bytes", "rules"})
    rules: list[CacheRule] = []
    rules_raw = cad.get("rules") or []
    if not isinstance(rules_raw, list):
        r.err("cache.rules", "expected a list")
        rules_raw = []
    ids = {u.id for u in upstreams}
    for i, rr in enumerate(rules_raw):
        p = f"cache.rules[{i}]"
        rdict = r.mapping(rr, p)
        r.check_keys(
            rdict,
            p,
            {
                "upstream", "path", "ttl", "methods", "statuses", "max_object_bytes", "vary",
                "stale_while_revalidate", "stale_if_error",
            },
        )  # fmt: skip
        up_id = r.string(rdict, "upstream", p)
        if up_id is None:
            r.err(f"{p}.upstream", "required")
        elif up_id not in ids:
            r.err(f"{p}.upstream", f"no upstream with id {up_id!r}")
        glob = r.string(rdict, "path", p)
        if glob is None:
            r.err(f"{p}.path", "required")
        ttl = r.parsed(rdict, "ttl", p, parse_duration, None)
        if ttl is None and "ttl" not in rdict:
            r.err(f"{p}.ttl", "required")
        methods = tuple(m.upper() for m in r.str_list(rdict, "methods", p)) or ("GET", "HEAD")
        for m in methods:
            if m not in ("GET", "HEAD"):
                r.err(f"{p}.methods", f"only GET and HEAD are cacheable, not {m}")
        statuses: tuple[int, ...] = DEFAULT_CACHE_STATUSES
        if rdict.get("statuses") is not None:
            st = rdict["statuses"]
            if not isinstance(st, list) or not all(isinstance(s, int) and 100 <= s <= 599 for s in st):
                r.err(f"{p}.statuses", "expected a list of HTTP status codes")
            else:
                statuses = tuple(st)
        vary = tuple(h.lower() for h in r.str_list(rdict, "vary", p))
        for h in vary:
            if h in PER_CLIENT_HEADERS:
                r.err(f"{p}.vary", f"{h} is set per client by the sidecar: an answer varying on it cannot be shared")
        rules.append(
            CacheRule(
                upstream=up_id or "?",
                path=glob or "/",
                ttl=ttl or 0.0,
                methods=methods,
                statuses=statuses,
                max_object_bytes=r.parsed(rdict, "max_object_bytes", p, parse_size, DEFAULT_CACHE_MAX_OBJECT),
                vary=vary,
                stale_while_revalidate=r.parsed(rdict, "stale_while_revalidate", p, parse_duration, 0.0),
                stale_if_error=r.parsed(rdict, "stale_if_error", p, parse_duration, 0.0),
            )
        )
    cache = CacheConfig(
        max_bytes=r.parsed(cad, "max_bytes", "cache", parse_size, DEFAULT_CACHE_MAX_BYTES), rules=tuple(rules)
    )

    md = r.mapping(top.get("metrics"), "metrics")
    r.check_keys(md, "metrics", {"max_key_series"})
    metrics = MetricsConfig(
        max_key_series=r.integer(md, "max_key_series", "metrics", DEFAULT_METRICS_MAX_KEYS, minimum=1)
        or DEFAULT_METRICS_MAX_KEYS
    )

    ld = r.mapping(top.get("log"), "log")
    r.check_keys(ld, "log", {"access", "level"})
    log = LogConfig(
        access=r.string(ld, "access", "log", "stdout") or "stdout",
        level=r.choice(ld, "level", "log", "info", ("debug", "info", "warning", "error")),
    )

    svd = r.mapping(top.get("server"), "server")
    r.check_keys(
        svd, "server",
        {"shutdown_grace", "trusted_proxies", "header_timeout", "max_header_size", "body_idle_timeout",
         "keepalive_timeout", "public_url"},
    )  # fmt: skip
    trusted: list[str] = []
    for i, item in enumerate(r.str_list(svd, "trusted_proxies", "server")):
        try:
            trusted.append(parse_network(item))
        except ValueError as e:
            r.err(f"server.trusted_proxies[{i}]", str(e))
    server = ServerConfig(
        shutdown_grace=r.parsed(svd, "shutdown_grace", "server", parse_duration, DEFAULT_SHUTDOWN_GRACE),
        trusted_proxies=tuple(trusted),
        header_timeout=r.parsed(svd, "header_timeout", "server", parse_positive_duration, DEFAULT_HEADER_TIMEOUT),
        max_header_size=r.parsed(svd, "max_header_size", "server", parse_header_size, DEFAULT_MAX_HEADER_SIZE),
        body_idle_timeout=r.parsed(
            svd, "body_idle_timeout", "server", parse_positive_duration, DEFAULT_BODY_IDLE_TIMEOUT
        ),
        keepalive_timeout=r.parsed(
            svd, "keepalive_timeout", "server", parse_positive_duration, DEFAULT_KEEPALIVE_TIMEOUT
        ),
        public_url=r.parsed(svd, "public_url", "server", parse_public_url, None),
    )

    cod = r.mapping(top.get("cors"), "cors")
    r.check_keys(cod, "cors", {"enabled", "origins"})
    cors = CorsConfig(
        enabled=r.boolean(cod, "enabled", "cors", False), origins=tuple(r.str_list(cod, "origins", "cors")) or ("*",)
    )

    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        upstreams=tuple(upstreams),
        listen=listen,
        tls=tls,
        admin=admin,
        store=store,
        keys=keys,
        credentials=credentials,
        rate_limits=rate_limits,
        cache=cache,
        metrics=metrics,
        log=log,
        server=server,
        cors=cors,
        source=source,
    )


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last, silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # ``<<: *anchor`` merges; an explicit key may override what it brings
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. Relative paths in it resolve against its folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{p}: {where}not valid YAML: {getattr(e, 'problem', e)}"]) from None
    return parse_config(data, env=env, base=p.resolve().parent, source=p.resolve())


def iter_secrets(config: Config) -> Iterator[str]:
    """Every secret the config holds, so tests and log scrubbers can look for leaks."""
    if config.admin.token:
        yield config.admin.token
    for u in config.upstreams:
        if u.token:
            yield u.token
        yield from (v for v in u.headers.values() if v)
