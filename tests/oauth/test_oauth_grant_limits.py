"""A grant is a child key: the same limits as its parent *now*, spent from the parent's budget.

The attacker holds a grant (an OAuth client's tokens). The operator lowers the parent key's
limits after the grant was made (abuse seen): the grant must slow down with it. And a person
with one key must not multiply its rate by approving many clients: every grant of a key spends
from the key's own buckets and quota counter. Each test asserts what the client sees."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_TOKEN, Running
from mcp_server import McpUpstream
from mcp_support import call as call_tool
from oauth_support import free_port, oauth_config
from oauth_support import start_sidecar as start
from pg_support import pg_dsn, pg_server
from test_oauth_refusals import ACCEPT, INIT, PERMS, Clock, call, tokens

from sidecar.app import Sidecar

__all__ = ["pg_dsn", "pg_server"]  # the fixtures, re-exported for pytest

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def clock() -> Clock:
    return Clock()  # frozen: buckets do not refill during a test


@pytest.fixture
async def gw(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], clock: Clock
) -> Running:
    cfg = oauth_config(upstream, tmp_path, free_port(), access_token_ttl="10m")
    return await start(aiohttp_client, cfg, tmp_path, started, clock=clock)


async def patch(gw: Running, key_id: str, fields: dict[str, Any], status: int = 200) -> dict[str, Any]:
    r = await gw.admin.patch(f"/admin/keys/{key_id}", json=fields, headers=ADMIN)
    body = dict(await r.json())
    assert r.status == status, body
    return body


async def codes(gw: Running, access: str, n: int) -> list[Any]:
    """``n`` requests with the token: the status, or the error code of a refusal."""
    out: list[Any] = []
    for _ in range(n):
        r = await call(gw, access)
        out.append(r.status if r.status == 200 else (r.status, (await r.json())["error"]["code"]))
        if r.status == 200:
            await r.read()
    return out


@pytest.mark.parametrize(
    ("fields", "lowered", "code"),
    [
        ({"rate_limits": ["100/minute"]}, {"rate_limits": ["2/minute"]}, "rate_limit_exceeded"),
        ({"quota": "100/day"}, {"quota": "2/day"}, "quota_exceeded"),
    ],
)
async def test_a_grant_slows_down_when_its_parent_is_lowered_after_the_exchange(
    gw: Running, fields: dict[str, Any], lowered: dict[str, Any], code: str
) -> None:
    parent, key = await gw.create_key(permissions=PERMS, **fields)
    _, answer = await tokens(gw, key)
    await patch(gw, parent.id, lowered)  # PATCH /admin/keys/{id}: the admin API refreshes its table
    assert await codes(gw, answer["access_token"], 3) == [200, 200, (429, code)]


async def test_the_grants_of_one_key_spend_from_the_keys_own_budget(gw: Running) -> None:
    """Two clients approved with one key of 3/minute: together (and with the key itself) they get 3
    requests, not 3 each."""
    _, key = await gw.create_key(permissions=PERMS, rate_limits=["3/minute"])
    _, a = await tokens(gw, key)
    _, b = await tokens(gw, key)
    assert await codes(gw, a["access_token"], 1) == [200]
    assert await codes(gw, b["access_token"], 1) == [200]
    assert await codes(gw, a["access_token"], 1) == [200]
    assert await codes(gw, b["access_token"], 1) == [(429, "rate_limit_exceeded")]
    r = await gw.proxy.post("/mcp/tools", json=INIT, headers={**ACCEPT, "Authorization": f"Bearer {key}"})
    assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limit_exceeded"


async def test_a_grants_quota_is_its_parents_quota(gw: Running) -> None:
    """The quota counter is the parent's: what the grant spent shows (and is reset) on the parent."""
    parent, key = await gw.create_key(permissions=PERMS, quota="3/day")
    _, answer = await tokens(gw, key)
    assert await codes(gw, answer["access_token"], 3) == [200, 200, 200]
    r = await gw.admin.get(f"/admin/keys/{parent.id}", headers=ADMIN)
    assert [s["used"] for s in (await r.json())["data"]["quota_status"]] == [3]
    assert await codes(gw, answer["access_token"], 1) == [(429, "quota_exceeded")]
    r = await gw.admin.post(f"/admin/keys/{parent.id}/quota", json={"used": 0}, headers=ADMIN)
    assert r.status == 200, await r.text()
    assert await codes(gw, answer["access_token"], 1) == [200]


async def test_a_grants_own_limits_cannot_be_edited_apart_from_its_parents(gw: Running) -> None:
    """Its limits are its parent's: an edit of them on the grant would be a limit that does not
    hold, so it is refused (409) and the parent's are what counts; other fields can still change."""
    parent, key = await gw.create_key(permissions=PERMS, rate_limits=["2/minute"])
    _, answer = await tokens(gw, key)
    (grant,) = [r for r in await gw.sc.store.list_keys() if r.parent_id == parent.id]
    for fields in ({"rate_limits": ["100/minute"]}, {"quota": "5/day"}, {"concurrency": 9}):
        err = await patch(gw, grant.id, fields, status=409)
        assert err["error"]["code"] == "conflict" and "parent" in err["error"]["message"], err
    same = {"name": "renamed", "rate_limits": list(grant.rate_limits), "quota": None, "concurrency": None}
    assert (await patch(gw, grant.id, same))["data"]["name"] == "renamed"  # the console's form sends them all
    assert await codes(gw, answer["access_token"], 3) == [200, 200, (429, "rate_limit_exceeded")]


async def test_a_lowered_parent_reaches_the_grant_on_another_replica(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], pg_dsn: str
) -> None:
    """Postgres fleet: the parent is lowered on replica A; replica B, which serves the grant, holds it
    to the new limit as soon as it has polled the change (within its poll interval)."""
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = {
            **oauth_config(upstream, tmp_path / name, free_port()),
            "store": {"kind": "postgres", "poll_interval": "100ms"},
        }
        replicas.append(
            await start(aiohttp_client, cfg, tmp_path / name, started, extra_env={"SIDECAR_DATABASE_URL": pg_dsn})
        )
    a, b = replicas
    parent, key = await a.create_key(permissions=PERMS, rate_limits=["100/minute"])
    _, answer = await tokens(a, key)
    assert await codes(b, answer["access_token"], 1) == [200]
    await patch(a, parent.id, {"rate_limits": ["1/hour"]})
    deadline = time.monotonic() + 5
    while b.sc.verifier.table[parent.id].rate_limits != ("1/hour",):  # B's own poll, as for any key change
        assert time.monotonic() < deadline, "replica B never saw the parent's change"
        await asyncio.sleep(0.05)
    # at 1/hour a request is a full hour's bucket: the second in a row is refused, whatever time passed
    assert (await codes(b, answer["access_token"], 2))[1] == (429, "rate_limit_exceeded")


async def test_the_admin_api_shows_a_grant_with_the_limits_that_hold_for_it(gw: Running) -> None:
    """The grant's record keeps the copy made at the exchange; what the admin sees is its parent's
    current limits and the parent's quota counter, which is what the grant is held to."""
    parent, key = await gw.create_key(permissions=PERMS, rate_limits=["100/minute"], quota="100/day")
    _, answer = await tokens(gw, key)
    (grant,) = [r for r in await gw.sc.store.list_keys() if r.parent_id == parent.id]
    await patch(gw, parent.id, {"rate_limits": ["5/minute"], "quota": "4/day"})
    assert await codes(gw, answer["access_token"], 2) == [200, 200]
    r = await gw.admin.get(f"/admin/keys/{grant.id}", headers=ADMIN)
    shown = (await r.json())["data"]
    assert shown["rate_limits"] == ["5/minute"] and shown["quota"] == "4/day"
    assert [(s["quota"], s["used"]) for s in shown["quota_status"]] == [("4/day", 2)]
    r = await gw.admin.get("/admin/keys", headers=ADMIN)
    (listed,) = [k for k in (await r.json())["data"] if k["id"] == grant.id]
    assert listed["rate_limits"] == ["5/minute"] and listed["quota"] == "4/day"


async def test_grants_share_their_parents_per_tool_budget(
    aiohttp_client: Any, upstream: McpUpstream, tmp_path: Path, started: list[Sidecar], clock: Clock
) -> None:
    """Attack: per-tool limits (``tool_limits: {search: [2/minute]}``) counted per grant id would be
    N grants, N times the tool's rate. They are counted on the parent's budget: two grants and the
    key itself get 2 searches a minute together."""
    from mcp_support import session

    from sidecar.upstreams.mcp.jsonrpc import TOOL_RATE_LIMITED

    cfg = oauth_config(upstream, tmp_path, free_port(), access_token_ttl="10m")
    cfg["upstreams"][0]["mcp"] = {"tool_limits": {"search": ["2/minute"]}}
    gw = await start(aiohttp_client, cfg, tmp_path, started, clock=clock)
    _, key = await gw.create_key(permissions=PERMS)
    _, a = await tokens(gw, key)
    _, b = await tokens(gw, key)
    answers = []
    for rid, credential in enumerate((a["access_token"], b["access_token"], key)):
        h = await session(gw, credential)
        r = await gw.proxy.post("/mcp/tools", json=call_tool(rid, "search", query="q"), headers=h)
        assert r.status == 200, await r.text()
        text = (await r.text()).replace("\r\n", "\n")
        answers.append(json.loads(text.split("data:", 1)[1].split("\n\n")[0]) if "data:" in text else json.loads(text))
    assert ["result" in x for x in answers] == [True, True, False]
    assert answers[2]["error"]["code"] == TOOL_RATE_LIMITED
