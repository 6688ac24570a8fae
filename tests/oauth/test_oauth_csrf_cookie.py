"""The consent page's CSRF cookie cannot be tossed in from a sibling host (sidecar/oauth/consent.py).

Behind https the cookie is ``__Host-sidecar_oauth_csrf``: browsers accept that name only from the
host itself, Secure, ``Path=/``, without ``Domain``, so ``evil.example.com`` cannot plant one for
``sidecar.example.com`` (``Domain=example.com``) and the form is checked against the sidecar's own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aiohttp import web
from conftest import MakeSidecar, base_config
from oauth_support import CALLBACK, pkce

ISSUER = "https://sidecar.example"


async def sidecar(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> Any:
    app = web.Application()  # an MCP upstream never contacted: the form is refused or answered before
    server = await aiohttp_server(app)
    cfg = base_config(str(server.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": str(server.make_url("/mcp")), "path_prefix": "/mcp"}]
    cfg["oauth"] = {"enabled": True, "public_url": ISSUER}
    return await make_sidecar(cfg)


async def test_behind_https_the_csrf_cookie_is_host_only_and_nothing_else_passes(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    sc = await sidecar(make_sidecar, aiohttp_server, tmp_path)
    reg = await sc.proxy.post("/oauth/register", json={"redirect_uris": [CALLBACK], "client_name": "c"})
    _, challenge = pkce()
    params = {"response_type": "code", "client_id": (await reg.json())["client_id"], "redirect_uri": CALLBACK,
              "code_challenge": challenge, "code_challenge_method": "S256"}  # fmt: skip
    page = await sc.proxy.get("/oauth/authorize", params=params)
    assert page.status == 200
    set_cookie = page.headers["Set-Cookie"]
    assert set_cookie.startswith("__Host-sidecar_oauth_csrf=")
    assert "Secure" in set_cookie and "Path=/" in set_cookie and "Domain" not in set_cookie
    hidden = dict(re.findall(r'name=(request_id|csrf) value="([^"]+)"', await page.text()))
    form = {**hidden, "api_key": "pmcp_" + "0" * 68, "lifetime": "3600", "decision": "continue"}
    sc.proxy.session.cookie_jar.clear()
    csrf = form["csrf"]
    tossed = await sc.proxy.post("/oauth/authorize", data=form, headers={"Cookie": f"sidecar_oauth_csrf={csrf}"})
    assert tossed.status == 403 and "CSRF" in await tossed.text()  # the unprefixed name is anyone's
    own = await sc.proxy.post("/oauth/authorize", data=form, headers={"Cookie": f"__Host-sidecar_oauth_csrf={csrf}"})
    assert own.status == 400 and "CSRF" not in await own.text()  # past the check: the key is refused
