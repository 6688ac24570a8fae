"""A JWT's open stream ends when that token expires, whatever newer tokens its subject has (invariant 5).

A stream authorised by a JWT never asks again. The subject stays active for as long as its client
gets new tokens from the IdP, so before, a stream opened with a token that leaked went on for as
long as the real client kept refreshing (the stream of the first token below ran past its end).
Now each stream carries its own token's end (``scope.until``) and the sweep cuts it then.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import MakeSidecar, base_config
from jwt_support import IdP, bearer, provider
from limits_support import Clock
from streams_support import cut
from test_sec_revocation import streaming_upstream

from sidecar.auth.jwt import identity_id

EVERYTHING = {"when": {"group": "viewers"}, "grant": {"upstreams": ["plex"]}}
ROLES = {"realm_access": {"roles": ["viewers"]}}
EVENTS = "/:/eventsource/notifications"


async def test_a_jwts_stream_ends_with_it_though_the_subject_has_a_newer_token(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    clock = Clock(float(int(time.time())))
    idp = IdP(clock=clock)
    idp.add_key("k1", "RSA")
    await idp.start(aiohttp_server)
    up = await aiohttp_server(streaming_upstream())
    keys = {"argon2": "cheapest", "stream_check_interval": "50ms"}
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path, keys=keys, jwt=[provider(idp, [EVERYTHING])])
    gw = await make_sidecar(cfg, clock=clock)
    ident = identity_id(idp.issuer, "alice")

    first = idp.token(lifetime=120, **ROLES)  # an attacker holds a copy of it
    async with gw.proxy.get(EVENTS, headers=bearer(first)) as leaked:
        assert leaked.status == 200
        await leaked.content.readline()
        clock.advance(100)
        newer = idp.token(lifetime=600, **ROLES)  # the real client refreshed: the subject lives on
        async with gw.proxy.get(EVENTS, headers=bearer(newer)) as own:
            assert own.status == 200 and gw.sc.streams.open_streams(ident) == 2
            clock.advance(81)  # the first token is over (exp + 60 s of clock skew), the newer one is not
            await cut(leaked)  # within a sweep, never a clean end
            assert gw.sc.streams.open_streams(ident) == 1  # the client's own stream goes on
            assert await own.content.readline()
    again = await gw.proxy.get(EVENTS, headers=bearer(first))
    assert again.status == 401 and (await again.json())["error"]["code"] == "invalid_token"
