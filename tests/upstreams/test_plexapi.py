"""python-plexapi, unmodified, through the sidecar to the Plex-like upstream.

plexapi is synchronous (requests, websocket-client): it runs in a thread while the
sidecar serves in the test's event loop. It only ever talks to the sidecar's URL; the
config below keeps it from looking anything up at plex.tv.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import PLEX_TOKEN, Running

from sidecar.demo import MEDIA, SEEN

os.environ.setdefault("PLEXAPI_HEADER_IDENTIFIER", "sidecar-tests-plexapi")
os.environ.setdefault("PLEXAPI_HEADER_PRODUCT", "SidecarTests")
os.environ.setdefault("PLEXAPI_PLEXAPI_AUTORELOAD", "false")

plexapi_server = pytest.importorskip("plexapi.server")
requests = pytest.importorskip("requests")

PLAYBACK = {"upstreams": ["plex"], "paths": ["plex:playback"]}


def base_url(running: Running) -> str:
    return str(running.proxy.make_url("")).rstrip("/")


def assert_upstream_saw_only_the_real_token(upstream: TestServer, key: str) -> None:
    for req in upstream.app[SEEN]:
        assert key not in str(req["path"]) + repr(req["headers"])
        assert req["headers"]["X-Plex-Token"] == PLEX_TOKEN


async def test_plexserver_library_and_media(plex_sidecar: Running, plex_upstream: TestServer) -> None:
    _, key = await plex_sidecar.create_key(permissions=PLAYBACK)
    server: Any = await asyncio.to_thread(plexapi_server.PlexServer, base_url(plex_sidecar), key, timeout=10)
    assert server.friendlyName == "Sidecar Demo"
    assert server.machineIdentifier == "demo-machine-id"

    # Every plexapi call may do I/O (even attribute access can reload): all of it in a thread.
    sections = await asyncio.to_thread(lambda: server.library.sections())
    assert [(s.title, s.type) for s in sections] == [("Movies", "movie"), ("TV Shows", "show")]
    movies = await asyncio.to_thread(sections[0].all)
    assert [m.title for m in movies] == ["Big Buck Bunny"]
    part_key = await asyncio.to_thread(lambda: movies[0].media[0].parts[0].key)

    # A media URL the way plexapi hands it to players: the key in the query, unencoded.
    media_url = server.url(part_key, includeToken=True)
    assert media_url.endswith(f"?X-Plex-Token={key}")
    resp = await asyncio.to_thread(requests.get, media_url, headers={"Range": "bytes=1000-1999"}, timeout=10)
    assert resp.status_code == 206 and resp.content == MEDIA[1000:2000]
    resp = await asyncio.to_thread(requests.get, media_url, timeout=10)
    assert resp.status_code == 200 and resp.content == MEDIA

    # plexapi's own identity passed through; the bare media fetches (no X-Plex-* of their own)
    # got the sidecar's configured identity instead.
    import plexapi

    ids = {req["headers"].get("X-Plex-Client-Identifier") for req in plex_upstream.app[SEEN]}
    assert ids == {plexapi.X_PLEX_IDENTIFIER, "sidecar"}
    assert_upstream_saw_only_the_real_token(plex_upstream, key)


async def test_plexapi_with_a_read_only_key_cannot_refresh(plex_sidecar: Running) -> None:
    _, key = await plex_sidecar.create_key(permissions={"upstreams": ["plex"], "paths": ["plex:read"]})
    server: Any = await asyncio.to_thread(plexapi_server.PlexServer, base_url(plex_sidecar), key, timeout=10)
    sections = await asyncio.to_thread(lambda: server.library.sections())
    from plexapi.exceptions import BadRequest

    with pytest.raises(BadRequest, match="insufficient_permissions"):  # plexapi's name for a 403
        await asyncio.to_thread(sections[0].update)  # GET /library/sections/1/refresh


async def test_notification_websocket_url_survives_plexapis_rewrite(
    plex_sidecar: Running, plex_upstream: TestServer
) -> None:
    _, key = await plex_sidecar.create_key(permissions=PLAYBACK)
    server: Any = await asyncio.to_thread(plexapi_server.PlexServer, base_url(plex_sidecar), key, timeout=10)
    from plexapi.alert import AlertListener

    # Exactly what AlertListener.run() does to build its URL.
    ws_url = server.url(AlertListener.key, includeToken=True).replace("http", "ws")
    assert (
        ws_url == base_url(plex_sidecar).replace("http://", "ws://") + f"/:/websockets/notifications?X-Plex-Token={key}"
    )
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
        msg = await asyncio.wait_for(ws.receive_json(), 10)
        assert msg["NotificationContainer"]["type"] == "playing"
        await ws.send_str("echo")
        assert (await asyncio.wait_for(ws.receive(), 10)).data == "echo"
    assert_upstream_saw_only_the_real_token(plex_upstream, key)


async def test_plexapi_alert_listener(plex_sidecar: Running, plex_upstream: TestServer) -> None:
    pytest.importorskip("websocket", reason="plexapi's AlertListener needs websocket-client")
    rec, key = await plex_sidecar.create_key(permissions=PLAYBACK)
    server: Any = await asyncio.to_thread(plexapi_server.PlexServer, base_url(plex_sidecar), key, timeout=10)
    got = threading.Event()
    alerts: list[dict[str, Any]] = []

    def on_alert(data: dict[str, Any]) -> None:
        alerts.append(data)
        got.set()

    listener = await asyncio.to_thread(server.startAlertListener, on_alert)
    try:
        assert await asyncio.to_thread(got.wait, 10), "no notification reached plexapi"
        assert alerts[0]["type"] == "playing"
        # Revoking the key ends the listener's stream from the sidecar's side (invariant 5): plexapi's
        # thread sees the close and returns by itself. (Its own stop() closes the socket from another
        # thread while run_forever polls it, a race in websocket-client that can leave the thread
        # polling a reused descriptor forever, so the test does not rely on it.)
        resp = await plex_sidecar.admin.delete(f"/admin/keys/{rec.id}", headers=plex_sidecar.admin_headers())
        assert resp.status == 200
        await asyncio.to_thread(listener.join, 10)
    finally:
        if listener.is_alive():
            await asyncio.to_thread(listener.stop)
    assert not listener.is_alive(), "the revoked key's notification stream was not closed by the sidecar"
    assert any(str(r["path"]).startswith("/:/websockets/notifications") for r in plex_upstream.app[SEEN])
    assert_upstream_saw_only_the_real_token(plex_upstream, key)
