"""Key stores: SQLite (the embedded default), a YAML file (for GitOps), PostgreSQL (fleets).

Both hold keys; mutable state (last used, usage history, quotas, audit) always lives
in SQLite, because a YAML keys file is typically a read-only ConfigMap. A PostgreSQL
store (``store.kind: postgres``, docs/postgres.md) holds keys and state for a fleet.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import StoreConfig
from .base import (
    GrantLimitReached,
    KeyChanges,
    KeyMissing,
    OwnerLimitReached,
    ReadOnlyStore,
    Store,
    StoreBusy,
    StoreError,
)
from .capped import CappedSqliteStore
from .sqlite import SqliteStore
from .yamlfile import YamlStore

__all__ = [
    "GrantLimitReached",
    "KeyChanges",
    "KeyMissing",
    "OwnerLimitReached",
    "ReadOnlyStore",
    "SqliteStore",
    "Store",
    "StoreBusy",
    "StoreError",
    "YamlStore",
    "open_store",
]


async def open_store(
    config: StoreConfig, *, max_lifetime: float | None = None, clock: Callable[[], float] | None = None
) -> Store:
    """Open the configured store; the caller closes it. ``max_lifetime`` (``keys.max_lifetime``) caps
    the keys of a YAML file, which no admin API call wrote (``sidecar.store.lifetime``), and the keys
    a database already holds when it is lowered or first set (``sidecar.store.capped``)."""
    store: Store
    if config.kind == "yaml":
        state = SqliteStore(config.state_path, config.busy_timeout)
        store = YamlStore(config.path, state, max_lifetime=max_lifetime, clock=clock)
    elif config.kind == "postgres" and config.postgres is not None:
        from .capped_pg import CappedPostgresStore  # asyncpg is imported only when used

        store = pg = CappedPostgresStore(config.dsn or "", **config.postgres.model_dump(exclude={"dsn_env"}))
        pg.set_lifetime_cap(max_lifetime, clock)
    else:
        store = db = CappedSqliteStore(config.path, config.busy_timeout)
        db.set_lifetime_cap(max_lifetime, clock)
    await store.open()
    return store
