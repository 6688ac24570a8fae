"""The shared GCRA table (issue 19) gives ``MemoryBackend``'s answers, bounded and exact across processes."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from limits_support import key

from sidecar.config import parse_config
from sidecar.limits.gcra import US, MemoryBackend, TableFull, resolve_plan
from sidecar.workers.shm import ShmBuckets

CFG = {"upstreams": [{"id": "api", "kind": "mcp", "url": "http://127.0.0.1:9"}]}


def plans(*limit_sets: list[str]):  # type: ignore[no-untyped-def]
    cfg = parse_config(CFG, env={})
    return [resolve_plan(cfg, key(f"k{i}", rate_limits=ls), cfg.upstreams[0]) for i, ls in enumerate(limit_sets)]


def test_same_answers_as_the_memory_backend(tmp_path: Path) -> None:
    table = ShmBuckets(str(tmp_path / "b"), create=True, slots=64)
    memory = MemoryBackend()
    ps = plans(["5/second"], ["2/second", "10/minute"], ["1/hour"])
    rng = random.Random(7)
    now = 1_000 * US
    for _ in range(3000):
        now += rng.randrange(0, 400_000)
        plan = rng.choice(ps)
        cost = -1 if rng.random() < 0.1 else 1
        got, want = table.evaluate(plan, now, None, cost), memory.evaluate(plan, now, None, cost)
        assert (got.ok, got.debts) == (want.ok, want.debts)


def test_two_mappings_share_one_budget(tmp_path: Path) -> None:
    """Two workers' mappings of the file (as two processes see it): one budget, exactly."""
    a = ShmBuckets(str(tmp_path / "b"), create=True, slots=64)
    b = ShmBuckets(str(tmp_path / "b"))
    (plan,) = plans(["10/minute"])
    now = 5_000 * US
    allowed = sum((a if i % 2 else b).evaluate(plan, now, None, 1).ok for i in range(30))
    assert allowed == 10


def test_spent_slots_are_reused_and_a_full_table_refuses(tmp_path: Path) -> None:
    table = ShmBuckets(str(tmp_path / "b"), create=True, slots=4)
    ps = plans(*[["1/second"]] * 6)
    now = 1 * US
    for p in ps[:4]:
        assert table.evaluate(p, now, None, 1).ok
    with pytest.raises(TableFull):  # four buckets in debt fill four slots: refused, not "backend down"
        table.evaluate(ps[4], now, None, 1)
    later = now + 2 * US  # every bucket is full again: its slot may be taken
    assert table.evaluate(ps[4], later, None, 1).ok and table.evaluate(ps[5], later, None, 1).ok
    assert table.evaluate(ps[0], later, None, 1).ok  # and the old key starts from a full bucket


def test_two_buckets_of_one_plan_never_share_a_slot(tmp_path: Path) -> None:
    """Attack (workers): a key's two limits whose buckets start at the same slot. The bucket names
    are public (the key id, the limit's period), so a delegate can pick periods that collide. The
    second bucket took the first's slot — just claimed, or full again — as a spare: both were
    written to one slot, the second's TAT won, and the first limit started afresh every time (a
    key of ``1/hour`` and ``1000/week`` got 1000 an hour)."""
    table = ShmBuckets(str(tmp_path / "b"), create=True, slots=64)
    cfg = parse_config(CFG, env={})
    k = key("k1")
    hour = resolve_plan(cfg, replace(k, rate_limits=("1/hour",)), cfg.upstreams[0])
    start = table._hash(hour.buckets[0]) & table.mask
    weeks = next(
        f"1000/{n}weeks"
        for n in range(2, 10_000)
        if table._hash(resolve_plan(cfg, replace(k, rate_limits=(f"1000/{n}weeks",)), cfg.upstreams[0]).buckets[0])
        & table.mask
        == start
    )
    plan = resolve_plan(cfg, replace(k, rate_limits=("1/hour", weeks)), cfg.upstreams[0])
    now = 1_000 * US
    assert table.evaluate(plan, now, None, 1).ok
    assert [table.evaluate(plan, now + i * US, None, 1).ok for i in range(1, 5)] == [False] * 4
