"""The key verifier under floods of forged keys (DESIGN invariant 6).

- Random keys (malformed, or well-formed with an unknown id) never cost an argon2 hash.
- Failures from many source addresses keep the throttle table bounded.
- IPv4 clients seen as IPv4-mapped IPv6 are throttled per IPv4 address, not all in ``::/64``.
- Wrong secrets for a known key id arriving all at once (a burst of connections whose heads
  are read in one loop iteration) never queue more than ``MAX_WAITING`` argon2 checks: the
  rest are answered 429 at once, and the pending table stays bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_sec_throttle import new_record

from sidecar.auth import verify
from sidecar.auth.keys import ID_LEN, generate_key
from sidecar.auth.verify import Verifier, throttle_bucket
from sidecar.config import KeysConfig
from sidecar.core.errors import InvalidKey, TooManyFailures
from sidecar.oauth.server import Gate
from sidecar.store import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "t.db")
    await s.open()
    yield s
    await s.close()


def address(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


async def test_random_keys_from_many_addresses_cost_no_argon2_and_bounded_memory(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verify, "MAX_TRACKED_IPS", 1000)
    good, good_key = new_record()
    await store.insert([good])
    v = Verifier(store, KeysConfig(argon2_profile="cheapest", failed_attempts_per_minute=5))
    await v.load()
    for i in range(3000):
        with pytest.raises((InvalidKey, TooManyFailures)):
            await v.verify(generate_key("pmcp_")[0], address(i))  # well formed, unknown id
        with pytest.raises((InvalidKey, TooManyFailures)):
            await v.verify(f"pmcp_garbage{i}", address(i))
        assert len(v._failures) <= 1000
    assert v.argon2_runs == 0
    assert v.store_lookups <= 3000, "one store lookup per unknown well-formed key at most"
    assert (await v.verify(good_key, address(1))).id == good.id
    assert v.argon2_runs == 1 and len(v._known) == 1


async def test_a_burst_of_wrong_secrets_never_queues_more_than_max_waiting(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verify, "MAX_WAITING", 20)
    target, target_key = new_record()
    await store.insert([target])
    v = Verifier(store, KeysConfig(argon2_profile="cheapest", failed_attempts_per_minute=1000))
    await v.load()
    queued: list[int] = []
    real = v._argon2

    async def watched(hashed: str, secret: str, lane: tuple[str, str]) -> bool:
        queued.append(len(v._pending))
        return await real(hashed, secret, lane)

    monkeypatch.setattr(v, "_argon2", watched)
    wrong = [generate_key("pmcp_", target_key[5 : 5 + ID_LEN])[0] for _ in range(500)]
    results = await asyncio.gather(*(v.verify(k, address(i)) for i, k in enumerate(wrong)), return_exceptions=True)
    names = [type(r).__name__ for r in results]
    assert set(names) <= {"InvalidKey", "TooManyFailures"}, names
    assert max(queued) <= verify.MAX_WAITING + verify.ARGON2_CONCURRENCY
    assert v.argon2_runs <= verify.MAX_WAITING + verify.ARGON2_CONCURRENCY
    assert names.count("TooManyFailures") >= 500 - verify.MAX_WAITING - verify.ARGON2_CONCURRENCY
    assert v._pending == {} and v._load == {}


def test_ipv4_mapped_addresses_are_throttled_per_ipv4_address() -> None:
    """A dual-stack socket (``workers: N`` binds ``[::]`` without IPV6_V6ONLY, or an ingress that
    reports ``::ffff:a.b.c.d``) shows IPv4 clients as IPv4-mapped IPv6. Their /64 is ``::/64``
    for every IPv4 client: one attacker's failures throttled all of them (and filled the OAuth
    gates for all of them). A mapped address counts as its IPv4 address."""
    assert throttle_bucket("::ffff:192.0.2.1") == throttle_bucket("192.0.2.1") == "192.0.2.1"
    assert throttle_bucket("::ffff:192.0.2.1") != throttle_bucket("::ffff:198.51.100.7")
    assert throttle_bucket("2001:db8:1:2::1") == throttle_bucket("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"


async def test_one_ipv4_mapped_attacker_does_not_throttle_other_ipv4_clients(store: SqliteStore) -> None:
    v = Verifier(store, KeysConfig(argon2_profile="cheapest", failed_attempts_per_minute=5))
    await v.load()
    for _ in range(10):
        with pytest.raises((InvalidKey, TooManyFailures)):
            await v.verify(generate_key("pmcp_")[0], "::ffff:192.0.2.1")
    assert v.throttled("::ffff:192.0.2.1", v.steady()) > 0
    assert v.throttled("::ffff:198.51.100.7", v.steady()) == 0
    gate = Gate(3, clock=lambda: 0.0)
    assert [gate.allow("::ffff:192.0.2.1") for _ in range(4)] == [True, True, True, False]
    assert gate.allow("::ffff:198.51.100.7")
