"""``sidecar demo`` and the small Plex-like upstream it (and the tests) run.

The upstream accepts only its own token, speaks enough of Plex's XML API for
python-plexapi (``PlexServer``, ``library.sections()``, media URLs, the
notifications websocket and event source), serves a media file with ``Range``,
and starts transcode sessions with relative segment URLs, like the real thing.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import tempfile
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = ["MEDIA", "SEEN", "free_port", "plex_like_app", "run_demo"]

MEDIA = bytes(range(256)) * 4096  # 1 MiB of known bytes, for Range checks
_ROOT = (
    '<MediaContainer size="0" friendlyName="Sidecar Demo" machineIdentifier="demo-machine-id" '
    'version="1.40.0.0" platform="Linux" myPlex="0" transcoderVideo="1" allowSync="0"></MediaContainer>'
)
_SECTIONS = (
    '<MediaContainer size="2" allowSync="0" title1="Plex Library">'
    '<Directory allowSync="1" art="/:/resources/movie-fanart.jpg" key="1" type="movie" title="Movies" '
    'agent="tv.plex.agents.movie" scanner="Plex Movie" language="en-US" uuid="u-1" updatedAt="1700000000" '
    'createdAt="1700000000" scannedAt="1700000000"><Location id="1" path="/data/movies"/></Directory>'
    '<Directory allowSync="1" key="2" type="show" title="TV Shows" agent="tv.plex.agents.series" '
    'scanner="Plex TV Series" language="en-US" uuid="u-2" updatedAt="1700000000" createdAt="1700000000" '
    'scannedAt="1700000000"><Location id="2" path="/data/tv"/></Directory></MediaContainer>'
)
_MOVIES = (
    '<MediaContainer size="1" librarySectionID="1" librarySectionTitle="Movies">'
    '<Video ratingKey="100" key="/library/metadata/100" type="movie" title="Big Buck Bunny" year="2008" '
    'librarySectionID="1" addedAt="1700000000" updatedAt="1700000000" duration="596000">'
    '<Media id="200" duration="596000" container="mp4"><Part id="300" key="/library/parts/300/file.mp4" '
    'size="1048576" container="mp4" file="/data/movies/bbb.mp4"/></Media></Video></MediaContainer>'
)


SEEN: web.AppKey[list[dict[str, object]]] = web.AppKey("seen")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plex_like_app(token: str) -> web.Application:
    """A Plex-like upstream that accepts only ``token`` and records what it saw."""
    seen: list[dict[str, object]] = []

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        got = request.headers.get("X-Plex-Token") or request.query.get("X-Plex-Token")
        seen.append({"path": request.path_qs, "headers": dict(request.headers)})
        if got != token:
            return web.Response(status=401, text="<html><body>401 Unauthorized</body></html>", content_type="text/html")
        return await handler(request)

    app = web.Application(middlewares=[check_token])
    app[SEEN] = seen

    def xml(text: str) -> web.Response:
        return web.Response(text=text, content_type="text/xml", charset="utf-8")

    async def root(request: web.Request) -> web.Response:
        return xml(_ROOT)

    async def identity(request: web.Request) -> web.Response:
        return xml('<MediaContainer size="0" machineIdentifier="demo-machine-id" version="1.40.0.0"/>')

    async def library(request: web.Request) -> web.Response:
        # What python-plexapi's ``server.library`` loads first.
        return xml(
            '<MediaContainer size="3" allowSync="0" identifier="com.plexapp.plugins.library" title1="Plex Library">'
            '<Directory key="sections" title="Library Sections"/><Directory key="recentlyAdded" '
            'title="Recently Added Content"/><Directory key="onDeck" title="On Deck Content"/></MediaContainer>'
        )

    async def sections(request: web.Request) -> web.Response:
        return xml(_SECTIONS)

    async def section_all(request: web.Request) -> web.Response:
        return xml(_MOVIES if request.match_info["id"] == "1" else '<MediaContainer size="0"/>')

    async def refresh(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def part(request: web.Request) -> web.StreamResponse:
        rng = request.http_range
        start, stop = rng.start or 0, rng.stop if rng.stop is not None else len(MEDIA)
        if rng.start is None and rng.stop is None:
            return web.Response(body=MEDIA, content_type="video/mp4", headers={"Accept-Ranges": "bytes"})
        body = MEDIA[start:stop]
        return web.Response(
            status=206,
            body=body,
            content_type="video/mp4",
            headers={"Content-Range": f"bytes {start}-{start + len(body) - 1}/{len(MEDIA)}", "Accept-Ranges": "bytes"},
        )

    async def start_m3u8(request: web.Request) -> web.Response:
        sid = request.query.get("session", "s1")
        text = f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=2000000\nsession/{sid}/base/index.m3u8\n"
        return web.Response(text=text, content_type="application/vnd.apple.mpegurl")

    async def session_file(request: web.Request) -> web.Response:
        return web.Response(text=f"segment {request.match_info['sid']} {request.match_info['rest']}")

    async def photo_transcode(request: web.Request) -> web.Response:
        # Real Plex fetches the nested ``url`` itself, with the token inside it: echo it so tests can look.
        return web.Response(body=b"\xff\xd8\xff" + request.query.get("url", "").encode(), content_type="image/jpeg")

    async def security_token(request: web.Request) -> web.Response:
        return xml(f'<MediaContainer size="0" token="{token}"/>')

    async def echo_token(request: web.Request) -> web.Response:
        # Like Plex redirects that carry the token along.
        raise web.HTTPFound(f"/library/sections?X-Plex-Token={token}")

    async def notifications(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"NotificationContainer": {"type": "playing", "size": 1}}))
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    async def eventsource(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f'event: ping\ndata: {{"n": {i}}}\n\n'.encode())
            await asyncio.sleep(0.05)
        return resp

    r = app.router
    r.add_get("/", root)
    r.add_get("/identity", identity)
    r.add_get("/library", library)
    r.add_get("/library/sections", sections)
    r.add_get("/library/sections/{id}/all", section_all)
    r.add_get("/library/sections/{id}/refresh", refresh)
    r.add_get("/library/parts/{id}/{name}", part)
    r.add_get("/video/:/transcode/universal/start.m3u8", start_m3u8)
    r.add_get("/video/:/transcode/universal/session/{sid}/{rest:.*}", session_file)
    r.add_get("/photo/:/transcode", photo_transcode)
    r.add_get("/security/token", security_token)
    r.add_get("/redirect", echo_token)
    r.add_get("/:/websockets/notifications", notifications)
    r.add_get("/:/eventsource/notifications", eventsource)
    return app


def _console_link(admin_app: web.Application, admin: str, proxy: str) -> str:
    """The web console's one-time sign-in link (single use, short-lived: sidecar/console/sessions.py)."""
    from .console import CONSOLE

    console = admin_app.get(CONSOLE)
    if console is None:
        return f"{admin}/ (admin.console.enabled is false)"
    console.proxy_url = proxy  # the examples shown with a new key point at the demo's proxy
    return f"{admin}/signin/once/{console.links.issue()}"


def _demo_listen(listen: str | None) -> tuple[str, int]:
    """``--listen host:port`` as given; without it 127.0.0.1:8080, or a free port when 8080 is taken."""
    if listen is not None:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--listen {listen!r}: expected host:port")
        return host.strip("[]") or "127.0.0.1", int(port)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8080))
        except OSError:
            return "127.0.0.1", free_port()
    return "127.0.0.1", 8080


async def run_demo(listen: str | None = None) -> None:
    """Start the Plex-like upstream and a sidecar in front of it; serve until Ctrl-C or SIGTERM."""
    from .app import Sidecar, running
    from .config import parse_config

    host, proxy_port = _demo_listen(listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    plex_token = secrets.token_hex(10)
    upstream_port = free_port()
    runner = web.AppRunner(plex_like_app(plex_token), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
        with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as tmp:
            admin_token = secrets.token_hex(16)
            env = {"PLEX_TOKEN": plex_token, "SIDECAR_ADMIN_TOKEN": admin_token}
            config = parse_config(
                {
                    "listen": f"{host}:{proxy_port}",
                    "admin": {"listen": f"127.0.0.1:{free_port()}"},
                    "store": {"kind": "sqlite", "path": str(Path(tmp) / "sidecar.db")},
                    "upstreams": [
                        {
                            "id": "plex",
                            "kind": "plex",
                            "url": f"http://127.0.0.1:{upstream_port}",
                            "token_env": "PLEX_TOKEN",
                        }
                    ],
                    "rate_limits": {"default": ["20/second"]},
                    "cache": {"rules": [{"upstream": "plex", "path": "/library/sections*", "ttl": "30s"}]},
                },
                env=env,
                base=Path(tmp),
            )
            sc = Sidecar(config, env=env)
            async with running(sc) as (_, admin_runner):
                _, key = await sc.manager().create(
                    {"name": "demo", "permissions": {"upstreams": ["plex"], "paths": ["plex:playback"]},
                     "rate_limits": ["5/second"]},
                    "demo",
                )  # fmt: skip
                _, ro_key = await sc.manager().create(
                    {"name": "read-only", "permissions": {"upstreams": ["plex"], "paths": ["plex:read"]}}, "demo"
                )
                await sc.verifier.refresh()
                shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
                base = f"http://{shown}:{proxy_port}"
                admin = f"http://{config.admin.listen}"
                console = _console_link(admin_runner.app, admin, base)
                print(
                    f"""
Sidecar demo is running (Ctrl-C to stop). State lives in {tmp}.
  proxy:    {base}   ->  a built-in Plex-like server (its real token stays hidden)
  admin:    {admin}  (admin token: {admin_token})
  console:  {console}
            (signs you in once, within 2 minutes; then sign in with the admin token)

Demo key (plex:playback, 5/second), shown once:  {key}
Read-only key (plex:read):                        {ro_key}

Try:
  curl -s {base}/library/sections -H 'X-Plex-Token: {key}'
  curl -s '{base}/library/sections?X-Plex-Token={key}'
  curl -s {base}/identity -H 'Authorization: Bearer {key}' -i | head -20
  curl -s {base}/library/sections/1/refresh -H 'x-api-key: {ro_key}'      # 403: refresh changes state
  curl -s {base}/security/token -H 'x-api-key: {key}'                     # 403: token minting needs admin
  curl -s {base}/library/sections -H 'x-api-key: pmcp_nope'               # 401 invalid_key
  curl -s {admin}/metrics | grep sidecar_requests_total
  curl -s {admin}/admin/keys -H 'Authorization: Bearer {admin_token}'
""",
                    flush=True,
                )
                await stop.wait()
                print("Stopping the demo.", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
