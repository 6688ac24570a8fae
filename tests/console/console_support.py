"""Helpers shared by the console's tests: sign in over plain HTTP and read a form's hidden fields."""

from __future__ import annotations

import re
from typing import Any

from conftest import ADMIN_TOKEN

HIDDEN = re.compile(r'<input type="hidden" name="(csrf|once)" value="([^"]*)">')


def hidden_fields(html: str) -> dict[str, str]:
    """The CSRF token and one-time nonce a console form carries."""
    return {name: value for name, value in HIDDEN.findall(html)}


async def sign_in(client: Any, token: str = ADMIN_TOKEN) -> dict[str, str]:
    """Sign ``client`` (an aiohttp TestClient on the admin app) in; the create form's hidden fields."""
    resp = await client.post("/signin", data={"token": token, "next": "/"}, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    page = await client.get("/keys/new")
    assert page.status == 200
    return hidden_fields(await page.text())


def key_form(name: str, **extra: str | list[str]) -> dict[str, Any]:
    """A create form as the browser posts it: all upstreams, 90 days, nothing else."""
    form: dict[str, Any] = {"name": name, "description": "", "owner": "", "expires": "90d", "expires_date": "",
                            "access": "all", "methods": "", "paths": "", "admin": "", "rate_limits": "",
                            "quota": "", "concurrency": ""}  # fmt: skip
    form.update(extra)
    return form


def shown_key(html: str, prefix: str = "pmcp_") -> str:
    m = re.search(r'<code id="new-key" data-secret>(' + re.escape(prefix) + r"[0-9a-z]+)</code>", html)
    assert m, html[:2000]
    return m.group(1)
