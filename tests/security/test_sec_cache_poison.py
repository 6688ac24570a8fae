"""Cache poisoning through request headers the upstream reads but does not name in ``Vary``.

Keys mapped to one upstream identity (the usual case: every key uses the owner's token)
share cache entries. An attacker with a narrow key must not be able to choose, through a
header the upstream reflects, what the next client gets: Plex picks JSON or XML from
``Accept``, localises from ``X-Plex-Language`` / ``Accept-Language``, describes the device
from the other ``X-Plex-*`` headers (the same parameters in the query are keyed already),
answers CORS from ``Origin`` and may personalise on ``Cookie`` — without ``Vary``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeSidecar, Running, base_config

REFLECTED = ("Accept", "Accept-Language", "X-Plex-Language", "X-Plex-Client-Identifier", "X-Plex-Product",
             "Origin", "Cookie")  # fmt: skip


def reflecting_upstream() -> web.Application:
    async def reflect(request: web.Request) -> web.Response:
        seen = {name: request.headers.get(name, "") for name in REFLECTED}
        return web.Response(text=json.dumps(seen), headers={"Cache-Control": "max-age=60"})  # no Vary

    async def transcode(request: web.Request) -> web.Response:
        return web.Response(
            text=f"picture of {request.query.get('url', 'nothing')}", headers={"Cache-Control": "max-age=60"}
        )

    app = web.Application()
    app.router.add_get("/library/reflect", reflect)
    app.router.add_get("/photo/:/transcode", transcode)
    return app


@pytest.fixture
async def run(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path) -> Running:
    up = await aiohttp_server(reflecting_upstream())
    rules = [
        {"upstream": "plex", "path": "/library/*", "ttl": "60s"},
        {"upstream": "plex", "path": "/photo/*", "ttl": "60s"},
    ]
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path, cache={"max_bytes": "1MiB", "rules": rules})
    return await make_sidecar(cfg)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Accept", "application/json"),
        ("Accept-Language", "xx-EVIL"),
        ("X-Plex-Language", "xx"),
        ("X-Plex-Client-Identifier", "attacker-device"),
        ("X-Plex-Product", "<script>evil</script>"),
        ("Origin", "https://attacker.example"),
        ("Cookie", "session=attacker"),
    ],
)
async def test_a_reflected_header_without_vary_does_not_poison_another_keys_answer(
    run: Running, name: str, value: str
) -> None:
    _, attacker = await run.create_key(permissions={"upstreams": ["plex"], "paths": ["/library/reflect"]})
    _, victim = await run.create_key()
    for _ in range(2):  # the second time as a repeat (the hit memo's own path)
        resp = await run.proxy.get("/library/reflect", headers={"X-Plex-Token": attacker, name: value})
        assert resp.status == 200 and json.loads(await resp.text())[name] == value
    for _ in range(2):
        resp = await run.proxy.get("/library/reflect", headers={"X-Plex-Token": victim})
        body = await resp.text()
        assert resp.status == 200 and value not in body, (resp.headers.get("X-Cache-Status"), body)
    hit = await run.proxy.get("/library/reflect", headers={"X-Plex-Token": victim})
    assert hit.headers["X-Cache-Status"] == "HIT"  # the victim's own variant is still cached


async def test_a_cached_nested_url_answer_is_not_served_to_a_key_that_may_not_get_the_nested_path(run: Running) -> None:
    """The key inside ``url=`` is keyed as a placeholder, so both keys' requests name one entry: the
    narrow key's must still be judged on the nested path (403), never answered from the entry."""
    _, victim = await run.create_key()
    _, other = await run.create_key()
    _, attacker = await run.create_key(permissions={"upstreams": ["plex"], "paths": ["/photo/*"]})
    target = "/photo/:/transcode?width=100&url=/library/metadata/7/thumb%3FX-Plex-Token%3D{key}"
    resp = await run.proxy.get(target.format(key=victim), headers={"X-Plex-Token": victim})
    assert resp.status == 200 and resp.headers["X-Cache-Status"] == "MISS"
    assert "/library/metadata/7/thumb" in await resp.text()
    resp = await run.proxy.get(target.format(key=other), headers={"X-Plex-Token": other})
    assert resp.headers["X-Cache-Status"] == "HIT"  # one entry for every key of this identity
    for _ in range(2):
        resp = await run.proxy.get(target.format(key=attacker), headers={"X-Plex-Token": attacker})
        body = await resp.text()
        assert resp.status == 403 and "picture" not in body and "X-Cache-Status" not in resp.headers, body
