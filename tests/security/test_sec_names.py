"""Names a client chooses, as identifiers and as output: the MCP tool name above all.

The attacker holds a key allowed every tool of an MCP upstream (the default) and chooses the
``params.name`` of its ``tools/call``s; a delegate chooses the owner and description of the keys
it creates. What the name must not do: fail a sink (the access log line lost, ``/metrics`` a 500
for everyone), or be counted as another tool (a made-up name in a real tool's series).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeSidecar, Running, base_config, log_lines, require_binary
from mcp_server import MCP_TOKEN, McpUpstream
from mcp_support import ACCEPT, SCOPED, answer_messages, bearer, call, mcp_config, session

from sidecar.cli import main
from sidecar.core.names import MAX_NAME, MAX_NAMES, join, split
from sidecar.core.scope import RequestScope
from sidecar.http.accesslog import AccessLog
from sidecar.observe.families import Spec, write_family
from sidecar.observe.metrics import MAX_TOOL_NAME, Metrics
from sidecar.upstreams.mcp.toollimits import MAX_BUDGETS

SURROGATE_CALL = b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"sea\\ud800rch","arguments":{}}}'


@pytest.fixture
async def upstream() -> AsyncIterator[McpUpstream]:
    up = McpUpstream().start()
    yield up
    await up.stop()


async def gateway(make_sidecar: MakeSidecar, up: McpUpstream, tmp_path: Path) -> tuple[Running, str]:
    gw = await make_sidecar(mcp_config(up, tmp_path), extra_env={"MCP_TOKEN": MCP_TOKEN})
    _, key = await gw.create_key(name="attacker", permissions={"upstreams": ["*"]})
    return gw, key


async def metrics_text(gw: Running) -> str:
    resp = await gw.admin.get("/metrics")
    assert resp.status == 200, await resp.text()
    return await resp.text()


async def promtool_accepts(text: str) -> None:
    """Prometheus's own parser (``promtool check metrics``) reads the exposition: a scrape would not fail."""
    proc = await asyncio.create_subprocess_exec(
        require_binary("promtool"), "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 10)
    assert b"parsing error" not in out and b"invalid" not in out, out.decode(errors="replace")


async def test_lone_surrogate_tool_name_is_refused_and_every_sink_survives(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """Before: ``"name": "sea\\ud800rch"`` (JSON's lone surrogate, which Python's json reads) went upstream,
    then the access log's orjson refused the line (the client got a 500 and the call was never logged) and
    the name became a ``tool`` label that no exposition could encode: ``/metrics`` answered 500 to every
    scraper until a restart. Now the body is a 400 ``bad_request`` that never goes up, and is logged."""
    gw, key = await gateway(make_sidecar, upstream, tmp_path)
    h = await session(gw, key)
    posts = len(upstream.rec.posts())
    r = await gw.proxy.post("/mcp/tools", data=SURROGATE_CALL, headers=h)
    assert r.status == 400, await r.text()
    answer = await r.json()
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["code"] == "bad_request"
    assert len(upstream.rec.posts()) == posts  # nothing went up

    # The REST tool call is the same name by another door.
    rest = {"Authorization": f"ApiKey {key}", "Content-Type": "application/json"}
    r = await gw.proxy.post("/mcp", data=b'{"mcp_id":"tools","tool":"a\\udfff","arguments":{}}', headers=rest)
    assert r.status == 400 and (await r.json())["error"]["code"] == "bad_request"

    # A good call after them: still served, and every request has its line.
    r = await gw.proxy.post("/mcp/tools", json=call(6, "search", query="q"), headers=h)
    assert r.status == 200
    lines = await log_lines(tmp_path / "access.log", 5)
    assert [x["status"] for x in lines[-3:]] == [400, 400, 200]
    await promtool_accepts(await metrics_text(gw))


async def test_made_up_tool_names_are_not_counted_as_real_tools(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """The ``tool`` label is the name the client sent, or ``other``; never a real tool it resembles.

    Before: the request's names were joined with ``,`` and split again for the metrics, so one call of the
    made-up ``search,delete_everything`` counted one call of each real tool (the operator sees
    ``delete_everything`` called); labels were ``strip()``-ed (`` search`` counted as ``search``) and cut at
    128 characters (a 129-character name counted as the real 128-character tool it starts with); a
    zero-width or bidi character made a series a dashboard shows as ``search``, and a log line and the
    console's recent requests that read ``search``. Now such names are ``tool="other"``, and the log
    spells their invisible characters (``search%E2%80%8B``).
    """
    gw, key = await gateway(make_sidecar, upstream, tmp_path)
    h = await session(gw, key)
    long_real = "t" * MAX_TOOL_NAME
    names = (
        "search,delete_everything",
        " search",
        long_real + "x",
        "50%2Cx",
        'q"} 1\\',
        "search\u200b",
        "sea\u202erch",
    )
    for i, name in enumerate(names, start=10):
        r = await gw.proxy.post("/mcp/tools", json=call(i, name), headers=h)
        assert r.status == 200, await r.text()
        await r.read()
    text = await metrics_text(gw)
    tools = {
        json.loads('"' + line.split('tool="', 1)[1].split('",outcome=')[0] + '"')
        for line in text.splitlines()
        if line.startswith("sidecar_mcp_tool_calls_total{")
    }
    assert tools == {"search,delete_everything", "other", "50%2Cx", 'q"} 1\\'}
    await promtool_accepts(text)
    lines = await log_lines(tmp_path / "access.log", 9)
    logged = [x["tool"] for x in lines if "tool" in x]
    assert logged[-2:] == ["search%E2%80%8B", "sea%E2%80%AErch"]
    assert [split(t) for t in logged] == [[n] if len(n) <= MAX_NAME else [None] for n in names]


async def test_long_and_many_tool_names_are_not_kept_whole(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """A body may carry a 1 MiB tool name, or a batch of thousands. Before: every such name was kept whole
    in the per-tool limiter's caches (10 000 plans and 256 names a key: gigabytes from one key), in the
    console's recent requests (100 a key) and written whole in the field the log and metrics read. Now the
    field holds at most ``MAX_NAMES`` names of at most ``MAX_NAME`` characters, and the limiter's caches
    hold a long name's digest."""
    cfg = mcp_config(upstream, tmp_path)
    cfg["upstreams"][0]["mcp"] = {"tool_limits": {"*": "1000/minute", "x*": "1000/minute"}}
    gw = await make_sidecar(cfg, extra_env={"MCP_TOKEN": MCP_TOKEN})
    _, key = await gw.create_key(name="attacker", permissions={"upstreams": ["*"]})
    h = await session(gw, key)
    huge = "x" * 200_000
    batch = [call(i, huge + str(i)) for i in range(3)] + [call(100 + i, f"t{i}") for i in range(20)]
    r = await gw.proxy.post("/mcp/tools", json=batch, headers=h)
    assert r.status in (200, 400)  # the SDK refuses batches (since 2025-06-18) itself: judged and counted first
    await r.read()
    (line,) = [x for x in await log_lines(tmp_path / "access.log", 3) if "tool" in x]
    assert len(line["tool"]) < MAX_NAMES * (MAX_NAME + 8) and len(split(line["tool"])) == MAX_NAMES + 1
    limiter = gw.sc.mcp.tool_limits  # type: ignore[union-attr]
    kept = [ident[2] for ident in (*limiter._plans, *limiter._globbed)]
    kept += [name for names in limiter._named.values() for name in names]
    assert kept and max(len(name) for name in kept) <= 71  # a digest, never the name
    # Every budget that called a globbed name is remembered (JWT subjects are budgets): a bounded number.
    for i in range(MAX_BUDGETS + 10):
        limiter._own_bucket(f"subject-{i}", "tools", "x1", 60)
    assert len(limiter._named) == MAX_BUDGETS and ("subject-0", "tools") not in limiter._named


def test_the_tool_field_splits_back_into_the_names_joined() -> None:
    for names in (["a"], ["a,b", "c"], ["%2C", "%25,x"], ["%41", ""], ["%\u2026", "x%\u2026 more"]):
        assert split(join(names)) == names
    assert split(join(["y" * (MAX_NAME + 1), "z"])) == [None, "z"]
    assert split(join(str(i) for i in range(MAX_NAMES + 3))) == [*map(str, range(MAX_NAMES)), None]


def test_metrics_exposition_encodes_whatever_label_it_holds() -> None:
    """The sinks' own guard: a label that is not valid Unicode is written escaped, never a failed scrape."""
    out: list[str] = []
    write_family(Spec("x", "counter", "doc", ("tool",), {("a\udfffb",): 1}), out, {})
    assert 'x_total{tool="a\\\\udfffb"} 1' in "".join(out).encode().decode()
    m = Metrics()
    scope = RequestScope(method="POST", path="/mcp", client_ip="127.0.0.1")
    scope.upstream, scope.key_id, scope.tool, scope.status = "tools", "k1", "a\udfffb", 200
    m.observe(scope)
    assert 'tool="other"' in m.exposition().decode()


def test_access_log_line_survives_text_orjson_refuses(tmp_path: Path) -> None:
    """One valid JSON line per request whatever its strings hold (a path aiohttp decoded, a name)."""
    target = tmp_path / "access.log"
    log = AccessLog(str(target))
    scope = RequestScope(method="GET", path="/a\ud800", client_ip="127.0.0.1")
    scope.tool, scope.status = "x\udfff", 400
    log.write(scope)
    log.flush()
    log.close()
    (line,) = target.read_text().splitlines()
    entry = json.loads(line)
    assert entry["path"] == "/a\\ud800" and entry["tool"] == "x\\udfff"


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "n", "owner": "x\\ud800"}',
        b'{"name": "n", "description": "x\\ud800"}',
        b'{"name": "n", "permissions": {"upstreams": ["*"], "tools": {"tools": ["\\udfff*"]}}}',
        b'{"name": "n", "permissions": {"upstreams": ["*"], "methods": ["G\\ud800"]}}',
        b'{"name": "n", "\\ud800": 1}',
    ],
)
async def test_key_fields_refuse_lone_surrogates(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path, body: bytes
) -> None:
    """Before: an owner with a lone surrogate was a 500 (the store could not encode it), so was an unknown
    field spelled with one (its error message), and a description, a tool glob or a method was stored, to be
    written out later by whatever shows the key. Now the admin API reads no lone surrogate: a 400."""
    gw, _ = await gateway(make_sidecar, upstream, tmp_path)
    headers = {**gw.admin_headers(), "Content-Type": "application/json"}
    r = await gw.admin.post("/admin/keys", data=body, headers=headers)
    assert r.status == 400, await r.text()
    assert (await r.json())["error"]["code"] == "bad_request"


def test_keys_show_text_keeps_a_multiline_description_on_its_own_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A description may hold newlines (it wraps); a delegate chose it. Before: ``sidecar keys show`` printed it
    raw, so ``"ok\\n          revoked_at: 2020-01-01T00:00:00Z"`` showed the operator an active key as revoked
    (any field can be forged that way). Now a value with line breaks or other non-printing characters is
    printed quoted, on its one line."""
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        json.dumps(
            {
                "admin": {"listen": "127.0.0.1:0"},
                "store": {"kind": "sqlite", "path": str(tmp_path / "s.db")},
                "keys": {"argon2": "cheapest"},
                "upstreams": [{"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:9", "path_prefix": "/mcp"}],
                "log": {"access": "off"},
            }
        )
    )
    forged = "ok\n          revoked_at: 2020-01-01T00:00:00Z\n               state: revoked"
    assert main(["keys", "create", "-c", str(cfg), "--name", "n", "--description", forged, "--json"]) == 0
    kid = json.loads(capsys.readouterr().out)["id"]
    assert main(["keys", "show", kid, "-c", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    fields = [line.split(":", 1)[0].strip() for line in lines]
    assert "revoked_at" not in fields and fields.count("state") == 1
    assert any(line.strip() == f"description: {json.dumps(forged)}" for line in lines)


async def test_a_rewritten_body_keeps_a_lone_surrogate_as_the_client_spelled_it(
    make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path
) -> None:
    """A batch the gateway rewrites (a call refused, the rest forwarded) is serialised again: before, a lone
    surrogate in a forwarded call's arguments (``"\\ud800"``, which Python's json reads) failed that encode and
    the client got a 500. Now the body goes up with the escape the client wrote."""
    gw = await make_sidecar(mcp_config(upstream, tmp_path), extra_env={"MCP_TOKEN": MCP_TOKEN})
    _, key = await gw.create_key(name="k", permissions=SCOPED)
    h = await session(gw, key)
    body = (
        b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"query":"\\ud800"}}},'
        b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_everything","arguments":{}}}]'
    )
    r = await gw.proxy.post("/mcp/tools", data=body, headers=h)
    assert r.status != 500, await r.text()
    sent = upstream.rec.requests[-1].body
    assert b'"query":"\\ud800"' in sent and b"delete_everything" not in sent


HOSTILE_LIST = (
    b'{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"sea\\ud800rch","description":"x\\udfff",'
    b'"inputSchema":{"type":"object"}},{"name":"search","description":"d\\ud800","inputSchema":{"type":"object"}}]}}'
)


@pytest.mark.parametrize("answer", ["json", "sse"])
@pytest.mark.parametrize("scoped", [False, True], ids=["every tool", "one tool"])
async def test_an_upstreams_lone_surrogates_in_a_tool_list_are_relayed_not_a_500(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, answer: str, scoped: bool
) -> None:
    """A hostile (or sloppy) upstream answers ``tools/list`` with lone surrogates in a name and in
    descriptions (JSON's ``\\ud800``, which Python's json reads). The list is re-serialised for a key
    limited to some tools, and the name is looked up for every key: neither may turn the upstream's own
    answer into a 500. A key with every tool gets the names as the upstream wrote them; a key allowed
    ``search`` only gets ``search`` alone, its description still escaped as sent."""
    from aiohttp import web

    async def post(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("method") != "tools/list":
            return web.json_response({"jsonrpc": "2.0", "id": body.get("id"), "result": {}})
        if answer == "json":
            return web.Response(body=HOSTILE_LIST, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"event: message\ndata: " + HOSTILE_LIST + b"\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/mcp", post)
    up = await aiohttp_server(app)
    cfg = base_config("http://unused", tmp_path)
    cfg["upstreams"] = [{"id": "h", "kind": "mcp", "url": str(up.make_url("/mcp")), "path_prefix": "/mcp/h"}]
    gw = await make_sidecar(cfg)
    _, key = await gw.create_key(name="k", permissions=SCOPED if scoped else {"upstreams": ["*"]})
    r = await gw.proxy.post(
        "/mcp/h", json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, headers={**ACCEPT, **bearer(key)}
    )
    text = await r.text()
    assert r.status == 200, text
    (msg,) = answer_messages(text)
    names = [t["name"] for t in msg["result"]["tools"]]
    assert names == (["search"] if scoped else ["sea\ud800rch", "search"]), text
    assert msg["result"]["tools"][-1]["description"] == "d\ud800"
