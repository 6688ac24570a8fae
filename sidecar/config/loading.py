"""Reading the YAML file: strict loading (no duplicate keys), validation against ``file.ConfigFile``,
and the ``Config`` the sidecar runs on built from it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .file import ConfigFile, UpstreamSection, cross_checks, duplicates, literal_secrets
from .mcp_scale import McpSessions, mcp_sessions_from
from .models import env_values, expand_env, validate_model
from .postgres import PostgresStoreOptions, postgres_options
from .schema import (
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
)
from .units import ConfigError


def parse_config(
    data: object, env: Mapping[str, str] | None = None, base: Path | None = None, source: Path | None = None
) -> Config:
    """Validate a loaded YAML document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    base = base or Path.cwd()
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"expected a mapping, got {type(data).__name__}"])
    problems: list[str] = []
    literal_secrets(data or {}, problems)
    # ${VAR} in the options the sidecar knows (an unknown one is refused without reading it).
    known = ConfigFile.model_fields
    raw = {k: expand_env(v, env, str(k), problems) if k in known else v for k, v in (data or {}).items()}
    file = validate_model(ConfigFile, raw, "", problems, {"env": env, "base": base}, unknown_first=True)
    duplicates(raw, problems)
    if file is None:
        raise ConfigError(problems, env_values(data, env))
    cross_checks(file, problems, env)
    # What the file names in the environment, read once: checked here, handed to build.
    postgres = _postgres(file, env, problems)
    sealing = mcp_sessions_from(file.mcp_sessions, env, problems)
    if problems:
        raise ConfigError(problems, env_values(data, env))
    return build(file, env, base, source, postgres=postgres, sealing=sealing)


def _values(section: BaseModel, *leave: str) -> dict[str, Any]:
    """A section's options by name (but ``leave``): the runtime object's fields of the same names.

    So an option added to a ``Section`` model and, under the same name, to its dataclass
    reaches the sidecar with no line here; only what is resolved or renamed is spelled out.
    """
    return {name: getattr(section, name) for name in type(section).model_fields if name not in leave}


def _upstream(u: UpstreamSection, env: Mapping[str, str]) -> UpstreamConfig:
    return UpstreamConfig(
        **_values(u, "token_env", "token", "headers", "plex", "timeouts", "tls", "mcp"),
        token=u.token if u.token is not None else env.get(u.token_env or ""),
        headers=dict(u.headers),
        plex_client_identifier=u.plex.client_identifier,
        plex_product=u.plex.product,
        plex_version=u.plex.version,
        connect_timeout=u.timeouts.connect,
        read_timeout=u.timeouts.read,
        tls_verify=u.tls.verify,
        tls_ca_file=u.tls.ca_file,
        mcp_max_body=u.mcp.max_body,
        mcp_tool_limits=u.mcp.tool_rules,
    )


def _postgres(
    f: ConfigFile, env: Mapping[str, str], problems: list[str]
) -> tuple[PostgresStoreOptions | None, str | None]:
    """A postgres store's options (their defaults filled in) and the DSN they name."""
    given = {k: getattr(f.store, k) for k in PostgresStoreOptions.model_fields if getattr(f.store, k) is not None}
    return postgres_options(given, f.store.kind, problems, env)


def build(
    f: ConfigFile,
    env: Mapping[str, str],
    base: Path,
    source: Path | None = None,
    *,
    postgres: tuple[PostgresStoreOptions | None, str | None] = (None, None),
    sealing: McpSessions | None = None,
) -> Config:
    """What the sidecar runs on, from what a valid file says: secrets read from the environment,
    defaults that depend on other options filled in, an upstream's sub-sections flattened.
    A section without a dataclass of its own (a ``Section`` the ``Config`` field holds as is) passes through."""
    store_path = f.store.path or base / ("sidecar.db" if f.store.kind == "sqlite" else "keys.yaml")
    default_state = store_path if f.store.kind == "sqlite" else base / "sidecar-state.db"
    pg_options, pg_dsn = postgres
    built = dict(
        upstreams=tuple(_upstream(u, env) for u in f.upstreams),
        tls=TlsConfig(cert=f.tls.cert, key=f.tls.key) if f.tls else None,
        # A missing admin token is not an error: the admin API then answers 503 (health and metrics stay up).
        admin=AdminConfig(**_values(f.admin, "console"), token=env.get(f.admin.token_env) or None),
        console=f.admin.console,
        store=StoreConfig(**_values(f.store, "path", "state_path", "poll_interval", *PostgresStoreOptions.model_fields),
                          path=store_path, state_path=f.store.state_path or default_state,
                          poll_interval=f.store.poll_interval or (0.1 if f.store.kind == "postgres" else 0.5),
                          postgres=pg_options, dsn=pg_dsn),
        keys=KeysConfig(**_values(f.keys, "argon2"), argon2_profile=f.keys.argon2),
        credentials=CredentialsConfig(**_values(f.credentials)),
        rate_limits=RateLimitConfig(**_values(f.rate_limits)),
        cache=CacheConfig(max_bytes=f.cache.max_bytes, rules=tuple(
            CacheRule(**_values(r, "methods"), methods=r.methods or ("GET", "HEAD")) for r in f.cache.rules)),
        metrics=MetricsConfig(**_values(f.metrics)),
        log=LogConfig(**_values(f.log)),
        server=ServerConfig(**_values(f.server)),
        mcp_sessions=sealing or McpSessions(),
        cors=CorsConfig(enabled=f.cors.enabled, origins=f.cors.origins or ("*",)),
        source=source,
    )  # fmt: skip
    return Config(**{**_values(f), **built})


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
