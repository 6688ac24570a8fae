"""Configuration: one YAML file parsed once into frozen, typed objects.

Declared once, with pydantic v2: ``file`` holds the file's structure as frozen, strict
``Section`` models (unknown options refused). Validation, every "unknown option (expected one
of: …)" hint and the JSON Schema (``config.schema.json``) come from those classes; operators
still get one message listing *every* problem with its YAML path (``upstreams[1].url: not an
http(s) URL``), as oauth2-proxy's validation does (``models.validate_section``).

Why two layers: the models say what the file *says*; the frozen, slotted dataclasses of
``schema`` are what the sidecar *runs* on, read on every request: secrets resolved from the
environment, relative paths made absolute, defaults that depend on other options filled in, an
upstream's ``plex``/``timeouts``/``tls``/``mcp`` sub-sections flattened. ``loading.build`` maps
one to the other once, at load; nothing is validated per request. Tests and code build the
dataclasses directly (``UpstreamConfig(id=…)``) without a file. A new option: a field on a
``Section`` model (validation and schema follow) and, if the sidecar reads it, a field on the
dataclass plus one line in ``build``.

Layout: ``file`` (the file's models, cross-section checks), ``models`` (the ``Section`` base,
value types, path-named errors), ``schema`` (the runtime dataclasses and defaults), ``units``
(value parsers: durations, sizes, limits, networks, key prefixes), ``loading`` (YAML in,
``Config`` out), ``json_schema`` (the published JSON Schema). Import from ``sidecar.config``.

Secrets never live in the file: ``token_env: NAME`` names an environment
variable, and any string may use ``${NAME}``; a missing variable is an error
that names it (never its value).
"""

from __future__ import annotations

from .loading import (
    load_config,
    parse_config,
)
from .schema import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_ADMIN_TOKEN_ENV,
    DEFAULT_BODY_IDLE_TIMEOUT,
    DEFAULT_CACHE_MAX_BYTES,
    DEFAULT_CACHE_MAX_OBJECT,
    DEFAULT_CACHE_STATUSES,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_KEY_PREFIX,
    DEFAULT_LISTEN,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MCP_MAX_BODY,
    DEFAULT_METRICS_MAX_KEYS,
    DEFAULT_PLEX_CLIENT_ID,
    DEFAULT_PLEX_PRODUCT,
    DEFAULT_PLEX_VERSION,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE,
    PER_CLIENT_HEADERS,
    AdminConfig,
    CacheConfig,
    CacheRule,
    Config,
    CorsConfig,
    CredentialsConfig,
    KeysConfig,
    LogConfig,
    MetricsConfig,
    RateLimitConfig,
    ServerConfig,
    StoreConfig,
    TlsConfig,
    UpstreamConfig,
    iter_secrets,
)
from .units import (
    PERIOD_SECONDS,
    ConfigError,
    Limit,
    check_prefix,
    parse_duration,
    parse_header_size,
    parse_limit,
    parse_network,
    parse_positive_duration,
    parse_public_url,
    parse_size,
)

__all__ = [
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_ADMIN_TOKEN_ENV",
    "DEFAULT_BODY_IDLE_TIMEOUT",
    "DEFAULT_CACHE_MAX_BYTES",
    "DEFAULT_CACHE_MAX_OBJECT",
    "DEFAULT_CACHE_STATUSES",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MCP_MAX_BODY",
    "DEFAULT_METRICS_MAX_KEYS",
    "DEFAULT_PLEX_CLIENT_ID",
    "DEFAULT_PLEX_PRODUCT",
    "DEFAULT_PLEX_VERSION",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_SHUTDOWN_GRACE",
    "PERIOD_SECONDS",
    "PER_CLIENT_HEADERS",
    "AdminConfig",
    "CacheConfig",
    "CacheRule",
    "Config",
    "ConfigError",
    "CorsConfig",
    "CredentialsConfig",
    "KeysConfig",
    "Limit",
    "LogConfig",
    "MetricsConfig",
    "RateLimitConfig",
    "ServerConfig",
    "StoreConfig",
    "TlsConfig",
    "UpstreamConfig",
    "check_prefix",
    "iter_secrets",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_header_size",
    "parse_limit",
    "parse_network",
    "parse_positive_duration",
    "parse_public_url",
    "parse_size",
]
