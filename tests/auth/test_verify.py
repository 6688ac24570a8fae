"""Verification: typos stop before the store, argon2 off the loop and only when needed,
throttled per client IP, and changes from any process reach a running sidecar within 1 s."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, PLEX_TOKEN, MakeSidecar, Running, base_config

from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord, Permissions
from sidecar.auth.verify import ARGON2_CONCURRENCY, Verifier, password_hasher
from sidecar.config import KeysConfig
from sidecar.core.errors import ExpiredKey, InvalidKey, RevokedKey, TooManyFailures
from sidecar.store import SqliteStore, YamlStore

CHEAP = password_hasher("cheapest")


class CountingStore(SqliteStore):
    """A real SQLite store that also counts key lookups (not a mock: every call does the real work)."""

    gets = 0

    async def get(self, key_id: str) -> KeyRecord | None:
        self.gets += 1
        return await super().get(key_id)


def new_record(prefix: str = "pmcp_", hasher: Any = CHEAP, **kw: Any) -> tuple[KeyRecord, str]:
    key, parts = generate_key(prefix)
    rec = KeyRecord(
        id=parts.key_id, name="t", hash=hasher.hash(parts.secret), display=display_form(prefix, parts.key_id, key), **kw
    )
    return rec, key


def wrong_secret(key: str) -> str:
    """A well-formed key (valid checksum) with the same id and another secret."""
    from sidecar.auth.keys import ID_LEN

    kid = key[len("pmcp_") : len("pmcp_") + ID_LEN]
    return generate_key("pmcp_", kid)[0]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = CountingStore(tmp_path / "v.db")
    await s.open()
    yield s
    await s.close()


async def make_verifier(store: SqliteStore, records: list[KeyRecord], **cfg: Any) -> Verifier:
    await store.insert(records)
    v = Verifier(store, KeysConfig(argon2_profile=cfg.pop("argon2_profile", "cheapest"), **cfg), **cfg.pop("kw", {}))
    await v.load()
    return v


# ---------------------------------------------------------------------------- unit: the Verifier


async def test_typo_is_invalid_without_store_or_argon2(store: CountingStore) -> None:
    rec, key = new_record()
    v = await make_verifier(store, [rec])
    for i in (5, 20, len(key) - 1):
        typo = key[:i] + ("0" if key[i] != "0" else "1") + key[i + 1 :]
        with pytest.raises(InvalidKey, match="malformed"):
            await v.verify(typo, "192.0.2.1")
    assert store.gets == 0 and v.store_lookups == 0 and v.argon2_runs == 0


async def test_verified_key_is_cached_hot_path_has_no_argon2_and_no_io(store: CountingStore) -> None:
    rec, key = new_record()
    v = await make_verifier(store, [rec])
    assert (await v.verify(key, "ip")).id == rec.id
    assert v.argon2_runs == 1
    for _ in range(200):
        await v.verify(key, "ip")
    assert v.argon2_runs == 1 and store.gets == 0
    # A permission edit keeps the hash: still no argon2. A new hash (not something we do, but) would re-verify.
    await store.update(rec.with_changes(name="renamed"))
    await v.refresh()
    assert (await v.verify(key, "ip")).name == "renamed"
    assert v.argon2_runs == 1


async def test_a_remembered_key_is_trusted_only_while_its_record_stands(store: CountingStore) -> None:
    rec, key = new_record()
    v = await make_verifier(store, [rec])
    for _ in range(3):
        assert (await v.verify(key, "ip")).id == rec.id  # the fingerprint path from the second call on
    await store.update(rec.with_changes(revoked_at=time.time() - 1))
    await v.refresh()
    with pytest.raises(RevokedKey):  # the client sees 401 revoked_key at once, not the remembered record
        await v.verify(key, "ip")
    with pytest.raises(InvalidKey):  # a near miss of a remembered key is checked in full
        await v.verify(wrong_secret(key), "ip")
    assert v.argon2_runs == 2


async def test_concurrent_first_uses_of_one_key_run_argon2_once(store: CountingStore) -> None:
    rec, key = new_record()
    v = await make_verifier(store, [rec])
    got = await asyncio.gather(*(v.verify(key, "ip") for _ in range(20)))
    assert {r.id for r in got} == {rec.id}
    assert v.argon2_runs == 1


async def test_wrong_secret_and_unknown_id(store: CountingStore) -> None:
    rec, key = new_record()
    v = await make_verifier(store, [rec])
    with pytest.raises(InvalidKey, match="wrong"):
        await v.verify(wrong_secret(key), "ip")
    assert v.argon2_runs == 1
    _, stranger = new_record()
    with pytest.raises(InvalidKey, match="unknown"):
        await v.verify(stranger, "ip")
    assert v.argon2_runs == 1 and store.gets == 1  # looked for in the store (another process may have made it)


async def test_key_created_by_another_process_works_before_the_next_poll(store: CountingStore, tmp_path: Path) -> None:
    v = await make_verifier(store, [])
    rec, key = new_record()
    other = SqliteStore(tmp_path / "v.db")
    await other.open()
    try:
        await other.insert([rec])
    finally:
        await other.close()
    assert (await v.verify(key, "ip")).id == rec.id
    assert rec.id in v.table


async def test_revoked_and_expired_after_the_secret_checks(store: CountingStore) -> None:
    clock = Clock()
    revoked, rkey = new_record(revoked_at=clock.now - 1)
    expiring, ekey = new_record(expires_at=clock.now + 10)
    await store.insert([revoked, expiring])
    v = Verifier(store, KeysConfig(argon2_profile="cheapest"), clock=clock)
    await v.load()
    with pytest.raises(RevokedKey):
        await v.verify(rkey, "ip")
    with pytest.raises(InvalidKey):  # a wrong secret never learns the key's state
        await v.verify(wrong_secret(rkey), "ip")
    assert (await v.verify(ekey, "ip")).id == expiring.id
    clock.now += 11
    with pytest.raises(ExpiredKey):
        await v.verify(ekey, "ip")


async def test_failed_attempts_are_throttled_per_ip_then_forgiven(store: CountingStore) -> None:
    clock = Clock()
    rec, key = new_record()
    await store.insert([rec])
    v = Verifier(store, KeysConfig(argon2_profile="cheapest", failed_attempts_per_minute=5), clock=clock)
    await v.load()
    for _ in range(5):
        with pytest.raises(InvalidKey):
            await v.verify(wrong_secret(key), "198.51.100.1")
    runs = v.argon2_runs
    with pytest.raises(TooManyFailures) as e:
        await v.verify(key, "198.51.100.1")  # even the right key: the address is cooling down
    assert e.value.status == 429 and e.value.code == "too_many_failed_attempts"
    assert 1 <= int(e.value.headers["Retry-After"]) <= 60
    assert v.argon2_runs == runs  # throttled before any work
    assert (await v.verify(key, "198.51.100.2")).id == rec.id  # another address is unaffected
    clock.now += 61
    assert (await v.verify(key, "198.51.100.1")).id == rec.id


async def test_a_burst_of_wrong_guesses_cannot_all_reach_argon2(store: CountingStore) -> None:
    rec, key = new_record()
    v = await make_verifier(store, [rec], failed_attempts_per_minute=5)
    results = await asyncio.gather(*(v.verify(wrong_secret(key), "203.0.113.9") for _ in range(60)),
                                   return_exceptions=True)  # fmt: skip
    kinds = [type(r).__name__ for r in results]
    assert set(kinds) <= {"InvalidKey", "TooManyFailures"}
    assert kinds.count("TooManyFailures") >= 60 - 5 - ARGON2_CONCURRENCY
    assert v.argon2_runs <= 5 + ARGON2_CONCURRENCY


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_argon2_flood_does_not_block_the_event_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """200 concurrent well-formed unknown keys: 176 with unknown ids (refused without argon2)
    and 24 with a known id and wrong secrets, which force 24 argon2id runs of the real
    rfc9106_low_memory profile (64 MiB, t=3). A ticker measures loop lag meanwhile.
    (24, not 200, real hashes: the point is the loop, and 200 would cost the suite a minute.)"""
    real = password_hasher("rfc9106_low_memory")
    store = SqliteStore(tmp_path / "lag.db")
    await store.open()
    try:
        rec, key = new_record(hasher=real)
        v = await make_verifier(store, [rec], argon2_profile="rfc9106_low_memory", failed_attempts_per_minute=10_000)
        argon2_guesses = 24
        guesses = [wrong_secret(key) for _ in range(argon2_guesses)]
        guesses += [generate_key("pmcp_")[0] for _ in range(200 - argon2_guesses)]
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                t = loop.time()
                await asyncio.sleep(0.005)
                lags.append(loop.time() - t - 0.005)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.5)  # ambient lag first, for comparison (printed, not asserted): ~100 ticks
        ambient = max(lags)
        lags.clear()
        started = time.perf_counter()
        # One address per guess: from one address, at most LANE_DEPTH distinct secrets of a key are checked at once.
        results = await asyncio.gather(*(v.verify(g, f"192.0.2.{i}") for i, g in enumerate(guesses)),
                                       return_exceptions=True)  # fmt: skip
        elapsed = time.perf_counter() - started
        stop.set()
        await tick
        assert all(isinstance(r, InvalidKey) for r in results)
        assert v.argon2_runs == argon2_guesses
        ordered = sorted(lags)
        worst, p99 = ordered[-1], ordered[int(len(ordered) * 0.99)]
        with capsys.disabled():
            print(
                f"\n[loop lag] 200 unknown keys, {argon2_guesses} argon2id (rfc9106_low_memory) in {elapsed:.1f}s: "
                f"max {worst * 1000:.1f} ms, "
                f"p99 {p99 * 1000:.1f} ms, median {statistics.median(lags) * 1000:.2f} ms over {len(lags)} ticks "
                f"(max with no argon2 running: {ambient * 1000:.1f} ms)"
            )
        # Had argon2 run on the loop, every tick during a hash would lag by the hash (~0.1-0.4 s):
        # the p99 would be that. The max is reported, not asserted tightly: on a shared 2-core box
        # the OS alone now and then stalls any thread for ~100 ms.
        assert p99 < 0.1
        assert worst < 1.0
    finally:
        await store.close()


# ---------------------------------------------------------------------------- end to end: reaching a running sidecar


async def status_now(running: Running, key: str, path: str = "/library/sections") -> str:
    """The error code (or "ok") of one request, now: for changes that must apply at once."""
    resp = await running.proxy.get(path, headers={"X-Plex-Token": key})
    if resp.status < 400:
        return "ok"
    return str((await resp.json())["error"]["code"])


async def wait_for_status(
    running: Running, key: str, code: str, *, deadline: float = 1.5, path: str = "/library/sections"
) -> float:
    """Poll the proxy until it answers ``code``; return how long that took."""
    start = time.monotonic()
    while True:
        resp = await running.proxy.get(path, headers={"X-Plex-Token": key})
        body = await resp.json() if resp.content_type == "application/json" else {}
        got = body.get("error", {}).get("code") if resp.status >= 400 else "ok"
        elapsed = time.monotonic() - start
        if got == code:
            return elapsed
        if elapsed > deadline:
            raise AssertionError(f"still {got!r} after {elapsed:.2f}s, expected {code!r}")
        await asyncio.sleep(0.02)


def config_file(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
        check=False,
    )


async def test_cli_revocation_reaches_the_running_sidecar_within_1s(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    running = await make_sidecar(cfg)
    rec, key = await running.create_key()
    assert await wait_for_status(running, key, "ok") < 1
    cli = await asyncio.to_thread(run_cli, "keys", "revoke", rec.id, config=config_file(tmp_path, cfg))
    assert cli.returncode == 0, cli.stderr
    assert await wait_for_status(running, key, "revoked_key") <= 1.0


async def test_cli_created_key_works_at_once(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    running = await make_sidecar(cfg)
    cli = await asyncio.to_thread(
        run_cli, "keys", "create", "--name", "cli", "--json", config=config_file(tmp_path, cfg)
    )
    assert cli.returncode == 0, cli.stderr
    key = json.loads(cli.stdout)["key"]
    resp = await running.proxy.get("/library/sections", headers={"X-Plex-Token": key})
    assert resp.status == 200  # found in the store before the next poll


async def test_admin_api_changes_reach_every_sidecar_on_the_store_within_1s(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """Two sidecars on one database (two replicas, or a server and an admin process)."""
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    a = await make_sidecar(cfg)
    b = await make_sidecar(cfg)
    rec, key = await a.create_key()
    assert await wait_for_status(b, key, "ok") < 1
    # A permission edit through A's admin API: immediate on A, within a second on B.
    resp = await a.admin.patch(
        f"/admin/keys/{rec.id}",
        json={"permissions": {"upstreams": ["plex"], "paths": ["/identity"]}},
        headers=a.admin_headers(),
    )
    assert resp.status == 200
    assert await status_now(a, key) == "insufficient_permissions"
    assert await wait_for_status(b, key, "insufficient_permissions") <= 1.0
    # Expiry set through B: both refuse it within a second of the moment it passes.
    resp = await b.admin.patch(f"/admin/keys/{rec.id}", json={"expires": "1s"}, headers=b.admin_headers())
    assert resp.status == 200
    expires_in = 1.0
    await asyncio.sleep(expires_in)
    assert await wait_for_status(a, key, "expired_key", path="/identity") <= 1.0
    assert await wait_for_status(b, key, "expired_key", path="/identity") <= 1.0
    # Revocation through A's admin API.
    rec2, key2 = await a.create_key()
    assert await wait_for_status(b, key2, "ok") < 1
    assert (await a.admin.delete(f"/admin/keys/{rec2.id}", headers=a.admin_headers())).status == 200
    assert await status_now(a, key2) == "revoked_key"
    assert await wait_for_status(b, key2, "revoked_key") <= 1.0


async def test_yaml_edits_reach_the_running_sidecar_within_1s(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    rec, key = new_record(permissions=Permissions(upstreams=("plex",)))
    keys_file.write_text(yaml.safe_dump({"keys": [rec.to_dict()]}, sort_keys=False))
    cfg = base_config(
        str(plex_upstream.make_url("")).rstrip("/"),
        tmp_path,
        store={"kind": "yaml", "path": str(keys_file), "state_path": str(tmp_path / "state.db")},
    )
    running = await make_sidecar(cfg)
    assert isinstance(running.sc.store, YamlStore)
    assert await wait_for_status(running, key, "ok") < 1

    def edit(**changes: Any) -> None:
        entry = {**rec.to_dict(), **changes}
        keys_file.write_text(yaml.safe_dump({"keys": [entry]}, sort_keys=False))

    edit(permissions={"upstreams": ["plex"], "paths": ["/identity"]})
    assert await wait_for_status(running, key, "insufficient_permissions") <= 1.0
    edit(permissions={"upstreams": ["plex"]}, revoked_at="2020-01-01T00:00:00Z")
    assert await wait_for_status(running, key, "revoked_key") <= 1.0
    keys_file.write_text("keys: [ {broken")  # a typo keeps the last good set: still revoked, not unknown
    await asyncio.sleep(0.7)
    assert await status_now(running, key) == "revoked_key"
    edit(permissions={"upstreams": ["plex"]})
    assert await wait_for_status(running, key, "ok") <= 1.0


async def test_typo_through_the_proxy_touches_neither_store_nor_argon2(plex_sidecar: Running) -> None:
    _, key = await plex_sidecar.create_key()
    v = plex_sidecar.sc.verifier
    runs, lookups = v.argon2_runs, v.store_lookups
    typo = key[:30] + ("a" if key[30] != "a" else "b") + key[31:]
    resp = await plex_sidecar.proxy.get("/identity", headers={"X-Plex-Token": typo})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_key"
    assert (v.argon2_runs, v.store_lookups) == (runs, lookups)


async def test_brute_force_gets_429_with_retry_after(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    cfg = base_config(
        str(plex_upstream.make_url("")).rstrip("/"),
        tmp_path,
        keys={"argon2": "cheapest", "failed_attempts_per_minute": 3},
    )
    running = await make_sidecar(cfg)
    _, key = await running.create_key()
    for _ in range(3):
        resp = await running.proxy.get("/identity", headers={"X-Plex-Token": wrong_secret(key)})
        assert resp.status == 401
    runs = running.sc.verifier.argon2_runs
    for candidate in (wrong_secret(key), key):
        resp = await running.proxy.get("/identity", headers={"X-Plex-Token": candidate})
        assert resp.status == 429
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert (await resp.json())["error"]["code"] == "too_many_failed_attempts"
    assert running.sc.verifier.argon2_runs == runs  # refused before any argon2 work


async def test_a_big_table_is_kept_out_of_the_garbage_collectors_way(tmp_path: Path) -> None:
    """With 100 000 keys a full GC pass would pause the loop ~150 ms; the table is frozen out of it."""
    import gc

    from sidecar.auth.verify import GC_FREEZE_KEYS

    hashed = CHEAP.hash("x" * 48)
    records = [KeyRecord(id=generate_key("pmcp_")[1].key_id, name=f"k{i}", hash=hashed) for i in range(GC_FREEZE_KEYS)]
    store = SqliteStore(tmp_path / "gc.db")
    await store.open()
    gc.unfreeze()
    try:
        await store.insert(records)
        v = Verifier(store, KeysConfig(argon2_profile="cheapest"))
        await v.load()
        assert len(v.table) == GC_FREEZE_KEYS
        assert gc.get_freeze_count() > GC_FREEZE_KEYS
    finally:
        gc.unfreeze()
        await store.close()
