"""The admin listener's DNS-rebinding guard (sidecar/admin/hostguard.py) and ``admin.allowed_hosts``.

The hole it closes: operators list a local nginx (127.0.0.1) in ``server.trusted_proxies``; a rebound
page in a browser on the same machine connects from 127.0.0.1 too, so exempting trusted proxies from
the guard let the page read ``/metrics`` and the console as its own origin.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config

from sidecar.admin.api import create_admin_app
from sidecar.config import ConfigError, parse_config

ENV = {"PLEX_TOKEN": "plex-token-value", "SIDECAR_ADMIN_TOKEN": "admin-token-value"}
LOCAL_NGINX = {"trusted_proxies": ["127.0.0.1/32"]}  # the test client connects from 127.0.0.1


async def start(make_sidecar: MakeSidecar, upstream: TestServer, tmp_path: Path, **admin: Any) -> Running:
    cfg = base_config(str(upstream.make_url("")).rstrip("/"), tmp_path, server=LOCAL_NGINX)
    cfg["admin"].update(admin)
    sc = await make_sidecar(cfg)
    await sc.create_key(name="secret-project", owner="team-a")
    return sc


async def refused(sc: Running, host: str, path: str = "/metrics") -> bool:
    """Is a request naming ``host`` (as a rebound page's would, with its own Origin) refused by the guard?"""
    resp = await sc.admin.get(path, headers={"Host": host, "Origin": f"http://{host}"}, allow_redirects=False)
    body = await resp.text()
    if resp.status == 400:
        error = (await resp.json())["error"]
        assert error["code"] == "bad_request" and "rebinding" in error["message"], body
        assert "secret-project" not in body
        return True
    assert resp.status == 200, (host, resp.status, body)
    return False


@pytest.mark.parametrize("extra", [{}, {"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Host": "localhost"}])
async def test_a_rebound_page_from_a_trusted_proxys_address_is_refused(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, extra: dict[str, str]
) -> None:
    """``trusted_proxies: [127.0.0.1/32]`` (a local nginx) and a browser on the same machine whose page
    ``evil.example`` re-pointed its name at 127.0.0.1: the peer is a "trusted proxy", and forwarded headers
    are the page's to send, but the Host is not the listener's: 400, for the metrics and the console."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    for path in ("/metrics", "/signin", "/", "/admin/keys", "/healthz"):
        resp = await sc.admin.get(path, headers={"Host": "evil.example", "Origin": "http://evil.example", **extra})
        assert resp.status == 400, (path, resp.status)
        body = await resp.text()
        assert "rebinding" in body and "secret-project" not in body and "team-a" not in body
    port = sc.admin.port
    for own in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost"):
        assert not await refused(sc, own), own


async def test_allowed_hosts_admits_the_listed_names_only(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """A proxy that forwards the public Host: that name is listed, and only it (any port for a bare
    name, that port only for host:port); look-alikes and other names stay refused."""
    sc = await start(make_sidecar, plex_upstream, tmp_path, allowed_hosts=["Admin.Example.com", "ops.example:8443"])
    assert sc.config.admin.allowed_hosts == ("admin.example.com", "ops.example:8443")
    for ok in ("admin.example.com", "ADMIN.example.com.", "admin.example.com:443", "ops.example:8443", "localhost"):
        assert not await refused(sc, ok), ok
    resp = await sc.admin.get("/metrics", headers={"Host": "admin.example.com"})
    assert resp.status == 200 and "secret-project" in await resp.text()
    for bad in ("evil.example", "ops.example", "ops.example:443", "admin.example.com.evil.example",
                "evil-admin.example.com", "sub.admin.example.com", "admin.example.co"):  # fmt: skip
        assert await refused(sc, bad), bad


async def test_allowed_hosts_also_guards_a_listener_bound_elsewhere(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Set on a listener not bound to loopback, the list holds there too (else it would silently do
    nothing); the bound address and loopback names still name it."""
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["admin"].update(listen="0.0.0.0:0", allowed_hosts="admin.example.com")
    sc = await make_sidecar(cfg)
    assert await refused(sc, "evil.example")
    assert not await refused(sc, "admin.example.com") and not await refused(sc, "127.0.0.1:1")
    cfg["admin"].pop("allowed_hosts")  # unset: a non-loopback listener's names are the operator's
    open_sc = await make_sidecar({**cfg, "store": {"kind": "sqlite", "path": str(tmp_path / "other.db")}})
    assert not await refused(open_sc, "evil.example")


async def test_a_unix_socket_scrape_passes_without_any_trusted_proxy(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """A worker's admin app on a unix socket, scraped by the supervisor as ``http://worker/…``: no IP peer,
    no browser; it never leaned on the trusted-proxy exemption (none configured here)."""
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    sc = await make_sidecar(cfg)
    runner = web.AppRunner(create_admin_app(sc.sc))
    await runner.setup()
    with tempfile.TemporaryDirectory(prefix="sc-hg-") as d:  # short: unix socket paths are limited
        path = str(Path(d) / "admin.sock")
        try:
            await web.UnixSite(runner, path).start()
            connector = aiohttp.UnixConnector(path=path)
            async with aiohttp.ClientSession(connector=connector) as http, http.get("http://worker/metrics") as resp:
                assert resp.status == 200 and "sidecar_" in await resp.text()
        finally:
            await runner.cleanup()


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("*", "no wildcards"),
        ("*.example.com", "no wildcards"),
        ("https://admin.example.com", "no scheme"),
        ("admin.example.com/console", "no scheme"),
        ("admin..example.com", "not a host name"),
        ("admin.example.com:99999", "out of range"),
        ("2001:db8::1", "in brackets"),
        ("", "not a host name"),
    ],
)
def test_a_bad_allowed_hosts_entry_is_a_config_error_naming_its_path(entry: str, words: str) -> None:
    cfg = {
        "listen": "127.0.0.1:8080",
        "admin": {"allowed_hosts": ["ok.example", entry]},
        "upstreams": [{"id": "plex", "kind": "plex", "url": "http://127.0.0.1:32400", "token_env": "PLEX_TOKEN"}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, env=ENV)
    (problem,) = info.value.problems
    assert problem.startswith("admin.allowed_hosts[1]") and words in problem, problem


LOOK_ALIKES = [
    "localhost.evil.example", "127.0.0.1.evil.example", "localhost@evil.example", "evil.example#localhost",
    "evil.example:80@localhost", "evil.localhost.example", "localhost%2eevil.example", "[::1].evil.example",
    "127.0.0.1:80:evil.example", "",
]  # fmt: skip


@pytest.mark.parametrize("host", LOOK_ALIKES)
async def test_names_that_only_look_like_loopback_are_refused(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, host: str
) -> None:
    """A rebound page's name is the attacker's to choose: one that starts, ends or is padded with a loopback
    name, an empty Host, is not a loopback name."""
    sc = await start(make_sidecar, plex_upstream, tmp_path)
    assert await refused(sc, host), host


@pytest.mark.parametrize("order", [("evil.example", "localhost"), ("localhost", "evil.example")])
async def test_two_host_headers_never_pass_as_the_loopback_one(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, order: tuple[str, str]
) -> None:
    """Two ``Host`` fields (a raw client; no browser sends them, but the guard must not read one and the
    handlers another): the request is refused, whichever comes first (aiohttp's parser refuses it before
    the guard runs; this holds the guard to that if the parser ever changes)."""
    import asyncio

    from raw_http import read_response

    sc = await start(make_sidecar, plex_upstream, tmp_path)
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.admin.port)
    try:
        writer.write(
            f"GET /metrics HTTP/1.1\r\nHost: {order[0]}\r\nHost: {order[1]}\r\nConnection: close\r\n\r\n".encode()
        )
        status, _, body = await asyncio.wait_for(read_response(reader, to_eof=True), 5)
    finally:
        writer.close()
    assert status == 400 and b"secret-project" not in body, (status, body[:200])
