"""The PostgreSQL store's state tables: last use, usage, quotas and the audit trail.

A mixin of ``PostgresStore`` (``postgres.py`` holds the connections and the keys). Every
write is one transaction of batched upserts that add to what is there (``requests =
requests + n``, ``used = used + n``), so replicas never overwrite each other; rows are
written in sorted order so two replicas flushing at once never deadlock. Audit events the
database refuses are held in memory and written by ``flush_pending``, as with SQLite.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .auditbacklog import AuditBacklog
from .base import AuditEvent, UsageRow

__all__ = ["PgState"]

log = logging.getLogger("sidecar.store")


class PgState(AuditBacklog):
    """Last use, usage, quotas, audit; needs ``_write``, ``_fetch`` and the fields below."""

    _failures: dict[tuple[str, str], int]
    _pool: Any

    async def _write(self, kind: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    async def record_last_used(self, batch: dict[str, tuple[float, str]]) -> None:
        await self._write(
            "last_used",
            "INSERT INTO sidecar_last_used (id, at, ip) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE "
            "SET at = excluded.at, ip = excluded.ip WHERE excluded.at > sidecar_last_used.at",
            [(k, at, ip) for k, (at, ip) in sorted(batch.items())],  # sorted: replicas lock rows in one order
        )

    async def add_usage(self, batch: dict[tuple[str, str], UsageRow]) -> None:
        await self._write(
            "usage",
            "INSERT INTO sidecar_usage AS u (key_id, day, requests, errors, bytes, rate_limited) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_id, day) DO UPDATE SET "
            "requests = u.requests + excluded.requests, errors = u.errors + excluded.errors, "
            "bytes = u.bytes + excluded.bytes, rate_limited = u.rate_limited + excluded.rate_limited",
            [(k, d, u.requests, u.errors, u.bytes, u.rate_limited) for (k, d), u in sorted(batch.items())],
        )

    async def usage(self, key_id: str, days: int = 30) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT day, requests, errors, bytes, rate_limited FROM sidecar_usage WHERE key_id = $1 "
            "ORDER BY day DESC LIMIT $2",
            key_id,
            days,
        )
        return [
            {"day": d, "requests": r, "errors": e, "bytes": b, "rate_limited": rl} for d, r, e, b, rl in reversed(rows)
        ]

    async def quota_used(self, key_id: str, scope: str, window: str) -> int:
        rows = await self._fetch(
            "SELECT used FROM sidecar_quota WHERE key_id = $1 AND scope = $2 AND window_id = $3", key_id, scope, window
        )
        return int(rows[0][0]) if rows else 0

    async def add_quota(self, batch: dict[tuple[str, str, str], int]) -> None:
        await self._write(
            "quota",
            "INSERT INTO sidecar_quota AS q (key_id, scope, window_id, used) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (key_id, scope, window_id) DO UPDATE SET used = q.used + excluded.used",
            [(k, s, w, n) for (k, s, w), n in sorted(batch.items())],
        )

    async def set_quota(self, key_id: str, scope: str, window: str, used: int) -> None:
        await self._write(
            "quota",
            "INSERT INTO sidecar_quota (key_id, scope, window_id, used) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (key_id, scope, window_id) DO UPDATE SET used = excluded.used",
            [(key_id, scope, window, used)],
        )

    def _audit_ready(self) -> bool:
        return self._pool is not None

    async def _write_audit(self, batch: list[AuditEvent]) -> None:
        await self._write(
            "audit",
            "INSERT INTO sidecar_audit (at, actor, action, key_id, detail) VALUES ($1, $2, $3, $4, $5::jsonb)",
            [(e.at, e.actor, e.action, e.key_id, json.dumps(e.detail)) for e in batch],
        )

    async def audit_log(self, key_id: str | None = None, limit: int = 100) -> list[AuditEvent]:
        cols = "SELECT at, actor, action, key_id, detail::text FROM sidecar_audit"
        if key_id:
            rows = await self._fetch(f"{cols} WHERE key_id = $1 ORDER BY id DESC LIMIT $2", key_id, limit)
        else:
            rows = await self._fetch(f"{cols} ORDER BY id DESC LIMIT $1", limit)
        held = self._pending_audit(key_id)[:limit]
        stored = [AuditEvent(at, actor, action, kid, json.loads(detail)) for at, actor, action, kid, detail in rows]
        return (held + stored)[:limit]
