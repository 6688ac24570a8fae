"""An attacker's review of JWT validation and of sealed MCP session ids.

JWT: a real sidecar in front of the Plex-like upstream, a real in-process JWKS server
(``tests/jwt_support.py``) and an HMAC provider whose secret the test holds, so it can
sign exactly the claims a buggy or hostile IdP would (a huge ``exp``, a lone surrogate in
``sub``). Each refusal is the designed ``401 invalid_token``, never a 500, and nothing
reaches the upstream. Sealing: the ``Sealer`` itself, for what a client could do to the
id it was given (re-encode it, alias it, pad it) and for keys whose 32-bit ids collide.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwt_support import AUDIENCE, IdP, b64, bearer, provider
from limits_support import Clock
from mcp_server import MCP_TOKEN, McpUpstream
from raw_http import read_response

from sidecar.auth.jwt import identity_id
from sidecar.auth.jwt_rules import Identity, RuleSet
from sidecar.auth.permissions import tool_allowed
from sidecar.config import ConfigError, parse_config
from sidecar.config.jwt import JwtRule
from sidecar.core.errors import NotFound
from sidecar.demo import SEEN
from sidecar.upstreams.mcp.sealing import Sealer, key_id

HS_ISSUER = "https://minter.test"
HS_SECRET = "an HMAC secret of at least 32 bytes for HS256 tests"
GRANT_ALL = {"grant": {"upstreams": ["plex"]}}


@pytest.fixture
async def idp(aiohttp_server: Any) -> IdP:
    idp = IdP()
    idp.add_key("k1", "RSA")
    idp.add_key("e1", "EC")
    return await idp.start(aiohttp_server)


@pytest.fixture
async def gw(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, idp: IdP) -> Running:
    hs = {"issuer": HS_ISSUER, "audience": AUDIENCE, "algorithms": ["HS256"], "secret_env": "HS_SECRET"}
    providers = [provider(idp, [GRANT_ALL]), {**hs, "rules": [GRANT_ALL]}]
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, jwt=providers)
    return await make_sidecar(cfg, extra_env={"HS_SECRET": HS_SECRET})


def hs256(payload: str, header: dict[str, Any] | None = None) -> str:
    """A token the HMAC provider signs over exactly this payload text (any JSON a buggy IdP may emit)."""
    head = b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(payload.encode())
    sig = hmac.new(HS_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def claims(**over: Any) -> str:
    base: dict[str, Any] = {"iss": HS_ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + 300}
    return json.dumps({**base, **over})


async def answer(gw: Running, token: str) -> tuple[int, dict[str, Any]]:
    r = await gw.proxy.get("/library/sections", headers=bearer(token))
    text = await r.text()
    assert token not in text
    return r.status, json.loads(text) if r.content_type == "application/json" else {}


def code(body: dict[str, Any]) -> str:
    return str(body.get("error", {}).get("code"))


# ----------------------------------------------------------------------------- JWT: claims a signer got wrong

SIGNED_BUT_BAD = {
    "exp past float range": claims().replace('"exp": ', '"exp": 1' + "0" * 400 + ', "x": '),
    "exp as text": claims(exp=str(int(time.time()) + 300)),
    "exp NaN": claims().replace('"exp": ', '"exp": NaN, "x": '),
    "exp Infinity": claims().replace('"exp": ', '"exp": Infinity, "x": '),
    "sub a lone surrogate": claims(sub="\ud800"),
    "sub not a string": claims(sub=12),
    "sub empty": claims(sub=""),
    "aud a list of objects": claims(aud=[{"aud": AUDIENCE}]),
    "aud missing": claims(aud=None).replace(', "aud": null', ""),
}


@pytest.mark.parametrize("payload", list(SIGNED_BUT_BAD.values()), ids=list(SIGNED_BUT_BAD))
async def test_signed_tokens_with_bad_claims_are_401_not_500(
    gw: Running, plex_upstream: TestServer, payload: str
) -> None:
    before = len(plex_upstream.app[SEEN])
    status, body = await answer(gw, hs256(payload))
    assert (status, code(body)) == (401, "invalid_token")
    assert len(plex_upstream.app[SEEN]) == before


# ----------------------------------------------------------------------------- JWT: what a client can put in the header


async def raw_get(gw: Running, authorization: bytes) -> tuple[int, dict[str, Any]]:
    """GET with this Authorization value byte for byte (aiohttp's client would refuse to send it)."""
    reader, writer = await asyncio.open_connection(gw.proxy.server.host, gw.proxy.server.port)
    try:
        writer.write(b"GET /library/sections HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: ")
        writer.write(authorization + b"\r\n\r\n")
        status, _, body = await asyncio.wait_for(read_response(reader, to_eof=True), 5)
    finally:
        writer.close()
    return status, json.loads(body)


@pytest.mark.parametrize(
    "value",
    [b"Bearer eyJ\xff.eyJ.sig", b"Bearer \xc3\xa9yJhbGciOiJIUzI1NiJ9.e30.c2ln", b"Bearer a.b.\xed\xa0\x80"],
    ids=["invalid-utf8", "non-ascii", "utf8-surrogate"],
)
async def test_a_jwt_shaped_bearer_with_non_ascii_bytes_is_401(gw: Running, value: bytes) -> None:
    status, body = await raw_get(gw, value)
    assert (status, body["error"]) == (401, {"code": "invalid_token", "message": "invalid token: malformed token"})


# ----------------------------------------------------------------------------- JWT: headers an attacker writes


def rs256(idp: IdP, header: dict[str, Any], kid: str = "k1") -> str:
    """Signed by the IdP's RSA key over any header (joserfc would refuse to sign some of these)."""
    head = b64(json.dumps({"alg": "RS256", **header}).encode())
    body = b64(json.dumps(idp.claims()).encode())
    key = idp.keys[kid].private_key
    assert isinstance(key, rsa.RSAPrivateKey)
    return f"{head}.{body}.{b64(key.sign(f'{head}.{body}'.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def header_attack(idp: IdP, case: str) -> str:
    """One header trick each, on a token really signed with a key the IdP holds."""
    if case.startswith("alg "):
        head = b64(json.dumps({"alg": case[4:], "kid": "k1"}).encode())
        return f"{head}.{b64(json.dumps(idp.claims()).encode())}."
    if case == "JWE compact (five parts)":
        return "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.a2V5.aXY.Y2lwaGVy.dGFn"
    if case == "x5u to the attacker":
        idp.add_key("stranger", publish=False)
        return rs256(idp, {"x5u": "https://attacker.test/cert.pem", "kid": "k1"}, kid="stranger")
    extra = {
        "none (the control: accepted)": {},
        "crit an unknown extension": {"crit": ["x-never"], "x-never": 1},
        "b64 false": {"b64": False, "crit": ["b64"]},
        "kid of the EC key, alg RS256": {"kid": "e1"},
    }[case]
    return rs256(idp, {"kid": "k1", **extra})


HEADER_ATTACKS = [
    ("none (the control: accepted)", "200"),
    ("alg None", "invalid_token"),
    ("alg nOnE", "invalid_token"),
    ("alg PS256", "invalid_token"),  # an algorithm the provider did not allow, with a key that could do it
    ("JWE compact (five parts)", "invalid_key"),  # not a JWT shape: checked as an API key
    ("crit an unknown extension", "invalid_token"),
    ("b64 false", "invalid_token"),
    ("kid of the EC key, alg RS256", "invalid_token"),
    ("x5u to the attacker", "invalid_token"),
]


@pytest.mark.parametrize(("case", "expected"), HEADER_ATTACKS, ids=[c for c, _ in HEADER_ATTACKS])
async def test_header_tricks_are_refused(
    gw: Running, idp: IdP, plex_upstream: TestServer, case: str, expected: str
) -> None:
    before = len(plex_upstream.app[SEEN])
    status, body = await answer(gw, header_attack(idp, case))
    if expected == "200":
        assert status == 200
        return
    assert (status, code(body)) == (401, expected), body
    assert len(plex_upstream.app[SEEN]) == before


# ----------------------------------------------------------------------------- JWT: a leaked signing key


async def test_withdrawing_a_leaked_key_ends_the_streams_of_the_tokens_it_signed(gw: Running, idp: IdP) -> None:
    """The IdP withdraws a leaked key; the forger had given its tokens an exp ten years away. New
    requests were already refused (re-verified); open streams used to live on until that exp."""
    assert gw.sc.jwt is not None
    idp.add_key("leaked", "EC")
    ident = identity_id(idp.issuer, "alice")
    forged = idp.token("leaked", lifetime=10 * 365 * 86400)
    assert (await gw.proxy.get("/library/sections", headers=bearer(forged))).status == 200
    assert gw.sc.streams.state(ident) == "active"
    idp.published.remove("leaked")
    _, cache = next(gw.sc.jwt.jwks())
    await cache.refresh()
    assert (await answer(gw, forged))[0] == 401
    assert gw.sc.streams.state(ident) == "expired"  # the stream check ends what the leaked key opened
    fresh = idp.token("k1")  # the subject's own client, with a token of a key still published
    assert (await gw.proxy.get("/library/sections", headers=bearer(fresh))).status == 200
    assert gw.sc.streams.state(ident) == "active"


async def test_a_key_replaced_under_the_same_kid_no_longer_verifies_remembered_tokens(gw: Running, idp: IdP) -> None:
    """The IdP replaces a leaked key but keeps its kid: a token it verified must not stay remembered."""
    assert gw.sc.jwt is not None
    idp.add_key("rot", "EC")
    forged = idp.token("rot")
    assert (await gw.proxy.get("/library/sections", headers=bearer(forged))).status == 200
    idp.add_key("rot", "EC", publish=False)  # new key material, the same kid (still published once)
    _, cache = next(gw.sc.jwt.jwks())
    await cache.refresh()
    assert await answer(gw, forged) == (401, {"success": False, "error": {
        "code": "invalid_token", "message": "invalid token: bad signature"}})  # fmt: skip
    assert (await gw.proxy.get("/library/sections", headers=bearer(idp.token("rot")))).status == 200


async def test_a_quiet_sidecar_still_notices_a_withdrawn_key(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, aiohttp_server: Any
) -> None:
    """Only remembered tokens arrive (nobody new logs in): the keys must still be refreshed after their
    TTL, or a forged token of a withdrawn key stays accepted, and its streams open, until its exp."""
    clock = Clock(float(int(time.time())))
    idp = IdP(clock=clock)
    idp.add_key("k1", "RSA")
    idp.add_key("leaked", "EC")
    await idp.start(aiohttp_server)
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, jwt=[provider(idp, [GRANT_ALL])])
    gw = await make_sidecar(cfg, clock=clock)
    forged = idp.token("leaked", lifetime=10 * 365 * 86400)
    assert (await gw.proxy.get("/library/sections", headers=bearer(forged))).status == 200
    idp.published.remove("leaked")
    clock.advance(601)  # past jwks_cache_ttl (10m)
    ident = identity_id(idp.issuer, "alice")
    deadline = time.monotonic() + 3
    while (await gw.proxy.get("/library/sections", headers=bearer(forged))).status == 200:
        assert time.monotonic() < deadline, "the forged token is still accepted"
        await asyncio.sleep(0.01)
    assert gw.sc.streams.state(ident) == "expired"


# ----------------------------------------------------------------------------- JWT: rules that grant more than they say


@pytest.mark.parametrize("kind", ["tools", "resources", "prompts"])
def test_an_empty_tool_list_in_a_grant_is_refused_not_read_as_every_tool(tmp_path: Path, kind: str) -> None:
    """``tools: []`` used to compile to "not limited": every tool of every granted MCP upstream."""
    cfg = base_config("http://127.0.0.1:1", tmp_path)
    cfg["upstreams"].append({"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:2/mcp", "path_prefix": "/mcp"})
    rule = {"grant": {"upstreams": ["tools"], kind: []}}
    cfg["jwt"] = [{"issuer": "https://i.test", "jwks_url": "https://i.test/certs", "audience": "a", "rules": [rule]}]
    with pytest.raises(ConfigError, match=rf"jwt\[0\]\.rules\[0\]\.grant\.{kind}: an empty list would allow"):
        parse_config(cfg, env={"PLEX_TOKEN": "p" * 20}, base=tmp_path)
    # A mapping names its upstreams: an empty list there allows none of them (as for a key).
    rules = RuleSet((JwtRule.model_validate({"grant": {"upstreams": ["tools"], "tools": {"tools": []}}}),))
    match = rules.first(Identity("alice", "alice", frozenset(), frozenset()))
    assert match is not None and not tool_allowed(match[1].permissions, "tools", "search")


@pytest.mark.parametrize(
    ("url", "ok"),
    [("http://127.example.com/certs", False), ("http://127.0.0.1.nip.io/certs", False),
     ("http://127.0.0.1:8080/certs", True), ("http://[::1]/certs", True), ("https://127.example.com/certs", True)],
)  # fmt: skip
def test_plain_http_jwks_only_on_a_loopback_address(tmp_path: Path, url: str, ok: bool) -> None:
    """Keys fetched in clear can be swapped: a DNS name that merely starts with 127. is not loopback."""
    cfg = base_config("http://127.0.0.1:1", tmp_path)
    cfg["jwt"] = [{"issuer": "https://i.test", "jwks_url": url, "audience": "a", "rules": [GRANT_ALL]}]
    if ok:
        parse_config(cfg, env={"PLEX_TOKEN": "p" * 20}, base=tmp_path)
        return
    with pytest.raises(ConfigError, match=r"jwt\[0\]\.jwks_url: .*must be https"):
        parse_config(cfg, env={"PLEX_TOKEN": "p" * 20}, base=tmp_path)


# ----------------------------------------------------------------------------- sealed MCP session ids

# Two sealing keys whose 32-bit key ids collide (found by a birthday search: about 2^16 tries).
COLLIDING = (hashlib.sha256(b"collide9045").digest(), hashlib.sha256(b"collide135682").digest())
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}  # fmt: skip


async def mcp_gw(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path) -> tuple[Running, str]:
    """A sidecar with a configured sealing key in front of the SDK's server, and a key for it."""
    cfg = base_config(upstream.url, tmp_path, mcp_sessions={"seal_key_env": "SEAL"})
    auth = {"Authorization": "Bearer ${MCP_TOKEN}"}
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools",
                         "headers": auth}]  # fmt: skip
    hs = {"issuer": HS_ISSUER, "audience": AUDIENCE, "algorithms": ["HS256"], "secret_env": "HS_SECRET"}
    cfg["jwt"] = [{**hs, "rules": [{"grant": {"upstreams": ["tools"]}}]}]
    seal = base64.b64encode(os.urandom(32)).decode()
    gw = await make_sidecar(cfg, extra_env={"MCP_TOKEN": MCP_TOKEN, "SEAL": seal, "HS_SECRET": HS_SECRET})
    _, key = await gw.create_key(name="agent", permissions={"upstreams": ["tools"]})
    return gw, key


async def mcp_post(gw: Running, key: str, body: dict[str, Any], sid: str | None = None) -> Any:
    h = {**ACCEPT, **bearer(key), "MCP-Protocol-Version": "2025-11-25", **({"Mcp-Session-Id": sid} if sid else {})}
    return await gw.proxy.post("/mcp/tools", json=body, headers=h)


def aliases(token: str) -> list[str]:
    """The same token with another last character that base64 decodes to the same bytes."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    out = []
    for c in B64URL:
        other = token[:-1] + c
        if other != token and base64.urlsafe_b64decode(other + "=" * (-len(other) % 4)) == raw:
            out.append(other)
    return out


def variants(sid: str) -> dict[str, str]:
    """What a client could do to the id it was given; none of it names a session."""
    std = sid.replace("-", "+").replace("_", "/")
    out = {
        "padded": sid + "=" * (-len(sid) % 4 or 4),
        "extended": sid + "AAAA",
        "doubled": sid + sid,
        "swapped case": sid.swapcase(),
        "too long": sid + "A" * 2000,
        "first byte (version)": ("B" if sid[0] != "B" else "C") + sid[1:],
    }
    if std != sid:
        out["standard alphabet"] = std
    out.update({f"alias {i}": a for i, a in enumerate(aliases(sid))})
    return out


async def test_no_other_spelling_of_a_sealed_id_opens_it(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    gw, key = await mcp_gw(make_sidecar, upstream, tmp_path)
    r = await mcp_post(gw, key, INIT)
    assert r.status == 200, await r.text()
    sid = r.headers["Mcp-Session-Id"]
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    assert (await mcp_post(gw, key, ping, sid)).status == 200
    seen = len(upstream.rec.requests)
    for how, bad in variants(sid).items():
        r = await mcp_post(gw, key, ping, bad)
        body = await r.json()
        assert (r.status, body["error"]["code"]) == (404, "not_found"), how
    assert len(upstream.rec.requests) == seen  # none reached the upstream


async def test_a_jwt_subjects_session_follows_its_refreshed_tokens_and_no_one_else(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    gw, _ = await mcp_gw(make_sidecar, upstream, tmp_path)
    alice, bob = hs256(claims(sub="alice")), hs256(claims(sub="bob"))
    r = await mcp_post(gw, alice, INIT)
    assert r.status == 200, await r.text()
    sid = r.headers["Mcp-Session-Id"]
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    refreshed = hs256(claims(sub="alice", exp=int(time.time()) + 600))
    assert (await mcp_post(gw, refreshed, ping, sid)).status == 200  # the session is the subject's, not the token's
    seen = len(upstream.rec.requests)
    r = await mcp_post(gw, bob, ping, sid)
    assert (r.status, (await r.json())["error"]["code"]) == (403, "insufficient_permissions")
    assert len(upstream.rec.requests) == seen


def test_a_sealed_id_has_one_spelling_and_every_byte_counts() -> None:
    s = Sealer([os.urandom(32)])
    for sid in ("a", "ab", "abc"):  # the three lengths modulo 3: every padding case
        token = s.seal("tools", "k1", sid)
        assert s.unseal("tools", token).sid == sid
        for bad in [*aliases(token), *(token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
                                       for i in range(len(token)))]:  # fmt: skip
            with pytest.raises(NotFound):
                s.unseal("tools", bad)


def test_keys_whose_ids_collide_both_open() -> None:
    current, previous = COLLIDING
    assert key_id(current) == key_id(previous)
    old = Sealer([previous]).seal("tools", "k1", "before")
    rotated = Sealer([current, previous])
    assert rotated.unseal("tools", rotated.seal("tools", "k1", "after")).sid == "after"  # not shadowed by the old
    assert rotated.unseal("tools", old).sid == "before"
    with pytest.raises(NotFound):
        Sealer([current]).unseal("tools", old)


@pytest.mark.parametrize(
    "line",
    [b"Authorization: Bearer pmcp_\xff\xfe", b"Authorization: ApiKey pmcp_\xed\xa0\x80abc", b"x-api-key: pmcp_\xff",
     b"X-Plex-Token: \xff\xfe\xfd"],
    ids=["bearer", "apikey-surrogate", "x-api-key", "x-plex-token"],
)  # fmt: skip
async def test_a_key_shaped_credential_with_non_utf8_bytes_is_401_not_500(gw: Running, line: bytes) -> None:
    """The same bytes where an API key goes: the key verifier hashed the raw text as UTF-8 and raised."""
    reader, writer = await asyncio.open_connection(gw.proxy.server.host, gw.proxy.server.port)
    try:
        writer.write(b"GET /library/sections HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + line + b"\r\n\r\n")
        status, _, body = await asyncio.wait_for(read_response(reader, to_eof=True), 5)
    finally:
        writer.close()
    assert (status, json.loads(body)["error"]["code"]) == (401, "invalid_key"), body
