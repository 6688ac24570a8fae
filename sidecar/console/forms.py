"""The create and edit forms: HTML form fields to and from the admin API's JSON fields.

The console never validates a key field itself: it only reshapes what the form sent into
the object ``POST /admin/keys`` / ``PATCH /admin/keys/{id}`` take, and hands it to
``KeyManager`` (sidecar/admin/manage.py), whose errors are shown above the form. So the
console, the admin API and the CLI accept and refuse exactly the same keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from multidict import MultiDictProxy

from ..auth.models import KeyRecord
from ..auth.presets import PLEX_PRESETS
from ..config import Config
from ..core.errors import BadRequest

__all__ = [
    "EXPIRY_CHOICES", "GRACE_CHOICES", "FormState", "blank_form", "changed_fields", "fields_from_form",
    "form_from_record",
]  # fmt: skip

# The seeds' presets: 30 days short-term, 90 days regular rotation, 1 year long-term, or never.
EXPIRY_CHOICES = (("30d", "30 days"), ("90d", "90 days"), ("365d", "1 year"), ("never", "Never"))
GRACE_CHOICES = (("0", "none (the old key stops now)"), ("1h", "1 hour"), ("24h", "24 hours"), ("7d", "7 days"))
_SPLIT = re.compile(r"[\s,]+")
MAX_FIELD = 20_000  # characters in one form field: far above any real key, far below memory trouble

FormState = dict[str, Any]


def _words(text: str) -> list[str]:
    return [w for w in _SPLIT.split(text.strip()) if w]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _get(form: MultiDictProxy[str], name: str) -> str:
    values = form.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"{name}: give it once")
    value = values[0] if values else ""
    if len(value) > MAX_FIELD:
        raise BadRequest(f"{name}: too long")
    return value.replace("\r\n", "\n")  # browsers send a textarea's line breaks as CRLF


def blank_form(config: Config) -> FormState:
    return {
        "name": "", "description": "", "owner": "", "expires": "90d", "expires_date": "",
        "access": "all", "upstreams": [], "methods": "", "presets": [], "paths": "",
        "mcp": {u.id: {"mode": "all", "tools": [], "typed": "", "resources": "", "prompts": ""}
                for u in config.upstreams if u.kind == "mcp"},
        "admin": "", "rate_limits": "", "quota": "", "concurrency": "",
    }  # fmt: skip


def form_from_record(config: Config, rec: KeyRecord) -> FormState:
    """The edit form, filled with what the key has now."""
    p = rec.permissions
    state = blank_form(config)
    state.update(
        name=rec.name, description=rec.description, owner=rec.owner or "", expires="keep",
        access="all" if "*" in p.upstreams else "some", upstreams=[u for u in p.upstreams if u != "*"],
        methods=", ".join(p.methods), presets=[x for x in PLEX_PRESETS if x in p.paths],
        paths="\n".join(x for x in p.paths if x not in PLEX_PRESETS),
        admin=("full" if p.full_admin else "delegate") if p.admin else "",
        rate_limits=", ".join(rec.rate_limits), quota=rec.quota or "",
        concurrency="" if rec.concurrency is None else str(rec.concurrency),
    )  # fmt: skip
    for up_id, entry in state["mcp"].items():
        tools = p.tools.get(up_id)
        if tools is not None:
            entry.update(mode="some", tools=list(tools), typed="")
        entry["resources"] = "\n".join(p.resources.get(up_id, ()))
        entry["prompts"] = "\n".join(p.prompts.get(up_id, ()))
    return state


def _state(form: MultiDictProxy[str], config: Config) -> FormState:
    """What the form sent, in the shape the template re-renders it from (after an error)."""
    state = blank_form(config)
    for name in ("name", "description", "owner", "expires", "expires_date", "access", "methods", "paths", "admin",
                 "rate_limits", "quota", "concurrency"):  # fmt: skip
        state[name] = _get(form, name)
    state["upstreams"] = form.getall("upstream", [])
    state["presets"] = [x for x in form.getall("preset", []) if x in PLEX_PRESETS]
    for up_id, entry in state["mcp"].items():
        entry["mode"] = _get(form, f"tools_mode.{up_id}") or "all"
        entry["tools"] = form.getall(f"tool.{up_id}", [])
        for part in ("typed", "resources", "prompts"):
            entry[part] = _get(form, f"{part}.{up_id}")
    return state


def fields_from_form(form: MultiDictProxy[str], config: Config, *, edit: bool) -> tuple[dict[str, Any], FormState]:
    """(admin API fields, form state). Shape errors are a BadRequest, like a bad JSON body."""
    st = _state(form, config)
    return fields_from_state(st, edit=edit), st


def changed_fields(config: Config, rec: KeyRecord, fields: dict[str, Any]) -> dict[str, Any]:
    """Only what the edit form changes (so the audit entry names just that): each field compared with
    what the unchanged form would have sent."""
    before = fields_from_state(form_from_record(config, rec), edit=True)
    return {k: v for k, v in fields.items() if k not in before or before[k] != v}


def fields_from_state(st: FormState, *, edit: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {"name": st["name"], "description": st["description"], "owner": st["owner"] or None}
    if st["access"] == "all":
        upstreams = ["*"]
    else:
        upstreams = [u for u in st["upstreams"] if u]
        if not upstreams:
            raise BadRequest("upstream access: choose at least one upstream, or all")
    perms: dict[str, Any] = {"upstreams": upstreams}
    if _words(st["methods"]):
        perms["methods"] = _words(st["methods"])
    paths = st["presets"] + _lines(st["paths"])
    if paths:
        perms["paths"] = paths
    tools: dict[str, list[str]] = {}
    resources: dict[str, list[str]] = {}
    prompts: dict[str, list[str]] = {}
    for up_id, entry in st["mcp"].items():
        if entry["mode"] == "some":
            picked = [t for t in entry["tools"] if t] + _words(entry["typed"])
            tools[up_id] = list(dict.fromkeys(picked))
        if _lines(entry["resources"]):
            resources[up_id] = _lines(entry["resources"])
        if _lines(entry["prompts"]):
            prompts[up_id] = _lines(entry["prompts"])
    for name, table in (("tools", tools), ("resources", resources), ("prompts", prompts)):
        if table:
            perms[name] = table
    if st["admin"] in ("delegate", "full"):
        perms["admin"] = st["admin"]
    elif st["admin"]:
        raise BadRequest("admin: expected none, delegate or full")
    fields["permissions"] = perms
    fields["rate_limits"] = _words(st["rate_limits"])
    fields["quota"] = st["quota"].strip() or None
    conc = st["concurrency"].strip()
    if conc and not (conc.isascii() and conc.isdigit() and len(conc) <= 9):
        raise BadRequest("concurrency: expected a whole number")
    fields["concurrency"] = int(conc) if conc else None
    expires = st["expires"]
    if expires == "date":
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", st["expires_date"]):
            raise BadRequest("expires: pick a date")
        fields["expires"] = st["expires_date"] + "T23:59:59Z"
    elif expires in dict(EXPIRY_CHOICES):
        fields["expires"] = None if expires == "never" else expires
    elif not (edit and expires == "keep"):
        raise BadRequest("expires: choose one of the choices")
    return fields


def lifetime_choices(config: Config) -> list[tuple[str, str]]:
    """The expiry presets that ``keys.max_lifetime`` allows ("never" is then capped by the store)."""
    cap = config.keys.max_lifetime
    days = {"30d": 30, "90d": 90, "365d": 365}
    out = [(v, label) for v, label in EXPIRY_CHOICES if cap is None or v == "never" or days[v] * 86400 <= cap]
    if cap is not None:
        out = [(v, f"Never (capped at {cap / 86400:g} days)" if v == "never" else label) for v, label in out]
    return out


def audit_detail(detail: Mapping[str, Any]) -> str:
    """An audit event's detail as one short line (field names, new key ids; never a secret: none is stored)."""
    return ", ".join(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in detail.items())
