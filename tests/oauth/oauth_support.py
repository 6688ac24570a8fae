"""Shared pieces of the OAuth tests: a sidecar whose issuer is its own address, the SDK's
MCP server behind it, and a person filling the consent form (plain aiohttp, no browser).

The issuer (``oauth.public_url``) must be the address clients reach, so the proxy listener
is bound to a port chosen before the config is written.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from conftest import ADMIN_TOKEN, ProxyTestServer, Running, base_config
from mcp_server import MCP_TOKEN, McpUpstream
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar, create_apps
from sidecar.config import parse_config

CALLBACK = "http://127.0.0.1:1/callback"  # never contacted: the test reads the redirect's Location


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def oauth_config(upstream: McpUpstream, tmp_path: Path, port: int, **oauth: Any) -> dict[str, Any]:
    cfg = base_config(upstream.url, tmp_path)
    auth = {"Authorization": "Bearer ${MCP_TOKEN}"}
    cfg["listen"] = f"127.0.0.1:{port}"
    cfg["upstreams"] = [
        {"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools", "headers": auth},
        {"id": "other", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/other", "headers": auth},
    ]
    cfg["oauth"] = {"enabled": True, "public_url": f"http://127.0.0.1:{port}", **oauth}
    return cfg


async def start_sidecar(aiohttp_client: Any, cfg: dict[str, Any], tmp_path: Path, started: list[Sidecar], *,
                        extra_env: dict[str, str] | None = None,
                        **kw: Any) -> Running:  # fmt: skip
    env = {"SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN, "MCP_TOKEN": MCP_TOKEN, "PLEX_TOKEN": "x", **(extra_env or {})}
    config = parse_config(cfg, env=env, base=tmp_path)
    sc = Sidecar(config, registry=CollectorRegistry(), env=env, **kw)
    await sc.start()
    started.append(sc)
    proxy_app, admin_app = create_apps(sc)
    port = int(cfg["listen"].rsplit(":", 1)[1])
    proxy = await aiohttp_client(ProxyTestServer(proxy_app, port=port))
    admin = await aiohttp_client(admin_app)
    return Running(sc=sc, proxy=proxy, admin=admin, config=config, env=env)


@dataclass
class Redirect:
    location: str

    @property
    def params(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.location).query).items()}


_HIDDEN = re.compile(r'name=(request_id|csrf) value="([^"]+)"')


async def consent(authorize_url: str, api_key: str, *, tools: str = "", lifetime: int | str = 86400,
                  decision: str = "allow", pages: list[str] | None = None) -> Redirect:  # fmt: skip
    """Open the consent page like a browser and go through its two steps (key, then tools); the
    redirect back to the client, or ``status:<code>:<page>`` where it stopped. ``tools`` "" ticks
    "every tool"; otherwise the named tools are ticked (or typed, when the page has no list)."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(authorize_url, allow_redirects=False) as page:
            html = await page.text()
            if page.status != 200:
                return Redirect(page.headers.get("Location", f"status:{page.status}:{html}"))
            assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        base = f"{urlsplit(authorize_url).scheme}://{urlsplit(authorize_url).netloc}"
        step1 = {**dict(_HIDDEN.findall(html)), "api_key": api_key, "lifetime": str(lifetime),
                 "decision": "continue" if decision == "allow" else decision}  # fmt: skip
        async with http.post(base + "/oauth/authorize", data=step1, allow_redirects=False) as answer:
            html = await answer.text()
            if answer.status != 200:
                return Redirect(answer.headers.get("Location", f"status:{answer.status}:{html}"))
        if pages is not None:
            pages.append(html)
        step2: list[tuple[str, str]] = [*_HIDDEN.findall(html), ("decision", decision)]
        names = [t.strip() for t in tools.split(",") if t.strip()]
        if not names:
            step2.append(("all_tools", "1"))
        elif "name=tools" in html:
            step2.append(("tools", tools))
        else:
            step2.extend(("tool", n) for n in names)
        async with http.post(base + "/oauth/authorize", data=step2, allow_redirects=False) as answer:
            if answer.status != 303:
                return Redirect(f"status:{answer.status}:{await answer.text()}")
            return Redirect(answer.headers["Location"])


def pkce(verifier: str | None = None) -> tuple[str, str]:
    """(verifier, S256 challenge), computed here independently of the server's code."""
    import base64
    import hashlib
    import secrets

    v = verifier or secrets.token_urlsafe(48)
    return v, base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).decode().rstrip("=")


def authorize_url(gw: Running, client_id: str, challenge: str, **params: str) -> str:
    from urllib.parse import urlencode

    issuer = gw.config.oauth.public_url
    q = {
        "response_type": "code", "client_id": client_id, "redirect_uri": CALLBACK, "state": "st-1",
        "code_challenge": challenge, "code_challenge_method": "S256", "resource": f"{issuer}/mcp/tools",
        **params,
    }  # fmt: skip
    return f"{issuer}/oauth/authorize?{urlencode({k: v for k, v in q.items() if v != ''})}"


async def register(gw: Running, **fields: Any) -> dict[str, Any]:
    body = {"redirect_uris": [CALLBACK], "client_name": "Raw client", **fields}
    r = await gw.proxy.post("/oauth/register", json=body)
    assert r.status == 201, await r.text()
    return dict(await r.json())


async def code_for(gw: Running, api_key: str, client_id: str, *, tools: str = "", **params: str) -> tuple[str, str]:
    """A fresh authorization code and its PKCE verifier."""
    verifier, challenge = pkce()
    back = await consent(authorize_url(gw, client_id, challenge, **params), api_key, tools=tools)
    assert "code" in back.params, back.location
    return back.params["code"], verifier


async def exchange(gw: Running, client_id: str, code: str, verifier: str, **extra: str) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier, "redirect_uri": CALLBACK,
            "client_id": client_id, **extra}  # fmt: skip
    r = await gw.proxy.post("/oauth/token", data={k: v for k, v in form.items() if v != ""})
    return r.status, dict(await r.json())
