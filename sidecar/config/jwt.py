"""``jwt:`` — accept JWTs issued by an existing identity provider (docs/jwt.md).

A list of providers. Each names its issuer, where its signing keys are (``jwks_url``),
the audience a token must carry, the algorithms it may use, and ``rules`` that map the
token's claims (subject, scopes, groups) onto the permissions and limits an API key
would have. The first rule whose ``when`` matches grants; a token no rule matches is
refused (403). Pydantic models (``Section``); ``load_jwt`` validates the list and adds
the checks that need the rest of the file (upstream ids, environment variables).

Security choices made here, at load, so the hot path never has to: ``none`` is never an
algorithm; HMAC (HS256/384/512) only with a shared secret from ``secret_env`` and never
in the same provider as a public-key algorithm (an RSA public key fed to HMAC as a
secret is the classic algorithm-confusion forgery); a JWKS URL is https (plain http
only on loopback, for tests and a local IdP); ``audience`` is required (without it a
token minted for any other application of the same IdP would be accepted here).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from .models import Duration, PositiveDuration, Section, validate_section
from .units import parse_limit

__all__ = [
    "ASYMMETRIC_ALGORITHMS", "DEFAULT_ALGORITHMS", "HMAC_ALGORITHMS", "JwtClaims", "JwtGrant", "JwtProvider",
    "JwtRule", "JwtWhen", "issuers_granting", "load_jwt",
]  # fmt: skip

DEFAULT_ALGORITHMS = ("RS256", "ES256")
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# RFC 7518 §3.2: an HMAC key at least as long as the hash output.
HMAC_MIN_SECRET = {"HS256": 32, "HS384": 48, "HS512": 64}
DEFAULT_CLOCK_SKEW = 60.0
DEFAULT_JWKS_CACHE_TTL = 600.0
DEFAULT_JWKS_REFETCH_INTERVAL = 10.0
DEFAULT_JWKS_TIMEOUT = 5.0


def _names(value: object) -> object:
    """One name or a list of names: ``group: agents`` reads as well as ``group: [agents, ops]``."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


def _limit(value: str) -> str:
    parse_limit(value)  # ValueError with the usual message; kept as text, as a key's limits are
    return value


def _some(value: tuple[Any, ...]) -> tuple[Any, ...]:
    if not value:
        raise ValueError("must not be empty")
    return value


Names = Annotated[tuple[str, ...], BeforeValidator(_names)]
SomeNames = Annotated[tuple[str, ...], BeforeValidator(_names), AfterValidator(_some)]
LimitText = Annotated[str, AfterValidator(_limit)]


def _no_empty_list(value: tuple[str, ...] | dict[str, tuple[str, ...]]) -> tuple[str, ...] | dict[str, tuple[str, ...]]:
    """``tools: []`` would read as "not limited" (every tool), the opposite of what it says."""
    if value == ():
        raise ValueError("an empty list would allow every one: leave it out for all, or name what is allowed")
    return value


# Tool / resource / prompt globs: a list (for every upstream of the grant) or {upstream id: list}.
McpGlobs = Annotated[tuple[str, ...] | dict[str, Names], BeforeValidator(_names), AfterValidator(_no_empty_list)]


def _loopback(host: str | None) -> bool:
    """A loopback address or ``localhost`` (a DNS name such as ``127.example.com`` can resolve anywhere)."""
    host = (host or "").strip("[]").lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JwtClaims(Section):
    """Which claims carry the subject, scopes, groups and display name.

    A name with dots that is not itself a claim is a path into nested objects
    (Keycloak's ``realm_access.roles``); a URL-like claim (Auth0's namespaced
    ``https://example.com/groups``) is found by its full name first.
    """

    subject: str = Field(default="sub", min_length=1)  # Entra: oid is stable across applications
    scope: str = Field(default="scope", min_length=1)  # space-separated text or a list (Entra/Okta: scp)
    groups: str = Field(default="groups", min_length=1)  # a list (or one string) of group or role names
    name: str | None = None  # shown as the key name in the access log; the subject when unset


class JwtWhen(Section):
    """Every condition given must hold; each lists names of which any one will do. Empty: any token."""

    group: Names = ()
    scope: Names = ()
    sub: Names = ()


class JwtGrant(Section):
    """What a matching token may do: the fields of a key's permissions and limits."""

    upstreams: SomeNames  # ids, or "*" (every upstream, later ones included)
    methods: Names = ()
    paths: Names = ()  # globs, or the Plex presets plex:read / plex:playback / plex:admin
    tools: McpGlobs = ()
    resources: McpGlobs = ()
    prompts: McpGlobs = ()
    # Per subject, e.g. [60/minute]; empty: the upstream's (or the global) default.
    rate_limits: Annotated[tuple[LimitText, ...], BeforeValidator(_names)] = ()
    quota: LimitText | None = None  # per subject, e.g. 10000/month
    concurrency: int | None = Field(default=None, ge=1)

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.upper() for m in v)


class JwtRule(Section):
    when: JwtWhen = JwtWhen()
    grant: JwtGrant


class JwtProvider(Section):
    """One identity provider whose tokens this sidecar accepts."""

    issuer: str = Field(min_length=1)  # compared exactly with the token's iss
    jwks_url: str | None = None  # its signing keys (fetched, cached, refetched on an unknown kid)
    audience: SomeNames  # the token's aud must contain one of these
    algorithms: Names = DEFAULT_ALGORITHMS
    secret_env: str | None = None  # HS256/384/512 only: the variable holding the shared secret
    clock_skew: Duration = DEFAULT_CLOCK_SKEW  # leeway for exp, nbf and iat
    jwks_cache_ttl: PositiveDuration = DEFAULT_JWKS_CACHE_TTL  # keys are refetched after this
    jwks_refetch_interval: Duration = DEFAULT_JWKS_REFETCH_INTERVAL  # at most one unknown-kid refetch per interval
    timeout: PositiveDuration = DEFAULT_JWKS_TIMEOUT  # the whole JWKS fetch
    claims: JwtClaims = JwtClaims()
    rules: Annotated[tuple[JwtRule, ...], AfterValidator(_some)]

    @field_validator("jwks_url")
    @classmethod
    def _https(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            parts = urlsplit(v)
        except ValueError:
            raise ValueError(f"{v!r} is not a URL") from None
        if not parts.hostname or parts.scheme not in ("https", "http"):
            raise ValueError(f"{v!r} is not an https URL")
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise ValueError("must be https (plain http only on loopback): keys fetched in clear can be forged")
        return v

    @field_validator("jwks_refetch_interval")
    @classmethod
    def _refetch_floor(cls, v: float) -> float:
        if v < 1:
            # Random kids are free to send: without a floor, a flood keeps one fetch to the IdP in flight always.
            raise ValueError("must be at least 1s (each unknown kid may trigger a fetch from the IdP)")
        return v

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one algorithm")
        for alg in v:
            if alg.lower() == "none":
                raise ValueError("'none' is never accepted: an unsigned token proves nothing")
            if alg not in ASYMMETRIC_ALGORITHMS and alg not in HMAC_ALGORITHMS:
                known = ", ".join(sorted(ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS))
                raise ValueError(f"{alg!r} is not a supported algorithm (one of: {known})")
        return v

    @model_validator(mode="after")
    def _keys(self) -> JwtProvider:
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        if hmac and len(hmac) != len(self.algorithms):
            raise ValueError(
                "algorithms: HS256/384/512 cannot share a provider with public-key algorithms "
                "(a public key must never be usable as an HMAC secret); declare two providers"
            )
        if hmac:
            if not self.secret_env:
                raise ValueError("secret_env: required for HS256/384/512 (the shared secret's environment variable)")
            if self.jwks_url:
                raise ValueError("jwks_url: not used with HS256/384/512 (the key is secret_env's shared secret)")
        else:
            if self.secret_env:
                raise ValueError("secret_env: only for HS256/384/512 (public-key algorithms use jwks_url)")
            if not self.jwks_url:
                raise ValueError("jwks_url: required (where the provider publishes its signing keys)")
        return self


def _check_upstreams(p: JwtProvider, path: str, upstreams: Mapping[str, str], problems: list[str]) -> None:
    """Grants name upstreams that exist; MCP globs only where an MCP upstream could use them."""
    for j, rule in enumerate(p.rules):
        gpath = f"{path}.rules[{j}].grant"
        g = rule.grant
        for k, uid in enumerate(g.upstreams):
            if uid != "*" and uid not in upstreams:
                problems.append(f"{gpath}.upstreams[{k}]: no upstream with id {uid!r}")
        granted = [u for u in upstreams if "*" in g.upstreams or u in g.upstreams]
        for kind in ("tools", "resources", "prompts"):
            globs: Any = getattr(g, kind)
            if not globs:
                continue
            named = list(globs) if isinstance(globs, dict) else granted
            for uid in named:
                if uid != "*" and upstreams.get(uid) != "mcp":
                    problems.append(f"{gpath}.{kind}: {uid!r} is not a kind: mcp upstream of this grant")


def load_jwt(
    raw: object, upstreams: Mapping[str, str], problems: list[str], env: Mapping[str, str]
) -> tuple[JwtProvider, ...]:
    """The ``jwt:`` list validated (``upstreams``: id -> kind); problems appended, path-named."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"jwt: expected a list of providers, got {type(raw).__name__}")
        return ()
    out: list[JwtProvider] = []
    for i, item in enumerate(raw):
        p = validate_section(JwtProvider, item, f"jwt[{i}]", problems, env)
        if p is not None:
            out.append(p)
    check_jwt(tuple(out), upstreams, problems, env)
    return tuple(out)


def check_jwt(
    providers: tuple[JwtProvider, ...], upstreams: Mapping[str, str], problems: list[str], env: Mapping[str, str]
) -> None:
    """What the ``jwt:`` list needs from the rest of the file and the environment (``upstreams``: id -> kind)."""
    seen: dict[str, int] = {}
    for i, p in enumerate(providers):
        path = f"jwt[{i}]"
        if p.issuer in seen:
            problems.append(f"{path}.issuer: {p.issuer!r} is already jwt[{seen[p.issuer]}]'s issuer")
        seen[p.issuer] = i
        if p.secret_env:
            secret = env.get(p.secret_env)
            need = max(HMAC_MIN_SECRET[a] for a in p.algorithms)
            if secret is None:
                problems.append(f"{path}.secret_env: environment variable {p.secret_env} is not set")
            elif len(secret.encode()) < need:
                problems.append(f"{path}.secret_env: {p.secret_env} must hold at least {need} bytes for {p.algorithms}")
        _check_upstreams(p, path, upstreams, problems)


def issuers_granting(providers: Sequence[JwtProvider], upstream_ids: Collection[str]) -> list[str]:
    """The issuers whose tokens some rule lets use one of ``upstream_ids``: the authorization servers an
    MCP resource's RFC 9728 metadata names. Only providers with a ``jwks_url``: a shared-secret (HS*)
    issuer is a token minter of your own, not an OAuth server a client could log in to."""
    return [
        p.issuer
        for p in providers
        if p.jwks_url and any("*" in r.grant.upstreams or set(r.grant.upstreams) & set(upstream_ids) for r in p.rules)
    ]
