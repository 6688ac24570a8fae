"""Invariant 1 for MCP upstreams: their credential (the configured ``Authorization``) never
reaches a client.

A misbehaving MCP-ish upstream (plain aiohttp, just enough JSON-RPC and SSE) echoes the
``Authorization`` header it received: in a JSON-RPC result, a JSON-RPC error, response
headers and the reason phrase, an error status's body, SSE events split across chunks
(streamable HTTP and the legacy SSE transport), gzip and brotli bodies, a PHP-style
``\\/``-escaped JSON body, a percent-encoded URL, an opaque binary body, a filtered
``tools/list`` and the REST tool call's answers and errors. Each test says what the client
sees instead: ``REDACTED`` (``*`` of the same length in a binary body), or a 502.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import brotli
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config, log_lines
from multidict import CIMultiDict

from sidecar.config import UpstreamConfig
from sidecar.upstreams.mcp.scrub import MASK, McpScrubFilter, mcp_secrets

SECRET = "s3cr3t/mcp+token=0123456789"  # "/", "+", "=": its JSON and URL forms differ from it
AUTH = f"Bearer {SECRET}"
FORMS = (SECRET, SECRET.replace("/", "\\/"), quote(SECRET, safe=""))  # what an echo may look like on the wire
UA = "sidecar-mcp-gateway/1.0"  # a configured header that is no credential: never masked
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
GATE: web.AppKey[asyncio.Event] = web.AppKey("gate")
LEGACY: web.AppKey[asyncio.Queue[bytes]] = web.AppKey("legacy")
SEEN: web.AppKey[list[tuple[str, str]]] = web.AppKey("seen")  # (Authorization, Accept-Encoding) received
TOOLS = {"echo": ["echo"], "legacy": ["echo"]}


def leaks(text: str | bytes) -> list[str]:
    """The secret's forms found in what the client received."""
    s = text.decode(errors="replace") if isinstance(text, bytes) else text
    return [f for f in FORMS if f in s]


def clean(resp: aiohttp.ClientResponse, body: bytes) -> None:
    """Nothing the client received holds the secret: status line, header names and values, body
    (also once its JSON is decoded, which undoes escapes like ``\\/``)."""
    assert not leaks(resp.reason or ""), resp.reason
    for name, value in resp.raw_headers:
        assert not leaks(name) and not leaks(value), (name, value)
    assert not leaks(body), body[:300]
    for obj in _json_objects(body):
        assert SECRET not in json.dumps(obj, ensure_ascii=False), obj


def _json_objects(body: bytes) -> list[Any]:
    text = body.decode(errors="replace")
    try:
        return [json.loads(text)]
    except ValueError:
        pass
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.startswith("data:"):
            try:
                out.append(json.loads(line[5:]))
            except ValueError:
                continue
    return out


def _answer(rid: Any, auth: str, how: str) -> dict[str, Any]:
    if how in ("error", "percent"):
        text = (
            f"the API refused {auth}" if how == "error" else f"GET https://api.example/?token={quote(SECRET, safe='')}"
        )
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32000, "message": text}}
    if how == "invalid":
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": f"bad argument for {auth}"}}
    text = f"you sent {auth}; shard 7; agent {UA}"
    return {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": text}], "isError": False}}


def misbehaving_mcp() -> web.Application:
    """Echoes the ``Authorization`` it received, the way ``how`` (tool argument or ``X-Echo``) says."""
    app = web.Application()
    app[GATE] = asyncio.Event()
    app[LEGACY] = asyncio.Queue()
    app[SEEN] = []

    async def streamable(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        app[SEEN].append((auth, request.headers.get("Accept-Encoding", "")))
        msg = await request.json()
        method, rid = msg.get("method"), msg.get("id")
        if "id" not in msg:
            return web.Response(status=202)
        if method == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "evil"}}
            return web.json_response({"jsonrpc": "2.0", "id": rid, "result": result}, headers={"Mcp-Session-Id": "s1"})
        how = (msg.get("params", {}).get("arguments") or {}).get("how") or request.headers.get("X-Echo", "result")
        if method == "tools/list":
            tools = [{"name": n, "description": f"called with {auth}", "inputSchema": {"type": "object"}}
                     for n in ("echo", "forbidden_tool")]  # fmt: skip
            answer: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}}
        else:
            answer = _answer(rid, auth, how)
        body = json.dumps(answer).encode()
        if how == "header":
            headers = CIMultiDict(
                [("X-Debug-Auth", auth), ("Set-Cookie", f"upstream={SECRET}; Path=/"), ("Set-Cookie", "other=1"),
                 ("X-Token", SECRET), ("Link", f"</x?t={SECRET}>")]
            )  # fmt: skip
            return web.Response(body=body, content_type="application/json", reason=f"OK {auth}", headers=headers)
        if how == "status500":
            return web.Response(status=500, text=f"crash while using {auth}", headers={"X-Why": auth})
        if how == "gzip":
            return web.Response(body=gzip.compress(body), headers={"Content-Type": "application/json",
                                                                   "Content-Encoding": "gzip"})  # fmt: skip
        if how == "br":
            return web.Response(body=brotli.compress(body), headers={"Content-Type": "application/json",
                                                                     "Content-Encoding": "br"})  # fmt: skip
        if how == "php":  # json_encode's default: "/" written as "\/"
            return web.Response(body=body.replace(b"/", b"\\/"), content_type="application/json")
        if how == "octet":
            return web.Response(body=b"\x00\x01" + auth.encode() + b"\x02", content_type="application/octet-stream")
        if how == "sse":
            return await _sse(
                request, app, body, gated=bool((msg.get("params", {}).get("arguments") or {}).get("gate"))
            )
        return web.Response(body=body, content_type="application/json")

    async def legacy_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b"event: endpoint\ndata: /messages/?session_id=0123456789abcdef\n\n")
        while (event := await app[LEGACY].get()) != b"":
            cut = event.index(SECRET.encode()) + 5  # the secret straddles two writes
            await resp.write(event[:cut])
            await resp.write(event[cut:])
        await resp.write_eof()
        return resp

    async def legacy_post(request: web.Request) -> web.Response:
        msg = await request.json()
        answer = json.dumps(_answer(msg.get("id"), request.headers.get("Authorization", ""), "result"))
        app[LEGACY].put_nowait(f"event: message\ndata: {answer}\n\n".encode())
        return web.Response(status=202, text="Accepted")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        auth = request.headers.get("Authorization", "")
        sock = web.WebSocketResponse(autoping=False)
        await sock.prepare(request)
        await sock.send_str(f"you sent {auth}")
        await sock.send_bytes(b"\x00" + auth.encode() + b"\x01")
        await sock.ping(auth.encode())
        await sock.close(code=4000, message=auth.encode())
        return sock

    app.router.add_post("/mcp", streamable)
    app.router.add_get("/mcp", ws)
    app.router.add_get("/sse", legacy_stream)
    app.router.add_post("/messages/", legacy_post)
    return app


async def _sse(request: web.Request, app: web.Application, body: bytes, *, gated: bool) -> web.StreamResponse:
    """One progress event, then the answer with the secret cut in two writes (``gated``: the
    second half only once the client has shown it already has the first event)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n')
    event = b"event: message\ndata: " + body + b"\n\n"
    cut = event.index(SECRET.encode()) + 9
    await resp.write(event[:cut])
    if gated:
        await app[GATE].wait()
    await resp.write(event[cut:])
    await resp.write_eof()
    return resp


Setup = tuple[Running, TestServer, str]


@pytest.fixture
async def evil(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> Setup:
    up: TestServer = await aiohttp_server(misbehaving_mcp())
    root = str(up.make_url("")).rstrip("/")
    headers = {"Authorization": "Bearer ${MCP_SECRET}", "User-Agent": UA, "X-Shard": "7"}
    cfg = base_config(root, tmp_path)
    cfg["upstreams"] = [
        {"id": "echo", "kind": "mcp", "url": f"{root}/mcp", "path_prefix": "/mcp/echo", "headers": headers},
        {"id": "legacy", "kind": "mcp", "url": root, "path_prefix": "/mcp/legacy", "headers": headers},
    ]
    run = await make_sidecar(cfg, extra_env={"MCP_SECRET": SECRET})
    _, key = await run.create_key(name="agent", permissions={"upstreams": ["*"], "tools": TOOLS})
    return run, up, key


async def rpc(
    run: Running, key: str, how: str, *, method: str = "tools/call", accept_encoding: str = ""
) -> tuple[aiohttp.ClientResponse, bytes]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if method == "tools/call":
        msg["params"] = {"name": "echo", "arguments": {"how": how}}
    headers = {**ACCEPT, "Authorization": f"Bearer {key}", "X-Echo": how}
    if accept_encoding:
        headers["Accept-Encoding"] = accept_encoding
    resp = await run.proxy.post("/mcp/echo", json=msg, headers=headers)
    return resp, await resp.read()


def text_of(body: bytes) -> str:
    return str(json.loads(body)["result"]["content"][0]["text"])


# ---------------------------------------------------------------------------- streamable HTTP


async def test_an_echo_in_a_json_rpc_result_is_redacted(evil: Setup) -> None:
    """Client sees "you sent REDACTED"; what is no credential (the 1-character shard, User-Agent) stays."""
    run, up, key = evil
    resp, body = await rpc(run, key, "result", accept_encoding="br, zstd, gzip")
    assert resp.status == 200
    clean(resp, body)
    assert text_of(body) == f"you sent {MASK}; shard 7; agent {UA}"
    # The upstream really got the credential, and was asked for a body the sidecar can read.
    assert up.app[SEEN] == [(AUTH, "identity")]


async def test_an_echo_in_a_json_rpc_error_message_is_redacted(evil: Setup) -> None:
    """Client sees the upstream's JSON-RPC error (passed on) with "REDACTED" for the credential."""
    run, _, key = evil
    resp, body = await rpc(run, key, "error")
    assert resp.status == 200
    clean(resp, body)
    assert json.loads(body)["error"]["message"] == f"the API refused {MASK}"


async def test_echoes_in_response_headers_and_the_reason_phrase_are_redacted(evil: Setup) -> None:
    """Client sees "REDACTED" in every header value and the status line; other headers are intact."""
    run, _, key = evil
    resp, body = await rpc(run, key, "header")
    assert resp.status == 200
    clean(resp, body)
    assert resp.reason == f"OK {MASK}"
    assert resp.headers["X-Debug-Auth"] == MASK
    assert resp.headers["X-Token"] == MASK
    # kept under the upstream's prefix (sidecar/http/browser.py, ``scoped``)
    assert resp.headers.getall("Set-Cookie") == [f"upstream={MASK}; Path=/mcp/echo", "other=1; Path=/mcp/echo"]
    assert resp.headers["Link"] == f"</x?t={MASK}>"


async def test_an_upstream_error_status_passes_on_scrubbed(evil: Setup) -> None:
    """Upstream errors pass through untouched, except the credential: the client sees the 500, with "REDACTED"."""
    run, _, key = evil
    resp, body = await rpc(run, key, "status500")
    assert resp.status == 500
    clean(resp, body)
    assert body == f"crash while using {MASK}".encode()
    assert resp.headers["X-Why"] == MASK


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "ungated"])
async def test_an_echo_split_across_sse_chunks_is_redacted_and_the_stream_is_not_held(evil: Setup, gate: bool) -> None:
    """Client gets the first event while the upstream still holds the secret's second half, then the
    answer with "REDACTED": the secret cut across two writes never arrives, and the stream is not buffered."""
    run, up, key = evil
    msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": "echo", "arguments": {"how": "sse", "gate": gate}}}  # fmt: skip
    headers = {**ACCEPT, "Authorization": f"Bearer {key}"}
    async with run.proxy.post("/mcp/echo", json=msg, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        got = b""
        if gate:
            while b"\n\n" not in got:
                got += await asyncio.wait_for(resp.content.readany(), 5)
            assert b"notifications/progress" in got and not leaks(got)
            up.app[GATE].set()
        got += await asyncio.wait_for(resp.content.read(), 5)
        clean(resp, got)
    events = _json_objects(got)
    assert events[-1]["result"]["content"][0]["text"] == f"you sent {MASK}; shard 7; agent {UA}"


async def test_a_gzip_answer_is_decoded_and_redacted(evil: Setup) -> None:
    """Client sees the identity JSON with "REDACTED" (no Content-Encoding): gzip is decoded to be scrubbed."""
    run, _, key = evil
    resp, body = await rpc(run, key, "gzip")
    assert resp.status == 200
    assert "Content-Encoding" not in resp.headers
    clean(resp, body)
    assert text_of(body) == f"you sent {MASK}; shard 7; agent {UA}"


async def test_an_answer_that_cannot_be_decoded_is_refused(evil: Setup) -> None:
    """A brotli answer (the sidecar asked for identity) cannot be scrubbed: client sees 502 upstream_unavailable."""
    run, _, key = evil
    resp, body = await rpc(run, key, "br")
    assert resp.status == 502
    clean(resp, body)
    assert json.loads(body)["error"]["code"] == "upstream_unavailable"


async def test_escaped_and_percent_encoded_echoes_are_redacted(evil: Setup) -> None:
    """PHP-style "\\/" JSON and a percent-encoded URL in an error: client sees "REDACTED" in both."""
    run, _, key = evil
    resp, body = await rpc(run, key, "php")
    assert resp.status == 200
    clean(resp, body)
    assert text_of(body) == f"you sent {MASK}; shard 7; agent {UA}"
    resp, body = await rpc(run, key, "percent")
    clean(resp, body)
    assert json.loads(body)["error"]["message"] == f"GET https://api.example/?token={MASK}"


async def test_an_echo_in_a_binary_body_is_masked_in_place(evil: Setup) -> None:
    """An opaque body keeps its length: client sees "*" where the credential was."""
    run, _, key = evil
    resp, body = await rpc(run, key, "octet")
    assert resp.status == 200
    clean(resp, body)
    assert body == b"\x00\x01" + b"*" * len(AUTH) + b"\x02"


@pytest.mark.parametrize("how", ["result", "gzip"])
async def test_a_filtered_tools_list_is_scrubbed_after_filtering(evil: Setup, how: str) -> None:
    """tools/list is filtered (re-serialised JSON) and then scrubbed, gzip too: the client sees only "echo",
    described as "called with REDACTED" (before, a gzip list passed unfiltered and unscrubbed)."""
    run, _, key = evil
    resp, body = await rpc(run, key, how, method="tools/list")
    assert resp.status == 200
    clean(resp, body)
    tools = json.loads(body)["result"]["tools"]
    assert [t["name"] for t in tools] == ["echo"]
    assert tools[0]["description"] == f"called with {MASK}"


async def test_websocket_frames_on_an_mcp_route_are_scrubbed(evil: Setup) -> None:
    """Text and binary frames carry "REDACTED"; the ping payload and close reason a same-length "*" mask.
    (A key without tool limits: a restricted one gets no websocket on an MCP route, test_sec_ws_attacks.py.)"""
    run, _, _ = evil
    _, key = await run.create_key(name="unlimited", permissions={"upstreams": ["*"]})
    async with run.proxy.ws_connect("/mcp/echo", headers={"Authorization": f"Bearer {key}"}, autoping=False) as ws:
        text = await ws.receive()
        assert text.type == aiohttp.WSMsgType.TEXT and text.data == f"you sent {MASK}"
        binary = await ws.receive()
        assert binary.type == aiohttp.WSMsgType.BINARY and binary.data == f"\x00{MASK}\x01".encode()
        ping = await ws.receive()
        assert ping.type == aiohttp.WSMsgType.PING and ping.data == b"*" * len(AUTH)
        close = await ws.receive()
        assert close.type == aiohttp.WSMsgType.CLOSE and close.data == 4000 and close.extra == "*" * len(AUTH)


# ---------------------------------------------------------------------------- legacy SSE


async def test_an_echo_on_the_legacy_sse_stream_is_redacted(evil: Setup) -> None:
    """The answer to a legacy POST comes down the event stream, the secret cut across two writes:
    client sees "you sent REDACTED"."""
    run, up, key = evil
    auth = {"Authorization": f"Bearer {key}"}
    async with run.proxy.get("/mcp/legacy/sse", headers={**auth, "Accept": "text/event-stream"}) as stream:
        got = b""
        while b"\n\n" not in got:
            got += await asyncio.wait_for(stream.content.readany(), 5)
        endpoint = next(line[5:].strip() for line in got.decode().splitlines() if line.startswith("data:"))
        assert endpoint.startswith("/mcp/legacy/messages/")
        msg = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
        posted = await run.proxy.post(endpoint, json=msg, headers={**ACCEPT, **auth})
        assert posted.status == 202
        while b'"id": 7' not in got or not got.endswith(b"\n\n"):
            got += await asyncio.wait_for(stream.content.readany(), 5)
        clean(stream, got)
        up.app[LEGACY].put_nowait(b"")  # the upstream ends the stream
    answer = _json_objects(got)[-1]
    assert answer["id"] == 7 and answer["result"]["content"][0]["text"] == f"you sent {MASK}; shard 7; agent {UA}"


# ---------------------------------------------------------------------------- REST tool call


async def test_rest_tool_call_answers_and_errors_are_redacted(evil: Setup, tmp_path: Path) -> None:
    """POST /mcp: the client sees "you sent REDACTED" in data (JSON and SSE answers), and "REDACTED" in the
    502 / 400 messages built from the upstream's errors; the access log never holds the secret either."""
    run, _, key = evil
    apikey = {"Authorization": f"ApiKey {key}"}

    async def rest(how: str) -> tuple[aiohttp.ClientResponse, bytes]:
        r = await run.proxy.post("/mcp", json={"mcp_id": "echo", "tool": "echo", "arguments": {"how": how}},
                                 headers=apikey)  # fmt: skip
        return r, await r.read()

    for how in ("result", "sse", "php"):
        resp, body = await rest(how)
        assert resp.status == 200, body
        clean(resp, body)
        assert json.loads(body)["data"]["content"][0]["text"] == f"you sent {MASK}; shard 7; agent {UA}", how
    resp, body = await rest("error")
    assert resp.status == 502
    clean(resp, body)
    assert json.loads(body)["error"]["message"].endswith(f"the API refused {MASK}")
    resp, body = await rest("invalid")
    assert resp.status == 400
    clean(resp, body)
    assert json.loads(body)["error"]["message"].endswith(f"bad argument for {MASK}")
    lines = await log_lines(tmp_path / "access.log", want=5)  # the line follows the response
    assert len(lines) >= 5 and not leaks(json.dumps(lines)), lines


# ---------------------------------------------------------------------------- the filter itself


def _upstream(**headers: str) -> UpstreamConfig:
    return UpstreamConfig(id="u", kind="mcp", url="http://127.0.0.1:1/mcp", headers=headers)


def test_which_configured_headers_count_as_secrets() -> None:
    """The whole value and the credential alone, with their JSON and URL forms; short values and headers
    that never carry a credential are not secrets (they would mask every "7" or Content-Type)."""
    secrets = mcp_secrets(_upstream(Authorization=AUTH, **{"User-Agent": UA, "X-Shard": "7", "X-Api-Key": "k3y-0123"}))
    assert set(FORMS) <= set(secrets)
    assert {AUTH, "k3y-0123", f"Bearer%20{quote(SECRET, safe='')}"} <= set(secrets)
    assert "7" not in secrets and UA not in secrets and not any(UA in s for s in secrets)
    assert [len(s) for s in secrets] == sorted((len(s) for s in secrets), reverse=True)
    assert mcp_secrets(_upstream()) == () and mcp_secrets(_upstream(**{"X-Key": "abc1234"})) == ()
    assert set(mcp_secrets(_upstream(Authorization="Bearer abc"))) == {"Bearer abc", "Bearer%20abc"}  # not "abc"


class _Passthrough:
    def headers(self, status: int, headers: CIMultiDict[str]) -> bool:
        return False

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b""


@pytest.mark.parametrize("ctype", ["text/event-stream", "application/octet-stream"])
def test_a_secret_cut_at_every_offset_never_gets_out(ctype: str) -> None:
    """Fed in two pieces cut at every byte, in every form: the output never holds a form of the secret,
    and an event that is complete goes out at once (nothing held back after "\\n\\n")."""
    secrets = mcp_secrets(_upstream(Authorization=AUTH))
    for form in (AUTH, *FORMS):
        data = b"data: first\n\ndata: x " + form.encode() + b" y\n\n"
        for cut in range(1, len(data)):
            f = McpScrubFilter(secrets, _Passthrough())
            assert f.headers(200, CIMultiDict({"Content-Type": ctype}))
            first = f.feed(data[:cut])
            out = first + f.feed(data[cut:]) + f.flush()
            assert not leaks(out), (form, cut, out)
            if cut >= len(b"data: first\n\n"):
                assert first.startswith(b"data: first\n\n")
            if ctype == "application/octet-stream":
                assert len(out) == len(data)


async def test_a_compressed_list_from_an_upstream_without_credential_is_refused(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """No credential headers configured, so nothing to scrub; the upstream ignores ``identity`` and
    gzips tools/list. The client gets 502 upstream_unavailable, never the unfiltered list (before,
    a compressed list passed unread: every tool the key may not call was listed)."""
    up: TestServer = await aiohttp_server(misbehaving_mcp())
    root = str(up.make_url("")).rstrip("/")
    cfg = base_config(root, tmp_path)
    cfg["upstreams"] = [{"id": "echo", "kind": "mcp", "url": f"{root}/mcp", "path_prefix": "/mcp/echo"}]
    run = await make_sidecar(cfg)
    _, key = await run.create_key(name="agent", permissions={"upstreams": ["*"], "tools": {"echo": ["echo"]}})
    resp, body = await rpc(run, key, "gzip", method="tools/list")
    assert resp.status == 502
    assert json.loads(body)["error"]["code"] == "upstream_unavailable"
    assert b"forbidden_tool" not in body and b"\x1f\x8b" not in body
    resp, body = await rpc(run, key, "result", method="tools/list")
    assert resp.status == 200 and [t["name"] for t in json.loads(body)["result"]["tools"]] == ["echo"]
