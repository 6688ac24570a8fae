"""A replayed ``tools/list`` answer on a worker that never saw the request (issue 19 §3, ``cacheScope``).

Through the sidecar a list depends on the key, so an upstream's ``cacheScope: "public"`` is
turned into ``"private"`` for every key (a client cache shared across authorization contexts
must not serve one key's list to another). The worker that forwarded the ``tools/list`` knows
its id and rewrites the answer; a resumption (``GET`` with ``Last-Event-ID``) that lands on
another worker replays the answer there, where a key without MCP limits had its stream passed
byte for byte: ``"public"`` went through. A session's GET stream now reads any list it carries
for a ``public`` scope, whoever's key it is.
"""

from __future__ import annotations

import json

from sidecar.upstreams.mcp.authz import McpAccess
from sidecar.upstreams.mcp.filter import Policy, SseRewriter

TOOLS = [{"name": n, "inputSchema": {}} for n in ("search", "delete_everything")]


def frames(*msgs: dict[str, object]) -> bytes:
    return b"".join(b"id: e%d\nevent: message\ndata: %s\n\n" % (i, json.dumps(m).encode()) for i, m in enumerate(msgs))


def data(out: bytes) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: ")]


def test_a_replayed_public_list_is_private_for_every_key() -> None:
    replay = {"jsonrpc": "2.0", "id": 7, "result": {"tools": TOOLS, "cacheScope": "public", "ttlMs": 60000}}
    note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "public"}}
    for access in (McpAccess(), McpAccess(tools=("search",))):  # unlimited and limited keys alike
        out = SseRewriter(Policy(access, by_shape=True)).feed(frames(replay, note))
        got = data(out)
        assert got[0]["result"]["cacheScope"] == "private", access  # type: ignore[index]
        assert got[1] == note  # a notification that merely says "public" is not a list
    plain = frames({"jsonrpc": "2.0", "id": 8, "result": {"tools": TOOLS}})
    assert SseRewriter(Policy(McpAccess(), by_shape=True)).feed(plain) == plain  # nothing to change: byte for byte
