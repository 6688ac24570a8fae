"""``Connection`` cannot split what is keyed from what is forwarded, nor remove what the sidecar sets
(issue 14.5; DESIGN invariant 2).

Headers a client names in ``Connection`` are meant for this hop (RFC 9110 §7.6.1): the
sidecar removes them from the request at the start of the pipeline, so the credential,
cache and forwarding stages all see the same request. Headers the sidecar itself sets
(the real ``X-Plex-Token``, the Plex identity, ``Host``, ``X-Forwarded-*``) are added after
that and cannot be named away. Credential headers stay readable by the sidecar, which
consumes them (they are never forwarded anyway).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config
from plexrig import Recorder, raw_request, recording_handler

from sidecar.config import UpstreamConfig
from sidecar.http.canonical import canonical
from sidecar.http.forwarder import forward_headers

RULES = [{"upstream": "plex", "path": "/library/sections*", "ttl": "60s"}]


@pytest.fixture
async def rig(make_sidecar: MakeSidecar, aiohttp_raw_server: Any, tmp_path: Path) -> tuple[Running, Recorder]:
    rec = Recorder()
    server = await aiohttp_raw_server(recording_handler(rec))
    cfg = base_config(str(server.make_url("")).rstrip("/"), tmp_path, cache={"max_bytes": "1MiB", "rules": RULES})
    return await make_sidecar(cfg), rec


async def get(running: Running, target: str, headers: list[tuple[str, str]]) -> Any:
    return await raw_request(running.proxy.server.host, running.proxy.server.port, "GET", target, headers)


async def test_connection_named_accept_cannot_poison_another_keys_variant(rig: tuple[Running, Recorder]) -> None:
    """A sends ``Accept: application/json`` + ``Connection: close, Accept``: the upstream gets no
    Accept and answers XML. B, asking for JSON normally, must get JSON, not A's XML from the
    JSON variant of the cache."""
    running, rec = rig
    _, a = await running.create_key()
    _, b = await running.create_key()
    ans = await get(running, "/library/sections", [("X-Plex-Token", a), ("Accept", "application/json"),
                                                    ("Connection", "close, Accept")])  # fmt: skip
    assert ans.status == 200 and ans.body.startswith(b"<xml")
    assert "Accept" not in rec.seen[-1].headers
    ans = await get(running, "/library/sections", [("X-Plex-Token", b), ("Accept", "application/json")])
    assert ans.status == 200 and ans.body.startswith(b'{"kind": "json"'), ans.body
    # And the other way round: a JSON entry is never served for a request whose Accept is not forwarded
    # (twice, so the repeat-hit memo would have had its chance: it is not used for cleaned requests).
    memo = running.sc.hit_memo
    assert memo is not None
    served = memo.served
    for _ in range(2):
        ans = await get(running, "/library/sections", [("X-Plex-Token", b), ("Accept", "application/json"),
                                                        ("Connection", "Accept, close")])  # fmt: skip
        assert ans.body.startswith(b"<xml"), ans.body
    assert memo.served == served


@pytest.mark.parametrize(
    "named",
    [
        "X-Plex-Token",
        "x-plex-token, close",
        "Authorization",
        "X-Plex-Client-Identifier, X-Plex-Product, X-Plex-Version",
        "Host, X-Forwarded-Proto, X-Forwarded-Host, X-Forwarded-For",
        "keep-alive, X-Plex-Token, Upgrade",
    ],
)
async def test_connection_cannot_remove_what_the_sidecar_sets(rig: tuple[Running, Recorder], named: str) -> None:
    """Whatever the client names, the upstream gets the real token, the sidecar's identity
    (the client sent none), its own Host and X-Forwarded-*: 200, never a 401 from Plex."""
    running, rec = rig
    _, key = await running.create_key()
    for cred in (("X-Plex-Token", key), ("Authorization", f"Bearer {key}")):
        ans = await get(running, "/identity", [cred, ("Connection", named)])
        assert ans.status == 200, ans.body
        h = rec.seen[-1].headers
        assert h.getall("X-Plex-Token") == [PLEX_TOKEN]
        assert h["X-Plex-Client-Identifier"] == "sidecar" and "X-Plex-Product" in h and "X-Plex-Version" in h
        assert h["Host"] == running.config.upstreams[0].host
        assert "X-Forwarded-Proto" in h and "X-Forwarded-Host" in h and "X-Forwarded-For" in h
        assert key not in repr(h)


async def test_headers_named_in_connection_are_not_forwarded(rig: tuple[Running, Recorder]) -> None:
    """RFC 9110: a header listed in Connection is for this hop only."""
    running, rec = rig
    _, key = await running.create_key()
    ans = await get(running, "/identity", [("X-Plex-Token", key), ("X-Custom", "1"), ("X-Other", "2"),
                                           ("Connection", "X-Custom")])  # fmt: skip
    assert ans.status == 200
    h = rec.seen[-1].headers
    assert "X-Custom" not in h and h["X-Other"] == "2"
    assert "x-custom" not in h.get("Connection", "").lower()


def test_injected_upstream_headers_survive_connection() -> None:
    """MCP upstreams get configured headers (``Authorization: Bearer <upstream secret>``) injected after
    the credential is stripped; ``Connection: Authorization`` must not make the forwarder drop them."""
    request = make_mocked_request(
        "POST", "/mcp", headers={"Authorization": "Bearer pmcp_client", "Connection": "Authorization, X-A", "X-A": "1"}
    )
    canon = canonical(request)
    assert "X-A" not in canon.headers and canon.headers["Authorization"] == "Bearer pmcp_client"
    upstream = UpstreamConfig(id="m", kind="mcp", url="http://127.0.0.1:9")
    headers = canon.headers.copy()
    headers["Authorization"] = "Bearer upstream-secret"
    out = forward_headers(canon, headers, upstream)
    assert out["Authorization"] == "Bearer upstream-secret"
    assert canonical(make_mocked_request("GET", "/", headers={"Connection": "keep-alive"})).headers is not None


async def test_a_non_utf8_header_with_connection_names_is_a_designed_400(rig: tuple[Running, Recorder]) -> None:
    """The cleaned request cannot carry bytes that are not UTF-8: the client sees 400 bad_request, never a 500."""
    running, rec = rig
    _, key = await running.create_key()
    reader, writer = await asyncio.open_connection(running.proxy.server.host, running.proxy.server.port)
    try:
        writer.write(
            b"GET /identity HTTP/1.1\r\nHost: x\r\nX-Plex-Token: " + key.encode()
            + b"\r\nConnection: close, X-A\r\nX-B: \xff\xfe\r\n\r\n"
        )  # fmt: skip
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert data.startswith(b"HTTP/1.1 400 ") and b'"bad_request"' in data, data[:200]
    assert rec.seen == []


@pytest.mark.parametrize("named", ["Upgrade, Sec-WebSocket-Key", "Upgrade, Sec-WebSocket-Version, X-Plex-Token"])
async def test_a_websocket_handshake_survives_connection_names(plex_sidecar: Running, named: str) -> None:
    """The handshake headers are the sidecar's own business: 101, not aiohttp's plain-text 400."""
    _, key = await plex_sidecar.create_key()
    reader, writer = await asyncio.open_connection(plex_sidecar.proxy.server.host, plex_sidecar.proxy.server.port)
    try:
        writer.write(
            f"GET /:/websockets/notifications?X-Plex-Token={key} HTTP/1.1\r\nHost: x\r\nConnection: {named}\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .encode()
        )  # fmt: skip
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 101 ")
    finally:
        writer.close()
        await writer.wait_closed()
