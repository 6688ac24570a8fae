"""``oauth:`` in the config file: what is refused, each message naming its path."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.config import ConfigError, parse_config

MCP = {"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:9/mcp", "path_prefix": "/mcp/tools"}


def problems(oauth: dict[str, Any], **top: Any) -> list[str]:
    cfg = {"upstreams": [MCP], "oauth": oauth, **top}
    try:
        parse_config(cfg, env={"S": "from-env"})
    except ConfigError as e:
        return e.problems
    return []


@pytest.mark.parametrize(
    ("oauth", "top", "expected"),
    [
        ({"enabled": True}, {}, "oauth.public_url: required when oauth is enabled (or set server.public_url)"),
        ({"enabled": True, "public_url": "http://mcp.example.com"}, {},
         "oauth.public_url: 'http://mcp.example.com': the issuer must be https (http only on a loopback address)"),
        ({"enabled": True, "public_url": "http://127.0.0.1.evil.example"}, {},  # a name, not a loopback address
         "oauth.public_url: 'http://127.0.0.1.evil.example': the issuer must be https "
         "(http only on a loopback address)"),
        ({"enabled": True, "public_url": "https://x.example/path"}, {}, "oauth.public_url: 'https://x.example/path': "
         "give the origin only (scheme, host and port), no path or query"),
        ({"enabled": True}, {"server": {"public_url": "http://x.example"}},
         "oauth.public_url: server.public_url is not https; give an https issuer here"),
        ({"enabled": True, "public_url": "https://x.example", "upstreams": ["plex"]}, {},
         "oauth.upstreams[0]: 'plex' is not an upstream of kind mcp"),
        ({"enabled": True, "public_url": "https://x.example"}, {"store": {"kind": "yaml", "path": "/nonexistent.yaml"}},
         "oauth.enabled: grants are keys written by the sidecar: use a writable store (sqlite or postgres)"),
        ({"clients": [{"client_id": "a", "redirect_uris": ["http://evil.example/cb"]}]}, {},
         "oauth.clients[0].redirect_uris: 'http://evil.example/cb': a redirect URI must be https, or http on a "
         "loopback address"),
        ({"clients": [{"client_id": "a"}]}, {}, "oauth.clients[0].redirect_uris: required"),
        ({"enabled": True, "public_url": "https://x.example", "clients": [
            {"client_id": "a", "redirect_uris": ["https://a/cb"]}, {"client_id": "a", "redirect_uris": ["https://a/cb"]}]},
         {}, "oauth.clients[1].client_id: 'a' is given twice"),
        ({"access_token_ttl": "0s"}, {}, "oauth.access_token_ttl: must be greater than 0"),
        ({"cimd": {"allowed": ["x"]}}, {}, "oauth.cimd.allowed: unknown option (expected one of: allowed_hosts, "
         "cache_ttl, enabled, max_bytes, timeout, tls_ca_file)"),
        ({"enabled": "yes"}, {}, "oauth.enabled: expected true or false, got 'yes'"),
    ],
)  # fmt: skip
def test_refused(oauth: dict[str, Any], top: dict[str, Any], expected: str) -> None:
    assert expected in problems(oauth, **top)


def test_accepted_with_a_secret_from_the_environment() -> None:
    client = {
        "client_id": "a",
        "client_secret": "${S}",
        "redirect_uris": ["https://a.example/cb", "http://127.0.0.1/cb"],
    }
    cfg = parse_config({"upstreams": [MCP], "oauth": {"enabled": True, "public_url": "https://x.example",
                                                      "clients": [client]}}, env={"S": "from-env"})  # fmt: skip
    assert cfg.oauth.clients[0].client_secret == "from-env"
    assert "from-env" not in repr(cfg.oauth)
    assert cfg.oauth.issuer(None) == "https://x.example" and cfg.oauth.access_token_ttl == 3600
