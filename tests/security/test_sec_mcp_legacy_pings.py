"""Refused calls on a legacy SSE session go up as pings, and pings are bounded per key.

On the legacy transport a refused call's answer must come down the session's event stream,
so the sidecar sends the call up as a ``ping`` and swaps the ping's answer for the refusal.
Refusals spend nothing (DESIGN invariant 12); without a bound a key could make the upstream
answer pings as fast as it can post. Each key (all its sessions) sends at most ``PING_BURST`` at
once and ``PING_RATE`` a second; past that the client gets a 429 and nothing goes up.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeSidecar, Running
from mcp_server import MCP_TOKEN, McpUpstream
from mcp_support import ACCEPT, bearer, call, legacy_stream, mcp_config

from sidecar.auth.models import KeyRecord
from sidecar.upstreams.mcp.jsonrpc import TOOL_FORBIDDEN
from sidecar.upstreams.mcp.legacy import PING_BURST, PING_RATE, PingBudgets, pings_allowed


@pytest.fixture
async def gw(make_sidecar: MakeSidecar, upstream: McpUpstream, tmp_path: Path) -> Running:
    return await make_sidecar(mcp_config(upstream, tmp_path), extra_env={"MCP_TOKEN": MCP_TOKEN})


def pings(upstream: McpUpstream) -> int:
    return upstream.rec.methods().count("ping")


async def test_a_flood_of_refused_calls_costs_the_upstream_a_bounded_number_of_pings(
    gw: Running, upstream: McpUpstream
) -> None:
    _, key = await gw.create_key(name="agent", permissions={"upstreams": ["*"], "tools": {"*": ["search"]}})
    async with legacy_stream(gw, key) as s:
        before = pings(upstream)

        async def refused(rid: int) -> aiohttp.ClientResponse:
            r = await gw.proxy.post(s.endpoint, json=call(rid, "delete_everything"), headers={**ACCEPT, **bearer(key)})
            await r.read()
            return r

        started = time.monotonic()
        answers = await asyncio.gather(*(refused(100 + i) for i in range(3 * PING_BURST)))
        elapsed = time.monotonic() - started
        accepted = [100 + i for i, r in enumerate(answers) if r.status == 202]
        limited = [r for r in answers if r.status == 429]
        assert len(accepted) + len(limited) == 3 * PING_BURST
        assert PING_BURST <= len(accepted) <= PING_BURST + elapsed * PING_RATE + 1
        body = await limited[0].json()
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert "legacy SSE session" in body["error"]["message"]
        assert int(limited[0].headers["Retry-After"]) >= 1
        for rid in sorted(accepted):  # each accepted refusal comes down the stream
            assert (await s.answer(rid))["error"]["code"] == TOOL_FORBIDDEN
        assert pings(upstream) - before == len(accepted)  # the refused 429s sent nothing up

        # A call the key may make is no refusal: it still goes up.
        r = await gw.proxy.post(s.endpoint, json=call(300, "search", query="q"), headers={**ACCEPT, **bearer(key)})
        assert r.status == 202
        assert "result" in await s.answer(300)


async def test_a_batch_over_the_burst_is_refused_at_once_and_spends_nothing(gw: Running, upstream: McpUpstream) -> None:
    _, key = await gw.create_key(
        name="agent", permissions={"upstreams": ["*"], "tools": {"*": ["search"]}}, rate_limits=["4/minute"]
    )
    async with legacy_stream(gw, key) as s:  # the stream, initialize, initialized: 3 of the 4
        before = pings(upstream)
        batch = [call(1, "search", query="q")] + [call(10 + i, "delete_everything") for i in range(PING_BURST + 1)]
        r = await gw.proxy.post(s.endpoint, json=batch, headers={**ACCEPT, **bearer(key)})
        assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limit_exceeded"
        assert pings(upstream) == before and "tools/call" not in upstream.rec.methods()[-1:]
        # Refused whole, so refunded whole: the key's last request of the minute still works.
        r = await gw.proxy.post(s.endpoint, json=call(2, "search", query="q"), headers={**ACCEPT, **bearer(key)})
        assert r.status == 202, await r.text()
        assert "result" in await s.answer(2)


async def test_many_legacy_sessions_of_one_key_share_one_ping_budget(gw: Running, upstream: McpUpstream) -> None:
    """Attack: the bound was per session, and a key may hold hundreds of sessions (each costs one
    request to open): N sessions were N times the pings a second, all of them free. The bound is
    per key now — its budget, so a rotated key's successor and OAuth grants share it too."""
    _, key = await gw.create_key(name="agent", permissions={"upstreams": ["*"], "tools": {"*": ["search"]}})
    async with AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(legacy_stream(gw, key)) for _ in range(3)]
        before = pings(upstream)

        async def refused(endpoint: str, rid: int) -> int:
            r = await gw.proxy.post(endpoint, json=call(rid, "delete_everything"), headers={**ACCEPT, **bearer(key)})
            await r.read()
            return r.status

        started = time.monotonic()
        statuses = await asyncio.gather(
            *(refused(s.endpoint, 100 + 100 * n + i) for n, s in enumerate(streams) for i in range(PING_BURST))
        )
        elapsed = time.monotonic() - started
        assert set(statuses) == {202, 429}
        assert statuses.count(202) <= PING_BURST + elapsed * PING_RATE + 1
        for _ in range(200):  # the accepted ones' pings reach the upstream as their answers come down
            if pings(upstream) - before >= statuses.count(202):
                break
            await asyncio.sleep(0.01)
        assert pings(upstream) - before == statuses.count(202)


def test_the_key_bucket_refills_at_its_rate() -> None:
    budgets = PingBudgets()
    s = budgets.of(KeyRecord(id="k", name="k", hash=""), 100.0)
    successor = KeyRecord(id="k2", name="k", hash="", budget_id="k")
    assert budgets.of(successor, 100.0) is s  # one bucket per budget
    assert pings_allowed(s, PING_BURST, 100.0) == 0.0
    wait = pings_allowed(s, 1, 100.0)
    assert wait == pytest.approx(1 / PING_RATE)
    assert pings_allowed(s, 1, 100.0 + wait) == 0.0  # paid off: one more fits
    assert pings_allowed(s, PING_BURST + 1, 1000.0) > 0  # over the burst is never allowed at once
    assert pings_allowed(s, PING_BURST, 1000.0) == 0.0
