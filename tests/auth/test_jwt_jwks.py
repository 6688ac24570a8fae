"""The JWKS cache against a real server that misbehaves: what it keeps, what it refuses, how often it asks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from joserfc.jwk import ECKey, OctKey, RSAKey
from limits_support import Clock

from sidecar.auth.jwks import MAX_JWKS_BYTES, JwksCache, JwksError, parse_jwks

RSA = RSAKey.generate_key(2048, parameters={"kid": "r1", "use": "sig"})
EC = ECKey.generate_key("P-256", parameters={"kid": "e1"})


def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/elsewhere")


class Server:
    """A JWKS endpoint whose answer each test sets."""

    def __init__(self) -> None:
        self.hits = 0
        self.answer: Callable[[web.Request], Any] = lambda r: web.json_response({"keys": [RSA.as_dict(private=False)]})
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        result = self.answer(request)
        if asyncio.iscoroutine(result):
            result = await result
        assert isinstance(result, web.StreamResponse)
        return result


@pytest.fixture
async def server(aiohttp_server: Any) -> Server:
    s = Server()
    app = web.Application()
    app.router.add_get("/certs", s.handle)
    app.router.add_get("/elsewhere", s.handle)
    srv = await aiohttp_server(app)
    s.url = str(srv.make_url("/certs"))
    return s


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def cache(server: Server, session: aiohttp.ClientSession, clock: Clock, **kw: float) -> JwksCache:
    opts = {"timeout": 2.0, "ttl": 600.0, "refetch_interval": 10.0, **kw}
    return JwksCache(server.url, lambda: session, steady=clock, **opts)


def test_only_public_signing_keys_are_kept() -> None:
    oct_key = OctKey.generate_key(256, parameters={"kid": "o1"}).as_dict(private=True)
    enc = {**EC.as_dict(private=False), "kid": "enc", "use": "enc"}
    private = RSA.as_dict(private=True)  # a JWKS that leaks the private key: the public half is kept
    keys = parse_jwks(_json({"keys": [oct_key, enc, private, EC.as_dict(private=False), {"kty": "RSA"}, "x"]}))
    assert sorted(keys) == ["e1", "r1"]
    assert keys["r1"][0].as_dict(private=False) == RSA.as_dict(private=False)
    assert not keys["r1"][0].is_private
    for bad in (b"not json", b"[]", b"{}", b'{"keys": {}}', b'{"keys": null}'):
        with pytest.raises(JwksError):
            parse_jwks(bad)
    # A well-formed set without a usable signing key is an answer: "no keys", not a failed fetch.
    for empty in ({"keys": []}, {"keys": [oct_key]}, {"keys": [enc]}):
        assert parse_jwks(_json(empty)) == {}


async def test_concurrent_lookups_share_one_fetch(server: Server, session: aiohttp.ClientSession) -> None:
    c = cache(server, session, Clock())
    found = await asyncio.gather(*(c.find("r1") for _ in range(20)))
    assert all(keys and not why for keys, why in found)
    assert server.hits == 1


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (lambda r: web.Response(status=500), "HTTP 500"),
        (_redirect, "HTTP 302"),  # redirects are not followed
        (lambda r: web.Response(body=b"x" * (MAX_JWKS_BYTES + 1)), f"larger than {MAX_JWKS_BYTES} bytes"),
        (lambda r: _chunked(r, b"x" * (MAX_JWKS_BYTES + 1)), f"larger than {MAX_JWKS_BYTES} bytes"),
        (lambda r: web.Response(text="<html>"), "not JSON"),
        (lambda r: web.json_response({"error": "maintenance"}), 'no "keys" list'),
        (lambda r: web.json_response({"keys": {}}), 'no "keys" list'),
    ],
    ids=["500", "redirect", "too-large", "too-large-chunked", "not-json", "no-keys", "keys-not-a-list"],
)
async def test_a_bad_answer_keeps_the_keys_held(
    server: Server, session: aiohttp.ClientSession, answer: Callable[[web.Request], Any], error: str
) -> None:
    clock = Clock()
    c = cache(server, session, clock)
    assert (await c.find("r1"))[0]
    server.answer = answer
    clock.advance(601)  # stale: refreshed in the background, the held key still answers
    assert (await c.find("r1"))[0]
    await c.refresh()
    assert (c.failures, c.last_error) == (1, error)
    assert (await c.find("r1"))[0]  # kept
    keys, why = await c.find("new")  # unknown, and no refetch within the interval
    assert (keys, why) == ([], "unknown signing key (kid), and the identity provider's keys could not be refreshed")
    assert server.hits == 2


async def test_a_stalled_idp_times_out(server: Server, session: aiohttp.ClientSession) -> None:
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    server.answer = stall
    c = cache(server, session, Clock(), timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    keys, why = await c.find("r1")
    assert loop.time() - started < 1.5
    assert (keys, why) == ([], "the identity provider's signing keys could not be fetched")
    assert c.last_error == "TimeoutError"
    never.set()


async def test_a_withdrawn_key_bumps_the_generation(server: Server, session: aiohttp.ClientSession) -> None:
    clock = Clock()
    c = cache(server, session, clock)
    await c.find("r1")
    assert c.generation == 0
    server.answer = lambda r: web.json_response({"keys": [RSA.as_dict(private=False), EC.as_dict(private=False)]})
    clock.advance(11)
    assert (await c.find("e1"))[0]
    assert c.generation == 0  # a key added: what was verified stays verified
    server.answer = lambda r: web.json_response({"keys": [EC.as_dict(private=False)]})
    clock.advance(11)
    assert (await c.find("x"))[0] == []  # an unknown kid: refetched
    assert (await c.find("r1"))[0] == []
    assert c.generation == 1  # r1 withdrawn


@pytest.mark.parametrize("empty", [[], [{"kty": "oct", "k": "c2VjcmV0", "kid": "o"}]], ids=["empty", "no-signing-key"])
async def test_an_empty_key_set_withdraws_every_key(
    server: Server, session: aiohttp.ClientSession, empty: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """``{"keys": []}`` is the IdP saying "no keys": the held ones go (a failed fetch would keep them)."""
    clock = Clock()
    c = cache(server, session, clock)
    assert (await c.find("r1"))[0]
    server.answer = lambda r: web.json_response({"keys": empty})
    clock.advance(601)
    await c.refresh()
    assert (c.failures, c.last_error, c.keys, c.thumbprints) == (0, "", {}, frozenset())
    assert c.generation == 1  # what r1 verified is verified again, and fails
    assert await c.find("r1") == ([], "unknown signing key (kid)")
    assert await c.find("") == ([], "unknown signing key (kid)")
    assert "no usable signing key" in caplog.text and "r1" not in caplog.text
    server.answer = lambda r: web.json_response({"keys": [EC.as_dict(private=False)]})
    clock.advance(11)
    assert (await c.find("e1"))[0]  # a key published again is found by the refetch of its unknown kid
    assert c.generation == 1


async def test_a_token_without_kid_may_use_any_key(server: Server, session: aiohttp.ClientSession) -> None:
    server.answer = lambda r: web.json_response({"keys": [RSA.as_dict(private=False), EC.as_dict(private=False)]})
    c = cache(server, session, Clock())
    keys, _ = await c.find("")
    assert len(keys) == 2


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()


async def _chunked(request: web.Request, body: bytes) -> web.StreamResponse:
    """An answer without Content-Length: the cap must hold while reading."""
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        for i in range(0, len(body), 65536):
            await resp.write(body[i : i + 65536])
        await resp.write_eof()
    except ConnectionError:  # the sidecar hung up once it had read enough: as it should
        pass
    return resp
