"""Plex rewriting: the real token and identity going up, scrubbing coming down,
per-key upstream tokens, nested ``url=`` tokens, and transcode sessions owned by a key."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config
from multidict import CIMultiDict, MultiDict

from sidecar.config import UpstreamConfig
from sidecar.core.errors import Forbidden
from sidecar.demo import SEEN, plex_like_app
from sidecar.upstreams.plex import ScrubFilter, TranscodeSessions, inject_plex

PLAYBACK = {"upstreams": ["plex"], "paths": ["plex:playback"]}


def seen(upstream: TestServer) -> list[dict[str, Any]]:
    return upstream.app[SEEN]  # type: ignore[no-any-return]


def url_of(upstream: TestServer) -> str:
    return str(upstream.make_url("")).rstrip("/")


# ---------------------------------------------------------------------------- identity going up


@pytest.fixture
async def with_identity(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> Running:
    cfg = base_config(url_of(plex_upstream), tmp_path)
    cfg["upstreams"][0]["plex"] = {"client_identifier": "sidecar-box-1", "product": "Sidecar", "version": "2.5"}
    return await make_sidecar(cfg)


async def test_identity_is_injected_only_when_the_client_sent_none(
    with_identity: Running, plex_upstream: TestServer
) -> None:
    _, key = await with_identity.create_key()
    await with_identity.proxy.get("/identity", headers={"X-Plex-Token": key})
    h = seen(plex_upstream)[-1]["headers"]
    assert (h["X-Plex-Client-Identifier"], h["X-Plex-Product"], h["X-Plex-Version"]) == (
        "sidecar-box-1",
        "Sidecar",
        "2.5",
    )
    assert h["X-Plex-Token"] == PLEX_TOKEN

    # A client with its own identity keeps it (Plex would otherwise merge every device into one).
    await with_identity.proxy.get(
        "/identity", headers={"X-Plex-Token": key, "X-Plex-Client-Identifier": "my-phone", "X-Plex-Product": "Plexamp"}
    )
    h = seen(plex_upstream)[-1]["headers"]
    assert h["X-Plex-Client-Identifier"] == "my-phone" and h["X-Plex-Product"] == "Plexamp"
    assert "X-Plex-Version" not in h

    # ... also when it sends its identity in the query, as Plex Web does.
    await with_identity.proxy.get("/identity", params={"X-Plex-Token": key, "X-Plex-Client-Identifier": "web-tab"})
    last = seen(plex_upstream)[-1]
    assert "X-Plex-Client-Identifier" not in last["headers"] and "X-Plex-Client-Identifier=web-tab" in last["path"]


def test_inject_plex_unit() -> None:
    up = UpstreamConfig(id="plex", kind="plex", url="http://p", plex_client_identifier="cid")
    h: CIMultiDict[str] = CIMultiDict()
    inject_plex(h, MultiDict(), up, "TOKEN")
    assert h["X-Plex-Token"] == "TOKEN" and h["X-Plex-Client-Identifier"] == "cid"
    h2: CIMultiDict[str] = CIMultiDict({"x-plex-product": "Mine"})
    inject_plex(h2, MultiDict(), up, "TOKEN")
    assert "X-Plex-Client-Identifier" not in h2 and h2["X-Plex-Product"] == "Mine"


# ---------------------------------------------------------------------------- per-key upstream token


async def test_a_key_can_map_to_a_managed_users_token(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    kids_token = "managed-user-token-kids-42"
    upstream = await aiohttp_server(plex_like_app(kids_token))  # this server only knows the managed user's token
    cfg = base_config(url_of(upstream), tmp_path, keys={"argon2": "cheapest", "upstream_token_envs": ["PLEX_TOKEN_*"]})
    running = await make_sidecar(cfg, extra_env={"PLEX_TOKEN_KIDS": kids_token})
    _, owner_key = await running.create_key()
    _, kids_key = await running.create_key(upstream_token_env={"plex": "PLEX_TOKEN_KIDS"})
    resp = await running.proxy.get("/library/sections", headers={"X-Plex-Token": kids_key})
    assert resp.status == 200
    assert seen(upstream)[-1]["headers"]["X-Plex-Token"] == kids_token
    resp = await running.proxy.get("/library/sections", headers={"X-Plex-Token": owner_key})
    assert resp.status == 401  # the upstream's own refusal, passed through
    assert seen(upstream)[-1]["headers"]["X-Plex-Token"] == PLEX_TOKEN
    # The managed token is scrubbed like the owner's.
    _, kids_admin = await running.create_key(
        upstream_token_env={"plex": "PLEX_TOKEN_KIDS"}, permissions={"admin": True}
    )
    resp = await running.proxy.get("/security/token", headers={"X-Plex-Token": kids_admin})
    assert resp.status == 200 and kids_token not in await resp.text()


async def test_a_key_whose_token_variable_is_missing_gets_503(
    make_sidecar: MakeSidecar, plex_upstream: Any, tmp_path: Path
) -> None:
    keys = {"argon2": "cheapest", "upstream_token_envs": ["NOT_SET_ANYWHERE"]}
    running = await make_sidecar(base_config(url_of(plex_upstream), tmp_path, keys=keys))
    _, key = await running.create_key(upstream_token_env={"plex": "NOT_SET_ANYWHERE"})
    resp = await running.proxy.get("/identity", headers={"X-Plex-Token": key})
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "service_unavailable"


# ---------------------------------------------------------------------------- scrubbing coming down


async def test_real_token_is_scrubbed_from_location_and_text_bodies(plex_sidecar: Running) -> None:
    _, key = await plex_sidecar.create_key(permissions={"admin": True})
    resp = await plex_sidecar.proxy.get("/redirect", headers={"X-Plex-Token": key}, allow_redirects=False)
    assert resp.status == 302
    assert PLEX_TOKEN not in resp.headers["Location"]
    assert resp.headers["Location"] == f"/library/sections?X-Plex-Token={key}"  # the client's own key, so it works
    resp = await plex_sidecar.proxy.get("/security/token", headers={"X-Plex-Token": key})
    body = await resp.text()
    assert PLEX_TOKEN not in body and f'token="{key}"' in body


async def test_nested_url_parameter_carries_the_real_token_up(plex_sidecar: Running, plex_upstream: TestServer) -> None:
    _, key = await plex_sidecar.create_key(permissions=PLAYBACK)
    nested = f"/library/metadata/100/thumb/1700000000?X-Plex-Token={key}"
    resp = await plex_sidecar.proxy.get(
        "/photo/:/transcode", params={"url": nested, "width": "200", "height": "300", "X-Plex-Token": key}
    )
    assert resp.status == 200
    path = seen(plex_upstream)[-1]["path"]
    assert key not in path
    assert f"X-Plex-Token%3D{PLEX_TOKEN}" in path  # the upstream got the real token in the nested url
    # The demo echoes the url into its "JPEG": the client sees the token masked (invariant 1, any body).
    masked = "*" * len(PLEX_TOKEN)
    assert (await resp.read()).endswith(f"/library/metadata/100/thumb/1700000000?X-Plex-Token={masked}".encode())


def test_scrub_filter_handles_split_tokens_and_gzip() -> None:
    f = ScrubFilter("SECRETTOKEN", "pmcp_key")
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "text/xml", "Location": "/x?X-Plex-Token=SECRETTOKEN"})
    assert f.headers(200, headers) is True
    assert headers["Location"] == "/x?X-Plex-Token=pmcp_key"
    out = f.feed(b'<a token="SECRE') + f.feed(b'TTOKEN"/><b>SECRETTOKEN</b>') + f.flush()
    assert out == b'<a token="pmcp_key"/><b>pmcp_key</b>'

    g = ScrubFilter("SECRETTOKEN", "pmcp_key")
    gz_headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert g.headers(200, gz_headers) is True and "Content-Encoding" not in gz_headers
    data = gzip.compress(b'{"t": "SECRETTOKEN"}')
    assert g.feed(data[:7]) + g.feed(data[7:]) + g.flush() == b'{"t": "pmcp_key"}'

    # Media is scanned too (invariant 1: any body), but keeps its length and bytes: the token is masked in place.
    media = ScrubFilter("SECRETTOKEN", "pmcp_key")
    media_headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "video/mp4", "Content-Length": "27"})
    assert media.headers(200, media_headers) is True and media_headers["Content-Length"] == "27"
    assert media.feed(b"\0\1SECRET") + media.feed(b"TOKEN\2\3") + media.flush() == b"\0\1***********\2\3"


# ---------------------------------------------------------------------------- transcode sessions


async def test_transcode_session_belongs_to_the_key_that_started_it(
    plex_sidecar: Running, plex_upstream: TestServer
) -> None:
    proxy = plex_sidecar.proxy
    a_rec, a = await plex_sidecar.create_key(permissions=PLAYBACK)
    _, b = await plex_sidecar.create_key(permissions=PLAYBACK)
    start = "/video/:/transcode/universal/start.m3u8"
    resp = await proxy.get(start, params={"session": "sess-a", "path": "/library/metadata/100"},
                           headers={"X-Plex-Token": a})  # fmt: skip
    assert resp.status == 200
    playlist = await resp.text()
    assert "session/sess-a/base/index.m3u8" in playlist

    # The player follows the relative URL without any key: authorised as key A.
    segment = "/video/:/transcode/universal/session/sess-a/base/index.m3u8"
    resp = await proxy.get(segment)
    assert resp.status == 200 and await resp.text() == "segment sess-a base/index.m3u8"
    assert seen(plex_upstream)[-1]["headers"]["X-Plex-Token"] == PLEX_TOKEN

    # Key B may neither read A's session nor take it over.
    resp = await proxy.get(segment, headers={"X-Plex-Token": b})
    assert resp.status == 403
    resp = await proxy.get(start, params={"session": "sess-a"}, headers={"X-Plex-Token": b})
    assert resp.status == 403
    resp = await proxy.get("/video/:/transcode/universal/ping", params={"session": "sess-a"},
                           headers={"X-Plex-Token": b})  # fmt: skip
    assert resp.status == 403
    # B's own session is B's.
    resp = await proxy.get(start, params={"session": "sess-b"}, headers={"X-Plex-Token": b})
    assert resp.status == 200
    assert (
        await proxy.get("/video/:/transcode/universal/session/sess-b/0.ts", headers={"X-Plex-Token": a})
    ).status == 403

    # Keyless access to a session nobody started is a plain 401.
    resp = await proxy.get("/video/:/transcode/universal/session/unknown/0.ts")
    assert resp.status == 401

    # Once A is revoked, its session's keyless segments stop too.
    await plex_sidecar.sc.manager().revoke(a_rec.id, "test")
    await plex_sidecar.sc.verifier.refresh()
    assert (await proxy.get(segment)).status == 401


def test_transcode_sessions_unit() -> None:
    """``ids`` names every form of a session id, ``check`` refuses another key's, ``claim`` records.

    (Was one ``claim(path, query, key)``; split so that a session is claimed only after the
    rate limiter let the request through: see tests/security/test_sec_plex_paths.py.)"""
    now = [1000.0]
    t = TranscodeSessions(ttl=60, max_sessions=2, clock=lambda: now[0])
    start = "/video/:/transcode/universal/start.m3u8"

    def claim(path: str, query: dict[str, str], key: str) -> bool:
        ids = t.ids(path, MultiDict(query))
        try:
            t.check(ids, key)
        except Forbidden:
            return False
        t.claim(ids, key, "127.0.0.1")
        return True

    assert claim(start, {"session": "s1"}, "A")
    assert t.owner("s1") == "A"
    assert not claim(start, {"session": "s1"}, "B")
    assert not claim("/video/:/transcode/universal/session/s1/x.ts", {}, "B")
    assert claim("/video/:/transcode/universal/session/s1/x.ts", {}, "A")
    assert t.ids("/library/sections", MultiDict({"session": "s1"})) == ()  # not a transcode path
    assert t.session_of("/audio/:/transcode/universal/session/abc/1.ts") == "abc"
    now[0] += 61
    assert t.owner("s1") is None  # expired
    for i in range(3):
        claim(start, {"session": f"n{i}"}, "A")
    assert t.owner("n0") is None and t.owner("n2") == "A"  # bounded


async def test_plex_like_upstream_rejects_anything_but_its_token(aiohttp_client: Any) -> None:
    client = await aiohttp_client(plex_like_app("T"))
    assert (await client.get("/identity", headers={"X-Plex-Token": "nope"})).status == 401
    assert (await client.get("/identity", params={"X-Plex-Token": "T"})).status == 200
    assert isinstance(client.app, web.Application)
