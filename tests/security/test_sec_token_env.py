"""Per-key upstream tokens come only from allow-listed variables (issue 14.14, invariant 9).

An admin set a key's ``upstream_token_env`` to ``SIDECAR_ADMIN_TOKEN`` and the sidecar sent
that secret upstream as the Plex token. Now a key may name only variables on
``keys.upstream_token_envs``: others are a 400 at create, update and rotate, and a record
that names one anyway (written before the allow-list, or by hand) gets 503 and no token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, PLEX_TOKEN, MakeSidecar, Running, base_config

from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord
from sidecar.config import ConfigError, parse_config
from sidecar.demo import SEEN, plex_like_app

KIDS_TOKEN = "managed-user-token-kids-42"


async def start(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, allow: list[str]
) -> tuple[Running, TestServer]:
    up = await aiohttp_server(plex_like_app(PLEX_TOKEN))
    cfg = base_config(
        str(up.make_url("")).rstrip("/"), tmp_path, keys={"argon2": "cheapest", "upstream_token_envs": allow}
    )
    running = await make_sidecar(cfg, extra_env={"PLEX_TOKEN_KIDS": KIDS_TOKEN})
    return running, up


@pytest.mark.parametrize("allow", [[], ["PLEX_TOKEN_*"]])
async def test_admin_api_refuses_variables_off_the_allow_list(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, allow: list[str]
) -> None:
    running, _ = await start(make_sidecar, aiohttp_server, tmp_path, allow)
    headers = running.admin_headers()
    for name in ("SIDECAR_ADMIN_TOKEN", "HOME", "PATH", "PLEX_TOKEN"):
        body = {"name": "x", "upstream_token_env": {"plex": name}}
        resp = await running.admin.post("/admin/keys", json=body, headers=headers)
        err = (await resp.json())["error"]
        assert resp.status == 400 and err["code"] == "bad_request", "the client sees a 400 naming the rule"
        assert "keys.upstream_token_envs" in err["message"] and ADMIN_TOKEN not in err["message"]
    created = await running.admin.post("/admin/keys", json={"name": "y"}, headers=headers)
    key_id = (await created.json())["data"]["id"]
    resp = await running.admin.patch(
        f"/admin/keys/{key_id}", json={"upstream_token_env": {"plex": "SIDECAR_ADMIN_TOKEN"}}, headers=headers
    )
    assert resp.status == 400 and "keys.upstream_token_envs" in (await resp.json())["error"]["message"]
    resp = await running.admin.post(
        "/admin/keys", json={"name": "kids", "upstream_token_env": {"plex": "PLEX_TOKEN_KIDS"}}, headers=headers
    )
    assert resp.status == (201 if allow else 400)


async def test_a_record_naming_another_variable_gets_no_token(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Written straight into the store (a YAML file edited by hand, a record from before the
    allow-list): the request is refused with 503 and the upstream never hears the secret."""
    running, upstream = await start(make_sidecar, aiohttp_server, tmp_path, ["PLEX_TOKEN_*"])
    sc = running.sc
    key, parts = generate_key("pmcp_")
    rec = KeyRecord(
        id=parts.key_id,
        name="sneaky",
        hash=sc.verifier.hasher.hash(parts.secret),
        display=display_form("pmcp_", parts.key_id, key),
        upstream_token_env={"plex": "SIDECAR_ADMIN_TOKEN"},
    )
    await sc.store.insert([rec])
    await sc.verifier.refresh(force=True)
    resp = await running.proxy.get("/identity", headers={"X-Plex-Token": key})
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "service_unavailable"
    seen = upstream.app[SEEN]
    assert all(ADMIN_TOKEN not in str(s) for s in seen), "the admin token must never go upstream"
    # An allow-listed variable still works, with its own token.
    _, kids = await running.create_key(upstream_token_env={"plex": "PLEX_TOKEN_KIDS"})
    resp = await running.proxy.get("/identity", headers={"X-Plex-Token": kids})
    assert resp.status == 401  # this upstream only knows PLEX_TOKEN: the kids' token was sent, as mapped
    assert seen[-1]["headers"]["X-Plex-Token"] == KIDS_TOKEN


@pytest.mark.parametrize(
    ("allow", "needle"),
    [(["*"], "variable name or a prefix glob"), (["SIDECAR_*"], "admin token"), (["a b"], "variable name")],
)
def test_config_refuses_allow_lists_that_open_everything(tmp_path: Path, allow: list[str], needle: str) -> None:
    cfg = base_config("http://127.0.0.1:1", tmp_path, keys={"upstream_token_envs": allow})
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, env={"PLEX_TOKEN": PLEX_TOKEN}, base=tmp_path)
    assert "keys.upstream_token_envs[0]" in str(info.value) and needle in str(info.value)
