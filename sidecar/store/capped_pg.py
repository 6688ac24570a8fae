"""The PostgreSQL key store with ``keys.max_lifetime`` applied to what it reads (``sidecar.store.capped``).

A module of its own so asyncpg is imported only when a PostgreSQL store is configured.
"""

from __future__ import annotations

from .capped import LifetimeCap
from .postgres import PostgresStore

__all__ = ["CappedPostgresStore"]


class CappedPostgresStore(LifetimeCap, PostgresStore):
    """Keys as loaded, polled (LISTEN/NOTIFY, resync) and listed, each capped at ``created_at + max_lifetime``."""
