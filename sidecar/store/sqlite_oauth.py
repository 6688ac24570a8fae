"""The SQLite store's OAuth tables (migration 3 in ``sqlite_schema.py``): codes, tokens, clients.

A mixin of ``SqliteStore``, kept apart so the key store stays readable. Tokens are kept
under the SHA-256 of the token (``digest``), never in clear. ``oauth_use`` is the one
operation that must be atomic across processes (single-use codes, refresh rotation):
read and mark happen in one ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import OAuthToken
from .sqlitefaults import shielded

if TYPE_CHECKING:
    import asyncio

    import aiosqlite

    from .base import StoreError

__all__ = ["OAuthTables"]

_SELECT = (
    "SELECT digest, kind, key_id, client_id, resource, expires_at, used_at, data FROM oauth_tokens WHERE digest = ?"
)
_INSERT = (
    "INSERT INTO oauth_tokens (digest, kind, key_id, client_id, resource, expires_at, used_at, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def _token(row: Any) -> OAuthToken:
    digest, kind, key_id, client_id, resource, expires_at, used_at, data = row
    return OAuthToken(digest, kind, key_id, client_id, resource, expires_at, json.loads(data), used_at)


class OAuthTables:
    """``Store``'s OAuth methods for SQLite (see ``sidecar.store.base.Store``)."""

    if TYPE_CHECKING:  # what it uses of SqliteStore
        _lock: asyncio.Lock

        @property
        def db(self) -> aiosqlite.Connection: ...
        async def _write(self, sql: str, params: Any = (), many: bool = False, *, kind: str) -> None: ...
        async def _fetch(self, sql: str, params: Any = ()) -> list[Any]: ...
        async def _begin(self) -> None: ...
        async def _rollback(self) -> None: ...
        def _failed(self, kind: str, e: sqlite3.Error) -> StoreError: ...

    async def oauth_save(self, token: OAuthToken) -> None:
        await self._write(
            _INSERT,
            (token.digest, token.kind, token.key_id, token.client_id, token.resource, token.expires_at,
             token.used_at, json.dumps(dict(token.data))),
            kind="oauth",
        )  # fmt: skip

    async def oauth_get(self, digest: str) -> OAuthToken | None:
        rows = await self._fetch(_SELECT, (digest,))
        return _token(rows[0]) if rows else None

    async def oauth_use(self, digest: str, now: float) -> OAuthToken | None:
        return await shielded(self._oauth_use(digest, now))

    async def _oauth_use(self, digest: str, now: float) -> OAuthToken | None:
        async with self._lock:
            try:
                await self._begin()
                try:
                    async with self.db.execute(_SELECT, (digest,)) as cur:
                        row = await cur.fetchone()
                    if row is not None and row[6] is None:
                        await self.db.execute("UPDATE oauth_tokens SET used_at = ? WHERE digest = ?", (now, digest))
                    await self.db.execute("COMMIT")
                except BaseException:
                    await self._rollback()
                    raise
            except sqlite3.Error as e:
                raise self._failed("oauth", e) from None
        return _token(row) if row is not None else None

    async def oauth_forget(self, key_id: str, now: float) -> None:
        await self._write(
            "DELETE FROM oauth_tokens WHERE key_id = ? OR expires_at < ?", (key_id, now - 86400), kind="oauth"
        )

    async def oauth_save_client(self, client_id: str, data: Mapping[str, Any], now: float) -> None:
        await self._write(
            "INSERT INTO oauth_clients (client_id, data, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT(client_id) DO UPDATE SET data = excluded.data",
            (client_id, json.dumps(dict(data)), now),
            kind="oauth",
        )

    async def oauth_client(self, client_id: str) -> dict[str, Any] | None:
        rows = await self._fetch("SELECT data FROM oauth_clients WHERE client_id = ?", (client_id,))
        return dict(json.loads(rows[0][0])) if rows else None

    async def oauth_clients(self) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT data FROM oauth_clients ORDER BY created_at, client_id")
        return [dict(json.loads(d)) for (d,) in rows]

    async def oauth_client_count(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM oauth_clients")
        return int(rows[0][0])

    async def oauth_delete_client(self, client_id: str) -> bool:
        before = await self.oauth_client(client_id)
        await self._write("DELETE FROM oauth_clients WHERE client_id = ?", (client_id,), kind="oauth")
        return before is not None
