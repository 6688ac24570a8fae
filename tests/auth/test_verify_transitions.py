"""A key's state changing while a check of it waits, and the wall clock stepping around a reload.

An attacker's view of time: a key revoked while its first check queues for argon2 must not
be served the old record's answer once argon2 is done, and a key seen expired must not come
back when the wall clock steps back and the store is then re-read (SIGHUP, a keys-file edit).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from test_verify import Clock  # its clock starts at T0 too

from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord, Permissions
from sidecar.auth.verify import Verifier, password_hasher
from sidecar.config import KeysConfig
from sidecar.core.errors import ExpiredKey, InvalidKey, RevokedKey
from sidecar.store import SqliteStore, YamlStore

CHEAP = password_hasher("cheapest")
T0 = 1_800_000_000.0


def new_record(**kw: Any) -> tuple[KeyRecord, str]:
    key, parts = generate_key("pmcp_")
    return KeyRecord(
        id=parts.key_id, name="t", hash=CHEAP.hash(parts.secret), display=display_form("pmcp_", parts.key_id, key), **kw
    ), key


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = SqliteStore(tmp_path / "t.db")
    await s.open()
    yield s
    await s.close()


async def verifier(store: Any, records: list[KeyRecord], clock: Clock) -> Verifier:
    await store.insert(records)
    v = Verifier(store, KeysConfig(argon2_profile="cheapest"), clock=clock)
    await v.load()
    return v


async def queued(v: Verifier, key: str) -> asyncio.Task[KeyRecord]:
    """A first use of ``key`` held in the argon2 queue (every slot busy) until ``v._slots.release()``."""
    busy = v._slots.free
    v._slots.free = 0
    task = asyncio.create_task(v.verify(key, "192.0.2.7"))
    async with asyncio.timeout(2):
        while v._slots.waiting == 0:
            await asyncio.sleep(0)
    v._slots.free = busy - 1  # the release below hands the waiter one slot, as a finished check would
    return task


async def test_a_key_revoked_while_its_check_queues_is_refused(store: SqliteStore) -> None:
    """Before: the record read before the queue was judged after it, so a key revoked (and polled in)
    while argon2 was busy got through, however long the queue took."""
    clock = Clock()
    rec, key = new_record()
    v = await verifier(store, [rec], clock)
    task = await queued(v, key)
    await store.update(rec.with_changes(revoked_at=clock.now - 1))
    assert await v.refresh()
    v._slots.release()
    with pytest.raises(RevokedKey):
        await task
    with pytest.raises(RevokedKey):  # and the next request, from what the first one remembered
        await v.verify(key, "192.0.2.7")


async def test_permissions_cut_while_a_check_queues_apply_to_it(store: SqliteStore) -> None:
    clock = Clock()
    rec, key = new_record(permissions=Permissions(upstreams=("*",)))
    v = await verifier(store, [rec], clock)
    task = await queued(v, key)
    await store.update(rec.with_changes(permissions=Permissions(upstreams=("mcp",))))
    await v.refresh()
    v._slots.release()
    assert (await task).permissions.upstreams == ("mcp",)


async def test_a_secret_replaced_while_its_check_queues_is_refused(tmp_path: Path) -> None:
    """A keys file edited so the same id gets a new secret: the old secret, checked against the old
    hash while the file was re-read, must not pass as the new record."""
    clock = Clock()
    rec, key = new_record()
    path = tmp_path / "keys.yaml"
    store = YamlStore(path, SqliteStore(tmp_path / "state.db"))
    path.write_text(_yaml([rec]))
    await store.open()
    try:
        v = Verifier(store, KeysConfig(argon2_profile="cheapest"), clock=clock)
        await v.load()
        task = await queued(v, key)
        _, parts = generate_key("pmcp_", rec.id)
        path.write_text(_yaml([rec.with_changes(hash=CHEAP.hash(parts.secret))]))
        assert await v.refresh(force=True)
        v._slots.release()
        with pytest.raises(InvalidKey):
            await task
    finally:
        await store.close()


def _yaml(records: list[KeyRecord]) -> str:
    import yaml

    return yaml.safe_dump({"keys": [r.to_dict() for r in records]})


@pytest.mark.parametrize("kind", ["sqlite", "yaml"])
async def test_a_reload_after_a_step_back_revives_no_expired_key(kind: str, tmp_path: Path) -> None:
    """Seen expired at wall time T+1; the clock steps back an hour; the store is re-read in full
    (SIGHUP, or any edit of a keys file): before, the re-read records lost the latch and the
    key answered 200 again until the clock caught up."""
    clock = Clock()
    rec, key = new_record(expires_at=T0 + 30)
    other, _ = new_record()
    if kind == "sqlite":
        store: Any = SqliteStore(tmp_path / "r.db")
        await store.open()
        await store.insert([rec, other])
    else:
        (tmp_path / "keys.yaml").write_text(_yaml([rec, other]))
        store = YamlStore(tmp_path / "keys.yaml", SqliteStore(tmp_path / "state.db"))
        await store.open()
    try:
        v = Verifier(store, KeysConfig(argon2_profile="cheapest"), clock=clock)
        await v.load()
        assert (await v.verify(key, "192.0.2.7")).id == rec.id
        clock.now = T0 + 31
        with pytest.raises(ExpiredKey):
            await v.verify(key, "192.0.2.7")
        clock.now = T0 - 3600  # NTP, a restored snapshot
        if kind == "yaml":
            (tmp_path / "keys.yaml").write_text(_yaml([rec, other.with_changes(name="edited")]))
        await v.refresh(force=True)
        with pytest.raises(ExpiredKey):
            await v.verify(key, "192.0.2.7")
        # An operator who really extends the key writes a new expiry: judged afresh.
        extended = rec.with_changes(expires_at=T0 + 7200)
        if kind == "yaml":
            (tmp_path / "keys.yaml").write_text(_yaml([extended, other]))
        else:
            await store.update(extended)
        await v.refresh(force=True)
        assert (await v.verify(key, "192.0.2.7")).id == rec.id
    finally:
        await store.close()


async def test_a_sighup_reload_does_not_undo_a_revocation_a_poll_saw_meanwhile(tmp_path: Path) -> None:
    """A big table (over 1000 keys) is decoded in a thread on SIGHUP. A key revoked after that
    reload read the rows was applied by the next poll, then the reload's older snapshot replaced
    the table, and the store's cursor was already past the revocation: the key worked again until
    its row changed once more. Re-reads are now one at a time."""
    entered, hold = threading.Event(), threading.Event()

    class HeldDecode(SqliteStore):
        armed = False

        @classmethod
        def _records(cls, rows: list[Any]) -> dict[str, KeyRecord]:
            if cls.armed:  # the SIGHUP reload's decoding thread, held until the test lets it go
                entered.set()
                hold.wait(5)
            return super()._records(rows)

    clock = Clock()
    rec, key = new_record()
    crowd = [KeyRecord(id=generate_key("pmcp_")[1].key_id, name="n", hash=rec.hash) for _ in range(1100)]
    store = HeldDecode(tmp_path / "big.db")
    await store.open()
    try:
        await store.insert([rec, *crowd])
        v = Verifier(store, KeysConfig(argon2_profile="cheapest"), clock=clock)
        await v.load()
        assert (await v.verify(key, "192.0.2.7")).id == rec.id
        HeldDecode.armed = True
        reload = asyncio.create_task(v.refresh(force=True))  # SIGHUP
        assert await asyncio.to_thread(entered.wait, 2)
        HeldDecode.armed = False
        await store.update(rec.with_changes(revoked_at=clock.now - 1))  # revoked after the reload's read
        poll = asyncio.create_task(v.refresh())  # the watch loop's next poll
        await asyncio.wait({poll}, timeout=0.5)  # unserialised, it applies the revocation now
        hold.set()
        await asyncio.gather(reload, poll)
        await v.refresh()
        with pytest.raises(RevokedKey):
            await v.verify(key, "192.0.2.7")
    finally:
        hold.set()
        await store.close()
