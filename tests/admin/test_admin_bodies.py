"""Admin bodies declared once: the OpenAPI document's schemas are generated from the models the
handlers validate with, and the config file's JSON Schema is served beside it."""

from __future__ import annotations

from typing import Any

from conftest import ADMIN_TOKEN, PLEX_TOKEN, Running

from sidecar.admin.bodies import REQUESTS, RESPONSES, KeyInput
from sidecar.admin.openapi import openapi_spec
from sidecar.config.json_schema import config_json_schema

H = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def call(running: Running, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    kw.setdefault("headers", H)
    resp = await running.admin.request(method, path, **kw)
    return resp.status, await resp.json()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_openapi_schemas_are_the_body_models() -> None:
    spec = openapi_spec()
    schemas = spec["components"]["schemas"]
    assert {m.__name__ for m in (*REQUESTS, *RESPONSES)} <= set(schemas)
    assert set(schemas["KeyInput"]["properties"]) == set(KeyInput.model_fields)
    assert schemas["KeyInput"]["additionalProperties"] is False
    for ref in _refs(spec):  # every reference resolves to a generated component
        kind, name = ref.removeprefix("#/components/").split("/")
        assert name in spec["components"][kind], ref
    body = spec["paths"]["/admin/keys"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/KeyInput"}


async def test_every_documented_key_field_is_accepted(plex_sidecar: Running) -> None:
    """No drift between the document and the checks: a key using every KeyInput field is created."""
    every = {"name": "all", "description": "d", "owner": "ann", "permissions": {"upstreams": ["plex"]},
             "rate_limits": ["60/minute"], "quota": "1000/day", "concurrency": 2, "expires": "30d",
             "expires_at": None, "upstream_token_env": {}}  # fmt: skip
    assert set(every) == set(KeyInput.model_fields)
    status, body = await call(plex_sidecar, "POST", "/admin/keys", json=every)
    assert status == 201, body
    assert body["data"]["owner"] == "ann" and body["data"]["concurrency"] == 2


async def test_bodies_are_checked_by_their_models(plex_sidecar: Running) -> None:
    rec, _ = await plex_sidecar.create_key()
    cases = [
        ("POST", "/admin/keys", {"name": "x", "concurrency": "5"}, "concurrency: expected a whole number from 1 to"),
        ("POST", "/admin/keys", {"name": "x", "owner": 7}, "owner: expected a string"),
        ("PATCH", f"/admin/keys/{rec.id}", {"description": ["d"]}, "description: expected a string"),
        ("PATCH", f"/admin/keys/{rec.id}", {"upstream_token_env": {"plex": 1}}, "upstream_token_env: expected"),
        ("POST", f"/admin/keys/{rec.id}/rotate", {"grace": "1h", "colour": 1}, "unknown field(s): colour"),
        ("POST", f"/admin/keys/{rec.id}/rotate", {"grace": True}, "grace: expected a duration"),
        ("POST", f"/admin/keys/{rec.id}/quota", {"used": 0, "extra": 1, "more": 2}, "unknown field(s): extra, more"),
        ("POST", f"/admin/keys/{rec.id}/quota", {"used": "0"}, "used: expected a whole number from 0 to"),
    ]
    for method, path, body, needle in cases:
        status, answer = await call(plex_sidecar, method, path, json=body)
        assert status == 400 and answer["error"]["code"] == "bad_request", (body, answer)
        assert needle in answer["error"]["message"], (body, answer)


async def test_the_config_schema_is_served_without_auth_and_without_secrets(plex_sidecar: Running) -> None:
    resp = await plex_sidecar.admin.get("/admin/config.schema.json")  # no Authorization: like the OpenAPI document
    assert resp.status == 200 and resp.content_type == "application/json"
    text = await resp.text()
    assert await resp.json() == config_json_schema()
    assert ADMIN_TOKEN not in text and PLEX_TOKEN not in text
    assert "/admin/config.schema.json" in openapi_spec()["paths"]
