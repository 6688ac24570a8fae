"""The SQLite store's schema, as the migrations that build it (``PRAGMA user_version`` counts them)."""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

# Migration N brings a database from user_version N to N+1. Append, never edit.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, data TEXT NOT NULL, seq INTEGER NOT NULL);
    CREATE INDEX IF NOT EXISTS keys_seq ON keys(seq);
    CREATE TABLE IF NOT EXISTS last_used (id TEXT PRIMARY KEY, at REAL NOT NULL, ip TEXT);
    CREATE TABLE IF NOT EXISTS usage (
        key_id TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0,
        rate_limited INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (key_id, day));
    CREATE TABLE IF NOT EXISTS quota (
        key_id TEXT NOT NULL, scope TEXT NOT NULL, window TEXT NOT NULL, used INTEGER NOT NULL,
        PRIMARY KEY (key_id, scope, window));
    CREATE TABLE IF NOT EXISTS audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
        action TEXT NOT NULL, key_id TEXT, detail TEXT NOT NULL DEFAULT '{}');
    CREATE INDEX IF NOT EXISTS audit_key ON audit(key_id);
    """,
    # 1 -> 2: owner as a column, so max_keys_per_owner is an index lookup, not a scan of every key.
    """
    ALTER TABLE keys ADD COLUMN owner TEXT;
    UPDATE keys SET owner = json_extract(data, '$.owner');
    CREATE INDEX IF NOT EXISTS keys_owner ON keys(owner);
    """,
    # 2 -> 3: OAuth (sidecar/oauth/): codes and tokens by SHA-256 digest only, and registered clients.
    # Grants are keys: KeyRecord.parent_id and .grant live in the keys' JSON data.
    """
    CREATE TABLE IF NOT EXISTS oauth_tokens (
        digest TEXT PRIMARY KEY, kind TEXT NOT NULL, key_id TEXT NOT NULL, client_id TEXT NOT NULL,
        resource TEXT NOT NULL, expires_at REAL NOT NULL, used_at REAL, data TEXT NOT NULL DEFAULT '{}');
    CREATE INDEX IF NOT EXISTS oauth_tokens_key ON oauth_tokens(key_id);
    CREATE TABLE IF NOT EXISTS oauth_clients (client_id TEXT PRIMARY KEY, data TEXT NOT NULL, created_at REAL NOT NULL);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
