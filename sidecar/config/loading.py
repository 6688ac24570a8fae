"""Reading the YAML file: strict loading (no duplicate keys) and validation into ``Config``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .mcp_scale import parse_mcp_sessions, parse_tool_limits
from .reader import _ENV_RE, _HEADER_NAME_RE, _ID_RE, _TOKEN_ENV_PATTERN, _join, _Reader
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
)
from .units import (
    ConfigError,
    _busy_timeout,
    _flush_interval,
    check_prefix,
    parse_duration,
    parse_header_size,
    parse_limit,
    parse_network,
    parse_positive_duration,
    parse_public_url,
    parse_size,
)


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
    r.check_keys(mcp, _join(path, "mcp"), {"max_body", "tool_limits"})
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
        mcp_tool_limits=parse_tool_limits(mcp.get("tool_limits"), _join(path, "mcp.tool_limits"), r.problems),
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
            "mcp_sessions",
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

    mcp_sessions = parse_mcp_sessions(top.get("mcp_sessions"), r.env, r.problems)

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
        mcp_sessions=mcp_sessions,
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
