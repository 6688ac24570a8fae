"""Per-tool limits under a glob when the name bound is per worker (issue 19 §3 with §1).

Each worker bounds the glob-matched names that get a bucket of their own
(``toollimits.MAX_TOOL_BUCKETS``); names past the bound counted only in the glob's shared
bucket. The buckets are the host's, the bound is not. Hole found: under ``"delete_*": 1/hour``
a key called ``delete_everything`` on one worker (its own bucket), filled the other worker's
bound with made-up names (each a call of its own), and called ``delete_everything`` there
again: the shared bucket let it through, a second call within the hour. One process had the
same gap over time (fill the bound, call through the shared bucket, call again once the
made-up names' slots lapse). A name past the bound now counts in the shared bucket *and* its
own. Two ``ToolLimiter``s on one limiter are two workers on one host's buckets.
"""

from __future__ import annotations

from pathlib import Path

from conftest import MakeSidecar, base_config

from sidecar.upstreams.mcp import toollimits
from sidecar.upstreams.mcp.gateway import McpGateway
from sidecar.upstreams.mcp.toollimits import ToolLimiter


async def test_a_tools_budget_is_one_whichever_worker_counts_it(make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    cfg = base_config("http://127.0.0.1:9", tmp_path)
    cfg["upstreams"] = [
        {"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:9/mcp", "path_prefix": "/mcp/tools",
         "mcp": {"tool_limits": {"delete_*": "1/hour"}}},
    ]  # fmt: skip
    gw = await make_sidecar(cfg)
    attacker, _ = await gw.create_key(name="attacker")
    gateway = gw.sc.mcp
    assert isinstance(gateway, McpGateway)
    upstream = next(u for u in gw.config.upstreams if u.id == "tools")
    first, second = gateway.tool_limits, ToolLimiter(gw.sc.limiter)  # two workers, one host's buckets
    assert await first.check(attacker, upstream, [(0, "delete_everything")]) == {}
    junk = [(i, f"delete_junk_{i}") for i in range(toollimits.MAX_TOOL_BUCKETS)]
    assert await second.check(attacker, upstream, junk) == {}  # each made-up name once: the bound is full
    over = await second.check(attacker, upstream, [(0, "delete_everything")])
    assert 0 in over and over[0][1]["code"] == "rate_limit_exceeded"  # its hour's call is spent, on the host
    assert 0 in await first.check(attacker, upstream, [(0, "delete_everything")])
    assert await second.check(attacker, upstream, [(0, "delete_other")]) == {}  # a new name: the shared bucket's call
    assert 0 in await second.check(attacker, upstream, [(0, "delete_more")])  # and only one past the bound
