"""The store interface every backend implements, and its errors.

Keys: ``load_all`` once at start, then ``poll`` for what any process changed since.
State (last used, usage, quotas, audit) always lives in SQLite, whatever holds the keys.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..models import KeyRecord

__all__ = ["AuditEvent", "KeyChanges", "ReadOnlyStore", "Store", "StoreBusy", "StoreError", "UsageRow"]


class StoreError(Exception):
    """The store could not do what was asked; the message is safe to show."""


class StoreBusy(StoreError):
    """The database stayed locked past the busy timeout (another writer holds it)."""


class ReadOnlyStore(StoreError):
    """Keys in a YAML store are changed by editing the file, not through the API."""


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """What changed since the last poll. ``full`` replaces the whole table."""

    records: list[KeyRecord]
    full: bool = False


@dataclass(slots=True)
class UsageRow:
    requests: int = 0
    errors: int = 0
    bytes: int = 0
    rate_limited: int = 0


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: float
    actor: str
    action: str
    key_id: str | None
    detail: dict[str, Any] = field(default_factory=dict)


class Store(ABC):
    writable = True

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    # -- keys
    @abstractmethod
    async def load_all(self) -> dict[str, KeyRecord]: ...

    @abstractmethod
    async def poll(self, force: bool = False) -> KeyChanges | None:
        """Changes made by any process since the last call (or load_all), or None.

        ``force`` re-reads everything (SIGHUP)."""

    @abstractmethod
    async def get(self, key_id: str) -> KeyRecord | None: ...

    @abstractmethod
    async def list_keys(self) -> list[KeyRecord]: ...

    @abstractmethod
    async def insert(self, records: list[KeyRecord]) -> None: ...

    @abstractmethod
    async def update(self, record: KeyRecord) -> None: ...

    async def count_active(self, owner: str, now: float | None = None) -> int:
        """Active (not revoked, not expired) keys of ``owner``: for ``keys.max_keys_per_owner``."""
        t = time.time() if now is None else now
        return sum(1 for r in await self.list_keys() if r.owner == owner and r.state(t) == "active")

    # -- state (always SQLite)
    @abstractmethod
    async def record_last_used(self, batch: dict[str, tuple[float, str]]) -> None: ...

    @abstractmethod
    async def add_usage(self, batch: dict[tuple[str, str], UsageRow]) -> None:
        """Add to daily buckets keyed by (key id, YYYY-MM-DD)."""

    @abstractmethod
    async def usage(self, key_id: str, days: int = 30) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def quota_used(self, key_id: str, scope: str, window: str) -> int: ...

    @abstractmethod
    async def add_quota(self, batch: dict[tuple[str, str, str], int]) -> None:
        """Add to quota counters keyed by (key id, scope, window start)."""

    @abstractmethod
    async def set_quota(self, key_id: str, scope: str, window: str, used: int) -> None: ...

    @abstractmethod
    async def audit(self, event: AuditEvent) -> None: ...

    @abstractmethod
    async def audit_log(self, key_id: str | None = None, limit: int = 100) -> list[AuditEvent]: ...
