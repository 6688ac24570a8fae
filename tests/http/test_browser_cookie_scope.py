"""Cookies between upstreams on one origin (``scoped`` in sidecar/http/browser.py).

The attacker is an upstream at a path prefix (an MCP server at ``/mcp/a``): a browser keeps
cookies per host, so its ``Set-Cookie: …; Path=/`` would go with every request to every other
upstream (its session cookies leak to them), and a few large ones (a cookie bomb) would put every
request on the origin over the header limit. What the client receives is asserted, and what a
client with a cookie jar then sends (aiohttp's jar matches paths as browsers do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config

from sidecar.http.browser import scoped

P = "/mcp/a"
QUOTED = 'sid="a b,c"; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Max-Age=60; SameSite=None; Secure; Partitioned'
# (what the upstream sends, what the client gets with strip_prefix, … without it)
LINES = [
    ("s1=1; Path=/; HttpOnly", f"s1=1; HttpOnly; Path={P}", f"s1=1; HttpOnly; Path={P}"),
    ("s2=2", f"s2=2; Path={P}", f"s2=2; Path={P}"),  # no Path: the browser would use /mcp for a request to /mcp/a
    ("s3=3; Path=/x; Secure", f"s3=3; Secure; Path={P}/x", f"s3=3; Secure; Path={P}"),
    (f"s4=4; Path={P}/x", f"s4=4; Path={P}{P}/x", f"s4=4; Path={P}/x"),  # not stripped: already inside
    ("s5=5; Domain=127.0.0.1; Path=/", f"s5=5; Path={P}", f"s5=5; Path={P}"),  # host-only now
    ("s6=6; path=/", f"s6=6; Path={P}", f"s6=6; Path={P}"),
    ("s7=7;PATH = / ;SameSite=Lax", f"s7=7;SameSite=Lax; Path={P}", f"s7=7;SameSite=Lax; Path={P}"),
    ('s8=8; Path="/"', f"s8=8; Path={P}", f"s8=8; Path={P}"),  # quoted: not a path to a browser
    ("s9=9; Path=; Domain=", f"s9=9; Path={P}", f"s9=9; Path={P}"),
    ("s10=10; Path", f"s10=10; Path={P}", f"s10=10; Path={P}"),
    ("s11=11; Path=relative", f"s11=11; Path={P}", f"s11=11; Path={P}"),
    ("s12=12; Path=/x; Path=/", f"s12=12; Path={P}", f"s12=12; Path={P}"),  # the last one counts
    ("s13=13; Path=/; path=/y", f"s13=13; Path={P}/y", f"s13=13; Path={P}"),
    ("s14=14; DOMAIN = .localhost ;\tpath\t=\t/", f"s14=14; Path={P}", f"s14=14; Path={P}"),
    ("s15=15; Path=/MCP/A", f"s15=15; Path={P}/MCP/A", f"s15=15; Path={P}"),  # paths match case and all
    (f"s16=16; Path={P}x", f"s16=16; Path={P}{P}x", f"s16=16; Path={P}"),  # /mcp/ax is not inside /mcp/a
    ("s17=17; Path=/" + "x" * 1100, f"s17=17; Path={P}", f"s17=17; Path={P}"),  # browsers ignore a longer one
    (f"{QUOTED}; Path=/", f"{QUOTED}; Path={P}", f"{QUOTED}; Path={P}"),  # the rest byte for byte
]


async def cookie_upstream(aiohttp_server: Any, lines: list[str]) -> tuple[str, list[web.Request]]:
    """Answers every path with ``lines`` as Set-Cookie (``?bomb=N``: ten 3,000-byte cookies with
    ``Path=/`` instead, a cookie bomb); records what reached it."""
    seen: list[web.Request] = []

    async def any_path(request: web.Request) -> web.Response:
        seen.append(request)
        resp = web.Response(body=b'{"jsonrpc": "2.0", "id": 1, "result": {}}', content_type="application/json")
        bomb = request.query.get("bomb")
        for c in lines if bomb is None else [f"b{bomb}_{i}={'x' * 3000}; Path=/" for i in range(10)]:
            resp.headers.add("Set-Cookie", c)
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


async def origin(
    make_sidecar: MakeSidecar,
    aiohttp_server: Any,
    tmp_path: Path,
    lines: list[str],
    strip: bool = True,
    root: bool = False,
) -> tuple[Running, str, list[web.Request], list[web.Request], list[web.Request]]:
    """Plex at ``/``, MCP servers at ``/mcp/a`` and ``/mcp/b``: one origin. ``/mcp/a`` (or with
    ``root`` Plex) sets the cookies ``lines``."""
    plex, root_seen = await cookie_upstream(aiohttp_server, lines if root else [])
    a, a_seen = await cookie_upstream(aiohttp_server, [] if root else lines)
    b, b_seen = await cookie_upstream(aiohttp_server, [])
    cfg = base_config(plex, tmp_path)
    cfg["upstreams"] += [
        {"id": "a", "kind": "mcp", "url": a, "path_prefix": P, "strip_prefix": strip},
        {"id": "b", "kind": "mcp", "url": b, "path_prefix": "/mcp/b"},
    ]
    sc = await make_sidecar(cfg)
    _, key = await sc.create_key(permissions={"upstreams": ["*"]})
    return sc, key, root_seen, a_seen, b_seen


PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


def mcp_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}


@pytest.mark.parametrize("strip", [True, False])
async def test_a_prefixed_upstreams_cookies_are_kept_in_its_folder(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, strip: bool
) -> None:
    """Every Set-Cookie of one answer, whatever its spelling: one Path inside /mcp/a (last, so it
    wins), no Domain, every other attribute as sent."""
    sc, key, _, _, _ = await origin(make_sidecar, aiohttp_server, tmp_path, [line for line, _, _ in LINES], strip)
    resp = await sc.proxy.post(P, json=PING, headers=mcp_headers(key))
    assert resp.status == 200
    assert resp.headers.getall("Set-Cookie") == [kept if strip else as_is for _, kept, as_is in LINES]


BASED = ["c1=1; Path=/", "c2=2; Path=/base", "c3=3; Path=/base/x", "c4=4; Path=/basex", f"c5=5; Path=/base{P}/y"]


@pytest.mark.parametrize(
    ("strip", "paths"), [(True, [P, P, f"{P}/x", P, f"{P}{P}/y"]), (False, [P, P, P, P, f"{P}/y"])]
)
async def test_an_upstream_urls_own_path_is_read_off_its_cookies(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, strip: bool, paths: list[str]
) -> None:
    """``url: http://host/base``: the upstream is sent ``/base/…``, so its ``Path=/base/x`` means
    ``/mcp/a/x`` on the origin (stripped), and ``Path=/`` or ``/basex`` mean nothing it is sent."""
    url, _ = await cookie_upstream(aiohttp_server, BASED)
    cfg = base_config(url, tmp_path)
    cfg["upstreams"] = [{"id": "a", "kind": "mcp", "url": f"{url}/base/", "path_prefix": P, "strip_prefix": strip}]
    sc = await make_sidecar(cfg)
    _, key = await sc.create_key(permissions={"upstreams": ["*"]})
    resp = await sc.proxy.post(P, json=PING, headers=mcp_headers(key))
    assert resp.status == 200
    assert resp.headers.getall("Set-Cookie") == [
        f"{c.split(';')[0]}; Path={p}" for c, p in zip(BASED, paths, strict=True)
    ]


async def test_one_upstreams_cookies_no_longer_reach_another(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """An MCP server's session cookie (Path=/, Domain=) is not sent to its neighbour nor to Plex, and
    its cookie bomb locks out only its own folder; it still gets its own cookie back."""
    lines = ["session=A-SECRET; Path=/; HttpOnly", "other=A2; Domain=127.0.0.1"]
    sc, key, root_seen, a_seen, b_seen = await origin(make_sidecar, aiohttp_server, tmp_path, lines)
    assert (await sc.proxy.post(P, json=PING, headers=mcp_headers(key))).status == 200
    assert (await sc.proxy.post("/mcp/b", json=PING, headers=mcp_headers(key))).status == 200
    assert "Cookie" not in b_seen[-1].headers
    assert (await sc.proxy.get("/library/sections", headers={"X-Plex-Token": key})).status == 200
    assert "Cookie" not in root_seen[-1].headers
    assert (await sc.proxy.post(f"{P}/x", json=PING, headers=mcp_headers(key))).status == 200
    assert sorted(a_seen[-1].headers["Cookie"].split("; ")) == ["other=A2", "session=A-SECRET"]
    bomb = await sc.proxy.post(P, params={"bomb": "1"}, json=PING, headers=mcp_headers(key))
    # aiohttp's jar sends at most 8 KB of cookies, a browser all it keeps: three such answers would
    # put every request on the origin over the 64 KB head limit; now only those under /mcp/a.
    assert [c.rsplit("; ", 1)[1] for c in bomb.headers.getall("Set-Cookie")] == [f"Path={P}"] * 10


async def test_the_root_upstreams_cookies_pass_as_sent(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Plex at ``/``: its folder is the whole origin, nothing to rewrite (the sidecar's own cookie
    names and folders are still refused). The residual, on purpose: the sidecar cannot tell whose a
    cookie is going up, so Plex's Path=/ cookie reaches the MCP servers too (browser.py)."""
    lines = [line for line, _, _ in LINES] + ["sidecar_console=x; Path=/", "bomb=x; Path=/oauth"]
    sc, key, _, a_seen, _ = await origin(make_sidecar, aiohttp_server, tmp_path, lines, root=True)
    resp = await sc.proxy.get("/library/sections", headers={"X-Plex-Token": key})
    assert resp.status == 200
    assert resp.headers.getall("Set-Cookie") == [line for line, _, _ in LINES]
    assert (await sc.proxy.post(P, json=PING, headers=mcp_headers(key))).status == 200
    assert "s1=1" in a_seen[-1].headers["Cookie"].split("; ")


@pytest.mark.parametrize("line", ["a=1; Path=/\x00; Secure", "a=1\x01; Path=/", "a=1; Path=/x\x1f", "a=1\x7f"])
def test_a_line_a_browser_would_cut_is_dropped(line: str) -> None:
    """A browser cuts or refuses a cookie line at a control character: the appended Path could be lost."""
    assert scoped(line, P, True) is None
    assert scoped("a=1;\tPath=/", P, True) == f"a=1; Path={P}"  # a tab is whitespace, not a control
