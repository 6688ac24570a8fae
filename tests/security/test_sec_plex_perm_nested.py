"""Nested URLs: Plex as a narrow key's deputy (DESIGN invariants 2 and 3).

Plex fetches what a ``/photo/:/transcode`` ``url=`` names, and transcodes what a
``/video/:/transcode/…`` ``path=`` names, for the client. A relative one is a path on Plex
itself; so is an absolute one to Plex's own address (loopback, a private address, the
upstream's host): each is authorised as the key's own GET, at every depth of nesting, or
refused with ``403 insufficient_permissions`` before anything is forwarded.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from conftest import Running
from plexrig import Recorder, get, raw_request, refused, rig

READ = {"upstreams": ["plex"], "paths": ["plex:read"]}

__all__ = ["rig"]  # the fixture, from plexrig: pytest finds it here


async def photo(running: Running, nested: str, key: str) -> Any:
    return await get(running, f"/photo/:/transcode?width=100&url={quote(nested, safe='')}", key)


@pytest.mark.parametrize(
    "nested",
    [
        "/photo/:/transcode?url=/library/parts/1/file.jpg",  # a nested transcode of a file
        "/photo/:/transcode?url=" + quote("/photo/:/transcode?url=/:/prefs", safe=""),
        "http://127.0.0.1:32400/library/parts/1/file.jpg",  # Plex itself, by address
        "http://localhost:32400/library/parts/1/file.jpg",
        "http://LOCALHOST./library/parts/1/file.jpg",
        "http://127.1:32400/library/parts/1/file.jpg",
        "http://2130706433:32400/library/parts/1/file.jpg",
        "http://0x7f000001:32400/library/parts/1/file.jpg",
        "http://0.0.0.0:32400/library/parts/1/file.jpg",
        "http://[::1]:32400/library/parts/1/file.jpg",
        "http://[::ffff:127.0.0.1]:32400/library/parts/1/file.jpg",
        "http://192.168.1.10:32400/library/parts/1/file.jpg",  # Plex by its LAN address
        "http://10.0.0.2:32400/:/prefs",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata: not artwork
        "http://%31%32%37.0.0.1:32400/library/parts/1/file.jpg",  # an encoded host
        "http://[::127.0.0.1]:32400/library/parts/1/file.jpg",
        "http://127.0.0.1:32400\\@metadata.example/library/parts/1/file.jpg",  # `\\` ends the host for WHATWG
        "http://metadata.example@127.0.0.1:32400/library/parts/1/file.jpg",
        "http://nas.local:32400/library/parts/1/file.jpg",
        "file:///library/parts/1/file.jpg",
        "/library/parts/1/file.jpg?url=x",
        "/photo/:/transcode?url="
        + quote("/photo/:/transcode?url=" + quote("/photo/:/transcode?url=/x", safe=""), safe=""),
    ],
)
async def test_a_nested_url_to_plex_itself_is_authorised_like_the_path(
    rig: tuple[Running, Recorder], nested: str
) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions=READ)
    ans = await photo(running, nested, key)
    assert refused(ans), (nested, ans.status, ans.body)
    assert rec.seen == []


async def test_a_nested_url_naming_the_upstreams_own_host_is_authorised(rig: tuple[Running, Recorder]) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions=READ)
    own = running.sc.config.upstreams[0].url.rstrip("/")
    ans = await photo(running, own.replace("127.0.0.1", "localhost") + "/library/parts/1/file.jpg", key)
    assert refused(ans), ans.body
    ans = await photo(running, own + "/:/prefs", key)
    assert refused(ans), ans.body
    assert rec.seen == []


@pytest.mark.parametrize(
    "nested",
    [
        "https://metadata-static.plex.tv/a/b.jpg",  # artwork from the internet: Plex fetches it, no token
        "/library/metadata/1/thumb/1700000000",
        "http://127.0.0.1:32400/library/metadata/1/thumb/1700000000",  # Plex itself, a path the key may use
        "/photo/:/transcode?url=/library/metadata/1/thumb/1700000000",
    ],
)
async def test_nested_urls_the_key_may_use_still_pass(rig: tuple[Running, Recorder], nested: str) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions=READ)
    ans = await photo(running, nested, key)
    assert ans.status == 200, (nested, ans.body)
    assert ("url", nested) in rec.seen[-1].query


TRANSCODE_ONE = {"upstreams": ["plex"], "paths": ["/library/metadata/1", "/video/:/transcode/*"]}


@pytest.mark.parametrize(
    "path",
    [
        "/library/metadata/2",
        "http://127.0.0.1:32400/library/metadata/2",
        "/library/metadata/1/../2",
        "/library/metadata/1/..;/2",
    ],
)
async def test_a_transcode_of_an_item_the_key_may_not_read_is_refused(rig: tuple[Running, Recorder], path: str) -> None:
    """``path=`` names what the transcoder reads for the key: authorised like the key's own GET."""
    running, rec = rig
    _, key = await running.create_key(permissions=TRANSCODE_ONE)
    for route in ("start.m3u8", "decision", "start.mpd"):
        ans = await get(running, f"/video/:/transcode/universal/{route}?session=s1&path={quote(path, safe='')}", key)
        assert refused(ans), (route, path, ans.status, ans.body)
    assert rec.seen == []


async def test_a_transcode_of_an_item_the_key_may_read_passes(rig: tuple[Running, Recorder]) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions=TRANSCODE_ONE)
    for path in ("/library/metadata/1", "http://127.0.0.1:32400/library/metadata/1"):
        ans = await get(running, f"/video/:/transcode/universal/decision?path={quote(path, safe='')}", key)
        assert ans.status == 200, (path, ans.body)
    assert len(rec.seen) == 2


@pytest.mark.parametrize(
    "query",
    [
        "width=1;url=%2Flibrary%2Fparts%2F1%2Ffile.jpg",  # `;` as a separator, as some servers read it
        "width=1&url=%2Fphoto%2F%3A%2Ftranscode%3Fa%3D1%3Burl%3D%2Flibrary%2Fparts%2F1%2Ffile.jpg",
        "u%72l=%2Flibrary%2Fparts%2F1%2Ffile.jpg",
        "URL=%2Flibrary%2Fparts%2F1%2Ffile.jpg",
    ],
)
async def test_a_nested_url_in_any_query_spelling_is_authorised(rig: tuple[Running, Recorder], query: str) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions=READ)
    ans = await get(running, f"/photo/:/transcode?{query}", key)
    assert refused(ans), (query, ans.status, ans.body)
    assert rec.seen == []


PLAYBACK = {"upstreams": ["plex"], "paths": ["plex:playback"]}


@pytest.mark.parametrize("query", ["a=1;session=S", "session=MINE;session=S", "a=1;X-Plex-Session-Identifier=S"])
async def test_a_session_id_after_a_semicolon_is_checked(rig: tuple[Running, Recorder], query: str) -> None:
    """Key B cannot reach key A's transcode session S by hiding ``session=S`` behind a `;`."""
    running, rec = rig
    _, a = await running.create_key(permissions=PLAYBACK)
    _, b = await running.create_key(permissions=PLAYBACK)
    start = "/video/:/transcode/universal/start.m3u8?session=S&path=%2Flibrary%2Fmetadata%2F1"
    assert (await get(running, start, a)).status == 200
    seen = len(rec.seen)
    ans = await get(running, f"/video/:/transcode/universal/ping?{query}", b)
    assert ans.status in (400, 403), (query, ans.status, ans.body)
    assert len(rec.seen) == seen


QUEUE_ONE = {"upstreams": ["plex"], "paths": ["/library/metadata/1", "/playQueues*", "/playlists*"]}
LIB = "com.plexapp.plugins.library"


@pytest.mark.parametrize(
    ("route", "query"),
    [
        ("/playQueues", f"type=video&uri=server://mid/{LIB}/library/metadata/2"),
        ("/playQueues", "type=video&uri=library://uuid/item/%2Flibrary%2Fmetadata%2F2"),
        ("/playQueues", "type=video&uri=library://uuid/item/library/metadata/2"),
        ("/playQueues", "type=video&uri=library:///directory/%2Flibrary%2Fmetadata%2F1%2C2"),
        ("/playQueues", f"type=video&uri=server://mid/{LIB}/library/sections/2/all?type=1"),
        ("/playQueues", f"type=video&uri=server://mid/{LIB}/library/metadata/1&key=/library/metadata/2"),
        ("/playlists", f"type=video&title=x&smart=0&uri=server://mid/{LIB}/library/metadata/2"),
        ("/playlists/5/items", f"uri=server://mid/{LIB}/library/metadata/2"),
        ("/playQueues/5", "uri=library://uuid/item/%2Flibrary%2Fmetadata%2F2"),
    ],
)
async def test_a_queue_or_playlist_of_items_the_key_may_not_read_is_refused(
    rig: tuple[Running, Recorder], route: str, query: str
) -> None:
    """``uri=`` names the items Plex puts in the queue (and serves back): authorised as the key's GET."""
    running, rec = rig
    _, key = await running.create_key(permissions=QUEUE_ONE)
    target = route + "?" + "&".join(f"{n}={quote(v, safe='')}" for n, v in (p.split("=", 1) for p in query.split("&")))
    ans = await raw_request(
        running.proxy.server.host, running.proxy.server.port, "POST", target, [("X-Plex-Token", key)]
    )
    assert refused(ans), (route, query, ans.status, ans.body)
    assert rec.seen == []


async def test_a_queue_of_items_the_key_may_read_passes(rig: tuple[Running, Recorder]) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions=QUEUE_ONE)
    for uri in (f"server://mid/{LIB}/library/metadata/1", "library://uuid/item/%2Flibrary%2Fmetadata%2F1"):
        target = f"/playQueues?type=video&key=%2Flibrary%2Fmetadata%2F1&uri={quote(uri, safe='')}"
        ans = await raw_request(
            running.proxy.server.host, running.proxy.server.port, "POST", target, [("X-Plex-Token", key)]
        )
        assert ans.status == 200, (uri, ans.body)
    assert len(rec.seen) == 2


@pytest.mark.parametrize("name", ["url%00", "url%20", "%20url", "url%09", "u%00rl", "path%00"])
async def test_a_nested_url_under_a_padded_name_is_authorised(rig: tuple[Running, Recorder], name: str) -> None:
    """A server that trims names or stops at a NUL reads ``url%00=`` as ``url=``."""
    running, rec = rig
    transcode = name.startswith("path")
    _, key = await running.create_key(permissions=TRANSCODE_ONE if transcode else READ)
    route = "/video/:/transcode/universal/decision" if transcode else "/photo/:/transcode"
    ans = await get(running, f"{route}?{name}=%2Flibrary%2Fparts%2F1%2Ffile.jpg", key)
    assert refused(ans), (name, ans.status, ans.body)
    assert rec.seen == []


async def test_a_session_id_read_two_ways_is_refused(rig: tuple[Running, Recorder]) -> None:
    """``session=T;x=1`` is session ``T;x=1`` to one server and ``T`` to another: 400, nothing claimed."""
    running, rec = rig
    _, a = await running.create_key(permissions=PLAYBACK)
    ans = await get(running, "/video/:/transcode/universal/start.m3u8?session=T;x=1&path=%2Flibrary%2Fmetadata%2F1", a)
    assert ans.status == 400, (ans.status, ans.body)
    assert rec.seen == []
    ans = await get(
        running, "/video/:/transcode/universal/start.m3u8?a=1;b=2&session=T&path=%2Flibrary%2Fmetadata%2F1", a
    )
    assert ans.status == 200, ans.body  # a `;` elsewhere changes nothing about the id
