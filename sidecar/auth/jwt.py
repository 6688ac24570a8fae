"""JWTs from an existing identity provider, verified and turned into a key-like identity.

``Authorization: Bearer xxx.yyy.zzz`` — three dot-separated parts, which an API key never
has (prefix and lowercase hex, ``sidecar.auth.keys``) — goes here instead of the key
verifier, when ``jwt:`` providers are configured. JWTs are accepted in that header only:
never in a query string, ``x-api-key`` or ``X-Plex-Token``, where URLs and logs would
carry them.

Verification (joserfc; nothing hand-rolled): the token's ``iss`` picks the provider
(exact match), its ``alg`` must be one the provider allows (``none`` never is; HMAC only
for a provider configured with a shared secret, and then nothing else), the key comes
from the provider's JWKS by ``kid`` (``sidecar.auth.jwks``) and must be of the type the
algorithm needs (joserfc checks, so an RSA key is never an HMAC secret); then ``exp``
(required), ``nbf`` and ``iat`` with ``clock_skew`` of leeway, ``iss`` and ``aud``. Header
URLs (``jku``, ``x5u``) are never followed: keys come only from the configured JWKS.
``exp`` is also judged on ``expiry`` (``sidecar.clocks.HighWater``): once the sidecar has seen
a token's end, a wall clock stepped back does not make it valid again.

The identity: a ``KeyRecord`` with the id ``jwt:`` + 16 hex of SHA-256(issuer, subject)
(stable across tokens, never the token), the name of its subject, and the permissions and
limits of the first rule that matches (``sidecar.auth.jwt_rules``). Rate limits, quota,
MCP sessions, metrics (bounded like keys) and usage all key on that id, so they apply per
subject across token refreshes. A verified token is remembered (SHA-256 of the token ->
identity) until it expires, in a bounded LRU: the next request costs one hash and one
dict lookup. Failures are ``401 invalid_token`` with the reason and an RFC 6750
``WWW-Authenticate``; the token itself is never logged, echoed or stored. Each failure also
counts against the client's address in the key verifier's failed-attempts throttle
(``throttle``), so a flood of forged tokens turns into 429s like a flood of forged keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from joserfc.errors import ClaimError, ExpiredTokenError, JoseError, MissingClaimError, SecurityWarning
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry, extract_compact, validate_compact
from joserfc.jwt import JWTClaimsRegistry
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..clocks import HighWater, steady_clock
from ..config.jwt import JwtProvider
from ..core.errors import Forbidden, InvalidToken, SidecarError
from ..core.scope import RequestScope
from .credentials import Credential
from .identify import FailureThrottle, looks_like_jwt
from .jwks import JwksCache, PublicKey
from .jwt_rules import Grant, Identity, RuleSet
from .models import KeyRecord

__all__ = ["FAILURE_REASONS", "ID_PREFIX", "InvalidToken", "JwtAuthenticator", "identity_id"]

ID_PREFIX = "jwt:"
MAX_TOKENS = 10_000  # verified tokens remembered (LRU)
MAX_IDENTITIES = 100_000  # subjects whose latest expiry is known (open streams end with it)
NO_RULE = "no jwt rule of this identity provider grants this token any access"
MAX_KEYS_TRIED = 4  # keys sharing one kid (or a set without kids) tried per token
# Bounded reasons for sidecar_jwt_failures_total (the message says more).
FAILURE_REASONS = (
    "malformed", "issuer", "algorithm", "unknown_key", "signature", "expired", "not_yet_valid", "audience", "claims",
)  # fmt: skip


def identity_id(issuer: str, subject: str) -> str:
    """The stable, opaque id of a subject of an issuer: what metrics, limits and usage key on."""
    digest = hashlib.sha256(f"{issuer}\n{subject}".encode()).hexdigest()
    return ID_PREFIX + digest[:16]


@dataclass(slots=True)
class _Seen:
    """A remembered verified token."""

    record: KeyRecord
    until: float  # wall time it stops being accepted (exp + clock skew)
    provider: _Provider
    generation: int  # the provider's JWKS generation it was verified under
    signer: str = ""  # the JWKS key's RFC 7638 thumbprint ("" for a shared secret)


class _Provider:
    """One configured provider, ready for the hot path (registries and rules built once)."""

    def __init__(self, cfg: JwtProvider, jwks: JwksCache | None, secret: str | None) -> None:
        self.cfg = cfg
        self.issuer = cfg.issuer
        self.algorithms = frozenset(cfg.algorithms)
        # strict_check_header=False: IdPs add header fields of their own (x5t, …); crit is still enforced.
        self.registry = JWSRegistry(algorithms=list(cfg.algorithms), strict_check_header=False)
        self.jwks = jwks
        self.secret = OctKey.import_key(secret.encode()) if secret is not None else None
        self.rules = RuleSet(cfg.rules)
        self.leeway = int(cfg.clock_skew)
        self.display = f"jwt {urlsplit(cfg.issuer).hostname or cfg.issuer}"[:64]

    @property
    def generation(self) -> int:
        return self.jwks.generation if self.jwks is not None else 0

    async def keys(self, header: Mapping[str, Any], alg: str) -> Sequence[PublicKey | OctKey]:
        """The keys that may have signed: the shared secret, or the JWKS keys of the token's
        ``kid`` whose type fits ``alg`` (all of them when the token names no kid)."""
        if self.secret is not None:
            return (self.secret,)
        assert self.jwks is not None
        kid = header.get("kid", "")
        if not isinstance(kid, str):
            raise InvalidToken("malformed token", "malformed")
        keys, why = await self.jwks.find(kid)
        if not keys:
            raise InvalidToken(why, "unknown_key")
        return [k for k in keys if _fits(k, alg)][:MAX_KEYS_TRIED]

    def check_claims(self, claims: dict[str, Any], now: float) -> float:
        """exp (required), nbf, iat with leeway; iss; aud — each failure named. Returns exp + leeway."""
        registry = JWTClaimsRegistry(
            now=int(now),
            leeway=self.leeway,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "values": list(self.cfg.audience)},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise InvalidToken("token expired", "expired") from None
        except MissingClaimError as e:
            raise InvalidToken(f"missing claim {_claim_names(e.claim)}", "claims") from None
        except ClaimError as e:
            if e.claim == "aud":
                raise InvalidToken("wrong audience", "audience") from None
            if e.claim == "nbf":
                raise InvalidToken("token not yet valid", "not_yet_valid") from None
            if e.claim == "iat":
                raise InvalidToken("token issued in the future", "not_yet_valid") from None
            if e.claim == "iss":
                raise InvalidToken("wrong issuer", "issuer") from None
            raise InvalidToken(f"invalid claim {_claim_names(e.claim)}", "claims") from None
        try:
            return float(claims["exp"]) + self.leeway
        except OverflowError:  # an integer past float range (JSON allows it): no expiry we can keep
            raise InvalidToken("invalid claim exp", "claims") from None


def _claim_names(names: str) -> str:
    """Registered claim names only (they come from our own registry, but stay on the safe side)."""
    return ",".join(n for n in names.split(",") if n in ("iss", "aud", "exp", "nbf", "iat", "sub")) or "?"


class JwtAuthenticator:
    """Every ``jwt:`` provider of one sidecar; ``verify`` is the pipeline's entry point."""

    def __init__(
        self,
        providers: Sequence[JwtProvider],
        *,
        env: Mapping[str, str],
        clock: Callable[[], float] = time.time,
        steady: Callable[[], float] | None = None,
        registry: CollectorRegistry | None = None,
        throttle: FailureThrottle | None = None,
        expiry: Callable[[], float] | None = None,
    ) -> None:
        self.clock = clock  # wall: exp, nbf, iat
        self.expiry = expiry if expiry is not None else HighWater(clock)  # exp again, never going back
        self.steady = steady_clock(clock, steady)  # intervals: JWKS TTL and refetch spacing
        self._session: aiohttp.ClientSession | None = None
        self.providers: dict[str, _Provider] = {}
        for p in providers:
            jwks = None
            if p.jwks_url:
                jwks = JwksCache(
                    p.jwks_url, self._client, timeout=p.timeout, ttl=p.jwks_cache_ttl,
                    refetch_interval=p.jwks_refetch_interval, steady=self.steady,
                )  # fmt: skip
            secret = env.get(p.secret_env) if p.secret_env else None
            self.providers[p.issuer] = _Provider(p, jwks, secret)
        self._tokens: OrderedDict[bytes, _Seen] = OrderedDict()
        self._refused: dict[bytes, tuple[float, str]] = {}  # settled refusals (see _settle)
        self._expiry: OrderedDict[str, _Seen] = OrderedDict()  # identity id -> its token with the latest until
        self._records: dict[tuple[str, int, str], KeyRecord] = {}
        self.throttle = throttle  # per-address failed attempts, shared with API keys (auth/verify.py)
        self.verified = 0  # signatures that verified (the slow path ran): tests and benchmarks
        registry = registry if registry is not None else CollectorRegistry()
        self.failures = Counter(
            "sidecar_jwt_failures", "JWTs refused, by reason (the 401's message says more)", ["reason"],
            registry=registry,
        )  # fmt: skip
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        registry.register(_JwksCollector(self))

    # ------------------------------------------------------------ lifecycle

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def start(self) -> None:
        """Fetch every JWKS in the background, so the first requests find the keys there."""
        for p in self.providers.values():
            if p.jwks is not None:
                p.jwks.refresh()

    async def close(self) -> None:
        for p in self.providers.values():
            if p.jwks is not None:
                await p.jwks.close()
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------ hot path

    @staticmethod
    def accepts(credential: Credential) -> bool:
        """A JWT in ``Authorization: Bearer`` (an API key never has a dot)."""
        return looks_like_jwt(credential)

    async def verify(self, token: str, client_ip: str | None = None, scope: RequestScope | None = None) -> KeyRecord:
        """The identity this token proves, or ``InvalidToken`` (401) / ``Forbidden`` (no rule grants it).

        With ``client_ip``, a refusal counts as a failed attempt of that address: past
        ``keys.failed_attempts_per_minute`` it is a 429 instead (a token that verifies always passes).
        ``scope.until``: this token's end, so the streams it opens end with it, not with the subject's
        newest token (a leaked token's stream must not live on while its owner keeps refreshing).
        """
        # surrogateescape: aiohttp hands header bytes that are not UTF-8 over as lone surrogates (malformed below).
        fingerprint = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        seen = self._tokens.get(fingerprint)
        if seen is not None:
            if self.expiry() < seen.until and seen.generation == seen.provider.generation:
                self._tokens.move_to_end(fingerprint)
                if seen.provider.jwks is not None:
                    seen.provider.jwks.tick()  # past its TTL: refreshed in the background (a key may be gone)
                if scope is not None:
                    scope.until = seen.until
                return seen.record
            del self._tokens[fingerprint]
        try:
            record = await self._check(token, fingerprint)
        except InvalidToken as e:
            if self.throttle is None or client_ip is None:
                raise
            raise self.throttle.refuse(client_ip, e) from None
        if scope is not None and (seen := self._tokens.get(fingerprint)) is not None:
            scope.until = seen.until
        return record

    async def _check(self, token: str, fingerprint: bytes) -> KeyRecord:
        """A token not remembered as verified: a settled refusal, or the full check."""
        refused = self._refused.get(fingerprint)
        if refused is not None and (refused[1] == "expired" or self.clock() < refused[0]):
            raise self._again(refused[1])  # settled for this token: no signature check again
        try:
            return await self._verify(token, fingerprint)
        except InvalidToken as e:
            self.failures.labels(e.kind).inc()
            if e.kind == "expired":
                self._settle(fingerprint, 0.0, "expired")
            raise

    def _again(self, outcome: str) -> SidecarError:
        if outcome == "expired":
            self.failures.labels("expired").inc()
            return InvalidToken("token expired", "expired")
        return Forbidden(NO_RULE)

    def _settle(self, fingerprint: bytes, until: float, outcome: str) -> None:
        """Remember a refusal that cannot change for this token: expired (for good), or no rule grants it
        (until it expires: its claims and the rules are fixed). A client retrying it costs one hash."""
        if len(self._refused) >= MAX_TOKENS:
            self._refused.clear()
        self._refused[fingerprint] = (until, outcome)

    async def _verify(self, token: str, fingerprint: bytes) -> KeyRecord:
        try:
            obj = extract_compact(token.encode("ascii"))
            header = obj.headers()
            claims = json.loads(obj.payload)
        except (JoseError, ValueError, TypeError, RecursionError, UnicodeError):
            # TypeError: joserfc takes any JSON header holding the text "alg" (``"alg" in header``), a list
            # or a string too, and then indexes it (``header["b64"]``); the isinstance test below for the rest.
            raise InvalidToken("malformed token", "malformed") from None
        if not isinstance(claims, dict) or not isinstance(header, dict) or "b64" in header:
            raise InvalidToken("malformed token", "malformed")
        iss = claims.get("iss")
        provider = self.providers.get(iss) if isinstance(iss, str) else None
        if provider is None:
            raise InvalidToken("wrong issuer (not a configured identity provider)", "issuer")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in provider.algorithms:
            raise InvalidToken("token algorithm not allowed", "algorithm")
        keys = await provider.keys(header, alg)
        generation = provider.generation  # after the lookup: a refetch it caused is the set it verified under
        signer = next((key for key in keys if _signed_by(obj, key, provider.registry)), None)
        if signer is None:
            raise InvalidToken("bad signature", "signature")
        self.verified += 1
        now = self.clock()
        until = provider.check_claims(claims, now)
        if until <= self.expiry():  # the wall clock was stepped back past it: it had ended
            raise InvalidToken("token expired", "expired")
        who = Identity.of(claims, provider.cfg.claims)
        if who is None:
            raise InvalidToken(f"missing subject claim ({provider.cfg.claims.subject})", "claims")
        match = provider.rules.first(who)
        if match is None:
            self._settle(fingerprint, until, "no_rule")
            raise Forbidden(NO_RULE)
        record = self._record(provider, who, *match)
        thumbprint = "" if provider.jwks is None else signer.thumbprint()
        self._remember(fingerprint, _Seen(record, until, provider, generation, thumbprint))
        return record

    def _record(self, provider: _Provider, who: Identity, index: int, grant: Grant) -> KeyRecord:
        """One record per (subject, rule, name): the limiter caches its plan per record object."""
        ident = identity_id(provider.issuer, who.subject)
        cache_key = (ident, index, who.name)
        record = self._records.get(cache_key)
        if record is None:
            if len(self._records) >= MAX_IDENTITIES:
                self._records.clear()
            record = self._records[cache_key] = KeyRecord(
                id=ident,
                name=who.name,
                hash="",
                display=provider.display,
                description=f"JWT subject of {provider.issuer} (rule {index})",
                owner=provider.issuer,
                permissions=grant.permissions,
                rate_limits=grant.rate_limits,
                quota=grant.quota,
                concurrency=grant.concurrency,
                created_at=self.clock(),
            )
        return record

    def _remember(self, fingerprint: bytes, seen: _Seen) -> None:
        self._tokens[fingerprint] = seen
        if len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)
        ident = seen.record.id
        latest = self._expiry.get(ident)
        if latest is None or latest.until < seen.until or not _signer_held(latest):
            self._expiry[ident] = seen
            self._expiry.move_to_end(ident)
            if len(self._expiry) > MAX_IDENTITIES:
                self._expiry.popitem(last=False)

    # ------------------------------------------------------------ streams

    def state(self, key_id: str) -> str:
        """``active`` while the subject's latest token is valid, else ``expired`` (streams end then).

        Valid means unexpired and its signing key still published: a key the IdP withdraws (after a
        leak) ends the streams of the tokens it signed, whatever ``exp`` a forger gave them."""
        seen = self._expiry.get(key_id)
        if seen is not None and seen.provider.jwks is not None:
            seen.provider.jwks.tick()
        return "active" if seen is not None and self.expiry() < seen.until and _signer_held(seen) else "expired"

    def jwks(self) -> Iterator[tuple[str, JwksCache]]:
        for issuer, p in self.providers.items():
            if p.jwks is not None:
                yield issuer, p.jwks


_KEY_TYPES = {"RS": RSAKey, "PS": RSAKey, "ES": ECKey, "Ed": OKPKey}


def _fits(key: PublicKey, alg: str) -> bool:
    """The key's type suits the algorithm, and the key names no other algorithm (RFC 7517 §4.4)."""
    declared = key.get("alg")
    return isinstance(key, _KEY_TYPES.get(alg[:2], ())) and (declared is None or declared == alg)


def _signer_held(seen: _Seen) -> bool:
    """The key that signed this token is still in its provider's key set (always, for a shared secret)."""
    jwks = seen.provider.jwks
    return jwks is None or seen.signer in jwks.thumbprints


def _signed_by(obj: Any, key: PublicKey | OctKey, registry: JWSRegistry) -> bool:
    """joserfc's check: the algorithm is allowed, the key's type fits it, the signature verifies."""
    with contextlib.suppress(JoseError, ValueError, TypeError), warnings.catch_warnings():
        # "EdDSA is deprecated via RFC 9864" (in favour of "Ed25519"): the operator allowed it on purpose.
        warnings.simplefilter("ignore", SecurityWarning)
        return bool(validate_compact(obj, key, registry=registry))
    return False


class _JwksCollector(Collector):
    """``sidecar_jwks_fetches_total{issuer,result}`` and ``sidecar_jwks_keys{issuer}``, read at scrape time."""

    def __init__(self, auth: JwtAuthenticator) -> None:
        self.auth = auth

    def collect(self) -> Iterator[Metric]:
        fetches = CounterMetricFamily(
            "sidecar_jwks_fetches", "JWKS fetches from each identity provider, by result", labels=["issuer", "result"]
        )
        keys = GaugeMetricFamily("sidecar_jwks_keys", "Signing keys held for each identity provider", labels=["issuer"])
        for issuer, cache in self.auth.jwks():
            fetches.add_metric([issuer, "ok"], cache.fetches - cache.failures)
            fetches.add_metric([issuer, "error"], cache.failures)
            keys.add_metric([issuer], sum(map(len, cache.keys.values())))
        yield fetches
        yield keys
