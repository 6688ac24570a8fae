"""Audit events held while the database refuses writes: the SQLite and PostgreSQL stores share it.

An audit event describes a change already made, so a write the database refuses is never raised:
the event waits here (newest last, at most ``MAX_AUDIT_BACKLOG``; past it the oldest is dropped,
counted and logged) and is written with the next flush. One flush at a time (``_audit_lock``), so
no event is written twice; the audit trail shows held events before stored ones.
"""

from __future__ import annotations

import asyncio
import logging

from .base import AuditEvent, StoreError
from .sqlitefaults import shielded

__all__ = ["MAX_AUDIT_BACKLOG", "AuditBacklog"]

log = logging.getLogger("sidecar.store")

MAX_AUDIT_BACKLOG = 10_000  # audit events held while the database refuses writes; older ones are dropped past it


class AuditBacklog:
    """The held events of one store; the store gives ``_write_audit`` and ``_audit_ready``."""

    _failures: dict[tuple[str, str], int]

    def _init_audit_backlog(self) -> None:
        self._audit_backlog: list[AuditEvent] = []
        self._audit_lock = asyncio.Lock()  # one backlog write at a time: no event written twice

    def _audit_ready(self) -> bool:
        """Whether the database is open (a closed store keeps its events held)."""
        raise NotImplementedError

    async def _write_audit(self, batch: list[AuditEvent]) -> None:
        """Write ``batch`` in one go, or raise ``StoreError``."""
        raise NotImplementedError

    async def audit(self, event: AuditEvent) -> None:
        if len(self._audit_backlog) >= MAX_AUDIT_BACKLOG:
            lost = self._audit_backlog.pop(0)
            self._failures[("audit", "dropped")] = self._failures.get(("audit", "dropped"), 0) + 1
            log.error("audit backlog full (%d): dropped %s %s of %s", MAX_AUDIT_BACKLOG, lost.action, lost.key_id,
                      lost.at)  # fmt: skip
        self._audit_backlog.append(event)
        await self.flush_pending()

    async def flush_pending(self) -> None:
        await shielded(self._flush_audit())  # a cancel must not leave written events in the backlog

    async def _flush_audit(self) -> None:
        async with self._audit_lock:
            batch = list(self._audit_backlog)
            if not batch or not self._audit_ready():
                return
            try:
                await self._write_audit(batch)
            except StoreError as e:
                log.warning("audit write failed, %d event(s) held for the next try: %s", len(batch), e)
                return
            del self._audit_backlog[: len(batch)]

    def _pending_audit(self, key_id: str | None) -> list[AuditEvent]:
        """Held events, newest first: the audit trail shows them before they reach the database."""
        return [e for e in reversed(self._audit_backlog) if not key_id or e.key_id == key_id]
