"""JWTs from an identity provider, end to end: a real JWKS server, tokens signed here, a real sidecar.

The IdP (``tests/jwt_support.py``) serves its keys on a free port; the sidecar fronts the
Plex-like upstream. A hand-moved clock drives both the sidecar and the tokens, so expiry,
``nbf``, JWKS refetch spacing and cache TTLs are tested without sleeping. Each test
asserts what the client sees (status, JSON error, headers), what the upstream saw, and
that the token is nowhere it should not be.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config, log_lines
from joserfc import jwt
from joserfc.jwk import OctKey
from jwt_support import AUDIENCE, IdP, b64, bearer, provider
from limits_support import Clock

from sidecar.auth.jwt import identity_id
from sidecar.demo import SEEN

VIEWERS = {"when": {"group": "viewers"}, "grant": {"upstreams": ["plex"], "paths": ["plex:read"]}}
ROLES = {"realm_access": {"roles": ["viewers"]}}


@pytest.fixture
def clock() -> Clock:
    return Clock(float(int(time.time())))


@pytest.fixture
async def idp(aiohttp_server: Any, clock: Clock) -> IdP:
    idp = IdP(clock=clock)
    idp.add_key("k1", "RSA")
    idp.add_key("e1", "EC")
    return await idp.start(aiohttp_server)


async def start(
    make_sidecar: MakeSidecar,
    plex_upstream: TestServer,
    tmp_path: Path,
    clock: Clock,
    jwt: list[dict[str, Any]],
    **overrides: Any,
) -> Running:
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, jwt=jwt, **overrides)
    sc = await make_sidecar(cfg, clock=clock)
    return sc


@pytest.fixture
async def gw(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, clock: Clock, idp: IdP) -> Running:
    return await start(make_sidecar, plex_upstream, tmp_path, clock, [provider(idp, [VIEWERS])])


def failures(gw: Running, reason: str) -> float:
    return gw.sc.metrics.registry.get_sample_value("sidecar_jwt_failures_total", {"reason": reason}) or 0.0


async def refused(gw: Running, token: str, path: str = "/library/sections") -> tuple[int, dict[str, Any], str]:
    r = await gw.proxy.get(path, headers=bearer(token))
    text = await r.text()
    assert token not in text
    return r.status, json.loads(text), r.headers.get("WWW-Authenticate", "")


# ----------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("kid", ["k1", "e1"], ids=["RS256", "ES256"])
async def test_a_valid_token_is_proxied_with_its_rules_permissions(
    gw: Running, idp: IdP, plex_upstream: TestServer, tmp_path: Path, kid: str
) -> None:
    token = idp.token(kid, **ROLES)
    r = await gw.proxy.get("/library/sections", headers=bearer(token))
    assert r.status == 200, await r.text()
    assert "<MediaContainer" in await r.text()
    # The upstream got its own token, never the JWT (not in a header, not in the query).
    seen = plex_upstream.app[SEEN][-1]
    assert seen["headers"]["X-Plex-Token"] == PLEX_TOKEN  # type: ignore[index]
    assert all(token not in str(v) for v in seen["headers"].values())  # type: ignore[attr-defined]
    assert "Authorization" not in seen["headers"]  # type: ignore[operator]
    # plex:read does not include a library refresh: 403, and the upstream never sees it.
    before = len(plex_upstream.app[SEEN])
    r = await gw.proxy.get("/library/sections/1/refresh", headers=bearer(token))
    assert r.status == 403
    assert (await r.json())["error"]["code"] == "insufficient_permissions"
    assert len(plex_upstream.app[SEEN]) == before

    ident = identity_id(idp.issuer, "alice")
    gw.sc.access_log.flush()
    lines = await log_lines(tmp_path / "access.log", 2)
    assert [(e["key"], e["credential"], e["status"]) for e in lines] == [(ident, "jwt", 200), (ident, "jwt", 403)]
    assert token not in (tmp_path / "access.log").read_text()
    sample = gw.sc.metrics.registry.get_sample_value
    assert sample("sidecar_requests_total", {"key": ident, "upstream": "plex", "method": "GET", "code": "200"}) == 1


async def test_eddsa_when_the_provider_allows_it(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, clock: Clock, idp: IdP
) -> None:
    idp.add_key("ed", "OKP")
    algorithms = ["RS256", "Ed25519", "EdDSA"]  # EdDSA: the name most IdPs still send (RFC 9864 deprecates it)
    gw = await start(make_sidecar, plex_upstream, tmp_path, clock, [provider(idp, [VIEWERS], algorithms=algorithms)])
    for alg in ("Ed25519", "EdDSA"):
        token = idp.token("ed", sub=alg, header={"alg": alg}, **ROLES)
        assert (await gw.proxy.get("/library/sections", headers=bearer(token))).status == 200
    # Not allowed by default: the same key's tokens are refused on their algorithm.
    assert (await refused(gw, idp.token("e1", **ROLES)))[1]["error"][
        "message"
    ] == "invalid token: token algorithm not allowed"


async def test_a_token_no_rule_grants_is_forbidden(gw: Running, idp: IdP) -> None:
    r = await gw.proxy.get("/library/sections", headers=bearer(idp.token(realm_access={"roles": ["guests"]})))
    assert r.status == 403
    body = await r.json()
    assert body == {
        "success": False,
        "error": {"code": "insufficient_permissions", "message": body["error"]["message"]},
    }
    assert "no jwt rule" in body["error"]["message"]
    token = idp.token(realm_access={"roles": ["guests"]}, lifetime=60)
    for _ in range(3):
        assert (await gw.proxy.get("/library/sections", headers=bearer(token))).status == 403
    assert gw.sc.jwt is not None and gw.sc.jwt.verified == 2  # once per token: then refused from memory
    idp.clock.advance(61 + 60)  # type: ignore[attr-defined]
    r = await gw.proxy.get("/library/sections", headers=bearer(token))
    assert (r.status, (await r.json())["error"]["message"]) == (401, "invalid token: token expired")


async def test_a_verified_token_is_remembered_until_it_expires(gw: Running, idp: IdP, clock: Clock) -> None:
    token = idp.token(lifetime=120, **ROLES)
    for _ in range(5):
        assert (await gw.proxy.get("/library/sections", headers=bearer(token))).status == 200
    assert gw.sc.jwt is not None and gw.sc.jwt.verified == 1  # one signature check for five requests
    clock.advance(120 + 59)  # inside the 60 s skew: still good
    assert (await gw.proxy.get("/library/sections", headers=bearer(token))).status == 200
    clock.advance(2)
    for _ in range(3):
        status, body, _ = await refused(gw, token)
    assert gw.sc.jwt.verified == 2  # checked once more when it expired, then refused from memory
    assert (status, body["error"]["code"], body["error"]["message"]) == (
        401,
        "invalid_token",
        "invalid token: token expired",
    )


async def test_a_jwt_is_redacted_from_every_log(gw: Running, idp: IdP, tmp_path: Path, caplog: Any) -> None:
    token, other = idp.token(**ROLES), idp.token(sub="someone-else", **ROLES)
    r = await gw.proxy.get(f"/library/sections?id_token={other}", headers=bearer(token))
    assert r.status == 200
    logging.getLogger("some.library").warning("failed to parse header line: Authorization: Bearer %s", token)
    assert token not in caplog.text and "REDACTED" in caplog.text
    gw.sc.access_log.flush()
    (line,) = await log_lines(tmp_path / "access.log")
    assert line["path"] == "/library/sections?id_token=REDACTED"


async def test_api_keys_keep_working_next_to_jwt(gw: Running) -> None:
    _, key = await gw.create_key(permissions={"upstreams": ["plex"]})
    assert (await gw.proxy.get("/library/sections", headers=bearer(key))).status == 200


# ----------------------------------------------------------------------------- refused


def _forged(idp: IdP, case: str) -> str:
    now = int(idp.clock())
    match case:
        case "expired":
            return idp.token(iat=now - 600, exp=now - 61, **ROLES)
        case "not yet valid":
            return idp.token(nbf=now + 61, **ROLES)
        case "issued in the future":
            return idp.token(iat=now + 600, exp=now + 900, **ROLES)
        case "wrong audience":
            return idp.token(aud="someone-else", **ROLES)
        case "wrong issuer":
            return idp.token(iss="https://evil.test/realms/test", **ROLES)
        case "no exp":
            return idp.token(exp=None, **ROLES)
        case "alg none":
            return idp.unsigned(**ROLES)
        case "HS256 keyed with the RSA public key":
            return idp.hs256_with_public_key(**ROLES)
        case "signed by another key":
            idp.add_key("stranger", publish=False)
            return idp.token("stranger", header={"kid": "k1"}, **ROLES)  # kid says k1; the key is not k1
        case "jku to the attacker's keys":
            idp.add_key("evil", "EC", publish=False)
            return idp.token("evil", header={"jku": "https://attacker.test/jwks.json"}, **ROLES)
        case "embedded jwk":
            evil = idp.add_key("evil", "EC", publish=False)
            return idp.token("evil", header={"jwk": evil.as_dict(private=False)}, **ROLES)
        case "tampered payload":
            head, _, sig = idp.token(**ROLES).split(".")
            body = b64(json.dumps(idp.claims("mallory", realm_access={"roles": ["viewers"]})).encode())
            return f"{head}.{body}.{sig}"
        case "garbage":
            return "eyJhbGciOiJSUzI1NiJ9.not-json.c2ln"
    raise AssertionError(case)


REFUSALS = [
    ("expired", "token expired", "expired"),
    ("not yet valid", "token not yet valid", "not_yet_valid"),
    ("issued in the future", "token issued in the future", "not_yet_valid"),
    ("wrong audience", "wrong audience", "audience"),
    ("wrong issuer", "wrong issuer (not a configured identity provider)", "issuer"),
    ("no exp", "missing claim exp", "claims"),
    ("alg none", "token algorithm not allowed", "algorithm"),
    ("HS256 keyed with the RSA public key", "token algorithm not allowed", "algorithm"),
    ("signed by another key", "bad signature", "signature"),
    ("jku to the attacker's keys", "unknown signing key (kid)", "unknown_key"),
    ("embedded jwk", "unknown signing key (kid)", "unknown_key"),
    ("tampered payload", "bad signature", "signature"),
    ("garbage", "malformed token", "malformed"),
]


@pytest.mark.parametrize(("case", "reason", "metric"), REFUSALS, ids=[c for c, _, _ in REFUSALS])
async def test_a_bad_token_is_401_with_its_reason(
    gw: Running, idp: IdP, plex_upstream: TestServer, tmp_path: Path, case: str, reason: str, metric: str
) -> None:
    token = _forged(idp, case)
    before = len(plex_upstream.app[SEEN])
    status, body, challenge = await refused(gw, token)
    assert status == 401
    assert body == {"success": False, "error": {"code": "invalid_token", "message": f"invalid token: {reason}"}}
    assert challenge == f'Bearer realm="sidecar", error="invalid_token", error_description="{reason}"'
    assert len(plex_upstream.app[SEEN]) == before  # nothing reached the upstream
    assert failures(gw, metric) == 1
    assert gw.sc.metrics.registry.get_sample_value("sidecar_auth_failures_total", {"reason": "invalid_token"}) == 1
    gw.sc.access_log.flush()
    (line,) = await log_lines(tmp_path / "access.log")
    assert (line["key"], line["error"]) == (None, "invalid_token")
    assert token not in (tmp_path / "access.log").read_text()


async def test_a_token_within_the_clock_skew_is_accepted(gw: Running, idp: IdP) -> None:
    now = int(idp.clock())
    late = idp.token(iat=now - 600, exp=now - 30, **ROLES)  # expired 30 s ago; skew is 60 s
    early = idp.token(nbf=now + 30, iat=now + 30, **ROLES)  # the IdP's clock runs 30 s ahead
    for token in (late, early):
        assert (await gw.proxy.get("/library/sections", headers=bearer(token))).status == 200


async def test_a_jwt_is_accepted_only_as_a_bearer_token(gw: Running, idp: IdP, tmp_path: Path) -> None:
    token = idp.token(**ROLES)
    for kw in (
        {"params": {"X-Plex-Token": token}},
        {"headers": {"x-api-key": token}},
        {"headers": {"Authorization": f"ApiKey {token}"}},
    ):
        r = await gw.proxy.get("/library/sections", **kw)  # type: ignore[arg-type]
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "invalid_key"
    gw.sc.access_log.flush()
    await log_lines(tmp_path / "access.log", 3)
    assert token not in (tmp_path / "access.log").read_text()
    assert gw.sc.jwt is not None and gw.sc.jwt.verified == 0


# ----------------------------------------------------------------------------- keys: refetch, flood, rotation


async def test_an_unknown_kid_refetches_the_keys_then_is_accepted(gw: Running, idp: IdP, clock: Clock) -> None:
    assert (await gw.proxy.get("/library/sections", headers=bearer(idp.token(**ROLES)))).status == 200
    assert idp.fetches == 1
    idp.add_key("k2", "EC")  # the IdP adds a key; the sidecar has not seen it
    clock.advance(11)  # past jwks_refetch_interval (10 s)
    r = await gw.proxy.get("/library/sections", headers=bearer(idp.token("k2", sub="bob", **ROLES)))
    assert r.status == 200, await r.text()
    assert idp.fetches == 2


async def test_a_flood_of_unknown_kids_costs_the_idp_one_fetch_per_interval(
    gw: Running, idp: IdP, clock: Clock
) -> None:
    assert (await gw.proxy.get("/library/sections", headers=bearer(idp.token(**ROLES)))).status == 200
    clock.advance(11)
    tokens = [idp.token(header={"kid": f"random-{i}"}, **ROLES) for i in range(40)]
    answers = await asyncio.gather(*(refused(gw, t) for t in tokens))
    # Past keys.failed_attempts_per_minute (30) the address's failures are 429s, as for forged keys.
    assert (
        sorted((s, b["error"]["message"]) for s, b, _ in answers)
        == [(401, "invalid token: unknown signing key (kid)")] * 30
        + [(429, "too many failed key attempts from this address; slow down")] * 10
    )
    assert idp.fetches == 2  # the start, and one refetch shared by all forty
    for t in tokens[:10]:  # within the interval: no fetch at all
        assert (await refused(gw, t))[0] == 429
    assert idp.fetches == 2
    clock.advance(11)
    assert (await refused(gw, tokens[0]))[0] == 429
    assert idp.fetches == 3
    assert failures(gw, "unknown_key") == 51  # every one was checked: the reason is still counted


async def test_key_rotation(gw: Running, idp: IdP, clock: Clock) -> None:
    old = idp.token("k1", **ROLES)
    assert (await gw.proxy.get("/library/sections", headers=bearer(old))).status == 200
    # The IdP rotates: k2 is published, k1 withdrawn (say it leaked).
    idp.add_key("k2", "RSA")
    idp.published.remove("k1")
    clock.advance(11)
    new = idp.token("k2", **ROLES)
    assert (await gw.proxy.get("/library/sections", headers=bearer(new))).status == 200
    assert idp.fetches == 2
    # The withdrawn key is gone for new tokens, and for the one the sidecar had remembered.
    for token in (old, idp.token("k1", sub="carol", **ROLES)):
        status, body, _ = await refused(gw, token)
        assert (status, body["error"]["message"]) == (401, "invalid token: unknown signing key (kid)")
    assert (await gw.proxy.get("/library/sections", headers=bearer(new))).status == 200


async def test_an_empty_key_set_withdraws_every_key(
    gw: Running, idp: IdP, clock: Clock, plex_upstream: TestServer
) -> None:
    """An IdP that withdraws every key publishes ``{"keys": []}``: that is an answer, not a failed
    fetch, so the keys it held stop verifying (tokens and their open streams), as for one key withdrawn."""
    assert gw.sc.jwt is not None
    tokens = [idp.token(kid, lifetime=3600, **ROLES) for kid in ("k1", "e1")]
    for token in tokens:
        assert (await gw.proxy.get("/library/sections", headers=bearer(token))).status == 200
    ident = identity_id(idp.issuer, "alice")
    assert gw.sc.streams.state(ident) == "active"
    idp.published.clear()
    assert idp.jwks() == {"keys": []}
    clock.advance(601)  # past jwks_cache_ttl: a remembered token's request starts the refresh
    deadline = time.monotonic() + 3
    while (await gw.proxy.get("/library/sections", headers=bearer(tokens[0]))).status == 200:
        assert time.monotonic() < deadline, "a token of a withdrawn key is still accepted"
        await asyncio.sleep(0.01)
    _, cache = next(gw.sc.jwt.jwks())
    assert (cache.failures, cache.last_error, cache.keys) == (0, "", {})
    seen = len(plex_upstream.app[SEEN])
    for token in (*tokens, idp.token("k1", sub="carol", **ROLES)):
        status, body, _ = await refused(gw, token)
        assert (status, body["error"]["message"]) == (401, "invalid token: unknown signing key (kid)")
    assert len(plex_upstream.app[SEEN]) == seen
    assert gw.sc.streams.state(ident) == "expired"
    # The IdP publishes a key again: its tokens work at once (an unknown kid is refetched).
    idp.add_key("k2", "RSA")
    clock.advance(11)
    assert (await gw.proxy.get("/library/sections", headers=bearer(idp.token("k2", **ROLES)))).status == 200


async def test_a_token_without_kid_is_checked_against_the_keys_of_its_type(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, clock: Clock, idp: IdP
) -> None:
    idp.kidless = {"k1", "e1"}
    gw = await start(make_sidecar, plex_upstream, tmp_path, clock, [provider(idp, [VIEWERS])])
    for kid in ("k1", "e1"):
        r = await gw.proxy.get("/library/sections", headers=bearer(idp.token(kid, header={"kid": None}, **ROLES)))
        assert r.status == 200, await r.text()
    idp.add_key("stranger", publish=False)
    status, body, _ = await refused(gw, idp.token("stranger", header={"kid": None}, **ROLES))
    assert (status, body["error"]["message"]) == (401, "invalid token: bad signature")


async def test_keys_are_refreshed_after_their_ttl(gw: Running, idp: IdP, clock: Clock) -> None:
    assert (await gw.proxy.get("/library/sections", headers=bearer(idp.token(**ROLES)))).status == 200
    clock.advance(601)  # jwks_cache_ttl 10m
    assert (await gw.proxy.get("/library/sections", headers=bearer(idp.token(sub="bob", **ROLES)))).status == 200
    await _until(lambda: idp.fetches == 2)  # refreshed in the background; the request did not wait


async def test_when_the_idp_is_down_known_keys_keep_working(gw: Running, idp: IdP, clock: Clock) -> None:
    assert (await gw.proxy.get("/library/sections", headers=bearer(idp.token(**ROLES)))).status == 200
    assert idp.server is not None
    await idp.server.close()  # connection refused from now on
    clock.advance(601)  # the keys are stale; a refresh is due and will fail
    for sub in ("bob", "carol"):
        assert (await gw.proxy.get("/library/sections", headers=bearer(idp.token(sub=sub, **ROLES)))).status == 200
    await _until(lambda: _jwks_errors(gw) == 1)
    status, body, _ = await refused(gw, idp.token(header={"kid": "k9"}, **ROLES))
    assert status == 401
    assert body["error"]["message"] == (
        "invalid token: unknown signing key (kid), and the identity provider's keys could not be refreshed"
    )


async def test_when_the_idp_was_never_reached_tokens_are_refused_clearly(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, clock: Clock, idp: IdP
) -> None:
    idp.status = 503
    gw = await start(make_sidecar, plex_upstream, tmp_path, clock, [provider(idp, [VIEWERS])])
    status, body, _ = await refused(gw, idp.token(**ROLES))
    assert status == 401
    assert body["error"]["message"] == "invalid token: the identity provider's signing keys could not be fetched"
    idp.status = 200  # back up: the next try after the interval gets the keys
    clock.advance(11)
    assert (await gw.proxy.get("/library/sections", headers=bearer(idp.token(**ROLES)))).status == 200


def _jwks_errors(gw: Running) -> float:
    sample = gw.sc.metrics.registry.get_sample_value
    return sample("sidecar_jwks_fetches_total", {"issuer": "https://idp.test/realms/test", "result": "error"}) or 0.0


async def _until(cond: Any, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------- limits, metrics, streams


async def test_rate_limits_apply_per_subject_across_its_tokens(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, clock: Clock, idp: IdP
) -> None:
    rule = {"when": {"group": "viewers"}, "grant": {"upstreams": ["plex"], "rate_limits": ["3/minute"]}}
    gw = await start(make_sidecar, plex_upstream, tmp_path, clock, [provider(idp, [rule])])
    first, second = idp.token(jti="a", **ROLES), idp.token(jti="b", **ROLES)  # two tokens, one subject
    statuses = [(await gw.proxy.get("/library/sections", headers=bearer(t))).status for t in (first, second, first)]
    assert statuses == [200, 200, 200]
    r = await gw.proxy.get("/library/sections", headers=bearer(second))
    assert r.status == 429
    assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
    assert "Retry-After" in r.headers
    r = await gw.proxy.get("/library/sections", headers=bearer(idp.token(sub="bob", **ROLES)))
    assert r.status == 200  # another subject: its own budget
    assert r.headers["X-RateLimit-Limit"] == "3"
    assert r.headers["X-RateLimit-Remaining"] == "2"


async def test_subjects_past_the_metrics_cap_fold_into_other(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, clock: Clock, idp: IdP
) -> None:
    gw = await start(
        make_sidecar, plex_upstream, tmp_path, clock, [provider(idp, [VIEWERS])], metrics={"max_key_series": 2}
    )
    for sub in ("a", "b", "c", "d"):
        assert (await gw.proxy.get("/library/sections", headers=bearer(idp.token(sub=sub, **ROLES)))).status == 200
    sample = gw.sc.metrics.registry.get_sample_value
    labels = {"upstream": "plex", "method": "GET", "code": "200"}
    assert sample("sidecar_requests_total", {"key": identity_id(idp.issuer, "a"), **labels}) == 1
    assert sample("sidecar_requests_total", {"key": identity_id(idp.issuer, "b"), **labels}) == 1
    assert sample("sidecar_requests_total", {"key": "other", **labels}) == 2


async def test_open_streams_of_a_subject_end_when_its_latest_token_expires(gw: Running, idp: IdP, clock: Clock) -> None:
    assert gw.sc.jwt is not None
    ident = identity_id(idp.issuer, "alice")
    short = idp.token(lifetime=60, **ROLES)
    assert (await gw.proxy.get("/library/sections", headers=bearer(short))).status == 200
    assert gw.sc.streams.state(ident) == "active"
    clock.advance(100)
    longer = idp.token(lifetime=300, **ROLES)  # the client refreshed its token: the subject lives on
    assert (await gw.proxy.get("/library/sections", headers=bearer(longer))).status == 200
    clock.advance(100)
    assert gw.sc.streams.state(ident) == "active"
    clock.advance(300)
    assert gw.sc.streams.state(ident) == "expired"
    assert gw.sc.streams.state("jwt:0000000000000000") == "expired"  # never seen


async def test_an_hmac_provider_takes_only_its_shared_secret(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, clock: Clock, idp: IdP
) -> None:
    secret = "s3cret-" + "x" * 40
    hs = {
        "issuer": "https://hs.test", "audience": AUDIENCE, "algorithms": ["HS256"], "secret_env": "JWT_SECRET",
        "rules": [{"grant": {"upstreams": ["plex"]}}],
    }  # fmt: skip
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, jwt=[hs, provider(idp, [VIEWERS])])
    gw = await make_sidecar(cfg, clock=clock, extra_env={"JWT_SECRET": secret})
    claims = {**idp.claims("svc"), "iss": "https://hs.test"}
    good = jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(secret), algorithms=["HS256"])
    assert (await gw.proxy.get("/library/sections", headers=bearer(good))).status == 200
    # An RS256 token claiming the HMAC issuer is refused on its algorithm, before any key is looked at.
    rs = idp.token(iss="https://hs.test")
    assert (await refused(gw, rs))[1]["error"]["message"] == "invalid token: token algorithm not allowed"
    wrong = jwt.encode({"alg": "HS256"}, claims, OctKey.import_key("y" * 48), algorithms=["HS256"])
    assert (await refused(gw, wrong))[1]["error"]["message"] == "invalid token: bad signature"


async def test_quota_and_usage_are_kept_per_subject(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, clock: Clock, idp: IdP
) -> None:
    rule = {"when": {"group": "viewers"}, "grant": {"upstreams": ["plex"], "quota": "2/day"}}
    gw = await start(make_sidecar, plex_upstream, tmp_path, clock, [provider(idp, [rule])])
    token = idp.token(**ROLES)
    statuses = [(await gw.proxy.get("/library/sections", headers=bearer(token))).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    r = await gw.proxy.get("/library/sections", headers=bearer(idp.token(jti="fresh", **ROLES)))
    assert (r.status, (await r.json())["error"]["code"]) == (429, "quota_exceeded")  # a new token, the same subject
    await gw.sc.usage.flush()
    (day,) = await gw.sc.store.usage(identity_id(idp.issuer, "alice"))
    assert (day["requests"], day["errors"], day["rate_limited"]) == (4, 2, 2)
