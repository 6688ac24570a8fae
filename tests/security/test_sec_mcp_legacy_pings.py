"""Refused calls on a legacy SSE session go up as pings, and pings are bounded per session.

On the legacy transport a refused call's answer must come down the session's event stream,
so the sidecar sends the call up as a ``ping`` and swaps the ping's answer for the refusal.
Refusals spend nothing (DESIGN invariant 12); without a bound a key could make the upstream
answer pings as fast as it can post. Each session sends at most ``PING_BURST`` at once and
``PING_RATE`` a second; past that the client gets a 429 and nothing goes up.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeSidecar, Running
from mcp_server import MCP_TOKEN, McpUpstream
from mcp_support import ACCEPT, bearer, call, legacy_stream, mcp_config

from sidecar.upstreams.mcp.jsonrpc import TOOL_FORBIDDEN
from sidecar.upstreams.mcp.legacy import PING_BURST, PING_RATE, pings_allowed
from sidecar.upstreams.mcp.sessions import McpSession


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


def test_the_session_bucket_refills_at_its_rate() -> None:
    s = McpSession(owner="k")
    assert pings_allowed(s, PING_BURST, 100.0) == 0.0
    wait = pings_allowed(s, 1, 100.0)
    assert wait == pytest.approx(1 / PING_RATE)
    assert pings_allowed(s, 1, 100.0 + wait) == 0.0  # paid off: one more fits
    assert pings_allowed(s, PING_BURST + 1, 1000.0) > 0  # over the burst is never allowed at once
    assert pings_allowed(s, PING_BURST, 1000.0) == 0.0
