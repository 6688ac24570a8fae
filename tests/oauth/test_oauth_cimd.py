"""Client ID Metadata Documents: the SDK's client identifies itself by an https URL that the
sidecar fetches — through its SSRF guard (only hosts on ``oauth.cimd.allowed_hosts`` may be
private or loopback), with size, time and redirect limits, ``client_id`` equal to the URL,
and redirect URIs matched exactly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import Running
from mcp.client.auth import OAuthClientProvider
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata
from mcp_server import McpUpstream
from oauth_support import CALLBACK, authorize_url, consent, free_port, oauth_config, pkce, start_sidecar
from test_oauth_flow import Memory
from tlscerts import TlsFiles, make_tls

from sidecar.app import Sidecar
from sidecar.oauth.fetch import public_address

DOCS: web.AppKey[dict[str, Any]] = web.AppKey("docs", dict)


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_tls(tmp_path)


@pytest.fixture
async def docs(tls: TlsFiles) -> AsyncIterator[TestServer]:
    """An https server on loopback serving client metadata documents (and some traps)."""

    async def doc(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "big.json":
            return web.Response(body=b"{" + b" " * 200_000 + b"}", content_type="application/json")
        if name == "chunked.json":  # a document whose second half arrives a little later
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            body = json.dumps(request.app[DOCS]["chunked.json"]).encode()
            await resp.write(body[:20])
            await asyncio.sleep(0.02)
            await resp.write(body[20:])
            return resp
        if name == "deep.json":  # nested deeper than Python's json can parse, well within max_bytes
            return web.Response(body=b"[" * 5_000 + b"]" * 5_000, content_type="application/json")
        if name == "redirect.json":
            raise web.HTTPFound("https://10.0.0.1/client.json")
        if name == "slow.json":
            await asyncio.sleep(5)
        found = request.app[DOCS].get(name)
        return web.json_response(found) if found is not None else web.Response(status=404)

    app = web.Application()
    app[DOCS] = {}
    app.router.add_get("/{name}", doc)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=tls.server_context())
    yield server
    await server.close()


def doc_url(docs: TestServer, name: str) -> str:
    return f"https://127.0.0.1:{docs.port}/{name}"


async def gateway(aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], tls: TlsFiles,
                  allowed: list[str]) -> Running:  # fmt: skip
    cimd = {"allowed_hosts": allowed, "tls_ca_file": str(tls.ca), "timeout": "1s", "max_bytes": "16KiB"}
    cfg = oauth_config(upstream, tmp_path, free_port(), cimd=cimd)
    return await start_sidecar(aiohttp_client, cfg, tmp_path, started)


async def test_sdk_client_with_a_metadata_document(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], tls: TlsFiles, docs: TestServer
) -> None:
    gw = await gateway(aiohttp_client, upstream, tmp_path, started, tls, ["127.0.0.1"])
    _, key = await gw.create_key(permissions={"upstreams": ["tools"], "tools": {"tools": ["search", "fetch"]}})
    url = doc_url(docs, "client.json")
    docs.app[DOCS]["client.json"] = {"client_id": url, "client_name": "CIMD Agent", "redirect_uris": [CALLBACK],
                                     "token_endpoint_auth_method": "none"}  # fmt: skip
    storage = Memory()
    seen: list[str] = []

    async def redirect(u: str) -> None:
        seen.append(u)

    async def callback() -> AuthorizationCodeResult:
        back = await consent(seen[-1], key)
        p = back.params
        assert "code" in p, back.location
        return AuthorizationCodeResult(code=p["code"], state=p.get("state"), iss=p.get("iss"))

    meta = OAuthClientMetadata(client_name="CIMD Agent", redirect_uris=[CALLBACK])  # type: ignore[list-item]
    mcp_url = str(gw.proxy.make_url("/mcp/tools"))
    auth = OAuthClientProvider(mcp_url, meta, storage, redirect, callback, client_metadata_url=url)
    async with (
        httpx2.AsyncClient(auth=auth) as http,
        streamable_http_client(mcp_url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        names = {t.name for t in (await session.list_tools()).tools}
    assert names == {"search", "fetch"}
    assert storage.client is not None and storage.client.client_id == url
    r = await gw.admin.get("/admin/oauth/grants", params={"client": url}, headers=gw.admin_headers())
    (grant,) = (await r.json())["data"]
    assert grant["grant"]["client_name"] == "CIMD Agent"
    r = await gw.admin.get("/admin/oauth/clients", headers=gw.admin_headers())
    assert any(c["client_id"] == url and c["kind"] == "metadata" for c in (await r.json())["data"])


async def refusal(gw: Running, client_id: str) -> str:
    _, challenge = pkce()
    _, key = await gw.create_key(permissions={"upstreams": ["*"]})
    back = await consent(authorize_url(gw, client_id, challenge), key)
    assert back.location.startswith("status:400:"), back.location
    return back.location


async def test_ssrf_guard_refuses_private_and_loopback_addresses(aiohttp_client: Any, upstream: McpUpstream,
                                                                 tmp_path: Path, started: list[Sidecar],
                                                                 tls: TlsFiles, docs: TestServer) -> None:  # fmt: skip
    gw = await gateway(aiohttp_client, upstream, tmp_path, started, tls, [])  # nothing allowed
    url = doc_url(docs, "client.json")
    docs.app[DOCS]["client.json"] = {"client_id": url, "redirect_uris": [CALLBACK]}
    assert "private" in await refusal(gw, url)  # loopback literal, not on the allow-list
    assert "private" in await refusal(gw, f"https://localhost:{docs.port}/client.json")  # a name resolving to it
    for target in (
        "https://10.0.0.1/c.json",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/c.json",
        "https://[::ffff:127.0.0.1]/c.json",
        "https://192.168.1.1/c.json",
        "https://100.64.0.1/c.json",
    ):
        assert "private" in await refusal(gw, target), target  # fmt: skip
    assert "https" in await refusal(gw, f"http://127.0.0.1:{docs.port}/client.json")


async def test_metadata_document_rules(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], tls: TlsFiles, docs: TestServer
) -> None:
    gw = await gateway(aiohttp_client, upstream, tmp_path, started, tls, ["127.0.0.1"])
    other = doc_url(docs, "other.json")
    docs.app[DOCS]["liar.json"] = {"client_id": other, "redirect_uris": [CALLBACK]}
    assert "its own URL" in await refusal(gw, doc_url(docs, "liar.json"))
    docs.app[DOCS]["secret.json"] = {"client_id": doc_url(docs, "secret.json"), "redirect_uris": [CALLBACK],
                                     "token_endpoint_auth_method": "client_secret_post"}  # fmt: skip
    assert "public" in await refusal(gw, doc_url(docs, "secret.json"))
    assert "too large" in await refusal(gw, doc_url(docs, "big.json"))
    assert "not JSON" in await refusal(gw, doc_url(docs, "deep.json"))  # not a 500
    url = doc_url(docs, "chunked.json")  # read whole, not cut after its first packet
    docs.app[DOCS]["chunked.json"] = {"client_id": url, "client_name": "Chunked", "redirect_uris": [CALLBACK]}
    assert gw.sc.oauth is not None and (await gw.sc.oauth.clients.get(url)).name == "Chunked"
    assert "answered 302" in await refusal(gw, doc_url(docs, "redirect.json"))
    assert "could not be fetched" in await refusal(gw, doc_url(docs, "slow.json"))
    assert "answered 404" in await refusal(gw, doc_url(docs, "missing.json"))
    # the client id is shown on the consent page: its host must be the one fetched, no look-alike
    for spoof in ("https://cl\u0430ude.ai/client.json", "https://claude.ai\\.evil.example/c.json",
                  "https://claude.ai%2eevil.example/c.json"):  # fmt: skip
        assert "plain ASCII" in await refusal(gw, spoof), spoof
    # redirect URIs match exactly
    url = doc_url(docs, "exact.json")
    docs.app[DOCS]["exact.json"] = {"client_id": url, "redirect_uris": [CALLBACK + "/x"]}
    assert "redirect URI" in await refusal(gw, url)


def test_public_address() -> None:
    assert public_address("93.184.216.34") and public_address("2606:4700::1111")
    for ip in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.1.1", "100.64.0.1", "::1",
               "fe80::1", "fc00::1", "::ffff:10.0.0.1", "0.0.0.0", "224.0.0.1", "not-an-ip"):  # fmt: skip
        assert not public_address(ip), ip
