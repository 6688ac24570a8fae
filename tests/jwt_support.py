"""A real identity provider for the JWT tests: signing keys, a JWKS endpoint, tokens.

``IdP`` generates RSA and EC keys with joserfc, publishes the chosen ones at
``/realms/test/certs`` on a real aiohttp server (a free port, closed by the
``aiohttp_server`` fixture), counts the fetches and signs tokens the way Keycloak, Auth0
or Entra ID would (``kid`` in the header, ``iss``/``aud``/``exp``/``iat``/``sub`` in the
claims). It also forges what an attacker would send: ``alg: none`` and HS256 "signed"
with the RSA public key as the HMAC secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey

ISSUER = "https://idp.test/realms/test"
AUDIENCE = "sidecar"
JWKS_PATH = "/realms/test/certs"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class IdP:
    def __init__(self, issuer: str = ISSUER, clock: Callable[[], float] = time.time) -> None:
        self.issuer = issuer
        self.clock = clock
        self.keys: dict[str, RSAKey | ECKey | OKPKey] = {}
        self.published: list[str] = []
        self.kidless: set[str] = set()  # published without their kid (some IdPs publish one key, unnamed)
        self.fetches = 0
        self.status = 200  # what the JWKS endpoint answers (503: the IdP is having a bad day)
        self.server: TestServer | None = None

    # ------------------------------------------------------------ keys

    def add_key(self, kid: str, kind: str = "RSA", publish: bool = True) -> RSAKey | ECKey | OKPKey:
        params = {"kid": kid, "use": "sig"}
        key: RSAKey | ECKey | OKPKey
        if kind == "RSA":
            key = RSAKey.generate_key(2048, parameters=params)
        elif kind == "EC":
            key = ECKey.generate_key("P-256", params)
        else:
            key = OKPKey.generate_key("Ed25519", params)
        self.keys[kid] = key
        if publish:
            self.published.append(kid)
        return key

    def jwks(self) -> dict[str, Any]:
        keys = [self.keys[k].as_dict(private=False) for k in self.published]
        return {"keys": [{n: v for n, v in k.items() if n != "kid" or v not in self.kidless} for k in keys]}

    async def start(self, aiohttp_server: Any) -> IdP:
        async def certs(request: web.Request) -> web.Response:
            self.fetches += 1
            if self.status != 200:
                return web.Response(status=self.status, text="down")
            return web.json_response(self.jwks())

        app = web.Application()
        app.router.add_get(JWKS_PATH, certs)
        self.server = await aiohttp_server(app)
        return self

    @property
    def jwks_url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url(JWKS_PATH))

    # ------------------------------------------------------------ tokens

    def claims(self, sub: str = "alice", lifetime: float = 300, **extra: Any) -> dict[str, Any]:
        now = int(self.clock())
        out: dict[str, Any] = {"iss": self.issuer, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + int(lifetime)}
        out.update(extra)
        return {k: v for k, v in out.items() if v is not None}

    def token(self, kid: str = "k1", sub: str = "alice", header: dict[str, Any] | None = None, **claims: Any) -> str:
        key = self.keys[kid]
        alg = "RS256" if isinstance(key, RSAKey) else "ES256" if isinstance(key, ECKey) else "Ed25519"
        head = {"alg": alg, "kid": kid, "typ": "JWT", **(header or {})}
        head = {k: v for k, v in head.items() if v is not None}  # header={"kid": None}: no kid
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SecurityWarning)  # "EdDSA is deprecated": tests sign with it on purpose
            return jwt.encode(head, self.claims(sub, **claims), key, algorithms=[head["alg"]])

    def unsigned(self, sub: str = "alice", **claims: Any) -> str:
        """``alg: none``: no signature at all."""
        head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        return f"{head}.{b64(json.dumps(self.claims(sub, **claims)).encode())}."

    def hs256_with_public_key(self, kid: str = "k1", sub: str = "alice", **claims: Any) -> str:
        """The algorithm-confusion forgery: HS256 keyed with the RSA key's public PEM (anyone has it)."""
        public_pem = self.keys[kid].as_pem(private=False)  # type: ignore[union-attr]
        head = b64(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
        body = b64(json.dumps(self.claims(sub, **claims)).encode())
        sig = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64(sig)}"


def provider(idp: IdP, rules: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """One ``jwt:`` provider entry for ``idp``."""
    out: dict[str, Any] = {
        "issuer": idp.issuer,
        "jwks_url": idp.jwks_url,
        "audience": AUDIENCE,
        "claims": {"groups": "realm_access.roles"},  # Keycloak's shape
        "rules": rules,
    }
    out.update(overrides)
    return out


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
