"""The store interface every backend implements, and its errors.

Keys: ``load_all`` once at start, then ``poll`` for what any process changed since.
State (last used, usage, quotas, audit) always lives in SQLite, whatever holds the keys.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..auth.models import KeyRecord

__all__ = [
    "AuditEvent",
    "KeyChanges",
    "KeyMissing",
    "OAuthToken",
    "OwnerLimitReached",
    "ReadOnlyStore",
    "Store",
    "StoreBusy",
    "StoreError",
    "UsageRow",
    "check_owner_limit",
    "counts_toward_limit",
]


class StoreError(Exception):
    """The store could not do what was asked; the message is safe to show.

    ``reason`` names a fault of the database file (``locked``, ``disk_full``, ``read_only``,
    ``io_error``): the request was fine and may succeed later. ``""`` for anything else."""

    reason = ""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


class StoreBusy(StoreError):
    """The database stayed locked past the busy timeout (another writer holds it)."""

    reason = "locked"


class ReadOnlyStore(StoreError):
    """Keys in a YAML store are changed by editing the file, not through the API."""


class GrantLimitReached(StoreError):
    """The approving key already has ``oauth.max_grants_per_key`` active grants (checked in the write's
    transaction, so grants written at once, by any process, cannot pass the cap together)."""

    def __init__(self, parent: str, limit: int) -> None:
        super().__init__(f"key {parent!r} already has the maximum of {limit} active OAuth grants")
        self.parent, self.limit = parent, limit


class OwnerLimitReached(StoreError):
    """The write would take an owner past ``keys.max_keys_per_owner`` (checked in the write's transaction)."""

    def __init__(self, owner: str, limit: int) -> None:
        super().__init__(f"owner {owner!r} already has the maximum of {limit} active keys")
        self.owner, self.limit = owner, limit


class KeyMissing(StoreError):
    """``update_key`` was asked for an id the store does not hold."""


def counts_toward_limit(rec: KeyRecord, now: float) -> bool:
    """Does this key count for its owner's ``max_keys_per_owner``? Active keys do, except one that
    was rotated and is only living out its grace period (its successor counts instead)."""
    # OAuth grants (child keys) are capped per approving key (oauth.max_grants_per_key), not here.
    return rec.owner is not None and rec.rotated_to is None and rec.parent_id is None and rec.state(now) == "active"


def check_owner_limit(
    owned: Iterable[KeyRecord], before: Iterable[KeyRecord], after: Iterable[KeyRecord], limit: int | None, now: float
) -> None:
    """Refuse a write that raises an owner's count past ``limit``.

    ``owned`` are the stored keys of the owners concerned, read inside the write's transaction;
    ``before``/``after`` the records the write replaces and writes. A write that does not raise
    a count (a rotation: the old key stops counting as its successor starts) always passes, even
    for an owner already over a limit that was lowered since."""
    if limit is None:
        return
    after = list(after)
    owners = {r.owner for r in after if counts_toward_limit(r, now)}
    if not owners:
        return
    replaced = {r.id for r in before} | {r.id for r in after}
    for owner in owners:
        was = sum(1 for r in owned if r.owner == owner and counts_toward_limit(r, now))
        kept = sum(1 for r in owned if r.owner == owner and r.id not in replaced and counts_toward_limit(r, now))
        now_count = kept + sum(1 for r in after if r.owner == owner and counts_toward_limit(r, now))
        if now_count > limit and now_count > was:
            raise OwnerLimitReached(str(owner), limit)


def check_grant_limit(siblings: Iterable[KeyRecord], record: KeyRecord, limit: int | None, now: float) -> None:
    """Refuse a new grant (child key) when its parent already has ``limit`` active ones.

    ``siblings`` are the stored children of ``record.parent_id``, read inside the write's transaction."""
    if limit is None or record.parent_id is None:
        return
    parent = record.parent_id
    active = sum(1 for r in siblings if r.parent_id == parent and r.id != record.id and r.state(now) == "active")
    if active >= limit:
        raise GrantLimitReached(record.parent_id, limit)


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


@dataclass(frozen=True, slots=True)
class OAuthToken:
    """An OAuth authorization code, access or refresh token as stored: under the SHA-256 of the
    token (``digest``, hex), never the token itself (sidecar/oauth/tokens.py)."""

    digest: str
    kind: str  # "code" | "access" | "refresh"
    key_id: str  # the grant (a child key) it belongs to; for a code, the id the grant will get
    client_id: str
    resource: str  # the MCP upstream id it is valid at (RFC 8707)
    expires_at: float
    data: Mapping[str, Any] = field(default_factory=dict)  # a code's redirect URI, PKCE challenge, grant
    used_at: float | None = None  # codes and refresh tokens are single-use


_NO_OAUTH = "this store does not hold OAuth state (use the sqlite or postgres store)"


class Store(ABC):
    writable = True

    @property
    def write_failures(self) -> Mapping[tuple[str, str], int]:
        """(what was written, ``StoreError.reason``) -> writes the database refused, since start
        (``sidecar_store_write_failures_total``)."""
        return {}

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

    # Key lifecycle writes. Every store implements these two atomically: the read of the
    # current record, the owner count and the write happen in ONE transaction that other
    # writers (other tasks, other processes, other replicas) cannot interleave with —
    # SQLite: ``BEGIN IMMEDIATE``; Postgres: one transaction holding
    # ``pg_advisory_xact_lock`` on the owner(s) and ``SELECT … FOR UPDATE`` on the key.
    # ``check_owner_limit`` is the shared rule. Read-only stores raise ``ReadOnlyStore``.

    @abstractmethod
    async def create_key(
        self, record: KeyRecord, *, max_per_owner: int | None, now: float, max_grants: int | None = None
    ) -> None:
        """Insert a new key unless its owner is at ``max_per_owner`` (``OwnerLimitReached``) or, for a
        grant, its parent at ``max_grants`` active grants (``GrantLimitReached``)."""

    @abstractmethod
    async def update_key(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        *,
        max_per_owner: int | None,
        now: float,
        insert: KeyRecord | None = None,
    ) -> tuple[KeyRecord, KeyRecord]:
        """Read-modify-write one key: ``change`` gets the record as stored now and returns the
        new one (or the same object: nothing is written), or raises to abort. ``insert`` adds
        a key in the same transaction (rotation's successor). Returns (before, after).
        ``KeyMissing`` when there is no such key; ``OwnerLimitReached`` per ``check_owner_limit``."""

    async def count_active(self, owner: str, now: float | None = None) -> int:
        """Keys of ``owner`` that count for ``keys.max_keys_per_owner`` (``counts_toward_limit``)."""
        t = time.time() if now is None else now
        return sum(1 for r in await self.list_keys() if r.owner == owner and counts_toward_limit(r, t))

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
    async def audit(self, event: AuditEvent) -> None:
        """Record an event. A write the database refuses is held in memory and retried by
        ``flush_pending``, never raised: the change it describes has already been made."""

    async def flush_pending(self) -> None:  # noqa: B027 - a store that holds nothing back has nothing to do
        """Retry writes a fault held back (audit events); called with every usage flush."""

    @abstractmethod
    async def audit_log(self, key_id: str | None = None, limit: int = 100) -> list[AuditEvent]: ...

    # -- OAuth (sidecar/oauth/). Grants are keys (``KeyRecord.parent_id``/``grant``); these hold
    # codes, tokens (by digest) and registered clients. Not abstract: a store without them
    # refuses ``oauth.enabled`` at start. SQLite: sidecar/store/sqlite_oauth.py.
    # Postgres: sidecar/store/pg_oauth.py.

    async def list_grants(self, key_id: str | None = None, client_id: str | None = None) -> list[KeyRecord]:
        """Grants (child keys), optionally of one approving key or one client. Postgres: by its
        indexed parent_id column; others: a scan of every key."""
        return [
            r for r in await self.list_keys()
            if r.parent_id is not None and (key_id is None or r.parent_id == key_id)
            and (client_id is None or r.grant.get("client_id") == client_id)
        ]  # fmt: skip

    async def oauth_save(self, token: OAuthToken) -> None:
        """Store a new code or token."""
        raise StoreError(_NO_OAUTH)

    async def oauth_get(self, digest: str) -> OAuthToken | None:
        """The token stored under ``digest``, used or not, expired or not (the caller judges)."""
        raise StoreError(_NO_OAUTH)

    async def oauth_use(self, digest: str, now: float) -> OAuthToken | None:
        """Mark a code or refresh token used, atomically across processes; it is returned as it was
        *before*, so ``used_at is None`` means this call was its one use and anything else a replay."""
        raise StoreError(_NO_OAUTH)

    async def oauth_forget(self, key_id: str, now: float) -> None:
        """Delete every code and token of grant ``key_id`` (``""``: none), and any expired a day before ``now``."""
        raise StoreError(_NO_OAUTH)

    async def oauth_save_client(self, client_id: str, data: Mapping[str, Any], now: float) -> None:
        """Register (or replace) a client (RFC 7591 dynamic registration)."""
        raise StoreError(_NO_OAUTH)

    async def oauth_client(self, client_id: str) -> dict[str, Any] | None:
        raise StoreError(_NO_OAUTH)

    async def oauth_clients(self) -> list[dict[str, Any]]:
        """Every registered client, oldest first."""
        raise StoreError(_NO_OAUTH)

    async def oauth_client_count(self) -> int:
        """How many clients are registered (the registration cap; stores with SQL count without reading them)."""
        return len(await self.oauth_clients())

    async def oauth_delete_client(self, client_id: str) -> bool:
        """Remove a registered client; False when there was none."""
        raise StoreError(_NO_OAUTH)
