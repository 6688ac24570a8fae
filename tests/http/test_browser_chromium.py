"""End to end in Chromium: what an upstream relays cannot take over the origin the OAuth consent
page lives on. A page it serves cannot plant a service worker over the whole origin (one under
its own folder still works); a poster SVG or a reflected HTML page runs no script there; an MCP
server's cookies (a cookie bomb) stay under its own path prefix.

The upstream is hostile in the way a reflected-input bug makes one: it serves a page that
registers a worker from a script at the root, and asks for scope "/" with
``Service-Worker-Allowed``. Before the fix the worker registered with scope "/" and answered
every later navigation on the origin (the consent page included) itself.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeSidecar, base_config
from test_browser_cookie_scope import cookie_upstream

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip

PAGE = """<!doctype html><title>waiting</title><script>
const q = new URLSearchParams(location.search);
navigator.serviceWorker.register(q.get('sw') + '?X-Plex-Token=' + q.get('X-Plex-Token'), {scope: q.get('scope')})
  .then(r => { document.title = 'registered ' + new URL(r.scope).pathname; })
  .catch(e => { document.title = 'refused'; });
</script>"""
SVG = """<svg xmlns="http://www.w3.org/2000/svg"><script>localStorage.setItem('pwned', 'svg')</script></svg>"""
PROBE = """<!doctype html><script>document.title = localStorage.getItem('pwned') || 'clean'</script>"""
WORKER = "self.addEventListener('fetch', e => e.respondWith(new Response('<h1>not the consent page</h1>', "
WORKER += "{headers: {'Content-Type': 'text/html'}})));"


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium via Playwright; missing: a failure under CI=true, else a skip."""
    problem = None if os.path.exists(CHROMIUM) else f"{CHROMIUM} is not installed"
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        problem = "playwright (Python) is not installed"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            await b.close()


async def hostile_site(aiohttp_server: Any) -> str:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def worker(request: web.Request) -> web.Response:
        return web.Response(text=WORKER, content_type="application/javascript", headers={"Service-Worker-Allowed": "/"})

    async def svg(request: web.Request) -> web.Response:  # a poster someone uploaded
        return web.Response(text=SVG, content_type="image/svg+xml")

    async def search(request: web.Request) -> web.Response:  # echoes its query into a page, unescaped
        return web.Response(text=f"<p>no results for {request.query.get('q', '')}</p>", content_type="text/html")

    async def probe(request: web.Request) -> web.Response:
        return web.Response(text=PROBE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/library/metadata/1/thumb", svg)
    app.router.add_get("/search", search)
    app.router.add_get("/web/probe.html", probe)
    app.router.add_get("/web/index.html", page)
    app.router.add_get("/sw.js", worker)
    app.router.add_get("/web/sw.js", worker)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize(
    ("sw", "scope", "want"),
    [
        ("/sw.js", "/", "refused"),  # a root script: refused by the sidecar
        ("/web/sw.js", "/", "refused"),  # Service-Worker-Allowed: / dropped, so "/" is wider than allowed
        ("/web/sw.js", "/web/", "registered /web/"),  # an application's own folder: as before
    ],
)
async def test_a_relayed_page_cannot_register_a_worker_over_the_consent_page(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, browser: Any, sw: str, scope: str, want: str
) -> None:
    sc = await make_sidecar(base_config(await hostile_site(aiohttp_server), tmp_path))
    _, key = await sc.create_key(permissions={"upstreams": ["*"]})
    origin = str(sc.proxy.make_url("")).rstrip("/")
    page = await browser.new_page()
    await page.goto(f"{origin}/web/index.html?X-Plex-Token={key}&sw={sw}&scope={scope}")
    await page.wait_for_function("document.title !== 'waiting'", timeout=5000)
    assert await page.title() == want
    if want == "refused":  # nothing between the person and the sidecar's own pages
        await page.goto(f"{origin}/oauth/authorize")
        assert "not the consent page" not in await page.content()


@pytest.mark.parametrize(
    "target",
    [
        "/library/metadata/1/thumb?X-Plex-Token={key}",
        "/search?X-Plex-Token={key}&q=<script>localStorage.setItem('pwned','reflected')</script>",
    ],
)
async def test_a_poster_or_a_reflection_runs_no_script_on_the_origin(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, browser: Any, target: str
) -> None:
    """Navigated to, the SVG's script (or the reflected one) would write to the origin's storage,
    which Plex Web keeps its key in and the consent page shares. Sandboxed, it runs in an opaque
    origin: the probe page, in Plex Web's folder, finds nothing written."""
    sc = await make_sidecar(base_config(await hostile_site(aiohttp_server), tmp_path))
    _, key = await sc.create_key(permissions={"upstreams": ["*"]})
    origin = str(sc.proxy.make_url("")).rstrip("/")
    page = await browser.new_page()
    await page.goto(origin + target.format(key=key))
    await page.goto(f"{origin}/web/probe.html?X-Plex-Token={key}")
    assert await page.title() == "clean"


BOMB = """async (a) => {
  const post = (path) => fetch(path, {method: 'POST', body: '{"jsonrpc": "2.0", "id": 1, "method": "ping"}',
    headers: {'Authorization': 'Bearer ' + a.key, 'Accept': 'application/json, text/event-stream',
              'Content-Type': 'application/json'}});
  for (const n of [0, 1, 2]) await post('/mcp/a?bomb=' + n);
  return [(await post('/mcp/b')).status, (await fetch('/web/probe.html?X-Plex-Token=' + a.key)).status];
}"""


async def test_an_mcp_servers_cookie_bomb_stays_in_its_folder(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, browser: Any
) -> None:
    """An MCP server at /mcp/a answers a web MCP client's requests with thirty 3 KB cookies, Path=/.
    Chromium keeps and sends them all: before the fix every later request on the origin (Plex Web,
    the other MCP server, the consent page) carried a Cookie line over 64 KB: refused. Now kept
    under /mcp/a: the others reach their upstreams, without a cookie."""
    a, _ = await cookie_upstream(aiohttp_server, [])
    b, b_seen = await cookie_upstream(aiohttp_server, [])
    cfg = base_config(await hostile_site(aiohttp_server), tmp_path)
    cfg["upstreams"] += [{"id": "a", "kind": "mcp", "url": a, "path_prefix": "/mcp/a"},
                         {"id": "b", "kind": "mcp", "url": b, "path_prefix": "/mcp/b"}]  # fmt: skip
    sc = await make_sidecar(cfg)
    _, key = await sc.create_key(permissions={"upstreams": ["*"]})
    page = await browser.new_page()
    await page.goto(f"{str(sc.proxy.make_url('')).rstrip('/')}/web/probe.html?X-Plex-Token={key}")
    assert await page.evaluate(BOMB, {"key": key}) == [200, 200]
    assert "Cookie" not in b_seen[-1].headers
