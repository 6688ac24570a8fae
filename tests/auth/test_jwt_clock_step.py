"""A wall clock stepped back must not make an expired JWT valid again (invariant 5, docs/reliability.md "Clock").

``exp`` is a moment on the wall clock; once the sidecar has seen a later wall time, a token
that ended before it stays refused when NTP (or an operator) steps the clock back — whether the
sidecar had remembered the token as verified or never saw it before. Before the fix both were
proxied again (200): joserfc and the verified-token memory read the stepped-back clock.
"""

from __future__ import annotations

import time
from pathlib import Path

from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, base_config
from jwt_support import IdP, bearer, provider
from limits_support import Clocks

HOUR = 3600.0
VIEWERS = {"when": {"group": "viewers"}, "grant": {"upstreams": ["plex"], "paths": ["plex:read"]}}
ROLES = {"realm_access": {"roles": ["viewers"]}}


async def test_a_step_back_revives_no_expired_jwt(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path, aiohttp_server: object
) -> None:
    clocks = Clocks(float(int(time.time())))
    idp = IdP(clock=clocks.wall)
    idp.add_key("k1", "RSA")
    await idp.start(aiohttp_server)
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, jwt=[provider(idp, [VIEWERS])])
    gw = await make_sidecar(cfg, clock=clocks.wall, steady=clocks.steady)

    async def answer(token: str) -> tuple[int, str]:
        r = await gw.proxy.get("/library/sections", headers=bearer(token))
        return r.status, "" if r.status == 200 else (await r.json())["error"]["message"]

    remembered = idp.token(lifetime=120, **ROLES)  # verified once, then served from memory
    unseen = idp.token(lifetime=120, sub="bob", **ROLES)  # leaked, first presented after the step back
    assert await answer(remembered) == (200, "")
    clocks.step = +HOUR  # both are over (exp + 60 s of skew); the sidecar serves a fresh token then
    assert await answer(idp.token(lifetime=120, sub="carol", **ROLES)) == (200, "")
    clocks.step = 0.0  # the wall clock is stepped back an hour
    expired = (401, "invalid token: token expired")
    assert {"remembered": await answer(remembered), "unseen": await answer(unseen)} == {
        "remembered": expired,
        "unseen": expired,
    }
    # The cost, by design: a token must outlast the latest wall time seen (here: an hour ahead).
    assert await answer(idp.token(lifetime=120, sub="dave", **ROLES)) == expired
    assert await answer(idp.token(lifetime=2 * HOUR, sub="erin", **ROLES)) == (200, "")
