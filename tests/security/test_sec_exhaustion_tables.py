"""Every in-memory table the sidecar keeps per request, address, key, session or token stays
bounded under a flood (DESIGN invariant 6), and one key's flood never evicts another key's state
where that matters (invariant 4).

Each test floods one structure through its real entry point and asserts the structure's size
afterwards (deterministic, unlike RSS). Where the production bound is large, the module
constant is lowered for the test so the flood stays fast; the code path is the same.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from sidecar.cache.policy import Storable
from sidecar.cache.store import ENTRY_OVERHEAD, EntryStore
from sidecar.console import sessions as console_sessions
from sidecar.console.sessions import SessionStore, SignInThrottle
from sidecar.core.scope import RequestScope
from sidecar.http import accesslog
from sidecar.http.accesslog import AccessLog
from sidecar.oauth.server import Gate
from sidecar.observe import metrics as metrics_mod
from sidecar.observe.metrics import MAX_TOOL_SERIES, Metrics
from sidecar.observe.recent import RecentRequests
from sidecar.upstreams.mcp import sealing
from sidecar.upstreams.mcp.pending import PendingIds
from sidecar.upstreams.mcp.sealing import Sealer
from sidecar.upstreams.mcp.sessions import SessionTable
from sidecar.upstreams.transcode import TranscodeSessions


def scope(**kw: Any) -> RequestScope:
    s = RequestScope(method=kw.pop("method", "POST"), path="/mcp", client_ip=kw.pop("client_ip", "203.0.113.9"))
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def tool_labels(m: Metrics, key: str | None = None) -> set[str]:
    return {
        s.labels["tool"]
        for fam in m.registry.collect()
        for s in fam.samples
        if fam.name == "sidecar_mcp_tool_calls" and (key is None or s.labels["key"] == key)
    }


# --------------------------------------------------------------------------- metrics label cardinality


def test_denied_made_up_tool_names_cannot_use_up_the_tool_labels() -> None:
    """Refusals are free (invariant 12): a key calling tools it may not call, with made-up names,
    must not use up the process-wide tool labels, or every real tool after it reads tool="other"."""
    m = Metrics(CollectorRegistry(), process_metrics=False)
    for i in range(MAX_TOOL_SERIES + 50):
        m.observe(scope(key_id="attacker", upstream="mcp", status=200, error="insufficient_permissions",
                        tool=f"junk-{i}"))  # fmt: skip
        m.observe(scope(key_id="attacker", upstream="mcp", status=429, error="rate_limit_exceeded", tool=f"rl-{i}"))
    m.observe(scope(key_id="victim", upstream="mcp", status=200, tool="search"))
    assert "search" in tool_labels(m, "victim")
    assert len(tool_labels(m, "attacker") - {"other"}) <= metrics_mod.MAX_TOOL_SERIES_PER_KEY


def test_one_key_cannot_claim_every_tool_label() -> None:
    """A key allowed every tool name floods made-up names that go upstream: it gets at most its share
    of the labels, and another key's real tool still gets its own label afterwards."""
    m = Metrics(CollectorRegistry(), process_metrics=False)
    for i in range(MAX_TOOL_SERIES + 50):
        m.observe(scope(key_id="attacker", upstream="mcp", status=200, tool=f"made-up-{i}"))
    assert len(tool_labels(m, "attacker") - {"other"}) <= metrics_mod.MAX_TOOL_SERIES_PER_KEY
    m.observe(scope(key_id="victim", upstream="mcp", status=200, tool="search"))
    assert "search" in tool_labels(m, "victim")
    # every series stays bounded: labels, and the per-key claim bookkeeping
    assert len(m._tools) <= MAX_TOOL_SERIES
    assert len(m.mcp_tool_calls) <= 2 * (MAX_TOOL_SERIES + 1) * 4


def test_keys_past_max_key_series_share_one_label() -> None:
    m = Metrics(CollectorRegistry(), max_key_series=10, process_metrics=False)
    for i in range(1000):
        m.observe(scope(key_id=f"k{i}", upstream="plex", method="GET", status=200))
    keys = {k for (k, _, _, _) in m.series}
    assert len(keys) == 11 and "other" in keys


def test_made_up_methods_fold_into_other() -> None:
    m = Metrics(CollectorRegistry(), process_metrics=False)
    for i in range(1000):
        m.observe(scope(method=f"X{i}", status=405))
    assert len(m.series) == 1


# --------------------------------------------------------------------------- recent requests, console, OAuth gates


def test_recent_requests_bounded_per_key_in_keys_and_in_addresses() -> None:
    r = RecentRequests(per_key=5, max_keys=10, max_events=20, max_ips=30)
    for i in range(2000):
        r.add(scope(key_id=f"k{i % 50}", status=200))
        r.add(scope(client_ip=str(ipaddress.IPv6Address(2**100 + i)), status=401, error="invalid_key"))
    assert len(r.key_ids()) == 10
    assert all(len(r.for_key(k)) <= 5 for k in r.key_ids())
    assert len(r.failures) == 20 and len(r.failures_by_ip) == 30


def test_console_sign_in_throttle_and_sessions_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console_sessions, "MAX_TRACKED", 100)
    t = SignInThrottle(5, clock=lambda: 0.0)
    for i in range(5000):
        t.fail(f"198.51.{i // 256 % 256}.{i % 256}")
    assert len(t._failures) <= 100
    store = SessionStore(idle=60, lifetime=3600, max_sessions=50, clock=lambda: 0.0)
    sid, _ = store.create("operator")
    for _ in range(1000):
        store.create("token-guesser-who-signed-in")
    assert len(store) == 50
    assert store.get(sid) is not None, "the flooding actor dropped its own sessions, not the operator's"


def test_oauth_gate_tracks_bounded_addresses_and_counts_ipv6_per_64() -> None:
    g = Gate(3, clock=lambda: 0.0)
    # one /64: every address in it is one client
    assert [g.allow(str(ipaddress.IPv6Address((0x20010DB8 << 96) + i))) for i in range(5)] == [True] * 3 + [False] * 2
    for i in range(5000):
        g.allow(str(ipaddress.IPv6Network(((0x20010DB8 << 96) + (i << 64), 64)).network_address))
    assert len(g._seen) <= 100_000


# --------------------------------------------------------------------------- sessions and ids


def test_mcp_sessions_one_key_opening_many_never_evicts_another_keys() -> None:
    t = SessionTable(limit=50_000, per_key=500)
    t.bind("mcp", "streamable", "victim-session", "victim")
    for i in range(20_000):
        t.bind("mcp", "streamable", f"s{i}", "attacker")
    assert len(t._items) == 501 and len(t._by_owner["attacker"]) == 500
    assert t.get("mcp", "streamable", "victim-session") is not None


def test_pending_ids_are_bounded_whatever_the_ids() -> None:
    p = PendingIds(limit=64)
    for i in range(10_000):
        p.add(i)
        p.add("same")
    assert len(p) <= 64 and len(p._ids) <= 64


def test_sealed_session_memo_is_bounded_and_garbage_is_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealing, "MEMO", 100)
    s = Sealer.random()
    for i in range(1000):
        with pytest.raises(Exception):  # noqa: B017 - NotFound: garbage does not open
            s.unseal("mcp", f"garbage{i}")
    assert s._opened == {}
    for i in range(1000):
        s.unseal("mcp", s.seal("mcp", "k", f"sid{i}"))
    assert len(s._opened) <= 100


def test_transcode_sessions_per_key_and_another_keys_survive() -> None:
    t = TranscodeSessions(max_sessions=1000, per_key=100, clock=lambda: 0.0)
    t.claim(["victim-session"], "victim", "127.0.0.1")
    for i in range(5000):
        t.claim([f"a{i}"], "attacker", "127.0.0.1")
    assert len(t) == 101
    assert t.owner("victim-session") == "victim"


def test_mcp_sessions_many_keys_filling_the_table_evict_their_own() -> None:
    """Past the global bound, the session that goes is the biggest holder's oldest: keys of one
    owner flooding together cannot push out a key that holds one session (invariant 4)."""
    t = SessionTable(limit=100, per_key=50)
    t.bind("mcp", "streamable", "victim-session", "victim")
    for k in range(10):
        for i in range(50):
            t.bind("mcp", "streamable", f"a{k}-{i}", f"attacker{k}")
    assert len(t._items) == 100
    assert t.get("mcp", "streamable", "victim-session") is not None


# --------------------------------------------------------------------------- the response cache, the access log


def test_cache_of_tiny_vary_variants_stays_within_its_byte_budget() -> None:
    """Vary: User-Agent and a new User-Agent per request: each variant is charged its overhead,
    so 20 000 one-byte answers never hold more than max_bytes / ENTRY_OVERHEAD entries."""
    store = EntryStore(64 * 1024, clock=lambda: 0.0)
    verdict = Storable(ttl=60, stale_while_revalidate=0, stale_if_error=0, vary=("user-agent",))
    for i in range(20_000):
        client: CIMultiDict[str] = CIMultiDict({"User-Agent": f"bot-{i}"})
        store._store(("plex", "/library"), "plex", "/library", 200, CIMultiDict(), b"x", verdict, client, b"tok")
    assert store.size <= 64 * 1024
    assert len(store) <= 64 * 1024 // ENTRY_OVERHEAD
    assert len(store._per_primary) == 1 and len(store._variants) == 1


def test_access_log_pending_lines_stay_bounded(tmp_path: Path) -> None:
    async def flood() -> int:
        log = AccessLog(str(tmp_path / "access.log"))
        peak = 0
        for i in range(5000):
            log.write(scope(key_id="k", status=200, path="/" + "p" * 8000 + str(i)))
            peak = max(peak, len(log._pending))
        log.close()
        return peak

    assert asyncio.run(flood()) < accesslog.MAX_PENDING
    lines = (tmp_path / "access.log").read_bytes().splitlines()
    assert len(lines) == 5000 and max(map(len, lines)) < accesslog.MAX_LINE
