"""An attacker's view of time and state transitions, through a running sidecar (invariant 5).

What must hold: a key that has ended (revoked, expired) gets nothing more — not through a
keyless transcode segment of a session it started, not while a request of it waits for the
upstream's answer, not after the wall clock steps back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config
from limits_support import Clocks
from streams_support import closed_1008, cut
from test_sec_revocation import streaming_upstream

HOUR = 3600.0
START = "/video/:/transcode/universal/start.m3u8"
SEGMENT = "/video/:/transcode/universal/session/sess-t/base/index.m3u8"


async def test_an_expired_keys_transcode_segments_stop_and_a_step_back_revives_none(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Keyless segments are authorised as the key that started the session. That check read the
    record's state on the system clock, not the sidecar's wall clock and its "seen ended" latch:
    the key expired (wall clock past its expiry) still got its segments, and so did a key seen
    expired once the wall clock stepped back."""
    clocks = Clocks(time.time())  # starts at the system clock, which then stays behind the wall clock
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    r = await make_sidecar(cfg, clock=clocks.wall, steady=clocks.steady)
    _, key = await r.create_key(expires="30s")
    resp = await r.proxy.get(START, params={"session": "sess-t"}, headers={"X-Plex-Token": key})
    assert resp.status == 200
    assert (await r.proxy.get(SEGMENT)).status == 200  # keyless: the player follows the playlist
    clocks.step = +HOUR  # the key's expiry has passed on the wall clock
    assert (await r.proxy.get(SEGMENT)).status == 401
    resp = await r.proxy.get(START, params={"session": "sess-t"}, headers={"X-Plex-Token": key})
    assert (resp.status, (await resp.json())["error"]["code"]) == (401, "expired_key")
    clocks.step = -HOUR  # NTP steps the clock back: the key was seen expired, it stays so
    assert (await r.proxy.get(SEGMENT)).status == 401


def held_upstream(release: asyncio.Event, asked: asyncio.Event) -> web.Application:
    """An upstream whose answer (headers and all) waits until the test releases it."""

    async def slow(request: web.Request) -> web.StreamResponse:
        asked.set()
        await release.wait()
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_str("the answer")
            await ws.close()
            return ws
        return web.Response(text="the answer")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    return app


async def _rig(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> tuple[Running, asyncio.Event, asyncio.Event]:
    release, asked = asyncio.Event(), asyncio.Event()
    up = await aiohttp_server(held_upstream(release, asked))
    cfg = base_config(
        str(up.make_url("")).rstrip("/"), tmp_path, keys={"argon2": "cheapest", "stream_check_interval": "50ms"}
    )
    cfg["upstreams"][0]["timeouts"] = {"read": "60s"}
    cfg["cache"] = {"rules": [{"upstream": "plex", "path": "/library/*", "ttl": "60s"}]}
    return await make_sidecar(cfg), release, asked


async def test_a_request_waiting_for_its_answer_gets_none_once_its_key_is_revoked(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Authorised, then the upstream takes its time (up to ``read_timeout``, a minute here). The key
    is revoked meanwhile. Before: the answer, whenever it came, went to the revoked key — the sweep
    only knew streams whose headers had come. Now the wait ends within a sweep with 401 revoked_key,
    and the upstream request is closed (cancelled)."""
    r, release, asked = await _rig(make_sidecar, aiohttp_server, tmp_path)
    rec, key = await r.create_key()
    task = asyncio.create_task(r.proxy.get("/library/sections", headers={"X-Plex-Token": key}))
    async with asyncio.timeout(2):
        await asked.wait()
    await r.sc.manager().revoke(rec.id, "test")
    await r.sc.verifier.refresh()
    try:
        async with asyncio.timeout(2):  # a sweep is 50 ms; the contract's bound is 5 s
            resp = await task
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "revoked_key"
    finally:
        release.set()
        await asyncio.gather(task, return_exceptions=True)
    assert r.sc.streams.open_streams(rec.id) == 0


async def test_a_websocket_handshake_waiting_upstream_fails_once_its_key_expires(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The same for a websocket whose upstream has not answered the handshake yet: 401, no socket."""
    r, release, asked = await _rig(make_sidecar, aiohttp_server, tmp_path)
    rec, key = await r.create_key()
    task = asyncio.create_task(r.proxy.ws_connect("/:/websockets/notifications", params={"X-Plex-Token": key}))
    async with asyncio.timeout(2):
        await asked.wait()
    await r.sc.store.update(rec.with_changes(expires_at=time.time() - 1))
    await r.sc.verifier.refresh()
    try:
        async with asyncio.timeout(2):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await task
        assert refused.value.status == 401
    finally:
        release.set()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_cache_follower_gets_nothing_once_its_key_is_revoked(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Two keys miss one cache entry together: A's request goes upstream, B's waits for it (up to
    30 s). B is revoked meanwhile. Before: B was answered from the entry A's answer filled, after
    its revocation. Now B's wait ends with 401; A, whose key stands, gets its answer."""
    r, release, asked = await _rig(make_sidecar, aiohttp_server, tmp_path)
    _, a = await r.create_key(name="a")
    b_rec, b = await r.create_key(name="b")
    lead = asyncio.create_task(r.proxy.get("/library/sections", headers={"X-Plex-Token": a}))
    async with asyncio.timeout(2):
        await asked.wait()
    follow = asyncio.create_task(r.proxy.get("/library/sections", headers={"X-Plex-Token": b}))
    async with asyncio.timeout(2):
        while r.sc.cache.waiting == 0:
            await asyncio.sleep(0.01)
    await r.sc.manager().revoke(b_rec.id, "test")
    await r.sc.verifier.refresh()
    try:
        async with asyncio.timeout(2):
            resp = await follow
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "revoked_key"
    finally:
        release.set()
        await asyncio.gather(follow, return_exceptions=True)
    resp = await lead
    assert resp.status == 200 and await resp.text() == "the answer"


async def test_a_key_narrowed_loses_its_open_streams_and_a_renamed_one_keeps_them(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """An operator takes the notification paths away from a key (PATCH permissions). Before: its
    open websocket and event stream went on for as long as the client kept them (only revocation
    and expiry were swept). Now they end within a sweep (websocket: 1008; the event stream is
    cut), and a reconnect is refused 403. An edit that leaves permissions alone ends nothing."""
    up = await aiohttp_server(streaming_upstream())
    cfg = base_config(
        str(up.make_url("")).rstrip("/"), tmp_path, keys={"argon2": "cheapest", "stream_check_interval": "50ms"}
    )
    r = await make_sidecar(cfg)
    rec, key = await r.create_key(name="narrowed")
    kept_rec, kept = await r.create_key(name="renamed")
    ws = await r.proxy.ws_connect("/:/websockets/notifications", params={"X-Plex-Token": key})
    ws_kept = await r.proxy.ws_connect("/:/websockets/notifications", params={"X-Plex-Token": kept})
    events = await r.proxy.get("/:/eventsource/notifications", headers={"X-Plex-Token": key})
    assert events.status == 200 and await events.content.readline()
    assert (await ws.receive(timeout=2)).type == aiohttp.WSMsgType.TEXT
    await r.sc.manager().patch(rec.id, {"permissions": {"upstreams": ["plex"], "paths": ["/library/*"]}}, "test")
    await r.sc.manager().patch(kept_rec.id, {"name": "renamed again"}, "test")
    await r.sc.verifier.refresh()
    await closed_1008(ws)
    await cut(events)
    for _ in range(3):  # a sweep or two later, the renamed key's websocket still ticks
        assert (await ws_kept.receive(timeout=2)).type == aiohttp.WSMsgType.TEXT
    await ws_kept.close()
    resp = await r.proxy.get("/:/eventsource/notifications", headers={"X-Plex-Token": key})
    assert resp.status == 403


async def test_a_secret_replaced_under_the_same_id_ends_the_old_secrets_streams(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """A keys file whose entry keeps its id and permissions but gets a new hash (the operator
    replaced a leaked secret in place). Before: the old secret's open websocket went on, since the
    key was still active with the same permissions. Now it ends; the old secret gets 401."""
    import yaml

    from sidecar.auth.keys import display_form, generate_key
    from sidecar.auth.models import KeyRecord
    from sidecar.auth.verify import password_hasher

    cheap = password_hasher("cheapest")
    old, parts = generate_key("pmcp_")
    rec = KeyRecord(id=parts.key_id, name="in-file", hash=cheap.hash(parts.secret),
                    display=display_form("pmcp_", parts.key_id, old))  # fmt: skip
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [rec.to_dict()]}))
    up = await aiohttp_server(streaming_upstream())
    cfg = base_config(
        str(up.make_url("")).rstrip("/"), tmp_path, keys={"argon2": "cheapest", "stream_check_interval": "50ms"}
    )
    cfg["store"] = {"kind": "yaml", "path": str(keys_file)}
    r = await make_sidecar(cfg)
    ws = await r.proxy.ws_connect("/:/websockets/notifications", params={"X-Plex-Token": old})
    assert (await ws.receive(timeout=2)).type == aiohttp.WSMsgType.TEXT
    new, new_parts = generate_key("pmcp_", rec.id)
    replaced = rec.with_changes(hash=cheap.hash(new_parts.secret), display=display_form("pmcp_", rec.id, new))
    keys_file.write_text(yaml.safe_dump({"keys": [replaced.to_dict()]}))
    await r.sc.verifier.refresh(force=True)  # SIGHUP
    try:
        await closed_1008(ws)
    finally:
        await ws.close()
    resp = await r.proxy.get("/:/eventsource/notifications", headers={"X-Plex-Token": old})
    assert resp.status == 401
    async with r.proxy.get("/:/eventsource/notifications", headers={"X-Plex-Token": new}) as resp:
        assert resp.status == 200


async def test_a_request_waiting_for_its_answer_gets_403_once_its_key_loses_the_path(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    r, release, asked = await _rig(make_sidecar, aiohttp_server, tmp_path)
    rec, key = await r.create_key()
    task = asyncio.create_task(r.proxy.get("/library/sections", headers={"X-Plex-Token": key}))
    async with asyncio.timeout(2):
        await asked.wait()
    await r.sc.manager().patch(rec.id, {"permissions": {"upstreams": ["plex"], "paths": ["/status/*"]}}, "test")
    await r.sc.verifier.refresh()
    try:
        async with asyncio.timeout(2):
            resp = await task
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "insufficient_permissions"
    finally:
        release.set()
        await asyncio.gather(task, return_exceptions=True)
