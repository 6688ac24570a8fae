"""The PostgreSQL store's OAuth tables (migration 2 in ``postgres_schema.py``): codes, tokens, clients.

A mixin of ``PostgresStore``, as ``sqlite_oauth.py`` is of ``SqliteStore``. Tokens are kept
under the SHA-256 of the token (``digest``), never in clear. ``oauth_use`` is the one
operation that must be atomic across replicas (single-use codes, refresh rotation): one
transaction locks the row (``SELECT … FOR UPDATE``) and marks it used only if it was not. A
second replica racing for the same code waits on the lock and then reads the row as committed
(READ COMMITTED re-reads a locked row's latest version): exactly one sees ``used_at IS NULL``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from .base import OAuthToken
from .sqlitefaults import shielded

__all__ = ["PgOAuth"]

_GET = (
    "SELECT digest, kind, key_id, client_id, resource, expires_at, used_at, data::text "
    "FROM sidecar_oauth_tokens WHERE digest = $1"
)
_INSERT = (
    "INSERT INTO sidecar_oauth_tokens (digest, kind, key_id, client_id, resource, expires_at, used_at, data) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)"
)


def _token(row: Any) -> OAuthToken:
    digest, kind, key_id, client_id, resource, expires_at, used_at, data = row
    return OAuthToken(digest, kind, key_id, client_id, resource, expires_at, json.loads(data), used_at)


def token_row(t: OAuthToken) -> tuple[Any, ...]:
    return (t.digest, t.kind, t.key_id, t.client_id, t.resource, t.expires_at, t.used_at, json.dumps(dict(t.data)))


class PgOAuth:
    """``Store``'s OAuth methods for PostgreSQL (see ``sidecar.store.base.Store``); needs ``_write``, ``_fetch``."""

    async def _write(self, kind: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    if TYPE_CHECKING:

        def _conn(self, kind: str = "") -> AbstractAsyncContextManager[Any]: ...

    async def oauth_save(self, token: OAuthToken) -> None:
        await self._write("oauth", _INSERT, [token_row(token)])

    async def oauth_get(self, digest: str) -> OAuthToken | None:
        rows = await self._fetch(_GET, digest)
        return _token(rows[0]) if rows else None

    async def oauth_use(self, digest: str, now: float) -> OAuthToken | None:
        # A write: never retried by ``_fetch`` on a fresh connection (the first may have committed),
        # finished even if the caller is cancelled.
        return await shielded(self._oauth_use(digest, now))

    async def _oauth_use(self, digest: str, now: float) -> OAuthToken | None:
        async with self._conn("oauth") as conn, conn.transaction():
            row = await conn.fetchrow(_GET + " FOR UPDATE", digest)
            if row is not None and row["used_at"] is None:
                await conn.execute("UPDATE sidecar_oauth_tokens SET used_at = $2 WHERE digest = $1", digest, now)
        return _token(row) if row is not None else None

    async def oauth_forget(self, key_id: str, now: float) -> None:
        await self._write(
            "oauth", "DELETE FROM sidecar_oauth_tokens WHERE key_id = $1 OR expires_at < $2", [(key_id, now - 86400)]
        )

    async def oauth_save_client(self, client_id: str, data: Mapping[str, Any], now: float) -> None:
        await self._write(
            "oauth",
            "INSERT INTO sidecar_oauth_clients (client_id, data, created_at) VALUES ($1, $2::jsonb, $3) "
            "ON CONFLICT (client_id) DO UPDATE SET data = excluded.data",
            [(client_id, json.dumps(dict(data)), now)],
        )

    async def oauth_client(self, client_id: str) -> dict[str, Any] | None:
        rows = await self._fetch("SELECT data::text FROM sidecar_oauth_clients WHERE client_id = $1", client_id)
        return dict(json.loads(rows[0][0])) if rows else None

    async def oauth_clients(self) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT data::text FROM sidecar_oauth_clients ORDER BY created_at, client_id")
        return [dict(json.loads(d)) for (d,) in rows]

    async def oauth_client_count(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM sidecar_oauth_clients")
        return int(rows[0][0])

    async def oauth_delete_client(self, client_id: str) -> bool:
        async def run() -> bool:
            async with self._conn("oauth") as conn:
                deleted = await conn.fetch(
                    "DELETE FROM sidecar_oauth_clients WHERE client_id = $1 RETURNING client_id", client_id
                )
            return bool(deleted)

        return await shielded(run())
