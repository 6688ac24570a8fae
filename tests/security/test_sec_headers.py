"""What a client may claim about itself never reaches the upstream, and the origin the sidecar
hands out is never the client's word (issue 14, item 15; DESIGN invariant 2).

- ``X-Real-IP``, ``Forwarded`` and the method-override headers are dropped: a key allowed
  only GET must not get a DELETE through ``X-HTTP-Method-Override``.
- ``X-Forwarded-For`` keeps only the hops trusted proxies vouch for, then the peer.
- RFC 9728 metadata and ``WWW-Authenticate`` use ``server.public_url``, else a trusted
  proxy's ``X-Forwarded-*`` (documented in docs/mcp.md), else the listener's own address —
  never the ``Host`` a client sent.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config

from sidecar.http.listener import forwarded_for

CLAIMS = {
    "X-Real-IP": "6.6.6.6",
    "Forwarded": "for=6.6.6.6;proto=https;host=evil.example",
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "DELETE",
}


async def recording(aiohttp_server: Any) -> tuple[str, list[web.Request]]:
    seen: list[web.Request] = []

    async def any_path(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


async def plex_front(make_sidecar: MakeSidecar, url: str, tmp_path: Path, **server: Any) -> tuple[Running, str]:
    sc = await make_sidecar(base_config(url, tmp_path, **({"server": server} if server else {})))
    _, key = await sc.create_key(permissions={"upstreams": ["*"], "methods": ["GET"]})
    return sc, key


async def test_client_claims_never_reach_the_upstream(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A GET-only key sends every method override and identity claim: the upstream sees a plain
    GET from the sidecar's peer, none of the claims."""
    url, seen = await recording(aiohttp_server)
    sc, key = await plex_front(make_sidecar, url, tmp_path)
    resp = await sc.proxy.get("/library/sections", headers={"X-Plex-Token": key, **CLAIMS})
    assert resp.status == 200
    got = seen[-1]
    assert got.method == "GET"
    for name in CLAIMS:
        assert name not in got.headers, f"{name} reached the upstream"
    assert got.headers["X-Forwarded-For"] == "127.0.0.1"


async def test_untrusted_x_forwarded_for_is_replaced_by_the_peer(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """No trusted proxies: whatever X-Forwarded-For the client wrote, the upstream sees only the peer."""
    url, seen = await recording(aiohttp_server)
    sc, key = await plex_front(make_sidecar, url, tmp_path)
    spoof = {"X-Plex-Token": key, "X-Forwarded-For": "10.0.0.1, 203.0.113.9"}
    assert (await sc.proxy.get("/a", headers=spoof)).status == 200
    assert seen[-1].headers.getall("X-Forwarded-For") == ["127.0.0.1"]


async def test_trusted_proxies_vouch_only_for_their_own_hops(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Behind trusted proxies the chain is kept from the client (the first untrusted hop) rightwards;
    what the client prepended (a spoofed address, garbage) is dropped."""
    url, seen = await recording(aiohttp_server)
    sc, key = await plex_front(make_sidecar, url, tmp_path, trusted_proxies=["127.0.0.1", "10.0.0.0/8"])
    xff = {"X-Plex-Token": key, "X-Forwarded-For": "6.6.6.6, garbage, 203.0.113.7, 10.1.2.3"}
    assert (await sc.proxy.get("/a", headers=xff)).status == 200
    assert seen[-1].headers["X-Forwarded-For"] == "203.0.113.7, 10.1.2.3, 127.0.0.1"


NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"))


@pytest.mark.parametrize(
    ("peer", "claimed", "want"),
    [
        ("203.0.113.1", ["6.6.6.6"], "203.0.113.1"),  # untrusted peer: nothing of the client's is kept
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["198.51.100.2"], "198.51.100.2, 127.0.0.1"),
        ("127.0.0.1", ["6.6.6.6, 198.51.100.2"], "198.51.100.2, 127.0.0.1"),
        ("127.0.0.1", ["6.6.6.6", "198.51.100.2, 10.0.0.5"], "198.51.100.2, 10.0.0.5, 127.0.0.1"),
        ("127.0.0.1", ["10.0.0.9, 10.0.0.5"], "10.0.0.9, 10.0.0.5, 127.0.0.1"),  # all trusted: all kept
        ("127.0.0.1", ["198.51.100.2, garbage-1"], "127.0.0.1"),  # a non-IP ends the chain
        ("127.0.0.1", ["  ,, "], "127.0.0.1"),
        ("127.0.0.1", ["2001:db8::1"], "2001:db8::1, 127.0.0.1"),
    ],
)
def test_forwarded_for_chain(peer: str, claimed: list[str], want: str) -> None:
    assert forwarded_for(peer, claimed, NETS) == want


# --------------------------------------------------------------------------- the origin handed out


def mcp_config(url: str, tmp_path: Path, **server: Any) -> dict[str, Any]:
    cfg = base_config(url, tmp_path, **({"server": server} if server else {}))
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"{url}/mcp", "path_prefix": "/mcp/tools"}]
    return cfg


EVIL = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}


async def origin_handed_out(sc: Running, headers: dict[str, str]) -> tuple[str, str]:
    """(resource in the RFC 9728 metadata, resource_metadata in the 401's WWW-Authenticate)."""
    meta = await sc.proxy.get("/.well-known/oauth-protected-resource/mcp/tools", headers=headers)
    assert meta.status == 200
    challenge = await sc.proxy.post("/mcp/tools", json={}, headers=headers)
    assert challenge.status == 401
    www = challenge.headers["WWW-Authenticate"]
    return (await meta.json())["resource"], www.split('resource_metadata="')[1].split('"')[0]


async def test_metadata_and_challenge_never_reflect_the_clients_host(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Host: evil.example (and X-Forwarded-* from an untrusted peer): the URLs name the listener."""
    url, _ = await recording(aiohttp_server)
    sc = await make_sidecar(mcp_config(url, tmp_path))
    own = f"http://127.0.0.1:{sc.proxy.port}"
    resource, meta_url = await origin_handed_out(sc, EVIL)
    assert resource == f"{own}/mcp/tools"
    assert meta_url == f"{own}/.well-known/oauth-protected-resource/mcp/tools"


async def test_a_configured_public_url_is_what_is_handed_out(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    url, _ = await recording(aiohttp_server)
    sc = await make_sidecar(mcp_config(url, tmp_path, public_url="https://sidecar.example"))
    resource, meta_url = await origin_handed_out(sc, EVIL)
    assert resource == "https://sidecar.example/mcp/tools"
    assert meta_url == "https://sidecar.example/.well-known/oauth-protected-resource/mcp/tools"


async def test_a_trusted_proxys_forwarded_origin_is_still_used(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Documented in docs/mcp.md: behind a proxy in server.trusted_proxies, its X-Forwarded-* name the origin."""
    url, _ = await recording(aiohttp_server)
    sc = await make_sidecar(mcp_config(url, tmp_path, trusted_proxies=["127.0.0.1"]))
    resource, meta_url = await origin_handed_out(sc, {"X-Forwarded-Host": "mcp.example", "X-Forwarded-Proto": "https"})
    assert resource == "https://mcp.example/mcp/tools"
    assert meta_url.startswith("https://mcp.example/")
