"""``sidecar.workers.recent`` on its own: workers' rings merged newest first, bounded, the supervisor's own kept."""

from __future__ import annotations

import json
from typing import Any

from sidecar.observe.recent import Entry, RecentRequests
from sidecar.workers.recent import ACTIVITY_KEYS, HostRecent, dump


def entry(at: float, key: str = "k1", error: str = "", ip: str = "10.0.0.1", status: int = 200) -> Entry:
    return Entry(at, "GET", f"/p/{at:g}", status, 1.0, ip, "plex", key, error)


def worker(*entries: Entry, failures: tuple[Entry, ...] = ()) -> dict[str, Any]:
    """A worker's answer as it crosses the socket (JSON)."""
    r = RecentRequests(per_key=100)
    for e in entries:
        r._keys.setdefault(e.key_id, __import__("collections").deque(maxlen=100)).append(e)
    for e in failures:
        r.note(e)
    out: dict[str, Any] = json.loads(json.dumps(dump(r)))
    return out


def test_rings_merge_newest_first_and_bounded() -> None:
    host = HostRecent(RecentRequests(per_key=100))
    w0 = worker(*(entry(float(t)) for t in range(0, 120, 2)), entry(500.0, "k2"))
    w1 = worker(*(entry(float(t)) for t in range(1, 120, 2)))
    host.load([w0, w1])
    shown = host.for_key("k1")
    assert [e.at for e in shown] == [float(t) for t in range(119, 19, -1)]  # newest first, 100 of 120
    assert list(host.key_ids()) == ["k1", "k2"]  # most recently active last
    assert host.for_key("k2")[0].path == "/p/500"


def test_failures_and_counts_are_summed_and_the_supervisors_own_kept() -> None:
    host = HostRecent(RecentRequests())
    host.note(entry(5.0, "", "console_sign_in", "10.9.9.9", 401))  # a refused console sign-in, seen here
    f0 = worker(failures=(entry(1.0, "", "invalid_key", "10.0.0.7", 401),))
    f1 = worker(failures=(entry(3.0, "", "invalid_key", "10.0.0.7", 401), entry(4.0, "", "expired_key")))
    host.load([f0, f1, {"garbage": True}, "not a dump"])  # an answer that is not a dump is left out
    assert [e.at for e in host.failures] == [1.0, 3.0, 4.0, 5.0]
    assert host.failures_by_reason == {"console_sign_in": 1, "invalid_key": 2, "expired_key": 1}
    assert host.failures_by_ip["10.0.0.7"] == 2
    host.load([])  # workers gone quiet: the supervisor's own note is still there
    assert [e.error for e in host.failures] == ["console_sign_in"]


def test_a_key_page_asks_only_for_its_keys_and_activity_for_the_busiest() -> None:
    r = RecentRequests()
    for i in range(ACTIVITY_KEYS + 50):
        r._keys.setdefault(f"k{i}", __import__("collections").deque(maxlen=100)).append(entry(float(i), f"k{i}"))
    assert set(dump(r, ["k3", "nope"])["keys"]) == {"k3"}
    full = dump(r)["keys"]
    assert len(full) == ACTIVITY_KEYS and "k0" not in full and f"k{ACTIVITY_KEYS + 49}" in full
