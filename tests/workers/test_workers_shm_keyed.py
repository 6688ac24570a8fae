"""The workers' shared GCRA table hashes bucket names with a secret key: a client cannot aim its names.

Bucket names are partly the client's: a ``tools/call`` name under a tool-limit glob gets a bucket of
its own (``sidecar:rl:{KEY}:UPSTREAM/tool/NAME:PERIOD:COUNT``), and key ids are short and JWT identity ids
computable from a subject. With the public, unkeyed BLAKE2b an attacker picked names whose slots filled the
64-slot probe window at a chosen bucket's slot; that bucket's next check was "table full": a 503 for the
victim as long as the names' buckets lived (an hour, for ``"*": 1/hour``), or, for the attacker's own key
under ``on_redis_error: allow``, requests passed with no limit at all.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

from limits_support import key

from sidecar.config import parse_config
from sidecar.config.units import parse_limit
from sidecar.limits.gcra import US, resolve_plan
from sidecar.upstreams.mcp.toollimits import _plan
from sidecar.workers.inflight import MAX_PROBE as ROW_PROBE
from sidecar.workers.inflight import ShmInflight
from sidecar.workers.shm import MAX_PROBE, ShmBuckets

CFG = {"upstreams": [{"id": "api", "kind": "mcp", "url": "http://127.0.0.1:9"}]}
SLOTS = 1024


def public_slot(bucket: str) -> int:
    """Where the table used to put a bucket: what anyone could compute."""
    h = (int.from_bytes(hashlib.blake2b(bucket.encode(), digest_size=8).digest(), "little") >> 1) or 1
    return h & (SLOTS - 1)


def test_tool_names_cannot_be_aimed_at_another_keys_bucket(tmp_path: Path) -> None:
    table = ShmBuckets(str(tmp_path / "b"), create=True, slots=SLOTS)
    cfg = parse_config(CFG, env={})
    victim = resolve_plan(cfg, key("victim", rate_limits=("100/minute",)), cfg.upstreams[0])
    target = public_slot(victim.buckets[0])
    hourly = (parse_limit("1/hour"),)
    probe = _plan("attacker", "api", "delete_0", hourly).buckets[0]  # the name's place in its bucket's name
    prefix, suffix = probe.split("delete_0")
    names = (f"delete_{n}" for n in itertools.count())  # ~1000 tries a name: those whose (public) slot is the victim's
    aimed = [_plan("attacker", "api", name, hourly) for name in itertools.islice(
        (name for name in names if public_slot(prefix + name + suffix) == target), MAX_PROBE
    )]  # fmt: skip
    now = 1_000 * US
    for plan in aimed:  # the attacker's calls: one each, every bucket in debt for an hour
        assert table.evaluate(plan, now, None, 1).ok
    # The victim's first request of the minute: counted as usual, never "the table is full".
    assert table.evaluate(victim, now + US, None, 1).ok


def test_the_hash_key_is_per_table_and_shared_by_its_mappings(tmp_path: Path) -> None:
    a = ShmBuckets(str(tmp_path / "a"), create=True, slots=64)
    b = ShmBuckets(str(tmp_path / "b"), create=True, slots=64)
    a2 = ShmBuckets(str(tmp_path / "a"))
    assert a.key == a2.key != b.key and len(a.key) == 16
    assert a._hash("x") == a2._hash("x")
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o600


def test_key_ids_cannot_be_aimed_at_another_keys_in_flight_row(tmp_path: Path) -> None:
    """The in-flight table (``concurrency`` across workers): a delegate creates keys until it holds 64 whose
    (public) row is the victim's, and keeps one request of each in flight: the victim's next request found
    no row ("table full") and was refused as over its concurrency. Now the rows are keyed per table."""
    rows = 1024
    path = str(tmp_path / "inflight")
    owner, worker = ShmInflight(path, workers=1, rows=rows), ShmInflight(path, column=0)

    def public_row(ident: tuple[str, str]) -> int:
        digest = hashlib.blake2b(f"{ident[0]}\0{ident[1]}".encode(), digest_size=8).digest()
        return ((int.from_bytes(digest, "little") >> 1) or 1) % rows

    victim = ("victim", "*")
    target = public_row(victim)
    ids = (f"{n:012x}" for n in itertools.count())
    aimed = list(itertools.islice((i for i in ids if public_row((i, "*")) == target), ROW_PROBE))
    assert all(worker.acquire((i, "*"), 1) for i in aimed)
    assert worker.acquire(victim, 1)
    assert owner.key != ShmInflight(str(tmp_path / "other"), workers=1, rows=rows).key
