"""MCP attacks by a key that has read the code: doing more than its tools, resources and prompts allow.

The attacker holds a key limited to tool ``search``, resources ``docs://public/*`` and prompt
``greet`` (``SCOPED``) and sends what the official SDK's server (``tests/mcp_server.py``) or
a batch-capable 2025-03-26 server would act on: JSON the two sides might read differently,
method spellings, list requests sharing an id, the 2026-07-28 ``subscriptions/listen``,
a session's resumed GET stream asked for with another ``Accept``, compressed bodies,
batches against per-tool limits, another key's session in every form. Each test asserts what
the client sees and that the upstream never ran, read or listed what the key may not use.
Upstreams that keep state per session or read numbers as JavaScript: ``test_sec_mcp_upstreams.py``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeSidecar, Running, base_config
from mcp_server import ALL_TOOLS, MCP_TOKEN, McpUpstream, MemoryEventStore, batch_app
from mcp_support import ACCEPT, INIT, SCOPED, bearer, call, mcp_config, session
from mcp_support import answer_messages as messages

from sidecar.auth.models import Permissions
from sidecar.upstreams.mcp.authz import McpAccess
from sidecar.upstreams.mcp.filter import PendingIds, Policy
from sidecar.upstreams.mcp.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    TOOL_FORBIDDEN,
    TOOL_RATE_LIMITED,
)

MODERN = {"MCP-Protocol-Version": "2026-07-28"}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
FORBIDDEN_TOOLS = set(ALL_TOOLS) - {"search"}


def listed_tools(msgs: list[Any]) -> set[str]:
    return {t["name"] for m in msgs if isinstance(m.get("result"), dict) for t in m["result"].get("tools", [])}


async def start(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path) -> tuple[Running, str]:
    gw = await make_sidecar(mcp_config(upstream, tmp_path), extra_env={"MCP_TOKEN": MCP_TOKEN})
    _, key = await gw.create_key(name="attacker", permissions=SCOPED)
    return gw, key


def upstream_ran_nothing_forbidden(upstream: McpUpstream) -> None:
    assert not FORBIDDEN_TOOLS & set(upstream.rec.calls), upstream.rec.calls
    assert not [c for c in upstream.rec.calls if "secret" in c or "admin_override" in c], upstream.rec.calls


@pytest.fixture
async def resumable() -> AsyncIterator[McpUpstream]:
    """The SDK's server with an event store: a session's streams can be resumed with ``Last-Event-ID``."""
    up = McpUpstream(event_store=MemoryEventStore()).start()
    yield up
    await up.stop()


@pytest.fixture
async def batch_gw(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> tuple[Running, str]:
    """A sidecar in front of the batch-capable upstream, ``search`` limited to 2 calls a minute per key."""
    up = await aiohttp_server(batch_app())
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [
        {"id": "batch", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/batch",
         "mcp": {"tool_limits": {"search": ["2/minute"]}}}
    ]  # fmt: skip
    gw = await make_sidecar(cfg)
    _, key = await gw.create_key(name="attacker", permissions=SCOPED)
    return gw, key


# ----------------------------------------------------------------------------- JSON the two sides could read apart

NAME = '"name":"delete_everything"'
TRICKS: list[tuple[str, bytes, str]] = [
    # (what, body, what the client must see): "refused" = 200 and -32010; a JSON-RPC code = 400 with it;
    # "upstream" = goes up, and the SDK's server refuses it itself (no such method / tool).
    ("duplicate name", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search",' + NAME.encode()
     + b"}}", "refused"),
    ("duplicate params", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"},"params":{'
     + NAME.encode() + b"}}", "refused"),
    ("duplicate method", b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{'
     + NAME.encode() + b"}}", "refused"),
    ("escaped name", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\u0064elete_everything"}}',
     "refused"),
    ("escaped method", b'{"jsonrpc":"2.0","id":1,"method":"tools\\/c\\u0061ll","params":{' + NAME.encode() + b"}}",
     "refused"),
    ("utf-8 BOM", b"\xef\xbb\xbf" + json.dumps(call(1, "delete_everything")).encode(), "refused"),
    ("utf-16", json.dumps(call(1, "delete_everything")).encode("utf-16"), "refused"),
    ("utf-32", json.dumps(call(1, "delete_everything")).encode("utf-32"), "refused"),
    ("huge id", json.dumps(call(2**80, "delete_everything")).encode(), str(INVALID_REQUEST)),
    ("notification", json.dumps({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_everything"}})
     .encode(), "dropped"),
    ("batch", json.dumps([call(1, "delete_everything"), call(2, "fetch", url="u")]).encode(), "refused"),
    ("params an array", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["delete_everything"]}',
     str(INVALID_PARAMS)),
    ("name an array", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["delete_everything"]}}',
     str(INVALID_PARAMS)),
    ("id null", json.dumps(call(None, "delete_everything")).encode(), str(INVALID_REQUEST)),
    ("id an object", json.dumps(call({"a": 1}, "delete_everything")).encode(), str(INVALID_REQUEST)),
    ("id an array", json.dumps(call([1], "delete_everything")).encode(), str(INVALID_REQUEST)),
    ("id a float", json.dumps(call(1.0, "delete_everything")).encode(), str(INVALID_REQUEST)),
    ("empty batch", b"[]", str(INVALID_REQUEST)),
    ("deep nesting", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{' + NAME.encode()
     + b',"arguments":{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}}}", str(PARSE_ERROR)),
    ("lone surrogate", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{' + NAME.encode()
     + b',"arguments":{"a":"\\ud800"}}}', "refused"),
    ("method case", json.dumps({**call(1, "delete_everything"), "method": "Tools/Call"}).encode(), "upstream"),
    ("method space", json.dumps({**call(1, "delete_everything"), "method": "tools/call "}).encode(), "upstream"),
    ("method NUL", json.dumps({**call(1, "delete_everything"), "method": "tools/call\u0000"}).encode(), "upstream"),
    ("name case", json.dumps(call(1, "Search")).encode(), "refused"),
    ("name space", json.dumps(call(1, "search ")).encode(), "refused"),
    ("name NUL", json.dumps(call(1, "search\u0000")).encode(), "refused"),
    ("name fullwidth", json.dumps(call(1, "ｓｅａｒｃｈ")).encode(), "refused"),
]  # fmt: skip


async def test_json_tricks_never_reach_a_forbidden_tool(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """Every reading of the body the upstream could make is the one the sidecar judged."""
    gw, key = await start(make_sidecar, upstream, tmp_path)
    h = await session(gw, key)
    for what, body, expect in TRICKS:
        seen = len(upstream.rec.posts())
        r = await gw.proxy.post("/mcp/tools", data=body, headers=h)
        text = await r.text()
        if expect == "refused":
            assert r.status == 200, (what, text)
            answers = messages(text)
            assert answers and all(a["error"]["code"] == TOOL_FORBIDDEN for a in answers), (what, answers)
            assert answers[0]["error"]["data"] == {"code": "insufficient_permissions"}
        elif expect == "dropped":
            assert r.status == 202, (what, text)
        elif expect == "upstream":
            assert r.status == 200, (what, text)
            assert [a["error"]["code"] for a in messages(text)] == [-32601], (what, text)  # method not found
            continue
        else:
            assert r.status == 400, (what, text)
            err = json.loads(text)["error"]
            assert err["code"] == int(expect) and err["data"] == {"code": "bad_request"}, (what, err)
        assert len(upstream.rec.posts()) == seen, f"{what}: the refused body went up"
    forbidden = json.dumps(call(9, "delete_everything")).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(forbidden), 7):
            yield forbidden[i : i + 7]

    for data, label in ((chunked(), "application/json"), (forbidden, "application/json; charset=utf-16")):
        r = await gw.proxy.post("/mcp/tools", data=data, headers={**h, "Content-Type": label})
        assert messages(await r.text())[0]["error"]["code"] == TOOL_FORBIDDEN, label
    upstream_ran_nothing_forbidden(upstream)


RESOURCE_TRICKS = [  # (URI under the key's glob, whether the sidecar refuses it itself)
    ("docs://public/../vault", True),
    ("docs://public/..%2F..%2Fsecret%3A%2F%2Fvault", True),
    ("docs://public/%2e%2e/%2e%2e/secret://vault", True),
    ("docs://public/%252e%252e/vault", True),
    ("docs://public\\..\\vault", True),
    ("docs://public/readme#/../../secret://vault", True),
    ("docs://public/readme?uri=secret://vault", False),
    ("docs://public/*", False),
    ("docs://public/x\nsecret://vault", False),
]


async def test_resource_uri_tricks_never_read_a_forbidden_resource(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """URIs under the key's glob that an upstream might resolve elsewhere.

    Dot segments (plain, percent-encoded, twice encoded, backslashed) are refused by the sidecar,
    as ``..`` in a path is: ``docs://public/../vault`` matches ``docs://public/*`` but names
    ``docs://vault`` to an upstream that resolves it (the SDK's server happens not to; a file
    server joining paths does). Whatever else goes up, the SDK's server reads nothing secret.
    """
    gw, key = await start(make_sidecar, upstream, tmp_path)
    h = await session(gw, key)
    for i, (uri, refused) in enumerate(RESOURCE_TRICKS):
        seen = len(upstream.rec.posts())
        body = {"jsonrpc": "2.0", "id": i, "method": "resources/read", "params": {"uri": uri}}
        r = await gw.proxy.post("/mcp/tools", json=body, headers=h)
        text = await r.text()
        assert r.status == 200, (uri, text)
        assert "vault's contents" not in text, uri
        if refused:
            assert messages(text)[0]["error"]["code"] == TOOL_FORBIDDEN, (uri, text)
            assert len(upstream.rec.posts()) == seen, uri
    upstream_ran_nothing_forbidden(upstream)


# ----------------------------------------------------------------------------- methods that name resources


@pytest.mark.parametrize("spelling", ["resourceSubscriptions", "resource_subscriptions"])
async def test_subscriptions_listen_names_only_resources_the_key_may_read(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path, spelling: str
) -> None:
    """2026-07-28's ``subscriptions/listen`` is ``resources/subscribe`` in another form: the same rule holds.

    Before: the SDK's server acknowledged ``secret://vault`` (and would have sent its updates) to a key
    that may not subscribe to it. Both spellings are checked: the SDK's model takes the field by its
    name too when validated by name (its server validates by alias).
    """
    gw, key = await start(make_sidecar, upstream, tmp_path)
    h = {**ACCEPT, **bearer(key), **MODERN, "Mcp-Method": "subscriptions/listen"}

    def listen(rid: int, uris: Any) -> dict[str, Any]:
        notes = {"toolsListChanged": True, spelling: uris}
        return {"jsonrpc": "2.0", "id": rid, "method": "subscriptions/listen",
                "params": {"_meta": MODERN_META, "notifications": notes}}  # fmt: skip

    async def first_message(body: dict[str, Any]) -> dict[str, Any]:
        async with gw.proxy.post("/mcp/tools", json=body, headers=h) as r:  # a stream, if the listen went up
            assert r.status == 200
            if r.content_type == "application/json":
                return await r.json()  # type: ignore[no-any-return]
            return messages((await asyncio.wait_for(r.content.readuntil(b"\r\n\r\n"), 5)).decode())[0]

    for rid, uris in enumerate((["secret://vault"], ["docs://public/readme", "secret://vault"], [7], "x")):
        answer = await first_message(listen(rid, uris))
        assert answer.get("id") == rid and answer["error"]["code"] == TOOL_FORBIDDEN, answer
        assert answer["error"]["data"] == {"code": "insufficient_permissions"}
    assert "subscriptions/listen" not in upstream.rec.methods()
    ack = await first_message(listen(9, ["docs://public/readme"]))  # what the key may read, it may listen to
    assert ack["method"] == "notifications/subscriptions/acknowledged"
    if spelling == "resourceSubscriptions":  # (the server here reads the alias only)
        assert ack["params"]["notifications"]["resourceSubscriptions"] == ["docs://public/readme"]


# ----------------------------------------------------------------------------- list answers


@pytest.mark.parametrize("accept", ["text/event-stream", "*/*", "text/*", "Text/Event-Stream; q=1"])
async def test_a_resumed_stream_is_filtered_whatever_the_accept_header(
    make_sidecar: MakeSidecar, resumable: McpUpstream, tmp_path: Path, accept: str
) -> None:
    """``GET`` + ``Last-Event-ID`` replays a POST's answers; the SDK takes ``*/*`` and any case for SSE.

    Before: only ``Accept`` containing ``text/event-stream`` verbatim got the filtering stream; ``*/*``
    replayed the key's ``tools/list`` answer whole, ``delete_everything`` included.
    """
    gw, key = await start(make_sidecar, resumable, tmp_path)
    h = await session(gw, key)
    r = await gw.proxy.post("/mcp/tools", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=h)
    text = await r.text()
    assert listed_tools(messages(text)) == {"search"}
    priming = next(line[3:].strip() for line in text.splitlines() if line.startswith("id:"))
    async with gw.proxy.get("/mcp/tools", headers={**h, "Accept": accept, "Last-Event-ID": priming}) as g:
        assert g.status == 200
        replayed = (await asyncio.wait_for(g.content.readuntil(b"\r\n\r\n"), 5)).decode()
    msgs = messages(replayed)
    assert [m["id"] for m in msgs] == [2]
    assert listed_tools(msgs) == {"search"}


MANY = [{"jsonrpc": "2.0", "id": i, "method": "tools/list"} for i in range(1100)]  # more than 1024 marks
DUPLICATES = [
    MANY,
    [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}],
    [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}],
    [call(1, "search"), {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}],
    [{"jsonrpc": "2.0", "id": 1, "method": "nope"}, {"jsonrpc": "2.0", "id": "1", "method": "tools/list"},
     {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}],
]  # fmt: skip


@pytest.mark.parametrize("answer", ["json", "sse", "sse-batch"])
async def test_answers_sharing_an_id_never_unfilter_a_list(batch_gw: tuple[Running, str], answer: str) -> None:
    """A batch whose requests share an id, or hold more lists than the gateway kept marks for (1024):
    every ``tools/list`` answer is filtered, whatever comes first.

    Before: the first answer with the id (a ``ping``'s, another list's) used up the one mark the
    gateway kept for it, and the list after it went down whole; in a batch of 1100 lists, the
    first 76 lost their marks and went down whole; and a batch's answers sent as one SSE event (an
    array, as 2025-03-26 allows) were never read at all.
    """
    gw, key = batch_gw
    h = {**ACCEPT, **bearer(key), "X-Answer": answer}
    for body in DUPLICATES:
        r = await gw.proxy.post("/mcp/batch", json=body, headers=h)
        assert r.status == 200
        msgs = [m for event in messages(await r.text()) for m in (event if isinstance(event, list) else [event])]
        lists = [m for m in msgs if "tools" in m.get("result", {})]
        assert lists and all(listed_tools([m]) == {"search"} for m in lists), msgs


def test_marks_on_a_shared_stream_are_counted_and_taken_only_by_lists() -> None:
    """A legacy SSE session's marks are shared by all its POSTs: two lists sent with one id, a ping
    and an error with that id too, in any order on the stream — both lists are filtered."""
    access = McpAccess.of(Permissions.from_dict(SCOPED), "up")
    everything = {"tools": [{"name": n} for n in ALL_TOOLS]}
    prompts = {"prompts": [{"name": "greet"}, {"name": "admin_override"}]}
    shared = PendingIds()
    policy = Policy(access, lists=(shared,))
    for method in ("tools/list", "prompts/list", "tools/list"):
        shared.add(5, method)
    for msg in (
        {"jsonrpc": "2.0", "id": 5, "result": {}},
        {"jsonrpc": "2.0", "id": 5, "error": {"code": -32601, "message": "no"}},
        {"jsonrpc": "2.0", "id": 5, "result": prompts},
        {"jsonrpc": "2.0", "id": 5, "result": everything},
        {"jsonrpc": "2.0", "id": 5, "result": everything},
    ):
        out = policy.apply(msg) or msg
        result = out.get("result") or {}
        assert [t["name"] for t in result.get("tools", [{"name": "search"}])] == ["search"], out
        assert [p["name"] for p in result.get("prompts", [{"name": "greet"}])] == ["greet"], out
    assert not shared
    refusals = PendingIds()
    for rid in (6, 6):
        refusals.add(rid, {"jsonrpc": "2.0", "id": rid, "error": {"code": TOOL_FORBIDDEN, "message": "no"}})
    policy = Policy(access, refusals=(refusals,))
    for _ in range(2):  # two refused calls sent up as pings with one id: both answers are refusals
        out = policy.apply({"jsonrpc": "2.0", "id": 6, "result": {}})
        assert out is not None and out["error"]["code"] == TOOL_FORBIDDEN
    # A legacy stream finds lists by shape; it reads only events that name a list field (or escape one).
    shaped = Policy(access, by_shape=True)
    assert shaped.skips(b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}')
    for raw in (b'{"id":1,"result":{"tools":[]}}', b'{"id":1,"result":{"\\u0074ools":[]}}'):
        assert not shaped.skips(raw)
        assert not shaped.skips(raw.replace(b"tools", b"prompts"))


# ----------------------------------------------------------------------------- bodies, limits, sessions


async def test_a_compressed_body_goes_up_as_judged(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """aiohttp decodes a gzip request body; the sidecar judges and forwards the decoded bytes.

    Before: the decoded body went up still labelled ``Content-Encoding: gzip``, for an upstream
    that honours the header to decode a second time (what it acted on was not what was judged).
    """
    gw, key = await start(make_sidecar, upstream, tmp_path)
    h = {**await session(gw, key), "Content-Encoding": "gzip"}

    def packed(body: dict[str, Any]) -> bytes:
        return gzip.compress(json.dumps(body).encode())

    r = await gw.proxy.post("/mcp/tools", data=packed(call(3, "delete_everything")), headers=h)
    assert (await r.json())["error"]["code"] == TOOL_FORBIDDEN
    r = await gw.proxy.post("/mcp/tools", data=packed(call(4, "search", query="q")), headers=h)
    assert r.status == 200 and "results for q" in await r.text()
    last = upstream.rec.requests[-1]
    assert json.loads(last.body)["params"]["name"] == "search"
    assert last.header("content-encoding") is None
    upstream_ran_nothing_forbidden(upstream)


async def test_every_call_of_a_batch_counts_against_its_tool_limit(batch_gw: tuple[Running, str]) -> None:
    """``search`` at 2/minute: a batch of four searches runs two; refused calls spend nothing."""
    gw, key = batch_gw
    h = {**ACCEPT, **bearer(key)}
    forbidden = [call(i, "delete_everything") for i in range(3)]
    r = await gw.proxy.post("/mcp/batch", json=forbidden, headers=h)
    assert [a["error"]["code"] for a in await r.json()] == [TOOL_FORBIDDEN] * 3
    r = await gw.proxy.post("/mcp/batch", json=[call(10 + i, "search") for i in range(4)], headers=h)
    answers = {a["id"]: a for a in await r.json()}
    assert sum("result" in a for a in answers.values()) == 2
    assert sum(a.get("error", {}).get("code") == TOOL_RATE_LIMITED for a in answers.values()) == 2
    r = await gw.proxy.post("/mcp/batch", json=call(20, "search"), headers=h)
    assert (await r.json())["error"]["code"] == TOOL_RATE_LIMITED


@pytest.mark.parametrize("how", ["GET", "GET */*", "DELETE", "query", "query+header"])
async def test_another_keys_session_in_any_request_form(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path, how: str
) -> None:
    """The victim's sealed session id, presented by the attacker's key as a GET stream, a DELETE,
    or in the legacy query parameter: refused, nothing goes up, the victim's session lives on."""
    gw, key = await start(make_sidecar, upstream, tmp_path)
    _, victim = await gw.create_key(name="victim", permissions=SCOPED)
    vh = await session(gw, victim)
    sid = vh["Mcp-Session-Id"]
    seen = len(upstream.rec.requests)
    h = {**bearer(key), "MCP-Protocol-Version": "2025-11-25"}
    if how.startswith("GET"):
        accept = how[4:] or "text/event-stream"
        r = await gw.proxy.get("/mcp/tools", headers={**h, "Accept": accept, "Mcp-Session-Id": sid})
        status = 403
    elif how == "DELETE":
        r = await gw.proxy.delete("/mcp/tools", headers={**h, "Mcp-Session-Id": sid})
        status = 403
    else:
        extra = {"Mcp-Session-Id": sid} if how == "query+header" else {}
        r = await gw.proxy.post(f"/mcp/tools?session_id={sid}", json=call(5, "search", query="q"),
                                headers={**ACCEPT, **h, **extra})  # fmt: skip
        status = 404  # no legacy session of this process: never forwarded
    assert r.status == status, await r.text()
    assert (await r.json())["error"]["code"] in ("insufficient_permissions", "no_route")
    assert len(upstream.rec.requests) == seen
    r = await gw.proxy.post("/mcp/tools", json=call(6, "search", query="q"), headers=vh)
    assert r.status == 200 and "results for q" in await r.text()


async def test_legacy_lists_sharing_an_id_are_each_filtered(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """Legacy SSE: every answer comes down one stream, whose marks all the session's POSTs share.
    Two lists, a ping and an unknown method, all with id 5, posted at once: both lists arrive filtered."""
    gw, key = await start(make_sidecar, upstream, tmp_path)
    h = {**ACCEPT, **bearer(key)}
    async with gw.proxy.get("/mcp/legacy/sse", headers={**bearer(key), "Accept": "text/event-stream"}) as stream:
        assert stream.status == 200
        buf = b""

        async def event() -> dict[str, Any] | str:
            nonlocal buf
            while b"\r\n\r\n" not in buf:
                buf += await asyncio.wait_for(stream.content.readany(), 5)
            raw, buf = buf.split(b"\r\n\r\n", 1)
            lines = raw.decode().split("\r\n")
            data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
            return data if "event: endpoint" in lines else json.loads(data)

        endpoint = await event()
        assert isinstance(endpoint, str) and endpoint.startswith("/mcp/legacy/messages/?session_id=")
        assert (await gw.proxy.post(endpoint, json={**INIT, "id": 1}, headers=h)).status == 202
        assert (await event())["id"] == 1  # type: ignore[index]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await gw.proxy.post(endpoint, json=note, headers=h)).status == 202
        bodies = [{"jsonrpc": "2.0", "id": 5, "method": m} for m in ("ping", "tools/list", "nope", "tools/list")]
        posted = await asyncio.gather(*(gw.proxy.post(endpoint, json=b, headers=h) for b in bodies))
        assert [r.status for r in posted] == [202] * 4
        answers = [await event() for _ in bodies]
    lists = [a for a in answers if isinstance(a, dict) and "tools" in a.get("result", {})]
    assert len(lists) == 2 and all(listed_tools([m]) == {"search"} for m in lists), answers
