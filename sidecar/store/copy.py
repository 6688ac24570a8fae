"""Moving an installation between SQLite and PostgreSQL: keys (hashes included), last use,
usage, quotas, the audit trail and OAuth state (registered clients, and codes and tokens
not yet expired: by digest, as stored), read whole from one store and written to another.

The target must be empty: ``copy`` refuses to merge into a store that already holds anything
(a second run after a successful copy is refused, not doubled). Each side is opened through
its store class first, so the target's schema is created (or migrated) the ordinary way.
Keys keep their ids and hashes: every client key keeps working after the move, and so do
OAuth grants (keys) and their access and refresh tokens.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..auth.models import KeyRecord
from .base import AuditEvent, OAuthToken, Store, StoreError, UsageRow
from .sqlite import SqliteStore

__all__ = ["Dump", "Endpoint", "copy_store", "parse_endpoint", "read_store", "write_store"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Endpoint:
    kind: str  # sqlite | postgres
    where: str  # a path, or the DSN (secret: shown only as describe_dsn)

    def describe(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite {self.where}"
        from ..config.postgres import describe_dsn

        return describe_dsn(self.where)


def parse_endpoint(spec: str, env: Mapping[str, str] | None = None) -> Endpoint:
    """``sqlite:PATH``, ``postgres:ENV_VAR`` (the DSN from the environment: preferred, a
    command line is visible to every local user) or ``postgres:postgresql://…``."""
    env = os.environ if env is None else env
    kind, sep, rest = spec.partition(":")
    shown = f"{kind[:20]!r}" if sep else "the value"  # never the rest: a mistyped DSN carries its password
    if not sep or not rest:
        raise ValueError(f"{shown}: expected sqlite:PATH or postgres:ENV_VAR")
    if kind == "sqlite":
        return Endpoint("sqlite", rest)
    if kind in ("postgres", "postgresql"):
        if rest.startswith(("postgres://", "postgresql://")) or rest.startswith("//"):
            dsn = rest if not rest.startswith("//") else f"postgresql:{rest}"
            return Endpoint("postgres", dsn)
        if not _ENV_NAME.match(rest):
            raise ValueError("postgres:ENV_VAR: expected the name of a variable holding the DSN")
        dsn = env.get(rest, "")
        if not dsn:
            raise ValueError(f"postgres:{rest}: environment variable {rest} is not set")
        from ..config.postgres import check_dsn

        bad = check_dsn(dsn)  # as the config does: never quote (nor describe) a DSN that is not a URL
        if bad:
            raise ValueError(f"postgres:{rest}: {bad}")
        return Endpoint("postgres", dsn)
    raise ValueError(f"{shown}: expected sqlite:PATH or postgres:ENV_VAR")


@dataclass
class Dump:
    """Everything a store holds. Keys carry their last use; audit events are oldest first."""

    keys: list[KeyRecord] = field(default_factory=list)
    usage: list[tuple[str, str, UsageRow]] = field(default_factory=list)
    quota: list[tuple[str, str, str, int]] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)
    oauth_clients: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)  # id, data, created_at
    oauth_tokens: list[OAuthToken] = field(default_factory=list)  # live ones (not expired), by digest

    def counts(self) -> dict[str, int]:
        return {"keys": len(self.keys), "usage": len(self.usage), "quota": len(self.quota), "audit": len(self.audit),
                "oauth_clients": len(self.oauth_clients), "oauth_tokens": len(self.oauth_tokens)}  # fmt: skip

    def empty(self) -> bool:
        return not any(self.counts().values())


_TOKENS = (
    "SELECT digest, kind, key_id, client_id, resource, expires_at, used_at, {data} FROM {table} WHERE expires_at > "
)


def _oauth(clients: list[Any], tokens: list[Any]) -> dict[str, Any]:
    return {
        "oauth_clients": [(c, json.loads(d), float(at)) for c, d, at in clients],
        "oauth_tokens": sorted(
            (OAuthToken(dg, k, kid, cid, res, exp, json.loads(data), used) for dg, k, kid, cid, res, exp, used, data
             in tokens),
            key=lambda t: t.digest,
        ),
    }  # fmt: skip


async def read_store(ep: Endpoint, *, must_exist: bool = True) -> Dump:
    now = time.time()
    if ep.kind == "sqlite":
        path = Path(ep.where)
        if must_exist and not path.exists():  # noqa: ASYNC240 - one stat, in a CLI command
            raise StoreError(f"{path}: no such file")
        store = SqliteStore(path)
        await store.open()  # migrates an older file to the current schema first
        try:
            keys = await store.list_keys()
        finally:
            await store.close()
        with sqlite3.connect(path) as db:
            usage = db.execute("SELECT key_id, day, requests, errors, bytes, rate_limited FROM usage").fetchall()
            quota = db.execute("SELECT key_id, scope, window, used FROM quota").fetchall()
            audit = db.execute("SELECT at, actor, action, key_id, detail FROM audit ORDER BY id").fetchall()
            oauth = _oauth(
                db.execute(
                    "SELECT client_id, data, created_at FROM oauth_clients ORDER BY created_at, client_id"
                ).fetchall(),
                db.execute(_TOKENS.format(data="data", table="oauth_tokens") + "?", (now,)).fetchall(),
            )
        db.close()
    else:
        from .postgres import PostgresStore

        pg = PostgresStore(ep.where, listen=False)
        await pg.open()
        try:
            keys = await pg.list_keys()
            usage = await pg._fetch("SELECT key_id, day, requests, errors, bytes, rate_limited FROM sidecar_usage")
            quota = await pg._fetch("SELECT key_id, scope, window_id, used FROM sidecar_quota")
            audit = await pg._fetch("SELECT at, actor, action, key_id, detail::text FROM sidecar_audit ORDER BY id")
            oauth = _oauth(
                await pg._fetch("SELECT client_id, data::text, created_at FROM sidecar_oauth_clients "
                                "ORDER BY created_at, client_id"),
                await pg._fetch(_TOKENS.format(data="data::text", table="sidecar_oauth_tokens") + "$1", now),
            )  # fmt: skip
        finally:
            await pg.close()
    return Dump(
        keys=keys,
        usage=sorted((k, d, UsageRow(r, e, b, rl)) for k, d, r, e, b, rl in usage),
        quota=sorted((k, s, w, int(n)) for k, s, w, n in quota),
        audit=[AuditEvent(at, actor, action, kid, json.loads(detail)) for at, actor, action, kid, detail in audit],
        **oauth,
    )


def _last_used(keys: list[KeyRecord]) -> dict[str, tuple[float, str]]:
    return {r.id: (r.last_used_at, r.last_used_ip or "") for r in keys if r.last_used_at is not None}


async def write_store(ep: Endpoint, dump: Dump) -> None:
    """Write ``dump`` into an empty store (``StoreError`` when it is not empty)."""
    existing = await read_store(ep, must_exist=False)
    if not existing.empty():
        have = ", ".join(f"{n} {what}" for what, n in existing.counts().items() if n)
        raise StoreError(f"{ep.describe()} is not empty ({have}): copy only fills an empty store, it never merges")
    usage = {(k, d): u for k, d, u in dump.usage}
    quota = {(k, s, w): n for k, s, w, n in dump.quota}
    if ep.kind == "sqlite":
        store = SqliteStore(Path(ep.where))
        await store.open()
        try:
            await store.insert(dump.keys)
            await store.record_last_used(_last_used(dump.keys))
            await store.add_usage(usage)
            await store.add_quota(quota)
            await _write_oauth(store, dump)
        finally:
            await store.close()
        with sqlite3.connect(ep.where) as db:
            db.executemany(
                "INSERT INTO audit (at, actor, action, key_id, detail) VALUES (?, ?, ?, ?, ?)", _audit_rows(dump)
            )
        db.close()
        return
    from .postgres import PostgresStore

    pg = PostgresStore(ep.where, listen=False)
    await pg.open()
    try:
        await pg.insert(dump.keys)
        await pg.record_last_used(_last_used(dump.keys))
        await pg.add_usage(usage)
        await pg.add_quota(quota)
        await _write_oauth(pg, dump)
        await pg._write(
            "audit",
            "INSERT INTO sidecar_audit (at, actor, action, key_id, detail) VALUES ($1, $2, $3, $4, $5::jsonb)",
            _audit_rows(dump),
        )
    finally:
        await pg.close()


async def _write_oauth(store: Store, dump: Dump) -> None:
    for client_id, data, created_at in dump.oauth_clients:
        await store.oauth_save_client(client_id, data, created_at)
    for token in dump.oauth_tokens:
        await store.oauth_save(token)


def _audit_rows(dump: Dump) -> list[tuple[Any, ...]]:
    return [(e.at, e.actor, e.action, e.key_id, json.dumps(e.detail)) for e in dump.audit]


async def copy_store(src: Endpoint, dst: Endpoint) -> dict[str, int]:
    """Copy everything from ``src`` into the empty ``dst``; what was copied, by kind."""
    if src == dst:
        raise StoreError("--from and --to are the same store")
    dump = await read_store(src)
    await write_store(dst, dump)
    return dump.counts()
