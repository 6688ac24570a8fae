"""PostgreSQL store (asyncpg): keys, grants, last use, usage, quotas and audit for a fleet.

Every replica of a fleet opens the same database. Reads go through a small pool; one more
connection LISTENs for key changes (``pglisten.Listener``).

**Propagation.** Every key write runs in one transaction holding
``pg_advisory_xact_lock(KEYS_LOCK)``; a trigger stamps the row with the next ``seq`` and a
statement trigger sends ``NOTIFY sidecar_keys`` at commit. Because writers take the lock
before the sequence, ``seq`` order is commit order, so "rows past the last seq I saw" never
skips a row. A notification only marks the store dirty; the verifier's next ``poll``
(every ``store.poll_interval``, 0.5 s) reads the rows past the last seq — no query at all
when nothing changed. Safety nets: after every (re)connection of the listener the store
catches up the same way, and every ``resync_interval`` it compares (id, seq) of the whole
table with what it has handed out and re-reads what differs (a change written without the
lock, or a row deleted by hand, is found there).

**Faults.** A database restart or a cut leaves the loaded keys in memory: requests keep
being verified. Reads and writes fail fast with ``StoreError(reason="unavailable")`` for a
back-off window after a connection failure instead of each waiting out a connect timeout;
the usage recorder and the quota book keep their counts and write them once it is back,
audit events are held in memory (as in SQLite) and written by ``flush_pending``.

**Usage and quotas.** One transaction per flush (batched upserts), so a replica writes usage
at most once per ``store.usage_flush_interval``. Quota additions are atomic in the database
(``used = used + n``): no count is lost or doubled between replicas. Counting each request
against a fleet-wide quota *before* answering it is the Redis limiter's job
(``rate_limits.backend: redis``); see docs/postgres.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import asyncpg

from ..auth.models import KeyRecord
from ..config.postgres import describe_dsn
from .base import (
    KeyChanges,
    KeyMissing,
    Store,
    StoreError,
    check_grant_limit,
    check_owner_limit,
    counts_toward_limit,
)
from .pg_oauth import PgOAuth
from .pglisten import Listener, is_connection_error, wrap
from .pgstate import PgState
from .postgres_schema import CHANNEL, KEYS_LOCK, SCHEMA_VERSION, NewerSchema, migrate, version
from .sqlitefaults import shielded

__all__ = ["PostgresStore", "record_of", "row_of"]

log = logging.getLogger("sidecar.store")

MAX_BACKOFF = 5.0
_KEY_COLS = 'k.data::text, k.seq, k.parent_id, k."grant"::text, l.at, l.ip'
_FROM = "FROM sidecar_keys k LEFT JOIN sidecar_last_used l ON l.id = k.id"


def row_of(rec: KeyRecord) -> tuple[str, str, str | None, str | None, str]:
    """(id, data, owner, parent_id, grant): parent and grant are columns, the rest the stored JSON."""
    d = rec.to_stored()
    d.pop("parent_id", None)
    d.pop("grant", None)
    return rec.id, json.dumps(d), rec.owner, rec.parent_id, json.dumps(dict(rec.grant))


def record_of(data: str, parent_id: str | None, grant: str | None, at: float | None, ip: str | None) -> KeyRecord:
    rec = KeyRecord.from_stored(json.loads(data), at, ip)
    g = json.loads(grant) if grant else {}
    if parent_id is not None or g:
        rec = replace(rec, parent_id=parent_id, grant=g)
    return rec


class Unreachable(StoreError):
    """Refused without trying: the last attempt, moments ago, found the database unreachable."""

    reason = "unavailable"


class PostgresStore(PgOAuth, PgState, Store):
    def __init__(
        self,
        dsn: str,
        *,
        auto_migrate: bool = True,
        resync_interval: float = 60.0,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        listen: bool = True,
    ) -> None:
        self._dsn = dsn
        self.where = describe_dsn(dsn)
        self.auto_migrate = auto_migrate
        self.resync_interval = resync_interval
        self.pool_size = pool_size
        self.timeout = connect_timeout
        self._listen = listen  # the CLI has no table to keep current
        self._pool: asyncpg.Pool | None = None
        self.listener: Listener | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._seq = 0
        self._known: dict[str, int] = {}  # key id -> seq handed out (resync compares it)
        self._dirty = True
        self._next_resync = 0.0
        self._retry_at = 0.0  # fail fast until then: the last attempt found the database unreachable
        self._backoff = 0.0
        self._failures: dict[tuple[str, str], int] = {}
        self._init_audit_backlog()
        self._expiring: asyncio.Future[None] | None = None
        self.resync_repairs = 0  # records a resync found that notifications had missed

    @property
    def write_failures(self) -> dict[tuple[str, str], int]:
        return self._failures

    # ------------------------------------------------------------- connections

    async def _connect(self) -> Any:
        return await asyncpg.connect(self._dsn, timeout=self.timeout, command_timeout=self.timeout)

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                # min_size 0: connections are made when needed; asyncpg's own floor keeping would retry
                # (and log a traceback) in the background through an outage the listener already handles.
                self._dsn,
                min_size=0,
                max_size=self.pool_size,
                timeout=self.timeout,
                command_timeout=self.timeout,
            )
            async with self._pool.acquire() as conn:
                if self.auto_migrate:
                    applied = await migrate(conn)
                    if applied:
                        log.info("key database (%s): migrated to schema version %d", self.where, applied[-1])
                else:
                    found = await version(conn)
                    if found > SCHEMA_VERSION:
                        raise NewerSchema(found)
                    if found < SCHEMA_VERSION:
                        raise StoreError(
                            f"the key database ({self.where}) has schema version {found}, this sidecar needs "
                            f"{SCHEMA_VERSION}: run `sidecar store migrate` (or set store.auto_migrate: true)"
                        )
        except NewerSchema as e:
            await self.close()
            raise StoreError(f"key database ({self.where}): {e}") from None
        except StoreError:
            await self.close()
            raise
        except Exception as e:
            await self.close()
            raise wrap(e, self.where) from None
        self._next_resync = time.monotonic() + self.resync_interval
        if self._listen:
            self.listener = Listener(
                self._connect, CHANNEL, where=self.where, on_notify=self._notified, on_up=self._up,
                on_down=self._down, timeout=self.timeout, max_backoff=MAX_BACKOFF,
            )  # fmt: skip
            self._listen_task = asyncio.create_task(self.listener.run())

    async def close(self) -> None:
        if self._pool is not None and self._audit_backlog:
            await self.flush_pending()
            if self._audit_backlog:
                log.error("%d audit event(s) could not be written to %s and are lost: %s",
                          len(self._audit_backlog), self.where,
                          ", ".join(f"{e.action} {e.key_id}" for e in self._audit_backlog))  # fmt: skip
        if self._listen_task is not None:
            task, self._listen_task = self._listen_task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.listener is not None:
            await self.listener.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:  # gracefully unless the database is gone: then a goodbye would wait out the timeout
                await asyncio.wait_for(pool.close(), self.timeout if self.available else 0.01)
            except TimeoutError:
                pool.terminate()

    def _notified(self) -> None:
        self._dirty = True

    def _up(self) -> None:
        self._dirty = True  # whatever changed while nobody listened
        self._retry_at, self._backoff = 0.0, 0.0

    def _down(self) -> None:
        self._dirty = True
        if self._pool is not None:  # the pool's connections died with the server's sessions
            self._expiring = asyncio.ensure_future(self._pool.expire_connections())
        self._trip()

    def _trip(self) -> None:
        self._backoff = min(MAX_BACKOFF, max(0.1, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._retry_at

    @asynccontextmanager
    async def _conn(self, kind: str = "") -> AsyncIterator[Any]:
        """A pooled connection; errors become ``StoreError`` and trip the fail-fast window."""
        if self._pool is None:
            raise StoreError("store is not open")
        if not self.available:
            err: StoreError = Unreachable(f"the key database ({self.where}) is unreachable; retrying")
            if kind:
                self._count(kind, err)
            raise err
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn:
                yield conn
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
            if is_connection_error(e):
                self._trip()
            err = wrap(e, self.where)
            if kind:
                self._count(kind, err)
            raise err from None
        self._backoff = 0.0

    def _count(self, kind: str, err: StoreError) -> None:
        k = (kind, err.reason or "other")
        self._failures[k] = self._failures.get(k, 0) + 1

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """A read; retried once at once on fresh connections when a pooled one turns out dead
        (the database restarted since it was opened), before the fail-fast window applies."""
        for attempt in (1, 2):
            try:
                async with self._conn() as conn:
                    return list(await conn.fetch(sql, *args))
            except Unreachable:
                raise
            except StoreError as e:
                if attempt == 2 or e.reason != "unavailable" or self._pool is None:
                    raise
                await self._pool.expire_connections()
                self._retry_at = 0.0
        raise AssertionError("unreachable")

    async def _write(self, kind: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Rows in one transaction (one flush = one write), finished even if the caller is cancelled."""

        async def run() -> None:
            async with self._conn(kind) as conn, conn.transaction():
                await conn.executemany(sql, rows)

        if rows:
            await shielded(run())

    # ------------------------------------------------------------------ keys

    def _remember(self, rows: list[Any]) -> list[KeyRecord]:
        out = []
        for data, seq, parent, grant, at, ip in rows:
            rec = record_of(data, parent, grant, at, ip)
            self._known[rec.id] = seq
            self._seq = max(self._seq, seq)
            out.append(rec)
        return out

    async def load_all(self) -> dict[str, KeyRecord]:
        self._dirty = False
        rows = await self._fetch(f"SELECT {_KEY_COLS} {_FROM} ORDER BY k.seq")
        self._known = {}
        recs = self._remember(rows) if len(rows) <= 1000 else await asyncio.to_thread(self._remember, rows)
        return {r.id: r for r in recs}

    async def poll(self, force: bool = False) -> KeyChanges | None:
        if force:
            return KeyChanges(records=list((await self.load_all()).values()), full=True)
        now = time.monotonic()
        if not self.available:
            return None  # the listener reconnects; the outage was logged once, not every poll
        if now >= self._next_resync:
            return await self._resync(now)
        listening = self.listener is not None and self.listener.fresh  # a half-open socket is not
        if not self._dirty and listening:
            return None
        self._dirty = False  # before the read: a notification arriving during it marks it again
        try:
            rows = await self._fetch(f"SELECT {_KEY_COLS} {_FROM} WHERE k.seq > $1 ORDER BY k.seq", self._seq)
        except StoreError:
            self._dirty = True
            raise
        return KeyChanges(records=self._remember(rows)) if rows else None

    async def _resync(self, now: float) -> KeyChanges | None:
        """Compare the whole table's (id, seq) with what was handed out; re-read what differs."""
        self._next_resync = now + self.resync_interval
        self._dirty = False
        try:
            # Every write stamps a new seq: equal (count, max, sum) means nothing was missed,
            # checked without sending the table (100 000 keys: one row instead of 0.4 s).
            ((count, top, total),) = await self._fetch(
                "SELECT count(*), COALESCE(max(seq), 0), COALESCE(sum(seq), 0) FROM sidecar_keys"
            )
            known = self._known.values()
            if (count, top, total) == (len(self._known), max(known, default=0), sum(known)):
                return None
            pairs = await self._fetch("SELECT id, seq FROM sidecar_keys")
        except StoreError:
            self._dirty = True
            raise
        ids = {i for i, _ in pairs}
        if set(self._known) - ids:  # deleted by hand: only a full reload can say so
            log.warning("key database (%s): keys were deleted outside the sidecar; reloading all", self.where)
            return KeyChanges(records=list((await self.load_all()).values()), full=True)
        stale = [i for i, seq in pairs if self._known.get(i) != seq]
        if not stale:
            return None
        rows = await self._fetch(f"SELECT {_KEY_COLS} {_FROM} WHERE k.id = ANY($1::text[]) ORDER BY k.seq", stale)
        recs = self._remember(rows)
        missed = [r.id for r in recs]
        self.resync_repairs += len(missed)
        log.warning("key database (%s): resync found %d change(s) no notification announced", self.where, len(missed))
        return KeyChanges(records=recs)

    async def get(self, key_id: str) -> KeyRecord | None:
        rows = await self._fetch(f"SELECT {_KEY_COLS} {_FROM} WHERE k.id = $1", key_id)
        return record_of(*rows[0][:1], *rows[0][2:]) if rows else None

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._fetch(f"SELECT {_KEY_COLS} {_FROM} ORDER BY k.seq")
        return [record_of(d, p, g, at, ip) for d, _, p, g, at, ip in rows]

    async def list_grants(self, key_id: str | None = None, client_id: str | None = None) -> list[KeyRecord]:
        """Grants by the ``parent_id`` column (indexed): not a scan of every key."""
        where, args = ("k.parent_id = $1", [key_id]) if key_id is not None else ("k.parent_id IS NOT NULL", [])
        rows = await self._fetch(f"SELECT {_KEY_COLS} {_FROM} WHERE {where} ORDER BY k.seq", *args)
        found = [record_of(d, p, g, at, ip) for d, _, p, g, at, ip in rows]
        return [r for r in found if client_id is None or r.grant.get("client_id") == client_id]

    async def insert(self, records: list[KeyRecord]) -> None:
        if records:
            await shielded(self._key_write(lambda conn: self._insert_rows(conn, records)))

    async def update(self, record: KeyRecord) -> None:
        async def run(conn: Any) -> None:
            await self._update_row(conn, record)

        await shielded(self._key_write(run))

    async def _key_write(self, body: Callable[[Any], Any]) -> Any:
        async with self._conn("key") as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", KEYS_LOCK)
                out = await body(conn)
            self._dirty = True  # this process's next poll sees its own write without waiting for the NOTIFY
            return out

    @staticmethod
    async def _insert_rows(conn: Any, records: list[KeyRecord]) -> None:
        await conn.executemany(
            'INSERT INTO sidecar_keys (id, data, owner, parent_id, "grant") VALUES ($1, $2::jsonb, $3, $4, $5::jsonb)',
            [row_of(r) for r in records],
        )

    @staticmethod
    async def _update_row(conn: Any, rec: KeyRecord) -> None:
        kid, data, owner, parent, grant = row_of(rec)
        await conn.execute(
            'UPDATE sidecar_keys SET data = $2::jsonb, owner = $3, parent_id = $4, "grant" = $5::jsonb WHERE id = $1',
            kid, data, owner, parent, grant,
        )  # fmt: skip

    async def count_active(self, owner: str, now: float | None = None) -> int:
        t = time.time() if now is None else now
        rows = await self._fetch(f"SELECT {_KEY_COLS} {_FROM} WHERE k.owner = $1", owner)
        return sum(1 for d, _, p, g, at, ip in rows if counts_toward_limit(record_of(d, p, g, at, ip), t))

    async def create_key(
        self, record: KeyRecord, *, max_per_owner: int | None, now: float, max_grants: int | None = None
    ) -> None:
        await shielded(
            self._key_write(lambda conn: self._key_tx(conn, None, None, record, max_per_owner, now, max_grants))
        )

    async def update_key(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        *,
        max_per_owner: int | None,
        now: float,
        insert: KeyRecord | None = None,
    ) -> tuple[KeyRecord, KeyRecord]:
        out = await shielded(
            self._key_write(lambda conn: self._key_tx(conn, key_id, change, insert, max_per_owner, now))
        )
        assert out is not None
        return out  # type: ignore[no-any-return]

    async def _key_tx(
        self,
        conn: Any,
        key_id: str | None,
        change: Callable[[KeyRecord], KeyRecord] | None,
        insert: KeyRecord | None,
        limit: int | None,
        now: float,
        grants: int | None = None,
    ) -> tuple[KeyRecord, KeyRecord] | None:
        """Read, check and write under the keys lock (held by ``_key_write``): no other writer of
        any process interleaves between the owner count and the write."""
        before: KeyRecord | None = None
        after: KeyRecord | None = None
        if key_id is not None and change is not None:
            row = await conn.fetchrow(f"SELECT {_KEY_COLS} {_FROM} WHERE k.id = $1 FOR UPDATE OF k", key_id)
            if row is None:
                raise KeyMissing(f"no key with id {key_id!r}")
            before = record_of(row[0], row[2], row[3], row[4], row[5])
            after = change(before)
            if after is before and insert is None:
                return before, after
        written = [r for r in (after, insert) if r is not None]
        owners = sorted({r.owner for r in written if r.owner is not None})
        if limit is not None and owners:
            rows = await conn.fetch(f"SELECT {_KEY_COLS} {_FROM} WHERE k.owner = ANY($1::text[])", owners)
            owned = [record_of(d, p, g, at, ip) for d, _, p, g, at, ip in rows]
            check_owner_limit(owned, [before] if before is not None else [], written, limit, now)
        if grants is not None and insert is not None and insert.parent_id is not None:
            rows = await conn.fetch(f"SELECT {_KEY_COLS} {_FROM} WHERE k.parent_id = $1", insert.parent_id)
            check_grant_limit([record_of(d, p, g, at, ip) for d, _, p, g, at, ip in rows], insert, grants, now)
        if after is not None and after is not before:
            await self._update_row(conn, after)
        if insert is not None:
            await self._insert_rows(conn, [insert])
        if before is None or after is None:
            return None
        return before, after
