"""From a verified token's claims to what it may do: the ``rules`` of a ``jwt:`` provider.

Pure: no aiohttp, no I/O, nothing cryptographic (the claims arrive verified). Each
rule's grant is compiled once, at start, into the very ``Permissions`` an API key
carries, so permission checks, MCP tool filtering and rate limits read a JWT identity
exactly as they read a key. First matching rule wins, like a firewall: merging grants
would be lossy (a key's ``paths`` apply to all of its upstreams), and an ordered list is
easy to read — put the narrow rules first and a catch-all (no ``when``) last, if any.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config.jwt import JwtClaims, JwtGrant, JwtRule, JwtWhen
from .models import Permissions

__all__ = ["Grant", "Identity", "RuleSet", "claim", "group_names", "scope_names"]

MAX_NAME = 128  # the subject or display name as logged


def claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name; a dotted name that is not itself a claim walks nested objects.

    ``https://example.com/roles`` (Auth0's namespaced claims) is found whole;
    ``realm_access.roles`` (Keycloak) as ``claims["realm_access"]["roles"]``.
    """
    if name in claims:
        return claims[name]
    if "." not in name:
        return None
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def group_names(value: Any) -> frozenset[str]:
    """Groups or roles: a list of names (one string is one name)."""
    if isinstance(value, str):
        return frozenset((value,))
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


def scope_names(value: Any) -> frozenset[str]:
    """Scopes: RFC 8693's space-separated text (``scope``, Entra's ``scp``) or a list (Okta's ``scp``).

    Split on U+0020 alone (RFC 6749 §3.3), as the IdP joined them: ``str.split()`` also splits on tabs,
    NBSP, U+2003…, so one scope the IdP issued (a dynamic scope whose parameter a client chose,
    ``group:x<NBSP>admin``) would be read here as two, one of them a scope nobody granted."""
    if isinstance(value, str):
        return frozenset(t for t in value.split(" ") if t)
    return group_names(value)


def printable(text: str) -> str:
    """A claim value safe to log as a key name: no control characters, bounded."""
    if text.isprintable():
        return text[:MAX_NAME]
    return "".join(c for c in text if unicodedata.category(c)[0] != "C")[:MAX_NAME]


def _unicode(text: str) -> bool:
    """No lone surrogate (JSON's ``"\\ud800"`` decodes to one): the subject is hashed as UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Identity:
    """What the rules read from one verified token."""

    subject: str
    name: str
    groups: frozenset[str]
    scopes: frozenset[str]

    @classmethod
    def of(cls, claims: Mapping[str, Any], spec: JwtClaims) -> Identity | None:
        """None when the token has no usable subject (a string, not empty, valid Unicode)."""
        sub = claim(claims, spec.subject)
        if not isinstance(sub, str) or not sub or not _unicode(sub):
            return None
        name = claim(claims, spec.name) if spec.name else None
        return cls(
            subject=sub,
            name=printable(name if isinstance(name, str) and name else sub),
            groups=group_names(claim(claims, spec.groups)),
            scopes=scope_names(claim(claims, spec.scope)),
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """A rule's grant, compiled: the key-shaped permissions and limits."""

    permissions: Permissions
    rate_limits: tuple[str, ...]
    quota: str | None
    concurrency: int | None

    @classmethod
    def compile(cls, g: JwtGrant) -> Grant:
        return cls(
            permissions=Permissions(
                upstreams=g.upstreams,
                methods=g.methods,
                paths=g.paths,
                tools=_mcp(g.tools),
                resources=_mcp(g.resources),
                prompts=_mcp(g.prompts),
            ),
            rate_limits=g.rate_limits,
            quota=g.quota,
            concurrency=g.concurrency,
        )


def _mcp(globs: tuple[str, ...] | dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """A list applies to every upstream of the grant (``"*"``); a mapping names each upstream."""
    if isinstance(globs, dict):
        return {k: tuple(v) for k, v in globs.items()}
    return {"*": tuple(globs)} if globs else {}


def _matches(when: JwtWhen, who: Identity) -> bool:
    if when.sub and who.subject not in when.sub:
        return False
    if when.group and who.groups.isdisjoint(when.group):
        return False
    return not (when.scope and who.scopes.isdisjoint(when.scope))


class RuleSet:
    """A provider's rules, in file order, with their grants compiled once."""

    def __init__(self, rules: tuple[JwtRule, ...]) -> None:
        self._rules = [(r.when, Grant.compile(r.grant)) for r in rules]

    def first(self, who: Identity) -> tuple[int, Grant] | None:
        """The index and grant of the first rule whose ``when`` holds, or None."""
        for i, (when, grant) in enumerate(self._rules):
            if _matches(when, who):
                return i, grant
        return None
