"""A second attacker's pass over the authorization server (what the first pass left): each test
asserts what the browser or the client sees."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from conftest import Running
from mcp_server import McpUpstream
from oauth_support import (
    CALLBACK,
    authorize_url,
    code_for,
    consent,
    free_port,
    oauth_config,
    pkce,
    register,
    start_sidecar,
)
from test_oauth_refusals import PERMS

from sidecar.app import Sidecar

LOOPBACK = "http://127.0.0.1:1/cb"
CONF = {"client_id": "conf-loop", "redirect_uris": [LOOPBACK]}


@pytest.fixture
async def gw(aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar]) -> Running:
    cfg = oauth_config(upstream, tmp_path, free_port(), clients=[CONF])
    return await start_sidecar(aiohttp_client, cfg, tmp_path, started)


async def test_a_loopback_redirect_with_control_characters_is_refused_not_a_500(gw: Running) -> None:
    """``urlsplit`` drops tabs and newlines, so ``/c<LF>b`` looked like the registered ``/cb``; the
    Location header built from it then failed (500), after the code was spent. Refused as a page."""
    _, key = await gw.create_key(permissions=PERMS)
    dcr = (await register(gw, redirect_uris=["http://127.0.0.1/cb"]))["client_id"]
    _, challenge = pkce()
    cases = [
        (client, extra, spelling)
        for spelling in ("http://127.0.0.1:5555/c\nb", "http://127.0.0.1:5555/\tcb")
        for client, extra in ((dcr, {}), ("conf-loop", {}), ("conf-loop", {"code_challenge_method": "plain"}))
    ]
    cases.append(("conf-loop", {}, "http://127.0.0.1:5555/c\r\nb"))
    for client, extra, spelling in cases:
        back = await consent(authorize_url(gw, client, challenge, redirect_uri=spelling, **extra), key)
        assert back.location.startswith("status:400:"), (client, extra, back.location)
        assert "redirect URI is not one this client registered" in back.location


async def test_a_redirect_host_shown_on_the_consent_page_is_the_one_the_browser_goes_to(gw: Running) -> None:
    """The consent page's defence against a look-alike client is the host it shows ("read the
    host", docs/oauth.md): a host spelled with homoglyphs or characters browsers rewrite defeats it."""
    for uri in (
        "https://cl\u0430ude.ai/cb",  # Cyrillic а: the page would show "claude.ai"
        "https://claude.ai\\.evil.example/cb",  # browsers read "\\" as "/": the page and the browser disagree
        "https://claude.ai%2eevil.example/cb",  # browsers decode the host: claude.ai.evil.example
        "https://app.example/c\u0430llback",  # an IRI, not a URI (RFC 3986): no client sends one
    ):
        r = await gw.proxy.post("/oauth/register", json={"redirect_uris": [uri], "client_name": "Claude"})
        assert r.status == 400 and (await r.json())["error"] == "invalid_redirect_uri", (uri, await r.text())
    assert await gw.sc.store.oauth_clients() == []
    for uri in ("https://xn--cl-8kc.example:8443/cb?a=1", "http://[::1]:8080/cb", "https://A-b.example./cb"):
        r = await gw.proxy.post("/oauth/register", json={"redirect_uris": [uri]})
        assert r.status == 201, (uri, await r.text())


async def test_registration_with_odd_json_is_a_designed_error_never_a_500(gw: Running) -> None:
    """Anyone may register: every shape of JSON gets RFC 7591's error, and nothing is stored."""
    ok = {"redirect_uris": ["https://app.example/cb"]}
    for odd in (
        {"grant_types": [["authorization_code"]]},
        {"grant_types": [{"a": 1}]},
        {"response_types": [["code"]]},
        {"token_endpoint_auth_method": ["none"]},
        {"token_endpoint_auth_method": {"none": 1}},
        {"client_name": ["x"]},
        {"redirect_uris": [["https://app.example/cb"]]},
    ):
        r = await gw.proxy.post("/oauth/register", json={**ok, **odd})
        assert r.status == 400, (odd, r.status, await r.text())
        assert (await r.json())["error"] in ("invalid_client_metadata", "invalid_redirect_uri"), odd
    assert await gw.sc.store.oauth_clients() == []
    deep = '{"redirect_uris": ' + "[" * 8_000 + "]" * 8_000 + "}"  # within the 16 KiB body limit
    r = await gw.proxy.post("/oauth/register", data=deep, headers={"Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["error"] == "invalid_client_metadata", await r.text()


async def test_non_ascii_basic_credentials_are_an_invalid_client_never_a_500(gw: Running) -> None:
    """``b64decode`` raises a plain ValueError (not binascii.Error) for non-ASCII text: a header
    anyone can send must get the designed 401."""
    for header in ("Basic \u00e9", "Basic \u00ed\u00a0\u0080", "Basic Zm9v\u00e9"):
        for path in ("/oauth/token", "/oauth/revoke"):
            r = await gw.proxy.post(path, data={"grant_type": "refresh_token", "refresh_token": "x", "token": "x"},
                                    headers={"Authorization": header})  # fmt: skip
            assert r.status == 401, (header, path, r.status, await r.text())
            assert (await r.json())["error"] == "invalid_client"


async def in_two_packets(body: bytes) -> AsyncIterator[bytes]:
    """A body as a slow network delivers it: the second half arrives a little later (chunked)."""
    yield body[: len(body) // 2]
    await asyncio.sleep(0.02)
    yield body[len(body) // 2 :]


async def test_a_body_that_arrives_in_two_packets_is_read_whole(gw: Running) -> None:
    """``read(n)`` returns what has arrived so far: a token request was cut after its first packet
    (here in the middle of its code: "unknown authorization code"; a cut ``code_verifier`` failed
    PKCE and burned the code, so the client's retry looked like a replay); a registration was
    "not JSON". Slow networks and chunked uploads send bodies in pieces."""
    _, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client)
    form = {"grant_type": "authorization_code", "client_id": client, "redirect_uri": CALLBACK, "code": code,
            "code_verifier": verifier}  # fmt: skip
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    r = await gw.proxy.post("/oauth/token", data=in_two_packets(urlencode(form).encode()), headers=headers)
    assert r.status == 200, await r.text()
    assert (await r.json())["access_token"]
    body = b'{"redirect_uris": ["https://app.example/cb"], "client_name": "Two packets"}'
    r = await gw.proxy.post("/oauth/register", data=in_two_packets(body), headers={"Content-Type": "application/json"})
    assert r.status == 201, await r.text()
