"""The PostgreSQL store's schema, as versioned migrations, and the one way to apply them.

``sidecar_schema`` has a row per applied migration. ``migrate`` runs every missing one in
one transaction holding ``pg_advisory_xact_lock(MIGRATE_LOCK)``: replicas starting together
(or a replica and ``sidecar store migrate``) wait for each other, and the second finds
nothing to do. A database from a newer sidecar is refused rather than guessed at.

Key changes are stamped by a trigger (``seq`` from a sequence, so any writer — the sidecar,
the CLI, an operator's UPDATE — gets a new one) and announced by a statement trigger
(``NOTIFY sidecar_keys`` at commit), which is what every replica LISTENs to.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CHANNEL", "KEYS_LOCK", "MIGRATE_LOCK", "MIGRATIONS", "SCHEMA_VERSION", "TABLES", "migrate", "version"]

CHANNEL = "sidecar_keys"
# Advisory lock ids (64-bit, arbitrary, shared by every sidecar on the database).
MIGRATE_LOCK = 0x5349_4445_4341_0001  # "SIDECA" 1: schema migrations
KEYS_LOCK = 0x5349_4445_4341_0002  # key writes: one at a time, so seq order is commit order
TABLES = ("sidecar_keys", "sidecar_last_used", "sidecar_usage", "sidecar_quota", "sidecar_audit",
          "sidecar_oauth_tokens", "sidecar_oauth_clients")  # fmt: skip

# Migration N brings a database from version N to N+1. Append, never edit.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "keys, grants, last use, usage, quotas, audit; seq stamping and NOTIFY triggers",
        """
        CREATE SEQUENCE sidecar_key_seq;
        CREATE TABLE sidecar_keys (
            id text PRIMARY KEY,
            seq bigint NOT NULL,
            owner text,
            parent_id text,
            "grant" jsonb NOT NULL DEFAULT '{}',
            data jsonb NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now());
        CREATE INDEX sidecar_keys_seq ON sidecar_keys (seq);
        CREATE INDEX sidecar_keys_owner ON sidecar_keys (owner);
        CREATE INDEX sidecar_keys_parent ON sidecar_keys (parent_id);
        CREATE TABLE sidecar_last_used (id text PRIMARY KEY, at double precision NOT NULL, ip text);
        CREATE TABLE sidecar_usage (
            key_id text NOT NULL, day text NOT NULL, requests bigint NOT NULL DEFAULT 0,
            errors bigint NOT NULL DEFAULT 0, bytes bigint NOT NULL DEFAULT 0,
            rate_limited bigint NOT NULL DEFAULT 0, PRIMARY KEY (key_id, day));
        CREATE TABLE sidecar_quota (
            key_id text NOT NULL, scope text NOT NULL, window_id text NOT NULL, used bigint NOT NULL,
            PRIMARY KEY (key_id, scope, window_id));
        CREATE TABLE sidecar_audit (
            id bigserial PRIMARY KEY, at double precision NOT NULL, actor text NOT NULL,
            action text NOT NULL, key_id text, detail jsonb NOT NULL DEFAULT '{}');
        CREATE INDEX sidecar_audit_key ON sidecar_audit (key_id, id);
        CREATE FUNCTION sidecar_keys_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.seq := nextval('sidecar_key_seq');
            NEW.updated_at := now();
            RETURN NEW;
        END $$;
        CREATE TRIGGER sidecar_keys_stamp BEFORE INSERT OR UPDATE ON sidecar_keys
            FOR EACH ROW EXECUTE FUNCTION sidecar_keys_stamp();
        CREATE FUNCTION sidecar_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('sidecar_keys', '');
            RETURN NULL;
        END $$;
        CREATE TRIGGER sidecar_keys_notify AFTER INSERT OR UPDATE OR DELETE ON sidecar_keys
            FOR EACH STATEMENT EXECUTE FUNCTION sidecar_keys_notify();
        """,
    ),
    (
        # As SQLite's migration 3 (sqlite_schema.py): codes and tokens only by SHA-256 digest. Grants are
        # keys (sidecar_keys.parent_id, "grant"). Used by sidecar/store/pg_oauth.py.
        "OAuth codes, tokens (by digest) and registered clients",
        """
        CREATE TABLE sidecar_oauth_tokens (
            digest text PRIMARY KEY, kind text NOT NULL, key_id text NOT NULL, client_id text NOT NULL,
            resource text NOT NULL, expires_at double precision NOT NULL, used_at double precision,
            data jsonb NOT NULL DEFAULT '{}');
        CREATE INDEX sidecar_oauth_tokens_key ON sidecar_oauth_tokens (key_id);
        CREATE INDEX sidecar_oauth_tokens_expiry ON sidecar_oauth_tokens (expires_at);
        CREATE TABLE sidecar_oauth_clients (
            client_id text PRIMARY KEY, data jsonb NOT NULL, created_at double precision NOT NULL);
        """,
    ),
    (
        # Any writer (psql too) takes the sidecar's key lock before its rows get a seq: an UPDATE by hand
        # that committed after a sidecar write with a higher seq was skipped by every replica's poll.
        "key writes by any client take the key lock, so seq order stays commit order",
        f"""
        CREATE FUNCTION sidecar_keys_lock() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock({KEYS_LOCK});
            RETURN NULL;
        END $$;
        CREATE TRIGGER sidecar_keys_lock BEFORE INSERT OR UPDATE OR DELETE ON sidecar_keys
            FOR EACH STATEMENT EXECUTE FUNCTION sidecar_keys_lock();
        """,
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)

_CREATE_VERSIONS = """
CREATE TABLE IF NOT EXISTS sidecar_schema (
    version integer PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())
"""


async def version(conn: Any) -> int:
    """The database's schema version (0: never migrated)."""
    exists = await conn.fetchval("SELECT to_regclass('sidecar_schema') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM sidecar_schema"))


class NewerSchema(Exception):
    def __init__(self, found: int) -> None:
        super().__init__(
            f"the database has schema version {found}, but this sidecar only knows versions up to {SCHEMA_VERSION}: "
            "it was migrated by a newer sidecar; upgrade this one"
        )
        self.found = found


async def migrate(conn: Any) -> list[int]:
    """Apply the missing migrations (idempotent, safe to run from several processes at once).

    Returns the versions applied now ([] when the schema was current)."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
        await conn.execute(_CREATE_VERSIONS)
        current = await version(conn)
        if current > SCHEMA_VERSION:
            raise NewerSchema(current)
        for n in range(current, SCHEMA_VERSION):
            description, sql = MIGRATIONS[n]
            await conn.execute(sql)
            await conn.execute("INSERT INTO sidecar_schema (version, description) VALUES ($1, $2)", n + 1, description)
            applied.append(n + 1)
    return applied
