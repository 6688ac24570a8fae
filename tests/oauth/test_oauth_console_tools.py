"""The console's approval page shows a delegated admin key's session only the tools its own key may list."""

from __future__ import annotations

import re

from conftest import Running
from oauth_support import authorize_url, pkce, register
from test_oauth_console import gw

__all__ = ["gw"]  # the fixture, test_oauth_console's (a sidecar with oauth.console_url), re-exported for pytest


async def test_a_delegate_approving_from_the_console_sees_only_its_own_tools(gw: Running) -> None:
    """Like the tools picker, the approval page listed every tool of the upstream (``delete_everything``
    included) to a delegated admin key that may list only ``search``."""
    _, boss_key = await gw.create_key(name="boss", owner="alice", permissions={
        "admin": True, "upstreams": ["tools"], "tools": {"tools": ["search"]}})  # fmt: skip
    client_id = (await register(gw))["client_id"]
    _, challenge = pkce()
    r = await gw.proxy.get(authorize_url(gw, client_id, challenge).split(gw.config.oauth.public_url or "", 1)[1])
    m = re.search(r'/oauth/consent/([^"]+)"', await r.text())
    assert r.status == 200 and m
    r = await gw.admin.post("/signin", data={"token": boss_key, "next": "/"}, allow_redirects=False)
    assert r.status == 303
    html = await (await gw.admin.get(f"/oauth/consent/{m.group(1)}?b=1")).text()
    assert 'name="tool" value="search"' in html and "delete_everything" not in html
