"""End-to-end smoke: a key, the Plex-like upstream, the real token injected and hidden."""

from __future__ import annotations

from conftest import PLEX_TOKEN, Running


async def test_key_reaches_upstream_with_real_token(plex_sidecar: Running) -> None:
    _, key = await plex_sidecar.create_key()
    resp = await plex_sidecar.proxy.get("/library/sections", headers={"X-Plex-Token": key})
    assert resp.status == 200
    body = await resp.text()
    assert "Movies" in body
    assert key not in body and PLEX_TOKEN not in body


async def test_no_key_is_401_json(plex_sidecar: Running) -> None:
    resp = await plex_sidecar.proxy.get("/library/sections")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("ApiKey")
    assert await resp.json() == {
        "success": False,
        "error": {"code": "unauthorized", "message": "an API key is required"},
    }
