"""The host's in-flight table (``sidecar.workers.inflight``) on its own: slots, columns, reuse, a full table."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.core.errors import RateLimited
from sidecar.workers.inflight import ShmInflight


def tables(tmp_path: Path, rows: int = 64) -> tuple[ShmInflight, ShmInflight, ShmInflight]:
    path = str(tmp_path / "inflight")
    owner = ShmInflight(path, workers=2, rows=rows)
    return owner, ShmInflight(path, column=0), ShmInflight(path, column=1)


async def test_slots_are_counted_across_workers_and_cleared_per_worker(tmp_path: Path) -> None:
    owner, w0, w1 = tables(tmp_path)
    k = ("key1", "*")
    assert w0.acquire(k, 3) and w1.acquire(k, 3) and w1.acquire(k, 3)
    assert not w0.acquire(k, 3) and w0.get(k) == w1.get(k) == 3  # the host's count
    assert w1.acquire(("key1", "plex"), 1) and w0.get(("key2", "*")) == 0  # scopes and keys apart
    owner.clear(1)  # worker 1 died holding two of them
    assert w0.get(k) == 1 and w0.acquire(k, 3) and w0.acquire(k, 3) and not w1.acquire(k, 3)
    w1.release(k)  # a release after the clear never goes below zero
    assert w0.get(k) == 3
    for _ in range(3):
        w0.release(k)
    assert w0.get(k) == 0
    with pytest.raises(RateLimited, match="limit 1"):
        async with w0.slot({}, k, 1, True), w1.slot({}, k, 1, True):
            pass
    assert w0.get(k) == 0  # the slot taken was given back when the second was refused
    for t in (w0, w1, owner):
        t.close()


def test_idle_rows_are_reused_and_a_full_table_refuses(tmp_path: Path) -> None:
    owner, w0, _ = tables(tmp_path, rows=4)
    for i in range(4):
        assert w0.acquire((f"k{i}", "*"), 1)
    assert not w0.acquire(("k4", "*"), 1)  # no row free: refused (fails closed), never an error
    w0.release(("k0", "*"))
    assert w0.acquire(("k4", "*"), 1) and w0.get(("k4", "*")) == 1  # the idle row reused in place
    assert w0.get(("k0", "*")) == 0
    owner.close()
