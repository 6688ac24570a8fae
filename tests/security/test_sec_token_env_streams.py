"""A key whose upstream identity changes loses its open streams (invariant 5, as for narrowed permissions).

``upstream_token_env`` picks the upstream token a key's requests carry (a Plex managed user). An
open websocket or event stream was authorised — and relays — with the token of the identity it
was opened under. Before, an operator who moved a key to another identity (admin API, or an edit
of the keys file and a reload) left those streams running as the old identity: only a change of
permissions or of the secret ended them. Now they end within a sweep (websocket 1008, the event
stream cut), and the key's next request is authorised again under its new identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import MakeSidecar, Running, base_config
from streams_support import closed_1008, cut
from test_sec_revocation import streaming_upstream

from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord
from sidecar.auth.verify import password_hasher

ENV = {"PLEX_TOKEN_KIDS": "managed-user-token-kids", "PLEX_TOKEN_TEEN": "managed-user-token-teen"}


async def rig(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, store: dict[str, Any]) -> Running:
    up = await aiohttp_server(streaming_upstream())
    keys = {"argon2": "cheapest", "stream_check_interval": "50ms", "upstream_token_envs": ["PLEX_TOKEN_*"]}
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path, keys=keys)
    if store:
        cfg["store"] = store
    return await make_sidecar(cfg, extra_env=ENV)


async def in_file(tmp_path: Path) -> tuple[Path, KeyRecord, str]:
    key, parts = generate_key("pmcp_")
    rec = KeyRecord(
        id=parts.key_id,
        name="kid",
        hash=password_hasher("cheapest").hash(parts.secret),
        display=display_form("pmcp_", parts.key_id, key),
        upstream_token_env={"plex": "PLEX_TOKEN_KIDS"},
    )
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [rec.to_dict()]}))
    return path, rec, key


async def move(r: Running, rec: KeyRecord, how: str) -> None:
    """The operator moves the key to another managed user."""
    if how == "keys file":  # an edit of the file, then SIGHUP
        moved = rec.with_changes(upstream_token_env={"plex": "PLEX_TOKEN_TEEN"})
        r.config.store.path.write_text(yaml.safe_dump({"keys": [moved.to_dict()]}))
        await r.sc.verifier.refresh(force=True)
        return
    body = {"upstream_token_env": {"plex": "PLEX_TOKEN_TEEN"}}
    resp = await r.admin.patch(f"/admin/keys/{rec.id}", json=body, headers=r.admin_headers())
    assert resp.status == 200, await resp.text()
    await r.sc.verifier.refresh()


@pytest.mark.parametrize("how", ["admin API", "keys file"])
async def test_a_keys_streams_end_when_its_upstream_identity_changes(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, how: str
) -> None:
    if how == "keys file":
        path, rec, key = await in_file(tmp_path)
        r = await rig(make_sidecar, aiohttp_server, tmp_path, {"kind": "yaml", "path": str(path)})
    else:
        r = await rig(make_sidecar, aiohttp_server, tmp_path, {})
        rec, key = await r.create_key(upstream_token_env={"plex": "PLEX_TOKEN_KIDS"})
    headers = {"X-Plex-Token": key}
    async with (
        r.proxy.ws_connect("/:/websockets/notifications", headers=headers) as ws,
        r.proxy.get("/:/eventsource/notifications", headers=headers) as events,
    ):
        assert events.status == 200 and (await ws.receive(timeout=2)).type == aiohttp.WSMsgType.TEXT
        await events.content.readline()
        await move(r, rec, how)
        await closed_1008(ws)
        await cut(events)
    async with r.proxy.get("/:/eventsource/notifications", headers=headers) as again:  # now as the new identity
        assert again.status == 200
        assert r.sc.streams.open_streams(rec.id) == 1
