"""SQLite store (aiosqlite): keys plus all mutable state, in one WAL-mode file.

Several processes share the file: the serving sidecar, and the CLI writing while it
runs. Every key write bumps a monotonically increasing ``seq`` inside one
``BEGIN IMMEDIATE`` transaction; the server polls ``MAX(seq)`` (an index lookup)
every ``poll_interval`` and reloads only the rows past the last one it saw. That is
how a CLI revoke reaches a running sidecar within a second without any IPC.

The schema is versioned with ``PRAGMA user_version``: each entry of ``MIGRATIONS`` (``sqlite_schema.py``)
brings a database one version up, inside one ``BEGIN IMMEDIATE`` that re-reads the
version first (so two processes opening a fresh file at once migrate it once). A file
from a newer sidecar is refused rather than guessed at. One connection is shared by
the server's tasks, so write transactions are serialised by an ``asyncio.Lock``.

Faults of the file (locked past ``store.busy_timeout``, disk full, read-only, I/O error)
become a ``StoreError`` whose ``reason`` names them and whose message says what to do; each
refused write is counted in ``write_failures`` (``sidecar_store_write_failures_total``). A
failed transaction is always rolled back, so the shared connection works again as soon as
the file does. Audit events the file refuses are held in memory and written by the next
``flush_pending`` (the usage flush calls it), so a fault never loses one while the process lives.
Plain reads (key lookups, quota counters, polls) go through a second, read-only connection:
aiosqlite runs one connection's statements one after another in its thread, and a read must
not wait behind a write that waits up to ``busy_timeout`` for another process's lock (WAL
readers never wait for writers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite

from ..auth.models import KeyRecord
from .auditbacklog import AuditBacklog
from .base import (
    AuditEvent,
    KeyChanges,
    KeyMissing,
    Store,
    StoreError,
    UsageRow,
    check_grant_limit,
    check_owner_limit,
    counts_toward_limit,
)
from .filemodes import private_file
from .sqlite_oauth import OAuthTables
from .sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from .sqlitefaults import shielded, wrap

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

log = logging.getLogger("sidecar.store")

BUSY_TIMEOUT_MS = 5000  # the default of store.busy_timeout


class SqliteStore(OAuthTables, AuditBacklog, Store):
    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT_MS / 1000) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None  # reads outside write transactions
        self._seq = 0
        self._lock = asyncio.Lock()  # one write transaction at a time on the shared connection
        self._failures: dict[tuple[str, str], int] = {}
        self._init_audit_backlog()

    @property
    def write_failures(self) -> dict[tuple[str, str], int]:
        return self._failures

    def _failed(self, kind: str, e: sqlite3.Error) -> StoreError:
        """Count a write the file refused and return the error to raise."""
        err = wrap(e, self.path)
        k = (kind, err.reason or "other")
        self._failures[k] = self._failures.get(k, 0) + 1
        return err

    async def _begin(self) -> None:
        if self.db.in_transaction:  # a ROLLBACK that failed earlier must not wedge the connection
            await self._rollback()
        await self.db.execute("BEGIN IMMEDIATE")

    async def _rollback(self) -> None:
        """Undo a failed transaction. SQLite may already have rolled it back (disk full, I/O
        error); an error here must not hide the one that made us roll back."""
        if self._db is not None and self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute("ROLLBACK")

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def open(self) -> None:
        # 0600 before SQLite sees it: -wal and -shm then get the same mode (docs/security.md).
        private_file(self.path)
        try:
            self._db = await aiosqlite.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            await self._wal()
            await self._db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._migrate()
            self._reader = await aiosqlite.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            await self._reader.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            await self._reader.execute("PRAGMA query_only=1")
        except sqlite3.Error as e:
            await self.close()
            raise wrap(e, self.path) from None
        except BaseException:
            await self.close()
            raise

    async def _wal(self) -> None:
        """Switch to WAL, retrying: on a fresh file SQLite answers SQLITE_BUSY at once (no busy
        handler) while another process performs the same switch, so several sidecars or a CLI
        starting together would otherwise fail."""
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.005
        while True:
            try:
                await self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(0.1, delay * 2)

    async def _version(self) -> int:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _migrate(self) -> None:
        while True:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                version = await self._version()  # re-read under the write lock: another process may have migrated
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path.name} has schema version {version}, but this sidecar only knows versions up to "
                        f"{SCHEMA_VERSION}: it was written by a newer sidecar; upgrade this one (or use a backup)"
                    )
                if version == SCHEMA_VERSION:
                    await self.db.execute("COMMIT")
                    return
                for stmt in filter(str.strip, MIGRATIONS[version].split(";")):
                    await self.db.execute(stmt)
                await self.db.execute(f"PRAGMA user_version={version + 1}")
                await self.db.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise

    async def close(self) -> None:
        if self._db is not None:
            if self._audit_backlog:
                await self.flush_pending()
                if self._audit_backlog:
                    log.error("%d audit event(s) could not be written to %s and are lost: %s",
                              len(self._audit_backlog), self.path.name,
                              ", ".join(f"{e.action} {e.key_id}" for e in self._audit_backlog))  # fmt: skip
            db, self._db = self._db, None
            await db.close()
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()

    async def _write(self, sql: str, params: Any = (), many: bool = False, *, kind: str) -> None:
        """One statement in its own write transaction; ``kind`` labels a failure (the metric)."""
        await shielded(self._write_tx(sql, params, many, kind))

    async def _write_tx(self, sql: str, params: Any, many: bool, kind: str) -> None:
        async with self._lock:
            try:
                await self._begin()
                try:
                    if many:
                        await self.db.executemany(sql, params)
                    else:
                        await self.db.execute(sql, params)
                    await self.db.execute("COMMIT")
                except BaseException:
                    await self._rollback()
                    raise
            except sqlite3.Error as e:
                raise self._failed(kind, e) from None

    async def _fetch(self, sql: str, params: Any = ()) -> list[Any]:
        try:
            async with (self._reader or self.db).execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as e:
            raise wrap(e, self.path) from None

    # ------------------------------------------------------------------ keys

    @staticmethod
    def _record(data: str, lu_at: float | None = None, lu_ip: str | None = None) -> KeyRecord:
        return KeyRecord.from_stored(json.loads(data), lu_at, lu_ip)

    @classmethod
    def _records(cls, rows: list[Any]) -> dict[str, KeyRecord]:
        out: dict[str, KeyRecord] = {}
        for data, _, at, ip in rows:
            rec = cls._record(data, at, ip)
            out[rec.id] = rec
        return out

    async def load_all(self) -> dict[str, KeyRecord]:
        rows = await self._fetch(
            "SELECT k.data, k.seq, l.at, l.ip FROM keys k LEFT JOIN last_used l ON l.id = k.id ORDER BY k.seq"
        )
        # 100 000 rows take a while to decode: do it in a thread so a SIGHUP reload never stalls the loop.
        out = await asyncio.to_thread(self._records, rows) if len(rows) > 1000 else self._records(rows)
        if rows:
            self._seq = max(self._seq, max(seq for _, seq, _, _ in rows))
        return out

    async def poll(self, force: bool = False) -> KeyChanges | None:
        if force:
            return KeyChanges(records=list((await self.load_all()).values()), full=True)
        rows = await self._fetch("SELECT MAX(seq) FROM keys")
        top = rows[0][0] if rows and rows[0][0] is not None else 0
        if top <= self._seq:
            return None
        rows = await self._fetch(
            "SELECT k.data, k.seq, l.at, l.ip FROM keys k LEFT JOIN last_used l ON l.id = k.id "
            "WHERE k.seq > ? ORDER BY k.seq",
            (self._seq,),
        )
        records = [self._record(data, at, ip) for data, _, at, ip in rows]
        self._seq = max([self._seq, *(seq for _, seq, _, _ in rows)])
        return KeyChanges(records=records)

    async def get(self, key_id: str) -> KeyRecord | None:
        rows = await self._fetch(
            "SELECT k.data, l.at, l.ip FROM keys k LEFT JOIN last_used l ON l.id = k.id WHERE k.id = ?", (key_id,)
        )
        return self._record(*rows[0]) if rows else None

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._fetch(
            "SELECT k.data, l.at, l.ip FROM keys k LEFT JOIN last_used l ON l.id = k.id ORDER BY k.seq"
        )
        return [self._record(*r) for r in rows]

    async def insert(self, records: list[KeyRecord]) -> None:
        """Add keys in one transaction (one row or 100 000: the bulk path is the same)."""
        if records:
            await shielded(self._insert_tx(records))

    async def _insert_tx(self, records: list[KeyRecord]) -> None:
        async with self._lock:
            try:
                await self._begin()
                try:
                    async with self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM keys") as cur:
                        row = await cur.fetchone()
                    base = int(row[0]) if row else 0
                    await self.db.executemany(
                        "INSERT INTO keys (id, data, seq, owner) VALUES (?, ?, ?, ?)",
                        [(r.id, json.dumps(r.to_stored()), base + i + 1, r.owner) for i, r in enumerate(records)],
                    )
                    await self.db.execute("COMMIT")
                except BaseException:
                    await self._rollback()
                    raise
            except sqlite3.IntegrityError:
                raise StoreError("a key with that id already exists") from None
            except sqlite3.Error as e:
                raise self._failed("key", e) from None

    async def update(self, record: KeyRecord) -> None:
        await self._write(
            "UPDATE keys SET data = ?, owner = ?, seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM keys) WHERE id = ?",
            (json.dumps(record.to_stored()), record.owner, record.id),
            kind="key",
        )

    async def count_active(self, owner: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        rows = await self._fetch("SELECT data FROM keys WHERE owner = ?", (owner,))
        return sum(1 for (data,) in rows if counts_toward_limit(self._record(data), now))

    async def create_key(
        self, record: KeyRecord, *, max_per_owner: int | None, now: float, max_grants: int | None = None
    ) -> None:
        await self._key_tx(None, None, record, max_per_owner, now, max_grants)

    async def update_key(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        *,
        max_per_owner: int | None,
        now: float,
        insert: KeyRecord | None = None,
    ) -> tuple[KeyRecord, KeyRecord]:
        out = await self._key_tx(key_id, change, insert, max_per_owner, now)
        assert out is not None
        return out

    async def _key_tx(
        self,
        key_id: str | None,
        change: Callable[[KeyRecord], KeyRecord] | None,
        insert: KeyRecord | None,
        limit: int | None,
        now: float,
        grants: int | None = None,
    ) -> tuple[KeyRecord, KeyRecord] | None:
        """Read, check and write in one ``BEGIN IMMEDIATE``: SQLite's write lock is taken before
        the first read, so no other task or process can write between the count and the insert."""
        return await shielded(self._key_tx_locked(key_id, change, insert, limit, now, grants))

    async def _key_tx_locked(
        self,
        key_id: str | None,
        change: Callable[[KeyRecord], KeyRecord] | None,
        insert: KeyRecord | None,
        limit: int | None,
        now: float,
        grants: int | None,
    ) -> tuple[KeyRecord, KeyRecord] | None:
        async with self._lock:
            try:
                await self._begin()
                try:
                    out = await self._key_tx_body(key_id, change, insert, limit, now, grants)
                    await self.db.execute("COMMIT")
                    return out
                except BaseException:
                    await self._rollback()
                    raise
            except sqlite3.IntegrityError:
                raise StoreError("a key with that id already exists") from None
            except sqlite3.Error as e:
                raise self._failed("key", e) from None

    async def _key_tx_body(
        self,
        key_id: str | None,
        change: Callable[[KeyRecord], KeyRecord] | None,
        insert: KeyRecord | None,
        limit: int | None,
        now: float,
        grants: int | None,
    ) -> tuple[KeyRecord, KeyRecord] | None:
        before: KeyRecord | None = None
        after: KeyRecord | None = None
        if key_id is not None and change is not None:
            async with self.db.execute(
                "SELECT k.data, l.at, l.ip FROM keys k LEFT JOIN last_used l ON l.id = k.id WHERE k.id = ?", (key_id,)
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                raise KeyMissing(f"no key with id {key_id!r}")
            before = self._record(*row)
            after = change(before)
            if after is before and insert is None:
                return before, after
        written = [r for r in (after, insert) if r is not None]
        owners = sorted({r.owner for r in written if r.owner is not None})
        owned: list[KeyRecord] = []
        if limit is not None and owners:
            for owner in owners:
                async with self.db.execute("SELECT data FROM keys WHERE owner = ?", (owner,)) as cur:
                    owned.extend(self._record(d) for (d,) in await cur.fetchall())
            check_owner_limit(owned, [before] if before is not None else [], written, limit, now)
        if grants is not None and insert is not None and insert.parent_id is not None:
            sql = "SELECT data FROM keys WHERE json_extract(data, '$.parent_id') = ?"  # grants live in the JSON
            async with self.db.execute(sql, (insert.parent_id,)) as cur:
                check_grant_limit([self._record(d) for (d,) in await cur.fetchall()], insert, grants, now)
        async with self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM keys") as cur:
            top = await cur.fetchone()
        seq = int(top[0]) if top else 0
        if after is not None and after is not before:
            seq += 1
            await self.db.execute(
                "UPDATE keys SET data = ?, owner = ?, seq = ? WHERE id = ?",
                (json.dumps(after.to_stored()), after.owner, seq, after.id),
            )
        if insert is not None:
            seq += 1
            await self.db.execute(
                "INSERT INTO keys (id, data, seq, owner) VALUES (?, ?, ?, ?)",
                (insert.id, json.dumps(insert.to_stored()), seq, insert.owner),
            )
        if before is None or after is None:
            return None
        return before, after

    # ----------------------------------------------------------------- state

    async def record_last_used(self, batch: dict[str, tuple[float, str]]) -> None:
        if batch:
            await self._write(
                "INSERT INTO last_used (id, at, ip) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET at = excluded.at, ip = excluded.ip WHERE excluded.at > last_used.at",
                [(k, at, ip) for k, (at, ip) in batch.items()],
                many=True,
                kind="last_used",
            )

    async def add_usage(self, batch: dict[tuple[str, str], UsageRow]) -> None:
        if batch:
            await self._write(
                "INSERT INTO usage (key_id, day, requests, errors, bytes, rate_limited) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(key_id, day) DO UPDATE SET requests = requests + excluded.requests, "
                "errors = errors + excluded.errors, bytes = bytes + excluded.bytes, "
                "rate_limited = rate_limited + excluded.rate_limited",
                [(k, d, u.requests, u.errors, u.bytes, u.rate_limited) for (k, d), u in batch.items()],
                many=True,
                kind="usage",
            )

    async def usage(self, key_id: str, days: int = 30) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT day, requests, errors, bytes, rate_limited FROM usage WHERE key_id = ? ORDER BY day DESC LIMIT ?",
            (key_id, days),
        )
        return [
            {"day": d, "requests": r, "errors": e, "bytes": b, "rate_limited": rl} for d, r, e, b, rl in reversed(rows)
        ]

    async def quota_used(self, key_id: str, scope: str, window: str) -> int:
        rows = await self._fetch(
            "SELECT used FROM quota WHERE key_id = ? AND scope = ? AND window = ?", (key_id, scope, window)
        )
        return int(rows[0][0]) if rows else 0

    async def add_quota(self, batch: dict[tuple[str, str, str], int]) -> None:
        if batch:
            await self._write(
                "INSERT INTO quota (key_id, scope, window, used) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(key_id, scope, window) DO UPDATE SET used = used + excluded.used",
                [(k, s, w, n) for (k, s, w), n in batch.items()],
                many=True,
                kind="quota",
            )

    async def set_quota(self, key_id: str, scope: str, window: str, used: int) -> None:
        await self._write(
            "INSERT INTO quota (key_id, scope, window, used) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(key_id, scope, window) DO UPDATE SET used = excluded.used",
            (key_id, scope, window, used),
            kind="quota",
        )

    def _audit_ready(self) -> bool:
        return self._db is not None

    async def _write_audit(self, batch: list[AuditEvent]) -> None:
        await self._write(
            "INSERT INTO audit (at, actor, action, key_id, detail) VALUES (?, ?, ?, ?, ?)",
            [(e.at, e.actor, e.action, e.key_id, json.dumps(e.detail)) for e in batch],
            many=True,
            kind="audit",
        )

    async def audit_log(self, key_id: str | None = None, limit: int = 100) -> list[AuditEvent]:
        if key_id:
            rows = await self._fetch(
                "SELECT at, actor, action, key_id, detail FROM audit WHERE key_id = ? ORDER BY id DESC LIMIT ?",
                (key_id, limit),
            )
        else:
            rows = await self._fetch(
                "SELECT at, actor, action, key_id, detail FROM audit ORDER BY id DESC LIMIT ?", (limit,)
            )
        held = self._pending_audit(key_id)[:limit]
        stored = [AuditEvent(at, actor, action, kid, json.loads(detail)) for at, actor, action, kid, detail in rows]
        return (held + stored)[:limit]
