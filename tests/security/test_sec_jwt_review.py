"""A second attacker's review of JWTs from an identity provider (``sidecar/auth/jwt*.py``).

A real sidecar in front of the Plex-like upstream, a real in-process JWKS server
(``tests/jwt_support.py``) and an HMAC provider whose secret the test holds, so a token can
carry exactly the bytes a hostile client or a buggy IdP would put there. Each refusal is the
designed JSON error, never a 500, and nothing reaches the upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt_support import AUDIENCE, IdP, b64, provider
from limits_support import Clock
from test_sec_jwt_sealing import GRANT_ALL, HS_ISSUER, HS_SECRET, answer, gw

from sidecar.auth.jwt import JwtAuthenticator
from sidecar.config.jwt import JwtProvider
from sidecar.core.errors import Forbidden, InvalidToken
from sidecar.demo import SEEN

__all__ = ["gw"]  # the fixture (test_sec_jwt_sealing's, on this file's idp), re-exported for pytest


@pytest.fixture
async def idp(aiohttp_server: Any) -> IdP:
    idp = IdP()
    idp.add_key("k1", "RSA")
    return await idp.start(aiohttp_server)


def hs256(payload: dict[str, Any], header: bytes = b'{"alg":"HS256","typ":"JWT"}') -> str:
    """Signed with the HMAC provider's secret over exactly this header text."""
    head, body = b64(header), b64(json.dumps(payload).encode())
    return f"{head}.{body}.{b64(hmac.new(HS_SECRET.encode(), f'{head}.{body}'.encode(), hashlib.sha256).digest())}"


def claims(**over: Any) -> dict[str, Any]:
    return {"iss": HS_ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + 300, **over}


# ----------------------------------------------------------------------------- a header that is no JSON object

NOT_AN_OBJECT = {
    "a list naming alg (signed)": b'["alg"]',
    "a string holding alg (signed)": b'"alg"',
    "a string holding b64 too": b'"alg b64"',
    "a list naming b64 too (joserfc indexes it)": b'["alg", "b64"]',
}


@pytest.mark.parametrize("header", list(NOT_AN_OBJECT.values()), ids=list(NOT_AN_OBJECT))
async def test_a_header_that_is_not_a_json_object_is_401_not_500(
    gw: Running, plex_upstream: TestServer, idp: IdP, header: bytes
) -> None:
    """joserfc accepts any JSON header that contains the text ``alg`` (``"alg" in header``): a list or a
    string got through to ``header.get`` and answered 500, unthrottled, before any signature check."""
    before = len(plex_upstream.app[SEEN])
    for token in (hs256(claims(), header), hs256(claims(iss=idp.issuer), header)):
        status, body = await answer(gw, token)
        assert (status, body["error"]["code"]) == (401, "invalid_token"), body
        assert body["error"]["message"] == "invalid token: malformed token"
    assert len(plex_upstream.app[SEEN]) == before


# ----------------------------------------------------------------------------- claims read as the IdP wrote them

ADMIN_BY_SCOPE = {"when": {"scope": "admin"}, "grant": {"upstreams": ["plex"]}}


async def hs_gw(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, *rules: Any) -> Running:
    hs = {"issuer": HS_ISSUER, "audience": AUDIENCE, "algorithms": ["HS256"], "secret_env": "HS_SECRET"}
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, jwt=[{**hs, "rules": list(rules)}])
    return await make_sidecar(cfg, extra_env={"HS_SECRET": HS_SECRET})


@pytest.mark.parametrize(
    "space", ["\t", "\n", "\u00a0", "\u2003", "\u3000", "\x1c", "\x85", "\u2028"], ids=lambda c: f"U+{ord(c):04X}"
)
async def test_a_scope_is_split_only_on_the_space_the_idp_splits_on(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, space: str
) -> None:
    """RFC 6749 §3.3 / RFC 8693 §4.2: scope tokens are separated by SP (U+0020) alone. ``str.split()``
    also split on tabs, NBSP, U+2003, U+001C…: one scope an IdP issued (a dynamic scope whose parameter
    the client chose, ``group:x<NBSP>admin``) was read here as two, ``admin`` among them."""
    gw = await hs_gw(make_sidecar, plex_upstream, tmp_path, ADMIN_BY_SCOPE)
    assert (await answer(gw, hs256(claims(scope="openid admin"))))[0] == 200  # the control
    status, body = await answer(gw, hs256(claims(scope=f"openid group:x{space}admin")))
    assert (status, body["error"]["code"]) == (403, "insufficient_permissions"), body


# ----------------------------------------------------------------------------- any JSON a signer could emit


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
HEADER_NAMES = st.sampled_from(["alg", "kid", "typ", "crit", "b64", "jku", "jwk", "x5u", "x5c", "cty", "zip", "enc"])
HEADERS = (
    st.dictionaries(HEADER_NAMES, JSON, max_size=4).map(lambda h: {"alg": "HS256", **h})
    | st.dictionaries(HEADER_NAMES, JSON, max_size=4)
    | st.lists(st.sampled_from(["alg", "b64", "kid", "crit"]), max_size=3)
    | st.sampled_from(["alg", "alg b64", "b64", ""])
    | JSON
)
CLAIM_NAMES = st.sampled_from(["iss", "aud", "sub", "exp", "nbf", "iat", "jti", "scope", "groups", "name", "x"])
PAYLOADS = st.dictionaries(CLAIM_NAMES, JSON, max_size=6).map(lambda c: {**claims(), **c}) | JSON


def authenticator() -> JwtAuthenticator:
    """The HMAC provider alone, in process: what a token's bytes can do to verification itself."""
    raw = {
        "issuer": HS_ISSUER, "audience": AUDIENCE, "algorithms": ["HS256"], "secret_env": "S",
        "claims": {"groups": "groups", "name": "name"}, "rules": [{"when": {"group": "g"}, **GRANT_ALL}],
    }  # fmt: skip
    return JwtAuthenticator([JwtProvider.model_validate(raw)], env={"S": HS_SECRET})


@given(header=HEADERS, payload=PAYLOADS)
@settings(max_examples=300)
def test_any_signed_header_and_payload_is_an_identity_or_a_designed_refusal(header: Any, payload: Any) -> None:
    """Whatever JSON sits in a signed token's header and payload: a record, 401 invalid_token or 403."""
    token = hs256(payload, json.dumps(header).encode())

    async def run() -> None:
        auth = authenticator()
        try:
            record = await auth.verify(token)
            assert record.id.startswith("jwt:") and record.permissions.upstreams == ("plex",)
        except (InvalidToken, Forbidden):
            pass
        finally:
            await auth.close()

    asyncio.run(run())


# ----------------------------------------------------------------------------- a key set with a key joserfc cannot read


class OddIdP(IdP):
    """An IdP whose JWKS also lists keys this sidecar cannot use (a curve joserfc does not know)."""

    extra: tuple[dict[str, Any], ...] = ()

    def jwks(self) -> dict[str, Any]:
        out = super().jwks()
        out["keys"] += list(self.extra)
        return out


ODD_KEYS = {
    "EC on brainpoolP256r1 (eIDAS IdPs)": {"kty": "EC", "crv": "brainpoolP256r1", "x": "AAAA", "y": "AAAA"},
    "EC on P-192": {"kty": "EC", "crv": "P-192", "x": "AAAA", "y": "AAAA"},
    "OKP on a NIST curve": {"kty": "OKP", "crv": "P-256", "x": "AAAA"},
}


@pytest.mark.parametrize("odd", list(ODD_KEYS.values()), ids=list(ODD_KEYS))
async def test_a_key_set_with_an_unreadable_key_still_rotates_and_withdraws(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, aiohttp_server: Any, odd: dict[str, Any]
) -> None:
    """joserfc raises KeyError for a curve it does not know, and parse_jwks let it escape: the whole
    fetch failed, so the sidecar kept its old keys. A key the IdP withdrew (after a leak) stayed valid,
    and the key that replaced it was never learnt. One unusable key must be skipped, not the set."""
    clock = Clock(float(int(time.time())))
    idp = OddIdP(clock=clock)
    idp.add_key("k1", "RSA")
    await idp.start(aiohttp_server)
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, jwt=[provider(idp, [GRANT_ALL])])
    gw = await make_sidecar(cfg, clock=clock)
    leaked = idp.token("k1")
    assert (await answer(gw, leaked))[0] == 200
    idp.add_key("k2", "EC")  # the IdP rotates: k1 withdrawn, k2 published next to a key it cannot use
    idp.published.remove("k1")
    idp.extra = ({**odd, "kid": "odd", "use": "sig"},)
    clock.advance(11)  # past jwks_refetch_interval: k2's unknown kid refetches
    assert (await answer(gw, idp.token("k2")))[0] == 200
    status, body = await answer(gw, leaked)
    assert (status, body["error"]["message"]) == (401, "invalid token: unknown signing key (kid)")
    assert gw.sc.jwt is not None
    assert [cache.failures for _, cache in gw.sc.jwt.jwks()] == [0]


# ----------------------------------------------------------------------------- keys stay with their issuer


async def test_a_kid_of_another_issuers_key_set_never_verifies(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, aiohttp_server: Any
) -> None:
    """Two providers, each its own key set: a token naming issuer A, signed by B's key under B's kid (or
    A's kid), is refused; each issuer's own token passes. Keys are looked up per issuer, never pooled."""
    a, b = IdP(), IdP(issuer="https://other-idp.test/")
    a.add_key("ka", "RSA")
    b.add_key("kb", "RSA")
    await a.start(aiohttp_server)
    await b.start(aiohttp_server)
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path,
                      jwt=[provider(a, [GRANT_ALL]), provider(b, [GRANT_ALL])])  # fmt: skip
    gw = await make_sidecar(cfg)
    assert (await answer(gw, a.token("ka")))[0] == 200
    assert (await answer(gw, b.token("kb")))[0] == 200
    b.issuer = a.issuer  # B's key signs a token that names A as its issuer
    for kid, why in (("kb", "unknown signing key (kid)"), ("ka", "bad signature")):
        status, body = await answer(gw, b.token("kb", header={"kid": kid}))
        assert (status, body["error"]["message"]) == (401, f"invalid token: {why}")
