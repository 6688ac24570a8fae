"""A key in the URL *path* (DESIGN invariant 3): refused, never forwarded.

The key is removed from the query and the headers on the way up, but a path cannot lose a
segment without becoming another resource, so a request whose path holds the credential it
presents — raw, percent-encoded once or twice, in any case of hex digits — is a ``400
bad_request`` that echoes neither the path nor the key. It is refused before the upstream,
the cache or the limits see it (refusals are free, invariant 12), on the Plex route, on a
generic HTTP upstream under a prefix and on an MCP route; and its access log line holds a
placeholder for the path, never the key in any encoding.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeSidecar, Running, base_config, log_lines
from jwt_support import IdP, provider
from plexrig import Answer, Recorder, raw_request, recording_handler

MESSAGE = "the API key must not appear in the URL path: send it in a header"


def pct(text: str, *, lower: bool = False) -> str:
    """Every character percent-encoded (``%70%6D…``)."""
    return "".join(f"%{b:02x}" if lower else f"%{b:02X}" for b in text.encode())


def twice(text: str) -> str:
    """Percent-encoded, then its ``%`` encoded again (``%2570%256D…``)."""
    return pct(text).replace("%", "%25")


# How the key is written into the path: {key} is the key, {k0} its first character, {rest} the others.
PLACES = {
    "raw-segment": "/library/{key}/x",
    "raw-in-a-segment": "/library/metadata/1/thumb{key}.jpg",
    "raw-whole-path": "/{key}",
    "encoded-once": "/library/{enc}",
    "encoded-once-lowercase-hex": "/library/{enc_lower}",
    "one-char-encoded": "/library/%{k0hex}{rest}",
    "encoded-twice": "/library/{enc2}",
}


def place(template: str, key: str) -> str:
    return template.format(
        key=key, enc=pct(key), enc_lower=pct(key, lower=True), enc2=twice(key),
        k0hex=f"{ord(key[0]):02X}", rest=key[1:],
    )  # fmt: skip


def credential(form: str, key: str) -> tuple[list[tuple[str, str]], str]:
    """(headers, query string) presenting ``key`` in ``form``."""
    if form == "plex_header":
        return [("X-Plex-Token", key)], ""
    if form == "plex_query":
        return [], f"?X-Plex-Token={key}"
    if form == "x_api_key":
        return [("x-api-key", key)], ""
    if form == "basic":
        return [("Authorization", "Basic " + base64.b64encode(f"me:{key}".encode()).decode())], ""
    return [("Authorization", f"Bearer {key}")], ""


@pytest.fixture
async def rig(make_sidecar: MakeSidecar, aiohttp_raw_server: Any, tmp_path: Path) -> tuple[Running, Recorder]:
    """Plex at /, a generic HTTP server at /files (prefix stripped) and an MCP route at /mcp/tools,
    all three the same recording server: whatever reaches an upstream is seen."""
    rec = Recorder()
    server = await aiohttp_raw_server(recording_handler(rec))
    url = str(server.make_url("")).rstrip("/")
    cfg = base_config(url, tmp_path)
    cfg["upstreams"] += [
        {"id": "files", "url": url, "path_prefix": "/files", "token_env": "PLEX_TOKEN"},
        {"id": "tools", "kind": "mcp", "url": f"{url}/mcp", "path_prefix": "/mcp/tools"},
    ]
    cfg["cache"] = {"rules": [{"upstream": "plex", "path": "/library/*", "ttl": "60s"}]}
    return await make_sidecar(cfg), rec


async def send(running: Running, method: str, target: str, headers: list[tuple[str, str]]) -> Answer:
    host, port = running.proxy.server.host, running.proxy.server.port
    return await raw_request(host, port, method, target, headers)


def assert_refused(ans: Answer, key: str) -> None:
    assert ans.status == 400, ans.body
    assert ans.json() == {"success": False, "error": {"code": "bad_request", "message": MESSAGE}}
    for secret in (key, pct(key), twice(key), key[5:]):
        assert secret.encode() not in ans.body
        assert all(secret not in v for v in ans.headers.values())


@pytest.mark.parametrize("form", ["plex_header", "plex_query", "x_api_key", "bearer", "basic"])
@pytest.mark.parametrize("where", list(PLACES.values()), ids=list(PLACES))
async def test_a_key_in_the_plex_path_is_refused_before_anything(
    rig: tuple[Running, Recorder], form: str, where: str
) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions={"upstreams": ["*"]}, rate_limits=["1/minute"])
    headers, query = credential(form, key)
    for _ in range(3):  # never counted: the one request the limit allows still goes through after them
        assert_refused(await send(running, "GET", place(where, key) + query, headers), key)
    assert rec.seen == []
    ok = await send(running, "GET", "/library/sections" + query, headers)
    assert ok.status == 200, ok.body
    assert len(rec.seen) == 1 and key not in rec.seen[0].target


@pytest.mark.parametrize("where", list(PLACES.values()), ids=list(PLACES))
async def test_a_key_in_the_path_of_a_generic_upstream_is_refused(rig: tuple[Running, Recorder], where: str) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions={"upstreams": ["files"]})
    for method in ("GET", "PUT", "DELETE"):
        assert_refused(await send(running, method, "/files" + place(where, key), [("x-api-key", key)]), key)
    assert rec.seen == []
    ok = await send(running, "GET", "/files/report.txt", [("x-api-key", key)])
    assert ok.status == 200 and rec.paths() == ["/report.txt"]


@pytest.mark.parametrize("where", ["/{key}", "/sessions/{enc}", "/x/{enc2}"], ids=["raw", "encoded", "encoded-twice"])
async def test_a_key_in_the_path_of_an_mcp_route_is_refused(rig: tuple[Running, Recorder], where: str) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions={"upstreams": ["tools"]})
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    headers = [("Authorization", f"Bearer {key}"), ("Content-Type", "application/json"),
               ("Accept", "application/json, text/event-stream"), ("Content-Length", str(len(body)))]  # fmt: skip
    host, port = running.proxy.server.host, running.proxy.server.port
    for method in ("GET", "DELETE"):
        assert_refused(await raw_request(host, port, method, "/mcp/tools" + place(where, key), headers[:3]), key)
    # A POST with its JSON-RPC body: refused before the body is read or judged.
    target = "/mcp/tools" + place(where, key)
    ans = await raw_request(host, port, "POST", target, headers)
    assert_refused(ans, key)
    assert rec.seen == []


async def test_a_jwt_in_the_path_is_refused_too(
    make_sidecar: MakeSidecar, aiohttp_raw_server: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Any credential form: a bearer JWT from an IdP is as secret as a key."""
    idp = IdP()
    idp.add_key("k1", "RSA")
    await idp.start(aiohttp_server)
    rec = Recorder()
    server = await aiohttp_raw_server(recording_handler(rec))
    cfg = base_config(str(server.make_url("")).rstrip("/"), tmp_path)
    cfg["jwt"] = [provider(idp, [{"grant": {"upstreams": ["plex"]}}])]
    running = await make_sidecar(cfg)
    token = idp.token("k1")
    for where in ("/library/{key}", "/library/{enc}", "/library/{enc2}"):
        assert_refused(await send(running, "GET", place(where, token), [("Authorization", f"Bearer {token}")]), token)
    assert rec.seen == []
    assert (await send(running, "GET", "/library/sections", [("Authorization", f"Bearer {token}")])).status == 200


async def test_what_merely_resembles_the_key_is_not_refused(rig: tuple[Running, Recorder]) -> None:
    """Only the whole credential: its id, its prefix or a cut of it pass."""
    running, rec = rig
    record, key = await running.create_key()
    lookalikes = [f"/library/{record.id}", f"/library/{key[:-1]}", f"/library/{key[1:]}"]
    for path in lookalikes:
        ans = await send(running, "GET", path, [("X-Plex-Token", key)])
        assert ans.status == 200, (path, ans.body)
    assert len(rec.seen) == len(lookalikes)
    # Another key in the path is not this request's credential: it is forwarded like any text.
    _, other = await running.create_key()
    assert (await send(running, "GET", f"/library/{other}", [("X-Plex-Token", key)])).status == 200


async def test_the_access_log_holds_a_placeholder_for_the_path(rig: tuple[Running, Recorder], tmp_path: Path) -> None:
    running, _ = rig
    _, key = await running.create_key()
    targets = [
        "/library/" + key + "/x?X-Plex-Token=" + key,
        "/files/" + pct(key, lower=True),
        "/mcp/tools/" + twice(key),
    ]
    for target in targets:
        assert_refused(await send(running, "GET", target, [("X-Plex-Token", key)]), key)
    lines = await log_lines(tmp_path / "access.log", want=len(targets))
    assert [(ln["status"], ln["error"], ln["path"]) for ln in lines] == [
        (400, "bad_request", "/REDACTED"), (400, "bad_request", "/files/REDACTED"),
        (400, "bad_request", "/mcp/tools/REDACTED"),
    ]  # fmt: skip
    text = (tmp_path / "access.log").read_text()
    for secret in (key, pct(key), pct(key, lower=True), twice(key), key[5:]):
        assert secret not in text


async def test_the_key_in_another_letter_case_is_refused_too(rig: tuple[Running, Recorder]) -> None:
    """Keys are lower-case: an upstream that saw one upper-cased would read it back exactly."""
    running, rec = rig
    _, key = await running.create_key()
    for path in (f"/library/{key.upper()}", f"/library/{key[:8]}{key[8:].upper()}", "/files/" + pct(key.upper())):
        assert_refused(await send(running, "GET", path, [("X-Plex-Token", key)]), key)
    assert rec.seen == []
