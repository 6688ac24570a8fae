"""Prometheus metrics: exact values after known traffic through a real sidecar, bounded labels,
key states that follow the clock, requests recorded exactly once (websockets, disconnects),
and ``/metrics`` only on the admin listener.

Values are read the way Prometheus reads them: the admin listener's ``/metrics`` text,
parsed with ``prometheus_client.parser``. Unit tests of ``Metrics`` itself use a fresh
``CollectorRegistry`` and ``get_sample_value``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, PLEX_TOKEN, MakeSidecar, Running, base_config
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.auth.keys import generate_key
from sidecar.auth.models import KeyRecord
from sidecar.core.scope import RequestScope
from sidecar.observe.metrics import DURATION_BUCKETS, MAX_TOOL_SERIES, MAX_TOOL_SERIES_PER_KEY, Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
DEADLINE = 10.0


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def scrape(r: Running) -> Samples:
    """``/metrics`` once no request is in flight (the record is written as a request ends)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        resp = await r.admin.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = parse(await resp.text())
        if get(samples, "sidecar_in_flight_requests") == 0 or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.02)


async def wait_for_value(r: Running, name: str, want: float, /, **labels: str) -> Samples:
    deadline = time.monotonic() + DEADLINE
    while True:
        samples = await scrape(r)
        if get(samples, name, **labels) == want or time.monotonic() > deadline:
            assert get(samples, name, **labels) == want, (name, labels, series(samples, name))
            return samples
        await asyncio.sleep(0.02)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def plex_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


# ---------------------------------------------------------------- through a sidecar


async def test_exact_counts_after_known_traffic(plex_sidecar: Running) -> None:
    r = plex_sidecar
    alice, key_a = await r.create_key(name="alice", owner="team-a")
    bob, key_b = await r.create_key(name="bob")
    sent_a = 0
    for _ in range(3):
        resp = await r.proxy.get("/library/sections", headers={"X-Plex-Token": key_a})
        assert resp.status == 200
        sent_a += len(await resp.read())
    resp = await r.proxy.get("/nope", headers={"Authorization": f"Bearer {key_a}"})
    assert resp.status == 404  # the upstream's own 404
    sent_a += len(await resp.read())
    for _ in range(2):
        resp = await r.proxy.get("/identity", params={"X-Plex-Token": key_b})
        assert resp.status == 200
    for _ in range(2):
        assert (await r.proxy.get("/library/sections")).status == 401
    typo = key_a[:20] + ("1" if key_a[20] != "1" else "2") + key_a[21:]
    resp = await r.proxy.get("/library/sections", headers={"x-api-key": typo})
    assert (await resp.json())["error"]["code"] == "invalid_key"
    resp = await r.proxy.get("/library/sections", headers={"x-api-key": generate_key("pmcp_")[0]})
    assert (await resp.json())["error"]["code"] == "invalid_key"

    s = await scrape(r)
    a, b = alice.id, bob.id
    assert get(s, "sidecar_requests_total", key=a, upstream="plex", method="GET", code="200") == 3
    assert get(s, "sidecar_requests_total", key=a, upstream="plex", method="GET", code="404") == 1
    assert get(s, "sidecar_requests_total", key=b, upstream="plex", method="GET", code="200") == 2
    unauth = {k: v for k, v in series(s, "sidecar_requests_total").items() if ("key", "") in k}
    assert sum(unauth.values()) == 4  # no key (2), a mistyped key, a well-formed unknown key
    assert get(s, "sidecar_auth_failures_total", reason="unauthorized") == 2
    assert get(s, "sidecar_auth_failures_total", reason="invalid_key") == 2
    assert get(s, "sidecar_auth_failures_total", reason="insufficient_permissions") == 0
    failures = sum(series(s, "sidecar_auth_failures_total").values())
    assert failures == 4
    assert get(s, "sidecar_response_bytes_total", key=a, upstream="plex") == sent_a
    assert get(s, "sidecar_request_duration_seconds_count", upstream="plex") == 10
    assert get(s, "sidecar_upstream_duration_seconds_count", upstream="plex") == 6  # only what reached Plex
    assert get(s, "sidecar_request_duration_seconds_bucket", upstream="plex", le="+Inf") == 10
    assert get(s, "sidecar_key_info", key=a, name="alice", owner="team-a") == 1
    assert get(s, "sidecar_key_info", key=b, name="bob", owner="") == 1
    assert get(s, "sidecar_keys", state="active") == 2
    assert get(s, "sidecar_keys", state="expired") == 0
    assert get(s, "sidecar_keys", state="revoked") == 0
    assert get(s, "sidecar_in_flight_requests") == 0
    # Only verified keys get per-key series: nothing was created for the unknown key.
    keys_seen = {dict(k)["key"] for k in series(s, "sidecar_requests_total")}
    assert keys_seen == {a, b, ""}


async def test_request_bytes_and_unusual_methods(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    async def upload(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"got {len(body)}")

    app = web.Application()
    app.router.add_route("*", "/upload", upload)
    upstream = await aiohttp_server(app)
    r = await make_sidecar(base_config(plex_url(upstream), tmp_path))
    rec, key = await r.create_key()
    body = b"x" * 300_000
    resp = await r.proxy.post("/upload", data=body, headers={"X-Plex-Token": key})
    assert await resp.text() == "got 300000"
    resp = await r.proxy.request("PROPFIND", "/upload", data=b"abc", headers={"X-Plex-Token": key})
    assert await resp.text() == "got 3"
    resp = await r.proxy.request("MKCOL", "/upload", headers={"X-Plex-Token": key})
    assert resp.status == 200

    s = await scrape(r)
    assert get(s, "sidecar_request_bytes_total", key=rec.id, upstream="plex") == 300_003
    assert get(s, "sidecar_response_bytes_total", key=rec.id, upstream="plex") == len("got 300000got 3got 0")
    assert get(s, "sidecar_requests_total", key=rec.id, upstream="plex", method="POST", code="200") == 1
    # Methods are a bounded label: anything outside the standard set is "other".
    assert get(s, "sidecar_requests_total", key=rec.id, upstream="plex", method="other", code="200") == 2


async def test_metrics_only_on_the_admin_listener(
    make_sidecar: MakeSidecar, plex_sidecar: Running, plex_upstream: TestServer, tmp_path: Path
) -> None:
    r = plex_sidecar
    _, key = await r.create_key()
    # No key: the proxy treats /metrics like any other path (401), never the exposition.
    resp = await r.proxy.get("/metrics")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "unauthorized"
    # With a key it is proxied to the upstream (which has no such page), not answered by the sidecar.
    resp = await r.proxy.get("/metrics", headers={"X-Plex-Token": key})
    assert resp.status == 404
    text = await resp.text()
    assert "sidecar_requests_total" not in text and "# TYPE" not in text
    from sidecar.demo import SEEN

    assert any(str(seen["path"]).startswith("/metrics") for seen in plex_upstream.app[SEEN])
    # No upstream at "/": /metrics is simply no route.
    (tmp_path / "other").mkdir()
    cfg = base_config(plex_url(plex_upstream), tmp_path / "other")
    cfg["upstreams"][0]["path_prefix"] = "/plex"
    other = await make_sidecar(cfg)
    resp = await other.proxy.get("/metrics")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "no_route"
    # The admin listener serves it.
    resp = await r.admin.get("/metrics")
    assert resp.status == 200
    assert "# TYPE sidecar_requests_total counter" in await resp.text()


async def test_no_secret_in_the_exposition(plex_sidecar: Running) -> None:
    r = plex_sidecar
    rec, key = await r.create_key(name="carol", owner="ops")
    await r.proxy.get("/library/sections", params={"X-Plex-Token": key})
    await r.proxy.get("/library/sections", headers={"Authorization": f"ApiKey {key}"})
    await r.proxy.get("/library/sections", headers={"X-Plex-Token": key + "0"})
    text = (await (await r.admin.get("/metrics")).read()).decode()
    stored = await r.sc.store.get(rec.id)
    assert stored is not None
    secret_body = key.removeprefix("pmcp_")
    for secret in (key, secret_body, stored.hash, stored.hash.rsplit("$", 1)[-1], PLEX_TOKEN, ADMIN_TOKEN):
        assert secret not in text
    assert rec.id in text  # the id is what labels carry


async def test_cardinality_cap_folds_keys_into_other(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    r = await make_sidecar(base_config(plex_url(plex_upstream), tmp_path, metrics={"max_key_series": 2}))
    keys = [await r.create_key(name=f"k{i}") for i in range(4)]
    for i, (_, key) in enumerate(keys):
        for _ in range(i + 1):
            assert (await r.proxy.get("/identity", headers={"X-Plex-Token": key})).status == 200
    s = await scrape(r)
    reqs = {dict(k)["key"]: v for k, v in series(s, "sidecar_requests_total").items()}
    assert reqs == {keys[0][0].id: 1, keys[1][0].id: 2, "other": 3 + 4}
    assert {dict(k)["key"] for k in series(s, "sidecar_response_bytes_total")} == {
        keys[0][0].id,
        keys[1][0].id,
        "other",
    }
    assert len(series(s, "sidecar_key_info")) == 2
    assert get(s, "sidecar_keys", state="active") == 4


async def test_key_states_follow_the_clock(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    clock = Clock()
    r = await make_sidecar(base_config(plex_url(plex_upstream), tmp_path), clock=clock)
    soon, _ = await r.create_key(name="soon", expires="1h")
    later, _ = await r.create_key(name="later", expires="30d")
    forever, _ = await r.create_key(name="forever")
    gone, _ = await r.create_key(name="gone")
    await r.sc.manager().revoke(gone.id, "test")
    await r.sc.verifier.refresh()

    s = await scrape(r)
    assert get(s, "sidecar_keys", state="active") == 3
    assert get(s, "sidecar_keys", state="revoked") == 1
    assert get(s, "sidecar_key_expires_timestamp_seconds", key=soon.id) == pytest.approx(clock.now + 3600)
    assert get(s, "sidecar_key_expires_timestamp_seconds", key=later.id) == pytest.approx(clock.now + 30 * 86400)
    assert get(s, "sidecar_key_expires_timestamp_seconds", key=forever.id) is None

    clock.now += 2 * 3600  # nothing changes in the store: the next scrape still sees the expiry
    s = await scrape(r)
    assert get(s, "sidecar_keys", state="active") == 2
    assert get(s, "sidecar_keys", state="expired") == 1
    assert get(s, "sidecar_key_expires_timestamp_seconds", key=soon.id) is None  # so "expires soon" alerts resolve
    assert get(s, "sidecar_key_info", key=soon.id, name="soon", owner="") == 1


async def test_websocket_recorded_once_with_bytes_both_ways(plex_sidecar: Running) -> None:
    r = plex_sidecar
    rec, key = await r.create_key()
    async with r.proxy.ws_connect("/:/websockets/notifications", params={"X-Plex-Token": key}) as ws:
        hello = await ws.receive()
        assert hello.type == WSMsgType.TEXT
        await ws.send_str("ping-1234")
        echo = await ws.receive()
        assert echo.data == "ping-1234"
        s = parse(await (await r.admin.get("/metrics")).text())
        assert get(s, "sidecar_in_flight_requests") == 1
    s = await wait_for_value(r, "sidecar_requests_total", 1, key=rec.id, upstream="plex", method="GET", code="101")
    assert get(s, "sidecar_request_bytes_total", key=rec.id, upstream="plex") == len("ping-1234")
    assert get(s, "sidecar_response_bytes_total", key=rec.id, upstream="plex") == len(hello.data) + len("ping-1234")
    assert sum(series(s, "sidecar_requests_total").values()) == 1


def access_lines(r: Running, path: str) -> list[dict[str, Any]]:
    r.sc.access_log.flush()
    log = Path(r.config.log.access).read_text().splitlines()
    return [e for e in map(json.loads, log) if e["path"].startswith(path)]


async def test_client_disconnects_recorded_once(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    async def drip(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first chunk")
        await release.wait()
        return resp

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/drip", drip)
    upstream = await aiohttp_server(app)
    r = await make_sidecar(base_config(plex_url(upstream), tmp_path))
    rec, key = await r.create_key()
    headers = {"X-Plex-Token": key}

    # Gone before the upstream answered: nothing was sent, so 499.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r.proxy.get("/slow", headers=headers), 0.3)
    await wait_for_value(r, "sidecar_requests_total", 1, key=rec.id, upstream="plex", method="GET", code="499")

    # Gone mid-stream: the 200 went out and stays the status; the log says why it was cut.
    resp = await r.proxy.get("/drip", headers=headers)
    assert resp.status == 200
    assert await resp.content.readexactly(len(b"first chunk")) == b"first chunk"
    resp.close()
    s = await wait_for_value(r, "sidecar_requests_total", 1, key=rec.id, upstream="plex", method="GET", code="200")
    release.set()
    assert get(s, "sidecar_response_bytes_total", key=rec.id, upstream="plex") == len(b"first chunk")

    # Exactly once each, in metrics and in the access log.
    s = await scrape(r)
    assert sum(series(s, "sidecar_requests_total").values()) == 2
    assert [(e["status"], e.get("error")) for e in access_lines(r, "/slow")] == [(499, "client_disconnected")]
    assert [(e["status"], e.get("error")) for e in access_lines(r, "/drip")] == [(200, "client_disconnected")]


async def test_upstream_up(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again below: nothing listens there
    cfg = base_config(plex_url(plex_upstream), tmp_path)
    cfg["upstreams"].append(
        {"id": "dead", "kind": "plex", "url": dead, "token_env": "PLEX_TOKEN", "path_prefix": "/dead"}
    )
    r = await make_sidecar(cfg)
    # The start-up probe tells both apart before any request.
    await wait_for_value(r, "sidecar_upstream_up", 1, upstream="plex")
    await wait_for_value(r, "sidecar_upstream_up", 0, upstream="dead")
    _, key = await r.create_key()
    resp = await r.proxy.get("/dead/identity", headers={"X-Plex-Token": key})
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    s = await scrape(r)
    assert get(s, "sidecar_upstream_up", upstream="dead") == 0
    assert get(s, "sidecar_upstream_duration_seconds_count", upstream="dead") == 0
    assert get(s, "sidecar_request_duration_seconds_count", upstream="dead") == 1


async def test_rate_limited_and_quota_per_key(plex_sidecar: Running) -> None:
    r = plex_sidecar
    limited, key_l = await r.create_key(name="limited", rate_limits=["2/minute"])
    quota, key_q = await r.create_key(name="quota", quota="1/month")
    codes_l = [(await r.proxy.get("/identity", headers={"X-Plex-Token": key_l})).status for _ in range(3)]
    codes_q = [(await r.proxy.get("/identity", headers={"X-Plex-Token": key_q})).status for _ in range(2)]
    assert codes_l == [200, 200, 429]
    assert codes_q == [200, 429]
    s = await scrape(r)
    assert get(s, "sidecar_rate_limited_total", key=limited.id, upstream="plex") == 1
    assert get(s, "sidecar_quota_exceeded_total", key=quota.id, upstream="plex") == 1
    assert get(s, "sidecar_requests_total", key=limited.id, upstream="plex", method="GET", code="429") == 1
    assert get(s, "sidecar_auth_failures_total", reason="unauthorized") == 0
    # The quota gauges behind the "key near its quota" alert; a key's own quota spans all upstreams.
    assert get(s, "sidecar_quota_limit", key=quota.id, upstream="*") == 1
    assert get(s, "sidecar_quota_remaining", key=quota.id, upstream="*") == 0
    assert get(s, "sidecar_quota_limit", key=limited.id, upstream="*") is None  # no quota, no series


async def test_quota_remaining_counts_down(plex_sidecar: Running) -> None:
    r = plex_sidecar
    rec, key = await r.create_key(name="q", quota="10/day")
    for _ in range(3):
        assert (await r.proxy.get("/identity", headers={"X-Plex-Token": key})).status == 200
    s = await scrape(r)
    assert get(s, "sidecar_quota_limit", key=rec.id, upstream="*") == 10
    assert get(s, "sidecar_quota_remaining", key=rec.id, upstream="*") == 7


async def test_cache_results(make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path) -> None:
    cfg = base_config(
        plex_url(plex_upstream), tmp_path, cache={"rules": [{"upstream": "plex", "path": "/identity", "ttl": "60s"}]}
    )
    r = await make_sidecar(cfg)
    _, key = await r.create_key()
    s = await scrape(r)
    # Pre-initialised for an upstream with cache rules, so rate() works from the first scrape.
    assert {dict(k)["result"]: v for k, v in series(s, "sidecar_cache_requests_total").items()} == {
        "hit": 0,
        "miss": 0,
        "bypass": 0,
        "expired": 0,
        "stale": 0,
    }
    statuses = []
    for _ in range(3):
        resp = await r.proxy.get("/identity", headers={"X-Plex-Token": key})
        statuses.append(resp.headers.get("X-Cache-Status"))
    assert statuses == ["MISS", "HIT", "HIT"]
    s = await scrape(r)
    assert get(s, "sidecar_cache_requests_total", upstream="plex", result="miss") == 1
    assert get(s, "sidecar_cache_requests_total", upstream="plex", result="hit") == 2


# ------------------------------------------------------------------ Metrics alone


def scope(**kw: Any) -> RequestScope:
    s = RequestScope(method=kw.pop("method", "GET"), path="/", client_ip="127.0.0.1")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_exposition_matches_generate_latest() -> None:
    """The fast text writer and the registry path say the same thing, escaping included."""
    m = Metrics(CollectorRegistry(), clock=lambda: 1000.0, upstreams=["plex"], cached_upstreams=["plex"])
    odd = 'we"ird\\name\nwith newline'
    m.set_keys([KeyRecord(id="k1", name=odd, hash="$argon2id$x", owner="o", expires_at=5000.0)])
    m.observe(scope(key_id="k1", upstream="plex", status=200, bytes_sent=10, bytes_received=3, cache="HIT"))
    m.observe(scope(key_id="k1", upstream="plex", status=200, upstream_seconds=0.004, tool="search,fetch"))
    m.observe(scope(upstream="plex", status=401, error="unauthorized"))
    m.observe(scope(status=404, error="no_route"))
    m.upstream_up.labels("plex").set(1)
    fast = parse(m.exposition().decode())
    slow = parse(generate_latest(m.registry).decode())
    created = {k for k in slow if k[0].endswith("_created")}
    assert set(fast) == set(slow) - created
    for k, v in fast.items():
        if k[0].startswith("sidecar_"):  # process_* and python_gc_* move between two reads
            assert slow[k] == pytest.approx(v), k
    assert get(fast, "sidecar_key_info", key="k1", name=odd, owner="o") == 1
    assert get(fast, "sidecar_requests_total", key="", upstream="", method="GET", code="404") == 1


def test_histogram_buckets_are_cumulative() -> None:
    m = Metrics(CollectorRegistry(), process_metrics=False)
    for seconds in (0.0003, 0.0005, 0.002, 45.0, 7200.0):
        m.observe(scope(key_id="k", upstream="u", status=200, upstream_seconds=seconds))
    r = m.registry
    get_ = r.get_sample_value
    assert get_("sidecar_upstream_duration_seconds_bucket", {"upstream": "u", "le": "0.0005"}) == 2  # le is <=
    assert get_("sidecar_upstream_duration_seconds_bucket", {"upstream": "u", "le": "0.0025"}) == 3
    assert get_("sidecar_upstream_duration_seconds_bucket", {"upstream": "u", "le": "60.0"}) == 4
    assert get_("sidecar_upstream_duration_seconds_bucket", {"upstream": "u", "le": "3600.0"}) == 4
    assert get_("sidecar_upstream_duration_seconds_bucket", {"upstream": "u", "le": "+Inf"}) == 5
    assert get_("sidecar_upstream_duration_seconds_count", {"upstream": "u"}) == 5
    assert get_("sidecar_upstream_duration_seconds_sum", {"upstream": "u"}) == pytest.approx(7245.0028)
    assert DURATION_BUCKETS[0] <= 0.001 and DURATION_BUCKETS[-1] >= 1800  # fast calls and long streams


def test_labels_stay_bounded() -> None:
    m = Metrics(CollectorRegistry(), max_key_series=1, process_metrics=False)
    get_ = m.registry.get_sample_value
    for i in range(3):
        m.observe(scope(key_id=f"key{i}", upstream="u", status=200))
    for i in range(50):
        m.observe(scope(method=f"X{i}", status=405))
    m.observe(scope(status=0))  # the handler failed before any status: aiohttp answered 500
    assert get_("sidecar_requests_total", {"key": "key0", "upstream": "u", "method": "GET", "code": "200"}) == 1
    assert get_("sidecar_requests_total", {"key": "other", "upstream": "u", "method": "GET", "code": "200"}) == 2
    assert get_("sidecar_requests_total", {"key": "", "upstream": "", "method": "other", "code": "405"}) == 50
    assert get_("sidecar_requests_total", {"key": "", "upstream": "", "method": "GET", "code": "500"}) == 1
    for i in range(MAX_TOOL_SERIES + 10):  # new names come from many keys: one key gets a share (see below)
        m.observe(scope(key_id=f"key{i // MAX_TOOL_SERIES_PER_KEY}", upstream="mcp", status=200, tool=f"tool{i}"))
    tools = {
        s.labels["tool"] for fam in m.registry.collect() for s in fam.samples if fam.name == "sidecar_mcp_tool_calls"
    }
    assert len(tools) == MAX_TOOL_SERIES + 1 and "other" in tools


def test_mcp_tool_outcomes_and_auth_reasons() -> None:
    m = Metrics(CollectorRegistry(), process_metrics=False)
    get_ = m.registry.get_sample_value
    m.observe(scope(key_id="k", upstream="mcp", method="POST", status=200, tool="search"))
    m.observe(scope(key_id="k", upstream="mcp", method="POST", status=200, tool="search,fetch"))  # a batch
    m.observe(scope(key_id="k", upstream="mcp", method="POST", status=403, error="insufficient_permissions",
                    tool="delete"))  # fmt: skip
    m.observe(scope(key_id="k", upstream="mcp", method="POST", status=429, error="rate_limit_exceeded", tool="search"))
    m.observe(scope(key_id="k", upstream="mcp", method="POST", status=502, error="upstream_unavailable", tool="fetch"))
    m.observe(scope(key_id="k", upstream="mcp", method="POST", status=200, error="client_disconnected", tool="fetch"))

    def calls(tool: str, outcome: str) -> float | None:
        return get_("sidecar_mcp_tool_calls_total", {"key": "k", "upstream": "mcp", "tool": tool, "outcome": outcome})

    assert calls("search", "ok") == 2
    assert calls("fetch", "ok") == 2
    assert calls("delete", "denied") == 1
    assert calls("search", "rate_limited") == 1
    assert calls("fetch", "error") == 1
    assert get_("sidecar_auth_failures_total", {"reason": "insufficient_permissions"}) == 1
    assert get_("sidecar_rate_limited_total", {"key": "k", "upstream": "mcp"}) == 1
    assert get_("sidecar_upstream_up", {"upstream": "mcp"}) == 0
    # bad_request is an auth failure before a key is known (two credentials), not after (bad JSON-RPC).
    m.observe(scope(upstream="mcp", status=400, error="bad_request"))
    m.observe(scope(key_id="k", upstream="mcp", status=400, error="bad_request"))
    assert get_("sidecar_auth_failures_total", {"reason": "bad_request"}) == 1
    for reason in ("unauthorized", "invalid_key", "expired_key", "revoked_key", "too_many_failed_attempts"):
        assert get_("sidecar_auth_failures_total", {"reason": reason}) == 0  # pre-initialised
