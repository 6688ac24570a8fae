"""Grants and clients for operators: the admin API (``/admin/oauth/…``), the CLI
(``sidecar oauth …``), and a pre-registered confidential client from the config file."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ADMIN_TOKEN, Running
from mcp_server import MCP_TOKEN, McpUpstream
from oauth_support import CALLBACK, code_for, exchange, free_port, oauth_config, register, start_sidecar

from sidecar.app import Sidecar
from sidecar.cli import main

PERMS = {"upstreams": ["*"], "tools": {"tools": ["search", "fetch"]}}
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}  # fmt: skip
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture
def cfg(upstream: McpUpstream, tmp_path: Path) -> dict[str, Any]:
    client = {"client_id": "connector", "client_secret": "${CONNECTOR_SECRET}", "client_name": "Vouched Connector",
              "redirect_uris": [CALLBACK]}  # fmt: skip
    return oauth_config(upstream, tmp_path, free_port(), clients=[client])


@pytest.fixture
async def gw(aiohttp_client: Any, cfg: dict[str, Any], tmp_path: Path, started: list[Sidecar]) -> Running:
    return await start_sidecar(aiohttp_client, cfg, tmp_path, started, extra_env={"CONNECTOR_SECRET": "s3cret-123"})


async def test_preregistered_client_with_a_secret(gw: Running) -> None:
    import base64

    _, key = await gw.create_key(permissions=PERMS)
    code, verifier = await code_for(gw, key, "connector")
    form = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier, "redirect_uri": CALLBACK}
    basic = base64.b64encode(b"connector:wrong").decode()
    r = await gw.proxy.post("/oauth/token", data=form, headers={"Authorization": f"Basic {basic}"})
    assert r.status == 401 and (await r.json())["error"] == "invalid_client"
    code, verifier = await code_for(gw, key, "connector")
    basic = base64.b64encode(b"connector:s3cret-123").decode()
    r = await gw.proxy.post("/oauth/token", data={**form, "code": code, "code_verifier": verifier},
                            headers={"Authorization": f"Basic {basic}"})  # fmt: skip
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"


async def test_admin_api_lists_and_revokes_grants_and_clients(gw: Running) -> None:
    parent, key = await gw.create_key(permissions=PERMS, owner="bob")
    client = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client)
    _, answer = await exchange(gw, client, code, verifier)
    h = gw.admin_headers()
    r = await gw.admin.get("/admin/oauth/grants", params={"client": client}, headers=h)
    (grant,) = (await r.json())["data"]
    assert grant["parent_id"] == parent.id and "hash" not in grant
    r = await gw.admin.get("/admin/oauth/clients", headers=h)
    kinds = {c["client_id"]: c["kind"] for c in (await r.json())["data"]}
    assert kinds == {"connector": "configured", client: "registered"}
    # a delegated admin key may not manage OAuth
    _, delegate = await gw.create_key(permissions={"upstreams": ["*"], "admin": True}, owner="bob")
    r = await gw.admin.get("/admin/oauth/grants", headers={"Authorization": f"Bearer {delegate}"})
    assert r.status == 403
    r = await gw.admin.delete(f"/admin/oauth/grants/{grant['id']}", headers=h)
    assert r.status == 200 and (await r.json())["data"]["state"] == "revoked"
    r = await gw.proxy.post(
        "/mcp/tools", json=INIT, headers={**ACCEPT, "Authorization": f"Bearer {answer['access_token']}"}
    )
    assert r.status == 401
    r = await gw.admin.delete(f"/admin/oauth/grants/{parent.id}", headers=h)  # a plain key is no grant
    assert r.status == 404
    r = await gw.admin.delete(f"/admin/oauth/clients/{client}", headers=h)
    assert r.status == 200
    r = await gw.admin.delete("/admin/oauth/clients/connector", headers=h)
    assert r.status == 400
    r = await gw.admin.get("/admin/audit", params={"key": grant["id"]}, headers=h)
    actions = {e["action"] for e in (await r.json())["data"]}
    assert {"oauth_granted", "revoked"} <= actions


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def _cli(config: Path, *args: str) -> Done:
    """``sidecar oauth …`` in this process (a subprocess per call costs a second of imports)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["oauth", *args, "-c", str(config)])
    return Done(code, out.getvalue(), err.getvalue())


async def test_cli_lists_and_revokes_grants(
    gw: Running, cfg: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN, "MCP_TOKEN": MCP_TOKEN, "CONNECTOR_SECRET": "x"}.items():
        monkeypatch.setenv(name, value)
    parent, key = await gw.create_key(permissions=PERMS)
    client = (await register(gw))["client_id"]
    code, verifier = await code_for(gw, key, client)
    _, answer = await exchange(gw, client, code, verifier)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = await asyncio.to_thread(_cli, path, "grants", "--key", parent.id, "--json")
    assert out.returncode == 0, out.stderr
    (grant,) = json.loads(out.stdout)
    assert grant["grant"]["client_id"] == client
    out = await asyncio.to_thread(_cli, path, "clients")
    assert out.returncode == 0 and client in out.stdout and "connector" in out.stdout
    out = await asyncio.to_thread(_cli, path, "revoke", grant["id"])
    assert out.returncode == 0, out.stderr
    await gw.sc.verifier.refresh()
    r = await gw.proxy.post(
        "/mcp/tools", json=INIT, headers={**ACCEPT, "Authorization": f"Bearer {answer['access_token']}"}
    )
    assert r.status == 401 and (await r.json())["error"]["code"] == "revoked_key"
    out = await asyncio.to_thread(_cli, path, "remove-client", client)
    assert out.returncode == 0, out.stderr
    out = await asyncio.to_thread(_cli, path, "revoke", parent.id)
    assert out.returncode == 1 and "no OAuth grant" in out.stderr
