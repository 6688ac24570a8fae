"""One ``/metrics`` for the host (issue 19): how the supervisor merges its workers' expositions."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.auth.models import KeyRecord
from sidecar.core.scope import RequestScope
from sidecar.observe.metrics import Metrics
from sidecar.workers.aggregate import Retired, merge


def exposition(requests: dict[str, int], in_flight: int = 0) -> str:
    m = Metrics(CollectorRegistry(), max_key_series=2, upstreams=["plex"])
    m.set_keys([KeyRecord(id=k, name=k, hash="$argon2id$x") for k in ("k1", "k2", "k3")])
    for key, n in requests.items():
        for _ in range(n):
            m.observe(RequestScope("GET", "/", "1.2.3.4", upstream="plex", key_id=key, status=200))
    m.in_flight.value = in_flight
    return m.exposition().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_sum_host_gauges_once_processes_apart() -> None:
    own = exposition({})
    w0 = exposition({"k1": 3, "k3": 1}, in_flight=2)
    w1 = exposition({"k1": 2, "k2": 4}, in_flight=1)
    got = samples(merge(own, [(0, w0), (1, w1)], [0, 1]))
    req = "sidecar_requests_total"
    labels = (("code", "200"), ("key", "k1"), ("method", "GET"), ("upstream", "plex"))
    assert got[(req, labels)] == 5
    # The label cap holds as in one process: k3 had no slot left (max_key_series 2), it is "other".
    other = (("code", "200"), ("key", "other"), ("method", "GET"), ("upstream", "plex"))
    assert got[(req, other)] == 1
    assert sum(v for (name, _), v in got.items() if name == req) == 10
    assert got[("sidecar_request_duration_seconds_count", (("upstream", "plex"),))] == 10
    assert got[("sidecar_in_flight_requests", ())] == 3
    assert got[("sidecar_keys", (("state", "active"),))] == 3  # the key table once, not once per worker
    assert got[("sidecar_worker_requests_total", (("worker", "0"),))] == 4
    assert got[("sidecar_worker_requests_total", (("worker", "1"),))] == 6
    assert got[("sidecar_worker_restarts_total", (("worker", "1"),))] == 1
    assert got[("sidecar_workers", ())] == 2
    rss = {dict(labels)["worker"] for (name, labels) in got if name == "process_resident_memory_bytes"}
    assert rss == {"supervisor", "0", "1"}


def test_a_worker_that_does_not_answer_is_left_out() -> None:
    got = samples(merge(exposition({}), [(0, exposition({"k1": 2})), (1, None)], [0, 0]))
    assert got[("sidecar_workers", ())] == 1
    assert sum(v for (name, _), v in got.items() if name == "sidecar_requests_total") == 2


def test_a_dead_workers_counters_stay_in_the_sums() -> None:
    retired = Retired()
    retired.add(exposition({"k1": 4}, in_flight=3))  # worker 0 as last read, before it died
    got = samples(merge(exposition({}), [(0, exposition({"k1": 1})), (1, exposition({"k2": 2}))], [1, 0], retired))
    assert sum(v for (name, _), v in got.items() if name == "sidecar_requests_total") == 7
    assert got[("sidecar_request_duration_seconds_count", (("upstream", "plex"),))] == 7
    assert got[("sidecar_in_flight_requests", ())] == 0  # gauges of the dead are not kept
    assert got[("sidecar_worker_requests_total", (("worker", "0"),))] == 1  # per worker: since it started


def test_a_hung_worker_does_not_make_the_host_counters_step_down() -> None:
    """A worker that misses one scrape (hung, slow past the scrape timeout) keeps its last counts
    in the sums: a dip would read as a reset of the whole host, and its return as all of it again."""
    from sidecar.workers.aggregate import scrape_merge

    last: dict[int, str] = {}
    retired = Retired()
    req = "sidecar_requests_total"
    w0, w1 = exposition({"k1": 3}), exposition({"k2": 5})
    first = samples(scrape_merge(exposition({}), [w0, w1], last, [0, 0], retired))
    second = samples(scrape_merge(exposition({}), [exposition({"k1": 4}), None], last, [0, 0], retired))
    total = [sum(v for (name, _), v in got.items() if name == req) for got in (first, second)]
    assert total == [8, 9], f"host requests_total stepped {total}"
    assert second[("sidecar_workers", ())] == 1  # the hung one is not counted as answering
    assert second[("sidecar_in_flight_requests", ())] == 0  # its gauges are not kept
    third = samples(scrape_merge(exposition({}), [exposition({"k1": 4}), exposition({"k2": 6})], last, [0, 0], retired))
    assert sum(v for (name, _), v in third.items() if name == req) == 10  # back: its live counts, once
