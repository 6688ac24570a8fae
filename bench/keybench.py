"""In-process key measurements: a 100 000-key store, its load time, cold and warm verification.

Built on Sidecar's own modules (``sidecar.auth.keys``, ``sidecar.store``, ``sidecar.auth.verify``)
so the numbers are the hot path's, not a re-implementation's:

- ``build_store``: N keys in one bulk ``Store.insert``. Only the ``hot`` keys that will
  really be used get their own argon2id hash (cheapest profile, so a served sidecar's
  first use of each stays quick); the rest share one precomputed hash of a random secret,
  which looks exactly like a real entry to the loader.
- ``measure_load``: ``Verifier.load()`` on a freshly opened store, as ``serve`` does at start.
- ``measure_verify``: the first ``Verifier.verify`` of a key (argon2id with the *default*
  production profile, in a thread, as in production) against the warm path (the same key
  again: parse, CRC-32, dict lookup, SHA-256, constant-time compare).
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KeyStoreInfo", "VerifyTimes", "build_store", "measure_load", "measure_verify"]


@dataclass(frozen=True, slots=True)
class KeyStoreInfo:
    path: Path
    total: int
    hot_keys: list[str]
    build_s: float


@dataclass(frozen=True, slots=True)
class VerifyTimes:
    profile: str
    cold_us: list[float]
    warm_us: list[float]
    argon2_cold: int | None = None  # argon2 runs during the cold calls (one per key expected)
    argon2_warm: int | None = None  # and during the warm calls (none expected)

    @property
    def cold_p50(self) -> float:
        return statistics.median(self.cold_us)

    @property
    def warm_p50(self) -> float:
        return statistics.median(self.warm_us)

    @property
    def warm_p99(self) -> float:
        return _pct(self.warm_us, 99)

    @property
    def cold_max(self) -> float:
        return max(self.cold_us)


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def _records(prefix: str, total: int, hot: int, profile: str) -> tuple[list[object], list[str]]:
    from sidecar.auth.keys import display_form, generate_key
    from sidecar.auth.models import KeyRecord
    from sidecar.auth.verify import password_hasher

    hasher = password_hasher(profile)
    filler = hasher.hash(secrets.token_hex(24))
    now = time.time()
    records: list[object] = []
    hot_keys: list[str] = []
    for i in range(total):
        key, parsed = generate_key(prefix)
        if i < hot:
            h = hasher.hash(parsed.secret)
            hot_keys.append(key)
        else:
            h = filler
        records.append(
            KeyRecord(
                id=parsed.key_id,
                name=f"bench-{i}",
                hash=h,
                display=display_form(prefix, parsed.key_id, key),
                created_at=now,
            )
        )
    return records, hot_keys


async def build_store(
    path: Path, total: int, hot: int, *, prefix: str = "pmcp_", profile: str = "cheapest"
) -> KeyStoreInfo:
    from sidecar.store import SqliteStore

    t0 = time.perf_counter()
    records, hot_keys = _records(prefix, total, hot, profile)
    store = SqliteStore(path)
    await store.open()
    try:
        await store.insert(records)  # type: ignore[arg-type]
    finally:
        await store.close()
    return KeyStoreInfo(path=path, total=total, hot_keys=hot_keys, build_s=time.perf_counter() - t0)


async def measure_load(path: Path, repeats: int = 3) -> tuple[float, int]:
    """Median seconds for ``Verifier.load()`` from a freshly opened store, and the key count."""
    from sidecar.auth.verify import Verifier
    from sidecar.config import KeysConfig
    from sidecar.store import SqliteStore

    times: list[float] = []
    count = 0
    for _ in range(max(1, repeats)):
        store = SqliteStore(path)
        await store.open()
        try:
            verifier = Verifier(store, KeysConfig(argon2_profile="cheapest"))
            t0 = time.perf_counter()
            await verifier.load()
            times.append(time.perf_counter() - t0)
            count = len(verifier.table)
        finally:
            await store.close()
    return statistics.median(times), count


async def measure_verify(
    workdir: Path, *, keys: int = 5, warm_calls: int = 20_000, profile: str = "rfc9106_low_memory"
) -> VerifyTimes:
    """Cold (first use: argon2id of ``profile``) and warm (cached) ``Verifier.verify`` times, in µs."""
    from sidecar.auth.verify import Verifier
    from sidecar.config import KeysConfig
    from sidecar.store import SqliteStore

    path = workdir / f"verify-{profile}.db"
    info = await build_store(path, keys, keys, profile=profile)
    store = SqliteStore(path)
    await store.open()
    try:
        verifier = Verifier(store, KeysConfig(argon2_profile=profile))
        await verifier.load()
        cold: list[float] = []
        for key in info.hot_keys:
            t0 = time.perf_counter_ns()
            await verifier.verify(key, "127.0.0.1")
            cold.append((time.perf_counter_ns() - t0) / 1000)
        runs_cold = getattr(verifier, "argon2_runs", None)
        warm: list[float] = []
        n = len(info.hot_keys)
        for i in range(warm_calls):
            key = info.hot_keys[i % n]
            t0 = time.perf_counter_ns()
            await verifier.verify(key, "127.0.0.1")
            warm.append((time.perf_counter_ns() - t0) / 1000)
        runs_all = getattr(verifier, "argon2_runs", None)
        return VerifyTimes(
            profile=profile,
            cold_us=cold,
            warm_us=warm,
            argon2_cold=runs_cold,
            argon2_warm=None if runs_all is None or runs_cold is None else runs_all - runs_cold,
        )
    finally:
        await store.close()


def run(coro):  # type: ignore[no-untyped-def]
    """Run one measurement on a fresh loop (uvloop when installed, as Sidecar uses)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
