"""``sidecar store …``: schema migrations and moving an installation between stores.

- ``sidecar store migrate -c CONFIG``: bring the configured PostgreSQL database to this
  sidecar's schema version (idempotent; safe while replicas run or start: the migration
  takes an advisory lock). For a rollout with ``store.auto_migrate: false``, run it first.
- ``sidecar store copy --from sqlite:PATH --to postgres:ENV_VAR`` (and back): keys with
  their hashes, last use, usage, quotas and audit, into an EMPTY target.

Exit codes as the other commands: 0 done, 1 refused or failed, 2 bad usage or config,
75 the database is unreachable (try again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from .base import StoreError
from .copy import copy_store, parse_endpoint

__all__ = ["add_store_commands"]


def _migrate(args: argparse.Namespace, load: Callable[[argparse.Namespace], Any]) -> int:
    config = load(args)
    store = config.store
    if store.kind != "postgres" or not store.dsn:
        print(f"error: store.kind is {store.kind}: `store migrate` is for postgres (SQLite migrates itself)",
              file=sys.stderr)  # fmt: skip
        return 1

    async def run() -> tuple[int, list[int]]:
        import asyncpg

        from ..config.postgres import describe_dsn
        from .pglisten import wrap
        from .postgres_schema import NewerSchema, migrate, version

        where = describe_dsn(store.dsn)
        try:
            conn = await asyncpg.connect(store.dsn, timeout=store.postgres.connect_timeout)
            try:
                applied = await migrate(conn)
                return await version(conn), applied
            finally:
                await conn.close()
        except NewerSchema as e:
            raise StoreError(f"key database ({where}): {e}") from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
            raise wrap(e, where) from None

    current, applied = asyncio.run(run())
    if args.json:
        print(json.dumps({"version": current, "applied": applied}))
    elif applied:
        print(f"migrated to schema version {current} (applied {', '.join(map(str, applied))})")
    else:
        print(f"schema version {current}: up to date")
    return 0


def _copy(args: argparse.Namespace) -> int:
    src, dst = parse_endpoint(args.source), parse_endpoint(args.target)
    counts = asyncio.run(copy_store(src, dst))
    if args.json:
        print(json.dumps(counts))
    else:
        what = ", ".join(f"{n} {k}" for k, n in counts.items())
        print(f"copied {what} from {src.describe()} to {dst.describe()}")
    return 0


def add_store_commands(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], None], load: Callable[[argparse.Namespace], Any]
) -> None:
    """Register ``store migrate`` and ``store copy`` on the top-level subparsers."""
    st = sub.add_parser("store", help="key store tools: migrate a PostgreSQL schema, copy between stores")
    ssub = st.add_subparsers(dest="action", required=True)
    m = ssub.add_parser("migrate", help="bring the configured PostgreSQL store to this version's schema")
    with_config(m)
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(fn=lambda a: _migrate(a, load))
    c = ssub.add_parser("copy", help="copy keys, usage, quotas and audit into an empty store")
    c.add_argument("--from", dest="source", required=True, help="sqlite:PATH or postgres:ENV_VAR")
    c.add_argument("--to", dest="target", required=True, help="sqlite:PATH or postgres:ENV_VAR (must be empty)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(fn=_copy)
