"""Claims to permissions (pure): where each IdP puts groups and scopes, and which rule grants."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.auth.jwt import identity_id
from sidecar.auth.jwt_rules import Identity, RuleSet, claim, group_names, scope_names
from sidecar.auth.permissions import allowed, tool_allowed
from sidecar.config.jwt import JwtClaims, JwtRule


def rules(*raw: dict[str, Any]) -> RuleSet:
    return RuleSet(tuple(JwtRule.model_validate(r) for r in raw))


def who(sub: str = "u1", groups: tuple[str, ...] = (), scopes: tuple[str, ...] = ()) -> Identity:
    return Identity(subject=sub, name=sub, groups=frozenset(groups), scopes=frozenset(scopes))


@pytest.mark.parametrize(
    ("claims", "name", "value"),
    [
        ({"groups": ["a"]}, "groups", ["a"]),  # Entra ID, Okta
        ({"realm_access": {"roles": ["agents"]}}, "realm_access.roles", ["agents"]),  # Keycloak realm roles
        ({"resource_access": {"sidecar": {"roles": ["r"]}}}, "resource_access.sidecar.roles", ["r"]),  # client roles
        ({"https://example.com/roles": ["x"]}, "https://example.com/roles", ["x"]),  # Auth0 namespaced claim
        ({"realm_access": ["not", "a", "map"]}, "realm_access.roles", None),
        ({}, "groups", None),
    ],
)
def test_claims_are_found_where_each_idp_puts_them(claims: dict[str, Any], name: str, value: Any) -> None:
    assert claim(claims, name) == value


def test_scopes_and_groups_in_both_shapes() -> None:
    assert scope_names("openid mcp:read  profile") == {"openid", "mcp:read", "profile"}
    assert scope_names(["mcp:read", 7]) == {"mcp:read"}
    assert group_names("agents") == {"agents"}  # one group as a string is one name, not split
    assert group_names(["a b", None]) == {"a b"}
    assert group_names({"a": 1}) == frozenset()


def test_identity_needs_a_string_subject_and_logs_a_clean_name() -> None:
    spec = JwtClaims(subject="oid", name="preferred_username")
    assert Identity.of({"sub": "x"}, spec) is None
    assert Identity.of({"oid": 42}, spec) is None
    got = Identity.of({"oid": "o-1", "preferred_username": "eve\n{fake log line}" + "x" * 300}, spec)
    assert got is not None and got.subject == "o-1"
    assert "\n" not in got.name and len(got.name) == 128
    assert Identity.of({"oid": "o-2"}, spec) == Identity("o-2", "o-2", frozenset(), frozenset())


def test_the_first_matching_rule_grants() -> None:
    rs = rules(
        {"when": {"sub": "root-bot"}, "grant": {"upstreams": "*"}},
        {"when": {"group": ["agents", "ops"], "scope": "mcp:write"}, "grant": {"upstreams": ["tools"]}},
        {"when": {"group": "agents"}, "grant": {"upstreams": ["tools"], "tools": ["search", "read_*"]}},
        {"grant": {"upstreams": ["plex"], "paths": ["plex:read"], "methods": ["get"]}},
    )
    assert rs.first(who("root-bot", groups=("agents",)))[0] == 0  # type: ignore[index]
    assert rs.first(who(groups=("ops",), scopes=("mcp:write",)))[0] == 1  # type: ignore[index]
    assert rs.first(who(groups=("ops",), scopes=("mcp:read",)))[0] == 3  # type: ignore[index]  # both must hold
    index, grant = rs.first(who(groups=("agents",)))  # type: ignore[misc]
    assert index == 2
    assert tool_allowed(grant.permissions, "tools", "read_file")
    assert tool_allowed(grant.permissions, "tools", "search")
    assert not tool_allowed(grant.permissions, "tools", "delete_everything")
    assert allowed(grant.permissions, "plex", "plex", "GET", "/library") is not None  # not its upstream
    _, catch_all = rs.first(who())  # type: ignore[misc]
    assert catch_all.permissions.methods == ("GET",)
    assert allowed(catch_all.permissions, "plex", "plex", "GET", "/library/sections") is None
    assert allowed(catch_all.permissions, "plex", "plex", "GET", "/security/token") is not None  # never admin
    assert rules({"when": {"group": "x"}, "grant": {"upstreams": "*"}}).first(who()) is None


def test_tools_per_upstream_and_limits() -> None:
    rs = rules(
        {
            "grant": {
                "upstreams": ["a", "b"], "tools": {"a": ["search"]}, "rate_limits": "60/minute",
                "quota": "1000/day", "concurrency": 2,
            }
        }
    )  # fmt: skip
    _, g = rs.first(who())  # type: ignore[misc]
    assert tool_allowed(g.permissions, "a", "search")
    assert not tool_allowed(g.permissions, "a", "fetch")
    assert tool_allowed(g.permissions, "b", "anything")  # not named for b: not limited there
    assert (g.rate_limits, g.quota, g.concurrency) == (("60/minute",), "1000/day", 2)
    assert not g.permissions.admin


def test_identity_ids_are_stable_opaque_and_per_issuer() -> None:
    a = identity_id("https://idp-a", "alice")
    assert a == identity_id("https://idp-a", "alice")
    assert a != identity_id("https://idp-b", "alice")
    assert a != identity_id("https://idp-a\nalic", "e")  # the separator keeps issuer and subject apart
    assert a.startswith("jwt:") and len(a) == 20 and "alice" not in a
