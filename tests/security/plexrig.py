"""A recording Plex-like upstream and a raw-socket client, for the tests of issue 14.2/14.3/14.5/14.6/14.9.

The upstream is a real aiohttp low-level server (no router, so nothing normalises the
path before it is recorded): it keeps each request's method, raw target, query and
headers, and answers:

- ``…/start.m3u8``: a playlist with relative segment URLs, like Plex;
- anything else: 200, ``Vary: Accept``, ``Cache-Control: max-age=60``, and a body that
  says which representation it is (``<xml/>`` unless the request's Accept asks for JSON)
  and which path it served.

``raw_request`` sends one request with exactly the target and headers given (aiohttp's
client would tidy ``//`` and encodings away) and reads the whole answer. ``rig`` is the
fixture most Plex attack tests share: a sidecar with Plex at ``/`` in front of that server;
``get`` and ``refused`` what the permission tests send and expect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config
from multidict import CIMultiDict
from raw_http import read_response


@dataclass
class Seen:
    method: str
    target: str  # raw request target, query included
    path: str  # raw path
    query: list[tuple[str, str]]
    headers: CIMultiDict[str]


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


def recording_handler(rec: Recorder) -> Callable[[web.BaseRequest], Any]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        rec.seen.append(
            Seen(
                method=request.method,
                target=request.raw_path,
                path=request.rel_url.raw_path,
                query=list(request.query.items()),
                headers=CIMultiDict(request.headers),
            )
        )
        if request.rel_url.path.endswith("start.m3u8"):
            sid = request.query.get("session", "none")
            body = f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nsession/{sid}/base/index.m3u8\n"
            return web.Response(text=body, content_type="application/vnd.apple.mpegurl")
        wants_json = "json" in request.headers.get("Accept", "")
        kind = "json" if wants_json else "xml"
        text = (
            f'{{"kind": "json", "path": "{request.rel_url.raw_path}"}}'
            if wants_json
            else (f'<xml kind="xml" path="{request.rel_url.raw_path}"/>')
        )
        return web.Response(
            text=text,
            content_type=f"application/{kind}",
            headers={"Vary": "Accept", "Cache-Control": "max-age=60"},
        )

    return handler


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)


async def raw_request(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    source: str | None = None,
) -> Answer:
    """One HTTP/1.1 request sent byte for byte as given (``Connection: close`` added unless given), from the
    ``source`` address if given (any 127.x.y.z: another client on loopback)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: plex.test"]
    names = {n.lower() for n, _ in headers or ()}
    for name, value in headers or ():
        lines.append(f"{name}: {value}")
    if "connection" not in names:
        lines.append("Connection: close")
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        return Answer(*await read_response(reader, to_eof=True))
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.fixture
async def rig(make_sidecar: MakeSidecar, aiohttp_raw_server: Any, tmp_path: Path) -> tuple[Running, Recorder]:
    """A sidecar with Plex at ``/`` in front of a recording server: whatever reaches the upstream is seen."""
    rec = Recorder()
    server = await aiohttp_raw_server(recording_handler(rec))
    return await make_sidecar(base_config(str(server.make_url("")).rstrip("/"), tmp_path)), rec


async def get(running: Running, target: str, key: str) -> Any:
    """A raw GET of ``target`` with the key in ``X-Plex-Token``."""
    return await raw_request(
        running.proxy.server.host, running.proxy.server.port, "GET", target, [("X-Plex-Token", key)]
    )


def refused(ans: Any) -> bool:
    return bool(ans.status == 403 and ans.json()["error"]["code"] == "insufficient_permissions")
