"""An attacker holding one valid key tries to make the sidecar keep unbounded state.

Per-tool rate limits (``upstreams[].mcp.tool_limits``) count each tool a glob matches in its
own bucket. Tool names come from the client: with ``"delete_*": 1/hour`` every made-up
``delete_<random>`` name was a new GCRA bucket that lived an hour, and one POSTed batch of
``tools/call``s (1 MiB: ~15 000 calls) made 15 000 of them. The buckets with a name of their
own are now bounded per (key, upstream); names past the bound share their rule's bucket.

OAuth grants are kept for audit whatever their lifetime: a key approving grants that end at
once could add key records without end; grants approved per key and day are now capped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MakeSidecar, base_config

from sidecar.auth.models import KeyRecord
from sidecar.oauth.grants import GRANTS_TODAY, GrantError, active_grants, create_grant, grant_refusal, grants_per_day
from sidecar.upstreams.mcp import toollimits
from sidecar.upstreams.mcp.gateway import McpGateway

LIMITS = {"search": ["3/minute"], "delete_*": "1/hour", "*": ["100/minute"]}


def config(tmp_path: Path) -> dict[str, object]:
    cfg = base_config("http://127.0.0.1:9", tmp_path)
    cfg["upstreams"] = [
        {"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:9/mcp", "path_prefix": "/mcp/tools",
         "mcp": {"tool_limits": LIMITS}},
    ]  # fmt: skip
    return cfg


async def test_made_up_tool_names_cannot_grow_the_rate_buckets(make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    gw = await make_sidecar(config(tmp_path))
    victim, _ = await gw.create_key(name="victim")
    attacker, _ = await gw.create_key(name="attacker")
    gateway = gw.sc.mcp
    assert isinstance(gateway, McpGateway)
    upstream = next(u for u in gw.config.upstreams if u.id == "tools")
    tats = gw.sc.limiter.memory.tats
    before = len(tats)
    for batch in range(5):  # five 1 MiB batches' worth of made-up names
        calls = [(i, f"delete_{batch}_{i}") for i in range(3000)]
        over = await gateway.tool_limits.check(attacker, upstream, calls)
        # each name past the bound shares the rule's one bucket: 1/hour, so all but one are refused
        assert len(over) >= len(calls) - toollimits.MAX_TOOL_BUCKETS - 1
    assert len(tats) - before <= toollimits.MAX_TOOL_BUCKETS + len(LIMITS)
    # the victim's tools keep buckets of their own, untouched by the attacker's flood
    assert await gateway.tool_limits.check(victim, upstream, [(0, "delete_everything")]) == {}
    assert 0 in await gateway.tool_limits.check(victim, upstream, [(0, "delete_everything")])
    assert await gateway.tool_limits.check(victim, upstream, [(0, "delete_other")]) == {}
    # exact names keep their own budgets for the attacker too
    assert await gateway.tool_limits.check(attacker, upstream, [(0, "search")]) == {}


async def test_one_key_cannot_pile_up_ended_oauth_grants(make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    """A grant's lifetime may be any positive number and grants are never deleted (kept for audit):
    approving grants that end at once kept the active count at 0, so one key could add a key record
    to every process's table ~30 times a minute per address, without end. Grants approved in the
    last day are capped too (``MAX_GRANTS_PER_DAY``, a multiple of ``oauth.max_grants_per_key``)."""
    gw = await make_sidecar(base_config("http://127.0.0.1:9", tmp_path))
    parent, _ = await gw.create_key(name="approver")
    other, _ = await gw.create_key(name="someone else")
    now = gw.sc.clock()
    cap = 20
    per_day = grants_per_day(cap)
    ended = [
        KeyRecord(id=f"g{i:011x}", name="oauth: c", hash="x", display="g", parent_id=parent.id,
                  created_at=now - 60, expires_at=now - 30)
        for i in range(per_day)
    ]  # fmt: skip
    await gw.sc.store.insert(ended)
    await gw.sc.verifier.refresh()
    assert active_grants(gw.sc, parent.id, now) == 0
    assert grant_refusal(gw.sc, parent.id, now, cap) == GRANTS_TODAY
    assert grant_refusal(gw.sc, other.id, now, cap) is None, "another key's grants are its own"
    assert grant_refusal(gw.sc, parent.id, now + 86400 + 1, cap) is None, "a day later the key may approve again"
    # codes approved together, each under the cap, are checked again when they become grants
    spec = {"resource": "plex", "expires_at": now + 60, "client_id": "c"}
    with pytest.raises(GrantError, match="too many OAuth grants"):
        await create_grant(gw.sc, "g" + "f" * 11, parent.id, spec, now)
