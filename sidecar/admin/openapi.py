"""The admin API's OpenAPI 3.1 document: paths declared here, every schema generated from
the body models of ``sidecar.admin.bodies`` (what the handlers validate with)."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from ..observe.usage import MAX_DAYS
from .bodies import REF_TEMPLATE, REQUESTS, RESPONSES

MAX_AUDIT_LIMIT = 10_000
_ERR = {"$ref": "#/components/responses/Error"}
_KEY_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF_TEMPLATE.format(model=name)}


def _envelope(data: dict[str, Any] | None) -> dict[str, Any]:
    if data is None:
        return _ref("Envelope")
    return {"allOf": [_ref("Envelope"), {"properties": {"data": data}}]}


def _count(name: str, most: int) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": most}}


def _op(
    summary: str,
    ok: str = "200",
    body: str | None = None,
    params: list[Any] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    o: dict[str, Any] = {
        "summary": summary,
        "responses": {ok: {"description": "OK", "content": {"application/json": {"schema": _envelope(data)}}},
                      **{s: _ERR for s in ("400", "401", "403", "404", "409", "429", "503")}},
    }  # fmt: skip
    if body:
        o["requestBody"] = {"content": {"application/json": {"schema": _ref(body)}}}
    if params:
        o["parameters"] = params
    return o


def _public(summary: str) -> dict[str, Any]:
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {"summary": summary, "security": [], "responses": {"200": ok}}


@cache
def _schemas() -> dict[str, Any]:
    pairs = [(m, "validation") for m in REQUESTS] + [(m, "serialization") for m in RESPONSES]
    _, top = models_json_schema(pairs, ref_template=REF_TEMPLATE)  # type: ignore[arg-type]
    return dict(top["$defs"])


def openapi_spec() -> dict[str, Any]:
    """OpenAPI 3.1 description of the admin API."""
    key = _ref("Key")
    return {
        "openapi": "3.1.0",
        "info": {"title": "Sidecar admin API", "version": "1"},
        "components": {
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Error": {"description": "Error", "content": {"application/json": {"schema": _ref("Error")}}}
            },
            "schemas": _schemas(),
        },
        "security": [{"admin": []}],
        "paths": {
            "/admin/keys": {
                "post": _op("Create a key (the full key is in data.key, shown once)", "201", "KeyInput",
                            data=_ref("NewKey")),
                "get": _op("List keys (display form only)", data={"type": "array", "items": key}),
            },
            "/admin/keys/{id}": {
                "get": _op("Show a key", params=[_KEY_ID]),
                "patch": _op("Change a key's name, permissions, limits or expiry", body="KeyInput", params=[_KEY_ID],
                             data=key),
                "delete": _op("Revoke a key (it stays listed, for audit)", params=[_KEY_ID], data=key),
            },
            "/admin/keys/{id}/rotate": {
                "post": _op("Issue a replacement with the same permissions; the old key works for `grace`, then is "
                            "revoked", "201", "Rotate", params=[_KEY_ID], data=_ref("NewKey"))
            },
            "/admin/keys/{id}/usage": {
                "get": _op("Daily usage of a key, and when and from where it was last used",
                           params=[_KEY_ID, _count("days", MAX_DAYS)])
            },
            "/admin/keys/{id}/quota": {
                "post": _op('Reset ({"used": 0}) or top up ({"add": -500}) the current quota window',
                            body="QuotaChange", params=[_KEY_ID])
            },
            "/admin/audit": {
                "get": _op("The audit trail (created, patched, revoked, rotated: who and when), newest first",
                           params=[{"name": "key", "in": "query", "schema": {"type": "string"}},
                                   _count("limit", MAX_AUDIT_LIMIT)],
                           data={"type": "array", "items": _ref("AuditEvent")})
            },
            "/admin/cache": {"delete": _op("Purge the response cache (all, ?upstream=, ?path=glob)")},
            "/admin/openapi.json": {"get": _public("This document")},
            "/admin/config.schema.json": {"get": _public("The config file's JSON Schema (no secrets: no auth)")},
        },
    }  # fmt: skip
