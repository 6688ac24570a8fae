"""Attacks on key propagation between replicas sharing one PostgreSQL database.

A revocation on replica A must reach replica B within 1 s (DESIGN invariant 5) even when
B's LISTEN connection is half-open: a socket that still looks connected but delivers
nothing (a NAT or firewall dropped the flow, a failover left it dangling). Nothing arrives
to say the connection is gone; only B's own checks can find it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pg_support import pg_dsn, pg_server

from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord
from sidecar.auth.verify import password_hasher
from sidecar.store.postgres import PostgresStore

__all__ = ["pg_dsn", "pg_server"]  # the fixtures, re-exported for pytest

HASH = password_hasher("cheapest").hash("x" * 48)


def _record(name: str) -> KeyRecord:
    key, parts = generate_key("pmcp_")
    return KeyRecord(
        id=parts.key_id, name=name, hash=HASH, display=display_form("pmcp_", parts.key_id, key), created_at=1.7e9
    )


async def _settled(s: PostgresStore) -> None:
    """Listening, and the catch-up after connecting is done."""
    assert s.listener is not None
    await asyncio.wait_for(s.listener.connected.wait(), 5)
    deadline = time.monotonic() + 3
    while await s.poll() is not None:
        assert time.monotonic() < deadline


async def test_revoke_reaches_a_replica_whose_listen_socket_is_half_open(pg_dsn: str) -> None:
    """B's LISTEN socket stops delivering without closing: B still sees A's revocation within 1 s."""
    rec = _record("victim")
    a = PostgresStore(pg_dsn, resync_interval=3600)
    b = PostgresStore(pg_dsn, resync_interval=3600)
    await a.open()
    await b.open()
    try:
        await a.insert([rec])
        await b.load_all()
        await _settled(b)
        assert b.listener is not None
        conn: Any = b.listener._conn
        conn._transport.pause_reading()  # half-open: the socket is there, nothing comes through it
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await a.update(rec.with_changes(revoked_at=time.time()))
        seen: list[KeyRecord] = []
        while not seen and time.monotonic() - started < 3:
            ch = await b.poll()
            seen.extend(r for r in (ch.records if ch else []) if r.id == rec.id)
            await asyncio.sleep(0.02)
        took = time.monotonic() - started
        assert seen and seen[0].state() == "revoked", "B never saw the revocation"
        assert took < 1.0, f"revocation reached B after {took:.2f}s (invariant: 1 s)"
    finally:
        await a.close()
        await b.close()
