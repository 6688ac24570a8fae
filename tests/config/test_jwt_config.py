"""``jwt:`` providers in the config file: what is accepted, and every refusal with its YAML path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ConfigError, parse_config
from sidecar.config.jwt import DEFAULT_ALGORITHMS

ENV = {"PLEX_TOKEN": "plex-token-value", "MCP_TOKEN": "mcp-token-value", "JWT_SECRET": "s" * 32}


def provider(**overrides: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "issuer": "https://sso.example.com/realms/acme",
        "jwks_url": "https://sso.example.com/realms/acme/protocol/openid-connect/certs",
        "audience": "sidecar",
        "rules": [{"when": {"group": "agents"}, "grant": {"upstreams": ["tools"], "tools": ["search", "read_*"]}}],
    }
    p.update(overrides)
    return {k: v for k, v in p.items() if v is not ...}


def config(*providers: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstreams": [
            {"id": "plex", "kind": "plex", "url": "http://127.0.0.1:32400", "token_env": "PLEX_TOKEN"},
            {"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:8000", "path_prefix": "/mcp"},
        ],
        "jwt": list(providers),
    }


def problems(cfg: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, env=ENV, base=tmp_path)
    return e.value.problems


def test_a_provider_with_defaults(tmp_path: Path) -> None:
    cfg = parse_config(config(provider()), env=ENV, base=tmp_path)
    (p,) = cfg.jwt
    assert p.audience == ("sidecar",)
    assert p.algorithms == DEFAULT_ALGORITHMS == ("RS256", "ES256")
    assert (p.clock_skew, p.jwks_cache_ttl, p.jwks_refetch_interval, p.timeout) == (60.0, 600.0, 10.0, 5.0)
    assert (p.claims.subject, p.claims.scope, p.claims.groups, p.claims.name) == ("sub", "scope", "groups", None)
    (rule,) = p.rules
    assert rule.when.group == ("agents",)
    assert rule.grant.tools == ("search", "read_*")


@pytest.mark.parametrize("interval", ["0s", "500ms"])
def test_a_refetch_interval_under_a_second_is_refused(tmp_path: Path, interval: str) -> None:
    """Random kids cost an attacker nothing: ``0s`` let a flood keep a fetch to the IdP in flight always."""
    [msg] = problems(config(provider(jwks_refetch_interval=interval)), tmp_path)
    assert "jwks_refetch_interval" in msg and "at least 1s" in msg


def test_no_jwt_section_means_no_providers(tmp_path: Path) -> None:
    cfg = config()
    del cfg["jwt"]
    assert parse_config(cfg, env=ENV, base=tmp_path).jwt == ()


def test_an_hmac_provider_and_a_local_jwks(tmp_path: Path) -> None:
    hs = provider(issuer="https://ci", jwks_url=..., algorithms=["HS256"], secret_env="JWT_SECRET")
    local = provider(issuer="http://127.0.0.1:8081/realms/dev", jwks_url="http://127.0.0.1:8081/certs")
    cfg = parse_config(config(hs, local), env=ENV, base=tmp_path)
    assert [p.issuer for p in cfg.jwt] == ["https://ci", "http://127.0.0.1:8081/realms/dev"]


P = "jwt[0]"
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("alg none", provider(algorithms=["RS256", "none"]),
     f"{P}.algorithms: 'none' is never accepted: an unsigned token proves nothing"),
    ("unknown alg", provider(algorithms=["RS1"]), f"{P}.algorithms: 'RS1' is not a supported algorithm"),
    ("HS without a secret", provider(jwks_url=..., algorithms=["HS256"]),
     f"{P}: secret_env: required for HS256/384/512"),
    ("HS mixed with RS", provider(algorithms=["HS256", "RS256"], secret_env="JWT_SECRET"),
     f"{P}: algorithms: HS256/384/512 cannot share a provider with public-key algorithms"),
    ("HS with a jwks_url", provider(algorithms=["HS256"], secret_env="JWT_SECRET"),
     f"{P}: jwks_url: not used with HS256/384/512"),
    ("secret for RS", provider(secret_env="JWT_SECRET"), f"{P}: secret_env: only for HS256/384/512"),
    ("no jwks_url", provider(jwks_url=...), f"{P}: jwks_url: required"),
    ("plain http jwks", provider(jwks_url="http://sso.example.com/certs"),
     f"{P}.jwks_url: must be https (plain http only on loopback)"),
    ("no audience", provider(audience=...), f"{P}.audience: required"),
    ("empty audience", provider(audience=[]), f"{P}.audience: must not be empty"),
    ("no rules", provider(rules=[]), f"{P}.rules: must not be empty"),
    ("unknown option", provider(leeway="5s"), f"{P}.leeway: unknown option (expected one of: algorithms, audience,"),
    ("unknown when", provider(rules=[{"when": {"role": "x"}, "grant": {"upstreams": ["*"]}}]),
     f"{P}.rules[0].when.role: unknown option (expected one of: group, scope, sub)"),
    ("admin is not grantable", provider(rules=[{"grant": {"upstreams": ["*"], "admin": True}}]),
     f"{P}.rules[0].grant.admin: unknown option"),
    ("grant without upstreams", provider(rules=[{"grant": {"tools": ["x"]}}]),
     f"{P}.rules[0].grant.upstreams: required"),
    ("unknown upstream", provider(rules=[{"grant": {"upstreams": ["nope"]}}]),
     f"{P}.rules[0].grant.upstreams[0]: no upstream with id 'nope'"),
    ("tools on plex", provider(rules=[{"grant": {"upstreams": ["plex"], "tools": ["x"]}}]),
     f"{P}.rules[0].grant.tools: 'plex' is not a kind: mcp upstream of this grant"),
    ("bad limit", provider(rules=[{"grant": {"upstreams": ["*"], "rate_limits": ["60/min"]}}]),
     f"{P}.rules[0].grant.rate_limits[0]: '60/min' is not a limit"),
    ("bad skew", provider(clock_skew="soon"), f"{P}.clock_skew: 'soon' is not a duration"),
    ("zero timeout", provider(timeout="0s"), f"{P}.timeout: must be greater than 0"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "p", "message"), REFUSED, ids=[c for c, _, _ in REFUSED])
def test_refusals_name_the_path(case: str, p: dict[str, Any], message: str, tmp_path: Path) -> None:
    got = problems(config(p), tmp_path)
    assert any(line.startswith(message) for line in got), got


def test_a_duplicate_issuer_and_a_short_secret(tmp_path: Path) -> None:
    hs = provider(issuer="https://ci", jwks_url=..., algorithms=["HS512"], secret_env="JWT_SECRET")
    got = problems(config(provider(), provider(), hs), tmp_path)
    assert "jwt[1].issuer: 'https://sso.example.com/realms/acme' is already jwt[0]'s issuer" in got
    assert "jwt[2].secret_env: JWT_SECRET must hold at least 64 bytes for ('HS512',)" in got
    missing = provider(issuer="https://ci", jwks_url=..., algorithms=["HS256"], secret_env="NOPE")
    assert problems(config(missing), tmp_path) == ["jwt[0].secret_env: environment variable NOPE is not set"]


def test_jwt_must_be_a_list(tmp_path: Path) -> None:
    cfg = config()
    cfg["jwt"] = provider()
    assert problems(cfg, tmp_path) == ["jwt: expected a list of providers, got dict"]
