"""Configuration: what is accepted, every error with its YAML path, and ``sidecar config check``.

Error cases are one table; each asserts the exact message an operator reads. The
documented example file and DESIGN.md's minimal file are checked as written, and every
option the parser knows (discovered from its own "unknown option" hints) must appear in
``config.example.yaml``.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import (
    DEFAULT_MAX_BODY,
    DEFAULT_READ_TIMEOUT,
    ConfigError,
    load_config,
    parse_config,
    parse_duration,
    parse_limit,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yaml"
ENV = {"PLEX_TOKEN": "plex-token-value", "SIDECAR_ADMIN_TOKEN": "admin-token-value", "MCP_TOKEN": "mcp-token-value"}

# DESIGN.md, "Configuration": "This minimal file must be accepted as written".
DESIGN_MINIMAL = """\
listen: 127.0.0.1:8080
admin:
  listen: 127.0.0.1:9188
  token_env: SIDECAR_ADMIN_TOKEN
store:
  kind: sqlite            # or yaml, with path: keys.yaml
  path: ./sidecar.db
upstreams:
  - id: plex
    kind: plex
    url: http://127.0.0.1:32400
    token_env: PLEX_TOKEN
    path_prefix: /
rate_limits:
  backend: memory         # or redis, with redis_url
  default: [100/second]
cache:
  max_bytes: 64MiB
  rules:
    - {upstream: plex, path: /library/sections*, ttl: 30s}
"""


def good() -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:8080",
        "upstreams": [{"id": "plex", "kind": "plex", "url": "http://127.0.0.1:32400", "token_env": "PLEX_TOKEN"}],
    }


def problems_of(cfg: object, env: dict[str, str] | None = None, base: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, env=ENV if env is None else env, base=base)
    return info.value.problems


# --------------------------------------------------------------------------- accepted


def test_design_minimal_config_is_accepted_as_written(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(DESIGN_MINIMAL)
    cfg = load_config(path, env={"PLEX_TOKEN": "t"})
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.admin.listen == "127.0.0.1:9188"
    assert cfg.admin.token is None  # not set: the admin API answers 503, the rest runs
    assert cfg.store.kind == "sqlite" and cfg.store.path == tmp_path / "sidecar.db"
    (plex,) = cfg.upstreams
    assert (plex.id, plex.kind, plex.url, plex.token, plex.path_prefix) == (
        "plex", "plex", "http://127.0.0.1:32400", "t", "/",
    )  # fmt: skip
    assert plex.read_timeout == DEFAULT_READ_TIMEOUT and plex.max_body == DEFAULT_MAX_BODY
    assert [lim.text for lim in cfg.rate_limits.default] == ["100/second"]
    assert cfg.cache.max_bytes == 64 * 1024**2
    (rule,) = cfg.cache.rules
    assert (rule.upstream, rule.path, rule.ttl) == ("plex", "/library/sections*", 30.0)


def test_defaults_and_units() -> None:
    cfg = parse_config(good(), env=ENV)
    assert cfg.admin.listen == "127.0.0.1:9188" and cfg.admin.token == ENV["SIDECAR_ADMIN_TOKEN"]
    assert cfg.credentials.plex_query and cfg.credentials.basic
    up = cfg.upstreams[0]
    assert up.connect_timeout == 10 and up.read_timeout == 300 and up.tls_verify
    cfg = good()
    cfg["upstreams"][0].update(
        {"timeouts": {"connect": "250ms", "read": "5m"}, "max_body": "1.5GiB", "path_prefix": "/plex/"}
    )
    cfg["credentials"] = {"basic": False}
    cfg["server"] = {"trusted_proxies": ["10.0.0.0/8", "192.168.1.10"], "shutdown_grace": "1m"}
    parsed = parse_config(cfg, env=ENV)
    up = parsed.upstreams[0]
    assert (up.connect_timeout, up.read_timeout, up.max_body, up.path_prefix) == (
        0.25,
        300.0,
        3 * 1024**3 // 2,
        "/plex",
    )
    assert not parsed.credentials.basic and parsed.credentials.bearer
    assert parsed.server.trusted_proxies == ("10.0.0.0/8", "192.168.1.10") and parsed.server.shutdown_grace == 60


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("90d", 90 * 86400), ("2w", 14 * 86400), ("250ms", 0.25), (12, 12),
     ("1.5", 1.5)],
)  # fmt: skip
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("64MiB", 64 * 1024**2), ("1GB", 10**9), ("512KiB", 512 * 1024), ("10k", 10240), (100, 100), ("0", 0)],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "count", "period", "name"),
    [("10/second", 10, 1, "second"), ("600/minute", 600, 60, "minute"), ("5/10minutes", 5, 600, "10minute"),
     ("10000/day", 10000, 86400, "day"), ("3 / hours", 3, 3600, "hour")],
)  # fmt: skip
def test_parse_limit(text: str, count: int, period: int, name: str) -> None:
    lim = parse_limit(text)
    assert (lim.count, lim.period, lim.name) == (count, period, name)


def test_env_vars_fill_strings_and_headers() -> None:
    cfg = good()
    cfg["upstreams"].append(
        {"id": "tools", "kind": "mcp", "url": "http://${MCP_HOST}:8000", "path_prefix": "/mcp",
         "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}}
    )  # fmt: skip
    parsed = parse_config(cfg, env={**ENV, "MCP_HOST": "mcp.internal"})
    tools = parsed.upstreams[1]
    assert tools.url == "http://mcp.internal:8000"
    assert tools.headers == {"Authorization": "Bearer mcp-token-value"}
    assert "mcp-token-value" not in repr(tools)  # secrets stay out of reprs and logs


# --------------------------------------------------------------------------- refused, with the path


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """A mutation of ``good()`` that sets a dotted path (``upstreams.0.url``); ``...`` deletes it."""

    def apply(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = cfg
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if value is ...:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return apply


def _second_upstream(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def apply(cfg: dict[str, Any]) -> None:
        up = {"id": "plex2", "kind": "plex", "url": "http://127.0.0.1:32401", "token_env": "PLEX_TOKEN",
              "path_prefix": "/two"}  # fmt: skip
        up.update(fields)
        cfg["upstreams"].append(up)

    return apply


UPSTREAM_KEYS = (
    "concurrency, headers, id, kind, max_body, mcp, path_prefix, plex, quota, rate_limits, strip_prefix, "
    "timeouts, tls, token, token_env, url"
)
ERROR_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("bad url scheme", _set("upstreams.0.url", "ftp://plex:32400"),
     "upstreams[0].url: not an http(s) URL: 'ftp://plex:32400'"),
    ("url without host", _set("upstreams.0.url", "http://"), "upstreams[0].url: not an http(s) URL: 'http://'"),
    ("url with query", _set("upstreams.0.url", "http://plex:32400/?x=1"),
     "upstreams[0].url: must not carry a query or fragment: 'http://plex:32400/?x=1'"),
    ("url with credentials", _set("upstreams.0.url", "http://agent:hunter2secret@mcp:8000/mcp"),
     "upstreams[0].url: must not carry credentials (user:password@): put them in upstreams[].headers "
     "(Authorization: Basic ${VAR}), which come from the environment and are scrubbed from answers"),
    ("url missing", _set("upstreams.0.url", ...), "upstreams[0].url: required"),
    ("unknown top-level key", _set("colour", "blue"),
     "colour: unknown option (expected one of: admin, cache, cors, credentials, jwt, keys, listen, log, mcp_sessions, "
     "metrics, oauth, rate_limits, server, store, tls, upstreams, workers)"),
    ("unknown upstream key", _set("upstreams.0.timeout", "5s"),
     f"upstreams[0].timeout: unknown option (expected one of: {UPSTREAM_KEYS})"),
    ("unknown nested key", _set("upstreams.0.timeouts", {"idle": "5s"}),
     "upstreams[0].timeouts.idle: unknown option (expected one of: connect, read)"),
    ("unknown credentials key", _set("credentials", {"cookie": True}),
     "credentials.cookie: unknown option (expected one of: apikey, basic, bearer, plex_header, plex_query, "
     "x_api_key)"),
    ("credentials not a bool", _set("credentials", {"basic": "no"}),
     "credentials.basic: expected true or false, got 'no'"),
    ("missing token env var", _set("upstreams.0.token_env", "NOPE_TOKEN"),
     "upstreams[0].token_env: environment variable NOPE_TOKEN is not set"),
    ("missing ${VAR}", _set("upstreams.0.headers", {"X-Secret": "${NOPE_SECRET}"}),
     "upstreams[0].headers.X-Secret: environment variable NOPE_SECRET is not set"),
    ("literal token", _set("upstreams.0.token", "abc123"),
     "upstreams[0].token: secrets come from the environment: use token_env: VAR or ${VAR}"),
    ("plex without token", _set("upstreams.0.token_env", ...),
     "upstreams[0]: a plex upstream needs token_env (the environment variable holding its X-Plex-Token)"),
    ("bad duration", _set("upstreams.0.timeouts", {"read": "soon"}),
     "upstreams[0].timeouts.read: 'soon' is not a duration such as 30s, 5m, 1h, 90d"),
    ("zero read timeout", _set("upstreams.0.timeouts", {"read": 0}),
     "upstreams[0].timeouts.read: must be greater than 0"),
    ("negative timeout", _set("upstreams.0.timeouts", {"connect": -1}),
     "upstreams[0].timeouts.connect: must not be negative"),
    ("zero poll interval", _set("store.poll_interval", "0s"), "store.poll_interval: must be greater than 0"),
    ("bad size", _set("upstreams.0.max_body", "12 parsecs"),
     "upstreams[0].max_body: '12 parsecs' is not a size such as 512KiB, 64MiB, 1GiB"),
    ("negative size", _set("cache.max_bytes", -5), "cache.max_bytes: must not be negative"),
    ("bad limit", _set("rate_limits.default", ["10/second", "10/fortnight"]),
     "rate_limits.default[1]: '10/fortnight' is not a limit such as 10/second, 600/minute, 10000/day"),
    ("zero limit", _set("rate_limits.default", ["0/second"]),
     "rate_limits.default[0]: '0/second': the count and the period must be positive"),
    ("bad upstream quota", _set("upstreams.0.quota", "lots"),
     "upstreams[0].quota: 'lots' is not a limit such as 10/second, 600/minute, 10000/day"),
    ("bad concurrency", _set("upstreams.0.concurrency", 0),
     "upstreams[0].concurrency: expected a whole number >= 1, got 0"),
    ("duplicate id", _second_upstream(id="plex"), "upstreams[1].id: duplicate id 'plex'"),
    ("duplicate prefix", _second_upstream(path_prefix="/"),
     "upstreams[1].path_prefix: '/' is already used by upstream 'plex'"),
    ("bad id", _set("upstreams.0.id", "Plex Server"),
     "upstreams[0].id: 'Plex Server' must be lowercase letters, digits, '-' or '_'"),
    ("id missing", _set("upstreams.0.id", ...), "upstreams[0].id: required"),
    ("bad kind", _set("upstreams.0.kind", "jellyfin"), "upstreams[0].kind: expected one of plex, mcp, got 'jellyfin'"),
    ("prefix without slash", _set("upstreams.0.path_prefix", "plex"),
     "upstreams[0].path_prefix: must start with '/': 'plex'"),
    ("empty upstream", _set("upstreams", [{}]), "upstreams[0].id: required"),
    ("upstream not a mapping", _set("upstreams", ["plex"]), "upstreams[0]: expected an upstream mapping, got str"),
    ("upstreams not a list", _set("upstreams", {"id": "plex"}), "upstreams: expected a list of upstreams, got dict"),
    ("no upstreams", _set("upstreams", []), "upstreams: at least one upstream is required"),
    ("bad listen", _set("listen", 8080), "listen: '8080' is not host:port"),
    ("bad admin listen", _set("admin.listen", "localhost:http"), "admin.listen: 'localhost:http' is not host:port"),
    ("bad store kind", _set("store.kind", "mysql"), "store.kind: expected one of sqlite, yaml, postgres, got 'mysql'"),
    ("redis without url", _set("rate_limits.backend", "redis"),
     "rate_limits.redis_url: required when backend is redis"),
    ("cache rule for unknown upstream", _set("cache.rules", [{"upstream": "jellyfin", "path": "/*", "ttl": "1m"}]),
     "cache.rules[0].upstream: no upstream with id 'jellyfin'"),
    ("cache rule for POST", _set("cache.rules", [{"upstream": "plex", "path": "/*", "ttl": "1m", "methods": ["POST"]}]),
     "cache.rules[0].methods: only GET and HEAD are cacheable, not POST"),
    ("cache rule without ttl", _set("cache.rules", [{"upstream": "plex", "path": "/*"}]),
     "cache.rules[0].ttl: required"),
    ("cache rule varying per client",
     _set("cache.rules", [{"upstream": "plex", "path": "/*", "ttl": "1m", "vary": ["Accept", "X-Forwarded-For"]}]),
     "cache.rules[0].vary: x-forwarded-for is set per client by the sidecar: an answer varying on it cannot be shared"),
    ("bad trusted proxy", _set("server.trusted_proxies", ["10.0.0.0/8", "not-a-net"]),
     "server.trusted_proxies[1]: 'not-a-net' is not an IP network such as 10.0.0.0/8 or 192.168.1.10"),
    ("bad log level", _set("log.level", "loud"), "log.level: expected one of debug, info, warning, error, got 'loud'"),
    ("tls without key", _set("tls", {"cert": "/nonexistent/cert.pem"}), "tls.key: required when tls is set"),
    ("tls cert missing", _set("tls", {"cert": "/nonexistent/c.pem", "key": "/nonexistent/k.pem"}),
     "tls.cert: no such file: /nonexistent/c.pem"),
    ("upstream CA missing", _set("upstreams.0.tls", {"ca_file": "/nonexistent/ca.pem"}),
     "upstreams[0].tls.ca_file: no such file: /nonexistent/ca.pem"),
    ("bad header name", _set("upstreams.0.headers", {"Bad Name": "x"}),
     "upstreams[0].headers.Bad Name: 'Bad Name' is not a valid header name"),
    ("header value with a line break", _set("upstreams.0.headers", {"X-A": "a\r\nX-Injected: 1"}),
     "upstreams[0].headers.X-A: a header value cannot contain a line break"),
    ("header value with a NUL", _set("upstreams.0.headers", {"X-A": "a\x00b"}),
     "upstreams[0].headers.X-A: a header value cannot contain a control character"),
    ("admin on the proxy port", _set("admin.listen", "127.0.0.1:8080"),
     "admin.listen: '127.0.0.1:8080' is also the proxy listener (listen); give the admin API its own port"),
    ("section not a mapping", _set("admin", "127.0.0.1:9188"), "admin: expected a mapping, got str"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_config_error_names_its_path(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    cfg = copy.deepcopy(good())
    mutate(cfg)
    assert message in problems_of(cfg)


def test_every_problem_is_reported_at_once() -> None:
    cfg = good()
    cfg["listen"] = "nowhere"
    cfg["upstreams"][0]["url"] = "gopher://x"
    cfg["upstreams"][0]["timeouts"] = {"read": "forever"}
    cfg["rate_limits"] = {"default": ["many/second"]}
    problems = problems_of(cfg)
    assert sorted(p.split(":")[0] for p in problems) == [
        "listen", "rate_limits.default[0]", "upstreams[0].timeouts.read", "upstreams[0].url",
    ]  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, env=ENV)
    assert str(info.value).count("\n") == len(problems) - 1


def test_a_missing_env_var_is_named_never_its_neighbours_values() -> None:
    cfg = good()
    cfg["upstreams"][0]["headers"] = {"X-A": "${SET_ONE}", "X-B": "${UNSET_ONE}"}
    problems = problems_of(cfg, env={**ENV, "SET_ONE": "s3cr3t-value"})
    assert problems == ["upstreams[0].headers.X-B: environment variable UNSET_ONE is not set"]
    assert "s3cr3t-value" not in "\n".join(problems)


def test_not_a_mapping_at_all() -> None:
    assert problems_of(["listen", "8080"]) == ["expected a mapping, got list"]
    assert problems_of(None) == ["upstreams: at least one upstream is required"]


def test_yaml_file_errors_name_the_line(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("listen: 127.0.0.1:1\nupstreams: []\nlisten: 127.0.0.1:2\n")
    with pytest.raises(ConfigError) as info:
        load_config(dup, env=ENV)
    assert info.value.problems == [f"{dup}: line 3, column 1: not valid YAML: duplicate key 'listen'"]

    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: [127.0.0.1:1\n")
    with pytest.raises(ConfigError) as info:
        load_config(broken, env=ENV)
    assert re.fullmatch(rf"{re.escape(str(broken))}: line \d+, column \d+: not valid YAML: .+", info.value.problems[0])

    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml", env=ENV)
    assert info.value.problems == [f"{tmp_path / 'absent.yaml'}: cannot read: No such file or directory"]


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "x-common: &common {kind: plex, token_env: PLEX_TOKEN, timeouts: {read: 10s}}\n"
        "upstreams:\n"
        "  - {<<: *common, id: a, url: 'http://127.0.0.1:1', path_prefix: /a}\n"
        "  - {<<: *common, id: b, url: 'http://127.0.0.1:2', path_prefix: /b, timeouts: {read: 20s}}\n"
    )
    with pytest.raises(ConfigError) as info:  # x-common itself is an unknown option: merge sources must live inside
        load_config(path, env=ENV)
    assert [p.split(":")[0] for p in info.value.problems] == ["x-common"]
    path.write_text(
        "upstreams:\n"
        "  - &common {kind: plex, token_env: PLEX_TOKEN, id: a, url: 'http://127.0.0.1:1', path_prefix: /a}\n"
        "  - {<<: *common, id: b, path_prefix: /b}\n"
    )
    a, b = load_config(path, env=ENV).upstreams
    assert (a.id, b.id, b.url, b.path_prefix) == ("a", "b", "http://127.0.0.1:1", "/b")


# --------------------------------------------------------------------------- config.example.yaml


def _place(base: Any, steps: list[str], probe: dict[str, Any]) -> Any:
    """``base`` with ``probe`` merged in at ``steps`` (``"[]"`` = the first item of a list)."""
    if not steps:
        return {**base, **probe} if isinstance(base, dict) else probe
    step, rest = steps[0], steps[1:]
    if step == "[]":
        items = base if isinstance(base, list) and base else [{}]
        return [_place(items[0], rest, probe), *items[1:]]
    base = base if isinstance(base, dict) else {}
    return {**base, step: _place(base.get(step), rest, probe)}


def _discover_options() -> set[str]:
    """Every option path the parser accepts, read from its own "unknown option (expected one of: …)" hints."""
    hint = re.compile(r"zz_probe: unknown option \(expected one of: (?P<names>[^)]*)\)$")

    def names_at(steps: list[str]) -> list[str]:
        try:
            parse_config(_place(good(), steps, {"zz_probe": 1}), env=ENV)
        except ConfigError as e:
            for problem in e.problems:
                if m := hint.search(problem):
                    return m.group("names").split(", ")
        return []  # not a mapping of options: a leaf (or a free-form map such as headers)

    found: set[str] = set()

    def walk(steps: list[str]) -> None:
        for name in names_at(steps):
            path = "".join(s if s == "[]" else f".{s}" for s in [*steps, name]).lstrip(".")
            if path not in found:
                found.add(path)
                walk([*steps, name])
                walk([*steps, name, "[]"])

    walk([])
    return found


def _example_keys(node: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out.add(path)
            out |= _example_keys(v, path)
    elif isinstance(node, list):
        for item in node:
            out |= _example_keys(item, prefix + "[]")
    return out


def test_example_documents_every_option() -> None:
    options = _discover_options()
    assert {"listen", "upstreams[].timeouts.read", "cache.rules[].ttl", "credentials.plex_query"} <= options
    text = EXAMPLE.read_text()
    present = _example_keys(yaml.safe_load(text))
    # Options that cannot be live in an example that must pass `config check` (files that do not
    # exist here, an alternative spelling of a secret) are documented as commented-out lines.
    commented = set(re.findall(r"^\s*#\s*([a-z_]+):", text, re.M))
    missing = sorted(o for o in options if o not in present and o.rsplit(".", 1)[-1] not in commented)
    assert not missing, f"config.example.yaml does not document: {missing}"


def test_every_option_in_the_example_has_a_comment() -> None:
    lines = EXAMPLE.read_text().splitlines()
    root = yaml.compose("\n".join(lines))
    undocumented: list[str] = []

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value in node.value:
                line = key_node.start_mark.line
                path = f"{prefix}.{key_node.value}" if prefix else key_node.value
                above = lines[line - 1].strip() if line else ""
                is_section = isinstance(value, yaml.MappingNode) or (
                    isinstance(value, yaml.SequenceNode) and any(isinstance(v, yaml.MappingNode) for v in value.value)
                )
                if not is_section and "#" not in lines[line] and not above.startswith("#"):
                    undocumented.append(f"line {line + 1}: {path}")
                walk(value, path)
        elif isinstance(node, yaml.SequenceNode) and node.value:
            walk(node.value[0], prefix + "[]")  # later items repeat options the first one documents

    walk(root, "")
    # Keys of a free-form map (headers) are examples, not options.
    undocumented = [u for u in undocumented if not re.search(r"headers\.[A-Za-z-]+$", u)]
    assert not undocumented, "options without a comment:\n" + "\n".join(undocumented)


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ENV}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=60
    )


def test_config_check_accepts_the_example() -> None:
    done = _cli("config", "check", "-c", str(EXAMPLE), env=ENV)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    assert "plex-token-value" not in done.stdout + done.stderr and "mcp-token-value" not in done.stdout + done.stderr


def test_config_check_accepts_the_design_minimal_config(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(DESIGN_MINIMAL)
    done = _cli("config", "check", "-c", str(path), env={"PLEX_TOKEN": "x"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == [path]  # checking creates nothing (no database)


def test_config_check_refuses_with_exit_2_and_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "listen: 127.0.0.1:8080\n"
        "upstreams:\n"
        "  - {id: plex, kind: plex, url: 'ftp://plex', token_env: PLEX_TOKEN}\n"
        "  - {id: plex, kind: plex, url: 'http://b', token_env: PLEX_TOKEN, path_prefix: /b, colour: red}\n"
    )
    done = _cli("config", "check", "-c", str(path), env={})
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"config error in {path}:",
        "  upstreams[0].url: not an http(s) URL: 'ftp://plex'",
        "  upstreams[0].token_env: environment variable PLEX_TOKEN is not set",
        "  upstreams[1].colour: unknown option (expected one of: " + UPSTREAM_KEYS + ")",
        "  upstreams[1].token_env: environment variable PLEX_TOKEN is not set",
        "  upstreams[1].id: duplicate id 'plex'",
    ]


def test_config_check_on_a_missing_file_is_exit_2(tmp_path: Path) -> None:
    done = _cli("config", "check", "-c", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    assert "cannot read" in done.stderr
