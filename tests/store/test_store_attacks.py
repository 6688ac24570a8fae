"""Attacks and failures on the stores' edges: a DSN's secret in any message (DESIGN invariant 7)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pg_support import pg_dsn, pg_server

from sidecar.config.postgres import describe_dsn

SECRET = "s3cretPW"

__all__ = ["pg_dsn", "pg_server"]  # the fixtures, re-exported for pytest


@pytest.mark.parametrize(
    "dsn",
    [
        f"host=127.0.0.1 port=1 password={SECRET} dbname=d",  # libpq keyword form: not a URL
        f"postgresql://u:{SECRET}@127.0.0.1:1/d",
        f"postgresql://u:{SECRET}@h1:5,h2:6/d",
        f"postgresql://u:p@{SECRET}@h/d",
        f"postgresql://h/d?password={SECRET}",
        f"postgresql://u:{SECRET}@h:notaport/d",
    ],
)
def test_no_dsn_form_shows_its_password(dsn: str) -> None:
    assert SECRET not in describe_dsn(dsn)


def test_store_copy_never_prints_the_password_of_a_keyword_dsn(tmp_path: Path) -> None:
    """`store copy --from postgres:VAR` with a libpq keyword string: it used to be quoted whole in the error."""
    env = {k: v for k, v in os.environ.items() if k not in ("PGDSN", "SIDECAR_DATABASE_URL")}
    env["SRC"] = f"host=127.0.0.1 port=1 password={SECRET} dbname=d"
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        "store",
        "copy",
        "--from",
        "postgres:SRC",
        "--to",
        f"sqlite:{tmp_path}/x.db",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode != 0
    assert SECRET not in done.stdout + done.stderr
    assert "postgres:SRC" in done.stderr and "postgresql://" in done.stderr


async def test_an_operators_update_racing_a_sidecar_write_reaches_every_replica(pg_dsn: str) -> None:
    """An UPDATE by hand (psql) while a replica writes a key: the hand-made change took its seq
    without the sidecar's lock, the sidecar's commit landed first with a higher one, and every
    replica's "rows past my last seq" skipped the revocation until the resync (a minute later)."""
    import asyncpg

    from sidecar.auth.keys import display_form, generate_key
    from sidecar.auth.models import KeyRecord
    from sidecar.auth.verify import password_hasher
    from sidecar.store.postgres import PostgresStore

    def record(name: str) -> KeyRecord:
        key, parts = generate_key("pmcp_")
        return KeyRecord(id=parts.key_id, name=name, hash=password_hasher("cheapest").hash("x" * 48),
                         display=display_form("pmcp_", parts.key_id, key), created_at=1_700_000_000.0)  # fmt: skip

    victim = record("victim")
    writer, replica = PostgresStore(pg_dsn, resync_interval=3600), PostgresStore(pg_dsn, resync_interval=3600)
    await writer.open()
    await writer.insert([victim])
    await replica.open()
    await replica.load_all()
    psql = await asyncpg.connect(pg_dsn)
    try:
        tx = psql.transaction()
        await tx.start()
        await psql.execute(
            "UPDATE sidecar_keys SET data = jsonb_set(data, '{revoked_at}', '1700000200') WHERE id = $1", victim.id
        )
        other = asyncio.create_task(writer.insert([record("other")]))  # a replica's admin creates a key meanwhile
        await asyncio.wait({other}, timeout=0.3)
        if other.done():  # before the fix: it did not wait for the hand-made change, and a replica polls now
            await replica.poll()
        await tx.commit()
        await other
        seen: dict[str, KeyRecord] = {}
        for _ in range(3):
            changes = await replica.poll()
            seen.update({r.id: r for r in changes.records} if changes else {})
        assert victim.id in seen and seen[victim.id].revoked_at == 1_700_000_200.0
    finally:
        await psql.close()
        await replica.close()
        await writer.close()
