"""OAuth tables under a flood (DESIGN invariant 6: unauthenticated clients cost little).

Dynamic client registration is open to anyone (RFC 7591). The number of registered clients is
capped (``clients.MAX_REGISTERED``); checking the cap must not cost a read of every registered
client per attempt, or a flood of registrations against a full table is an unauthenticated
CPU amplifier (10 000 rows parsed on the event loop per request, ~50 ms each measured).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.config.oauth import OAuthConfig
from sidecar.oauth import clients as clients_mod
from sidecar.oauth.clients import ClientError, ClientRegistry
from sidecar.store.sqlite import SqliteStore

BODY = {"redirect_uris": ["http://127.0.0.1:1/callback"], "client_name": "flood"}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "db.sqlite")
    await s.open()
    yield s
    await s.close()


class Listings:
    """Counts full reads of the registered-client table on a real store."""

    def __init__(self, store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = store.oauth_clients

        async def counted() -> list[dict[str, Any]]:
            self.count += 1
            return await real()

        monkeypatch.setattr(store, "oauth_clients", counted)


async def test_registration_never_reads_every_registered_client(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ClientRegistry(OAuthConfig(), store)
    listings = Listings(store, monkeypatch)
    for _ in range(20):
        await registry.register(BODY)
    assert listings.count == 0, "each registration listed the whole client table"
    assert len(await store.oauth_clients()) == 20


async def test_registration_flood_stops_at_the_cap_cheaply(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients_mod, "MAX_REGISTERED", 30)
    registry = ClientRegistry(OAuthConfig(), store)
    listings = Listings(store, monkeypatch)
    refused = 0
    for _ in range(200):
        try:
            await registry.register(BODY)
        except ClientError as e:
            assert e.error == "access_denied"
            refused += 1
    assert refused == 170
    assert listings.count == 0
    monkeypatch.undo()
    assert len(await store.oauth_clients()) == 30
    # an operator removing one makes room for exactly one more
    monkeypatch.setattr(clients_mod, "MAX_REGISTERED", 30)
    first = (await store.oauth_clients())[0]["client_id"]
    assert await registry.remove(first)
    await registry.register(BODY)
    with pytest.raises(ClientError):
        await registry.register(BODY)
