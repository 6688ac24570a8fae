"""Unit tests for the pure MCP pieces: JSON-RPC parsing, header checks, SSE splitting, rewriting."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from sidecar.upstreams.mcp.authz import McpAccess
from sidecar.upstreams.mcp.filter import (
    JsonRewriter,
    PendingIds,
    Policy,
    SseRewriter,
    SseSplitter,
    client_path,
    parse_event,
    render_event,
)
from sidecar.upstreams.mcp.jsonrpc import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    JsonRpcError,
    check_headers,
    decode_header_value,
    error_object,
    parse_body,
)

ALLOWED = {"search", "fetch"}
TOOLS = [{"name": n, "inputSchema": {"type": "object"}} for n in ("search", "fetch", "delete_everything")]


ACCESS = McpAccess(tools=tuple(sorted(ALLOWED)))  # a key limited to two tools (no resources, no prompts)


def b64(text: str) -> str:
    return f"=?base64?{base64.b64encode(text.encode()).decode()}?="


def listing(rid: Any, **extra: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": {"tools": TOOLS, **extra}}


def policy(*list_ids: Any, refusals: dict[Any, dict[str, Any]] | None = None) -> Policy:
    lists = PendingIds()
    for rid in list_ids:
        lists.add(rid)
    refused = PendingIds()
    for rid, err in (refusals or {}).items():
        refused.add(rid, err)
    return Policy(ACCESS, lists=(lists,), refusals=(refused,))


# ----------------------------------------------------------------------------- parse_body


def test_parse_single_messages() -> None:
    req = parse_body(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{}}}')
    assert not req.batch and req.single_id == 1
    (m,) = req.messages
    assert m.is_request and m.tool == "search" and m.method == "tools/call"
    note = parse_body(b'{"jsonrpc":"2.0","method":"notifications/initialized"}').messages[0]
    assert note.is_notification and note.tool is None
    resp = parse_body(b'{"jsonrpc":"2.0","id":"s1","result":{}}').messages[0]
    assert not resp.is_request and not resp.is_notification and resp.method is None


def test_parse_batch() -> None:
    body = parse_body(b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","method":"x"}]')
    assert body.batch and len(body.messages) == 2 and body.single_id is None


@pytest.mark.parametrize(
    ("raw", "code", "rid"),
    [
        (b"", PARSE_ERROR, None),
        (b"{", PARSE_ERROR, None),
        (b"\xff\xfe", PARSE_ERROR, None),
        (b"[" * 100_000, PARSE_ERROR, None),
        (b"[]", INVALID_REQUEST, None),
        (b"null", INVALID_REQUEST, None),
        (b'"tools/call"', INVALID_REQUEST, None),
        (b'{"id":1,"method":"tools/list"}', INVALID_REQUEST, 1),
        (b'{"jsonrpc":"2.0","id":true,"method":"tools/list"}', INVALID_REQUEST, None),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"tools/list"}', INVALID_REQUEST, None),
        (b'{"jsonrpc":"2.0","id":1,"method":""}', INVALID_REQUEST, None),
        (b'{"jsonrpc":"2.0","id":1,"method":7}', INVALID_REQUEST, None),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":3}', INVALID_REQUEST, 1),
        (b'{"jsonrpc":"2.0","id":1}', INVALID_REQUEST, None),
        (b'{"jsonrpc":"2.0","id":2,"method":"tools/call"}', INVALID_PARAMS, 2),
        (b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":5}}', INVALID_PARAMS, 2),
        (b'{"jsonrpc":"2.0","id":2,"method":"resources/read","params":{}}', INVALID_PARAMS, 2),
        (b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"},[]]', INVALID_REQUEST, None),
    ],
)
def test_parse_refusals(raw: bytes, code: int, rid: Any) -> None:
    with pytest.raises(JsonRpcError) as e:
        parse_body(raw)
    assert e.value.code == code
    assert e.value.id == rid
    body = e.value.body(code="bad_request")
    assert body["jsonrpc"] == "2.0" and body["id"] == rid and body["error"]["code"] == code
    assert body["error"]["data"] == {"code": "bad_request"}


# ----------------------------------------------------------------------------- headers


CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}'


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Mcp-Method", "tools/call")],
        [("mcp-method", "tools/call"), ("MCP-NAME", "search")],
        [("Mcp-Name", b64("search"))],
        [("Mcp-Param-Region", "anything")],  # validated by the upstream against the tool's schema
    ],
)
def test_headers_that_agree(headers: list[tuple[str, str]]) -> None:
    check_headers(parse_body(CALL), headers)


@pytest.mark.parametrize(
    ("raw", "headers"),
    [
        (CALL, [("Mcp-Method", "tools/list")]),
        (CALL, [("Mcp-Name", "delete_everything")]),
        (CALL, [("Mcp-Name", b64("delete_everything"))]),
        (CALL, [("Mcp-Name", "=?base64?not base64?=")]),
        (CALL, [("Mcp-Name", "search"), ("Mcp-Name", "search")]),
        (CALL, [("Mcp-Method", "tools/call"), ("mcp-method", "tools/call")]),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', [("Mcp-Name", "search")]),
        (b'{"jsonrpc":"2.0","id":1,"result":{}}', [("Mcp-Method", "tools/call")]),
        (
            b"[" + CALL + b',{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"x"}}]',
            [("Mcp-Name", "search")],
        ),
    ],
)
def test_headers_that_disagree(raw: bytes, headers: list[tuple[str, str]]) -> None:
    body = parse_body(raw)
    with pytest.raises(JsonRpcError) as e:
        check_headers(body, headers)
    assert e.value.code == HEADER_MISMATCH
    assert e.value.id == body.single_id


def test_decode_header_value() -> None:
    assert decode_header_value("plain") == "plain"
    assert decode_header_value(b64("héllo wörld")) == "héllo wörld"
    assert decode_header_value("=?base64?!!!?=") is None
    assert decode_header_value("=?base64?aGk=?=") == "hi"
    assert decode_header_value("=?base64?aGl=?=") is None  # non-canonical padding bits
    assert decode_header_value("=?base64?/w==?=") is None  # not UTF-8


def test_error_object() -> None:
    assert error_object(None, -32700, "Parse error") == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "Parse error"},
    }


# ----------------------------------------------------------------------------- SSE splitting

STREAM = (
    b": ping - 2026-01-01\r\n\r\n"
    b'id: 7\r\nevent: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\r\n\r\n'
    b'retry: 500\ndata: {"a":\ndata: 1}\n\n'
    b"event: message\rdata: x\r\r"
)


def split_all(data: bytes, step: int) -> list[bytes]:
    sp = SseSplitter()
    out: list[bytes] = []
    for i in range(0, len(data), step):
        for raw, complete in sp.feed(data[i : i + step]):
            assert complete
            out.append(raw)
    out += [raw for raw, complete in sp.feed(b"", final=True) if complete]
    assert sp.flush() == b""
    return out


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_splitter_is_chunking_independent(step: int) -> None:
    events = split_all(STREAM, step)
    assert b"".join(events) == STREAM
    assert len(events) == 4
    assert events[0] == b": ping - 2026-01-01\r\n\r\n"


def test_splitter_waits_on_a_lone_cr_and_flushes_leftovers() -> None:
    sp = SseSplitter()
    assert sp.feed(b"data: 1\r") == []
    assert sp.feed(b"\n\r") == []  # "\r\n" then a lone "\r": could still be "\r\n"
    assert sp.feed(b"\n") == [(b"data: 1\r\n\r\n", True)]
    assert sp.feed(b"data: half") == []
    assert sp.flush() == b"data: half"


def test_splitter_overflow_passes_through() -> None:
    sp = SseSplitter(max_event=10)
    assert sp.feed(b"data: 12345678901234") == [(b"data: 12345678901234", False)]
    assert sp.overflowed
    assert sp.feed(b"more\n\n") == [(b"more\n\n", False)]


def test_parse_and_render_event() -> None:
    raw = b'id: 3\r\nevent: message\r\ndata: {"a":\r\ndata: 1}\r\nretry: 9\r\n\r\n'
    ev = parse_event(raw)
    assert (ev.event, ev.id, ev.data, ev.has_data) == ("message", "3", '{"a":\n1}', True)
    assert render_event(raw, '{"b":2}') == b'id: 3\r\nevent: message\r\ndata: {"b":2}\r\nretry: 9\r\n\r\n'
    assert parse_event(b": comment\n\n").has_data is False
    assert parse_event(b"data\n\n").data == ""
    assert parse_event(b"event: endpoint\ndata:/m?x=1\n\n").data == "/m?x=1"


# ----------------------------------------------------------------------------- policy


def test_policy_filters_only_tools_list_answers() -> None:
    p = policy(1)
    assert p.apply(listing(2)) is None  # not a tools/list id
    assert p.apply(listing("1")) is None  # "1" is not 1
    out = p.apply(listing(1))
    assert [t["name"] for t in out["result"]["tools"]] == ["search", "fetch"]
    assert p.filtered == 1
    assert p.apply(listing(1)) is None  # answered once
    assert p.apply({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}) is None


def test_policy_marks_filtered_lists_private_and_keeps_unchanged_ones() -> None:
    p = policy(1, 2)
    out = p.apply(listing(1, cacheScope="public", ttlMs=1000, nextCursor="c"))
    assert out["result"]["cacheScope"] == "private" and out["result"]["nextCursor"] == "c"
    mine = {"jsonrpc": "2.0", "id": 2, "result": {"tools": TOOLS[:2]}}
    assert p.apply(mine) is None  # nothing to remove: passes byte for byte


def test_policy_replaces_answers_to_refused_requests() -> None:
    refusal = error_object(5, -32010, "no")
    p = policy(refusals={5: refusal})
    assert p.apply({"jsonrpc": "2.0", "id": 5, "result": {}}) == refusal
    assert p.apply({"jsonrpc": "2.0", "id": 5, "result": {}}) is None


def test_pending_ids_are_bounded() -> None:
    ids = PendingIds(limit=3)
    for i in range(5):
        ids.add(i)
    assert len(ids) == 3
    assert ids.pop(0) is None and ids.pop(4) is True


# ----------------------------------------------------------------------------- rewriters


def sse(msg: dict[str, Any], eol: str = "\n") -> bytes:
    return f"event: message{eol}data: {json.dumps(msg)}{eol}{eol}".encode()


@pytest.mark.parametrize("step", [1, 5, 10_000])
def test_sse_rewriter_filters_in_stream_and_appends_refusals(step: int) -> None:
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    stream = b": ping\r\n\r\n" + sse(progress, "\r\n") + sse(listing(1), "\r\n")
    refusal = error_object(3, -32010, "no")
    rw = SseRewriter(policy(1), extra=[refusal])
    out = b"".join(rw.feed(stream[i : i + step]) for i in range(0, len(stream), step)) + rw.flush()
    events = out.split(b"\r\n\r\n")
    assert events[0] == b": ping"  # comments pass untouched
    assert events[1] + b"\r\n\r\n" == sse(progress, "\r\n")
    answers = [json.loads(e.split(b"data: ", 1)[1]) for e in events[2:] if e]
    assert [t["name"] for t in answers[0]["result"]["tools"]] == ["search", "fetch"]
    assert answers[1] == refusal


def test_sse_rewriter_passes_events_before_the_stream_ends() -> None:
    rw = SseRewriter(policy(1))
    assert rw.feed(b": ping\n\n") == b": ping\n\n"
    assert rw.feed(b'data: {"jsonrpc"') == b""
    assert b'"search"' in rw.feed(b':"2.0","id":1,"result":{"tools":[{"name":"search"}]}}\n\n')


def test_sse_rewriter_rewrites_the_legacy_endpoint() -> None:
    rw = SseRewriter(Policy(ACCESS), endpoint=lambda d: "/mcp/legacy" + d)
    out = rw.feed(b"event: endpoint\r\ndata: /messages/?session_id=ab\r\n\r\n")
    assert out == b"event: endpoint\r\ndata: /mcp/legacy/messages/?session_id=ab\r\n\r\n"


def test_sse_rewriter_leaves_garbage_alone() -> None:
    rw = SseRewriter(policy(1))
    assert rw.feed(b"data: not json\n\n") == b"data: not json\n\n"
    assert rw.feed(b"event: other\ndata: {}\n\n") == b"event: other\ndata: {}\n\n"


def test_json_rewriter() -> None:
    rw = JsonRewriter(policy(1))
    assert rw.feed(json.dumps(listing(1)).encode()) == b""
    assert [t["name"] for t in json.loads(rw.flush())["result"]["tools"]] == ["search", "fetch"]

    untouched = json.dumps(listing(9), indent=2).encode()
    rw = JsonRewriter(policy(1))
    rw.feed(untouched)
    assert rw.flush() == untouched

    refusal = error_object(3, -32010, "no")
    rw = JsonRewriter(policy(1), extra=[refusal])
    rw.feed(json.dumps([listing(1), {"jsonrpc": "2.0", "id": 2, "result": {}}]).encode())
    merged = json.loads(rw.flush())
    assert [m["id"] for m in merged] == [1, 2, 3]

    rw = JsonRewriter(policy(), extra=[refusal])
    rw.feed(b'{"jsonrpc":"2.0","id":2,"result":{}}')
    assert [m["id"] for m in json.loads(rw.flush())] == [2, 3]

    rw = JsonRewriter(policy(1))
    rw.feed(b"<html>")
    assert rw.flush() == b"<html>"

    rw = JsonRewriter(policy(1), max_body=4)
    assert rw.feed(b"abc") == b""
    assert rw.feed(b"defg") == b"abcdefg"
    assert rw.feed(b"h") == b"h"
    assert rw.flush() == b""


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("location", "upstream", "prefix", "strip", "expected"),
    [
        ("/messages/?session_id=1", "http://up:8000", "/mcp/legacy", True, "/mcp/legacy/messages/?session_id=1"),
        ("http://up:8000/mcp", "http://up:8000", "/mcp/legacy", True, "/mcp/legacy/mcp"),
        ("http://UP:8000/mcp", "http://up:8000", "/mcp/legacy", True, "/mcp/legacy/mcp"),
        ("http://elsewhere/mcp", "http://up:8000", "/mcp/legacy", True, None),
        ("https://up:8000/mcp", "http://up:8000", "/mcp/legacy", True, None),
        ("messages/", "http://up:8000", "/mcp/legacy", True, None),
        ("/mcp", "http://up:8000/mcp", "/mcp/tools", True, "/mcp/tools"),
        ("/mcp/sub#frag", "http://up:8000/mcp", "/mcp/tools", True, "/mcp/tools/sub#frag"),
        ("/other", "http://up:8000/mcp", "/mcp/tools", True, None),
        ("/mcp/x", "http://up:8000/mcp", "/mcp", False, "/x"),
        ("/x", "http://up:8000", "/", True, "/x"),
        ("/x", "http://up:8000", "/svc", False, "/x"),
    ],
)
def test_client_path(location: str, upstream: str, prefix: str, strip: bool, expected: str | None) -> None:
    assert client_path(location, upstream_url=upstream, prefix=prefix, strip_prefix=strip) == expected


# ----------------------------------------------------------------------------- answers too large to filter


def oversized(rid: Any, names: int = 50) -> bytes:
    tools = [{"name": f"secret_tool_{i}"} for i in range(names)]
    return json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}}).encode()


def chunked(rw: SseRewriter, data: bytes, step: int) -> bytes:
    return b"".join(rw.feed(data[i : i + step]) for i in range(0, len(data), step)) + rw.flush()


@pytest.mark.parametrize("step", [1, 7, 150])
def test_sse_list_too_large_to_filter_is_replaced_by_an_error(step: int) -> None:
    """Fail closed: a guarded list that outgrows the bound before its end arrives never reaches the
    client; an error with its id does, and the stream goes on (whatever the chunking)."""
    rw = SseRewriter(policy(1), max_event=200)
    stream = b"event: message\r\ndata: " + oversized(1) + b"\r\n\r\n" + b": ping\r\n\r\n"
    stream += b'event: message\r\ndata: {"jsonrpc":"2.0","id":2,"result":{}}\r\n\r\n'
    out = chunked(rw, stream, step)
    assert b"secret_tool" not in out
    events = [parse_event(e + b"\r\n\r\n") for e in out.split(b"\r\n\r\n") if e]
    answers = [json.loads(e.data) for e in events if e.has_data]
    assert answers[0]["id"] == 1 and answers[0]["error"]["data"] == {"code": "payload_too_large"}
    assert answers[1] == {"jsonrpc": "2.0", "id": 2, "result": {}}
    assert b": ping" in out


def test_sse_oversized_answers_pass_only_when_nothing_guards_them() -> None:
    # A large tool result (id 5, not a list) passes as it came, even while list 1 is pending.
    rw = SseRewriter(policy(1), max_event=200)
    big = b"data: " + oversized(5) + b"\n\n"
    assert chunked(rw, big, 100) == big
    # While something is guarded, an oversized event whose id cannot be read is dropped.
    rw = SseRewriter(policy(1), max_event=200)
    hidden = b"data: " + json.dumps({"result": {"pad": "x" * 600}, "jsonrpc": "2.0", "id": 1}).encode() + b"\n\n"
    assert chunked(rw, hidden + b": ping\n\n", 100) == b": ping\n\n"
    # Nothing guarded: oversized events pass untouched (they cannot be read, and need not be).
    rw = SseRewriter(policy(), max_event=200)
    assert chunked(rw, big, 100) == big


def test_json_list_too_large_to_filter_is_replaced_by_an_error() -> None:
    rw = JsonRewriter(policy(1), own=[1], extra=[error_object(3, -32010, "no")], batch=True, max_body=200)
    body = oversized(1)
    assert rw.feed(body[:150]) == b"" and rw.feed(body[150:]) == b""
    out = json.loads(rw.flush())
    assert [m["id"] for m in out] == [1, 3]
    assert out[0]["error"]["data"] == {"code": "payload_too_large"}
    rw = JsonRewriter(policy(1), own=[1], max_body=200)
    rw.feed(oversized(1))
    assert json.loads(rw.flush())["id"] == 1  # a single request gets a single answer
