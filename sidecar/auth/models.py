"""The key record and its permissions: what a store keeps and the hot path reads.

Pure data, no I/O. ``to_dict``/``from_dict`` are the one serialisation shared by the
SQLite store (JSON column), the YAML store, the admin API and the CLI, so the four
never drift apart. The argon2 hash is kept out of ``public_dict`` on purpose.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from ..config import parse_limit

__all__ = ["KeyRecord", "Permissions", "iso", "parse_time"]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: object) -> float | None:
    """ISO-8601 text, a datetime, or epoch seconds; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip().replace("Z", "+00:00")
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO-8601 time such as 2027-01-31 or 2027-01-31T12:00:00Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


_EMPTY: Mapping[str, Any] = MappingProxyType({})
_PERMS_INTERN: dict[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], bool | str], Permissions] = {}
_MCP_KINDS = ("tools", "resources", "prompts")  # per-upstream MCP limits, same shape and semantics
_MCP_WHAT = {"tools": "tool names", "resources": "resource URI globs", "prompts": "prompt names"}


def _stored_time(value: object) -> float | None:
    if value is None or isinstance(value, float):
        return value
    return parse_time(value)  # rows written before times were stored as numbers


def _str_tuple(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what}: expected a list of strings")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class Permissions:
    """What a key may reach. Empty ``methods``/``paths`` mean all; ``"*"`` upstreams include later ones."""

    upstreams: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()  # globs, or Plex presets plex:read / plex:playback / plex:admin
    tools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # MCP upstream id -> tool globs
    # MCP upstream id -> resource URI globs / prompt names or globs (see permissions.mcp_globs)
    resources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    prompts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    admin: bool = False  # may mint Plex tokens and manage keys through the admin API
    # ``admin: full``: manages every key like the admin token. Plain ``admin: true`` manages
    # only keys of its own owner within its own reach (sidecar/admin/delegation.py).
    full_admin: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"upstreams": list(self.upstreams)}
        if self.methods:
            d["methods"] = list(self.methods)
        if self.paths:
            d["paths"] = list(self.paths)
        for kind in _MCP_KINDS:
            table = getattr(self, kind)
            if table:
                d[kind] = {k: list(v) for k, v in table.items()}
        if self.admin:
            d["admin"] = "full" if self.full_admin else True
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Permissions:
        data = data or {}
        unknown = set(data) - {"upstreams", "methods", "paths", "admin", *_MCP_KINDS}
        if unknown:
            raise ValueError(f"permissions: unknown field(s) {', '.join(sorted(unknown))}")
        mcp: dict[str, dict[str, tuple[str, ...]]] = {}
        for kind in _MCP_KINDS:
            raw = data.get(kind) or {}
            if not isinstance(raw, Mapping):
                raise ValueError(f"permissions.{kind}: expected a mapping of upstream id to {_MCP_WHAT[kind]}")
            mcp[kind] = {str(k): _str_tuple(v, f"permissions.{kind}.{k}") for k, v in raw.items()}
        admin = data.get("admin", False)
        if not (isinstance(admin, bool) or admin in ("full", "delegate")):
            raise ValueError('permissions.admin: expected false, true (same as "delegate") or "full"')
        ups = _str_tuple(data.get("upstreams", ["*"]), "permissions.upstreams") or ("*",)
        if data.get("upstreams") in ([], ()):  # "none" or "all"? Neither is safe to guess: "*" must be said
            raise ValueError('permissions.upstreams: empty; give upstream ids, or "*" for every upstream')
        return cls(
            upstreams=ups,
            methods=tuple(m.upper() for m in _str_tuple(data.get("methods"), "permissions.methods")),
            paths=_str_tuple(data.get("paths"), "permissions.paths"),
            tools=mcp["tools"],
            resources=mcp["resources"],
            prompts=mcp["prompts"],
            admin=bool(admin),
            full_admin=admin == "full",
        )


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    hash: str = field(repr=False)  # argon2id of the secret; never leaves the store
    display: str = ""
    description: str = ""
    owner: str | None = None
    permissions: Permissions = Permissions()
    rate_limits: tuple[str, ...] = ()  # e.g. ("60/minute",); empty = upstream/global default
    quota: str | None = None  # e.g. "10000/month"
    concurrency: int | None = None
    # Per-upstream environment variable holding a different upstream token (Plex managed user).
    upstream_token_env: Mapping[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    last_used_ip: str | None = None
    rotated_to: str | None = None
    # An OAuth grant is a child key of the key that approved it (sidecar/oauth/grants.py): the
    # parent's revocation or expiry ends it (``Verifier.state``); ``grant`` holds client_id,
    # client_name, resource and the granted tools.
    parent_id: str | None = None
    grant: Mapping[str, Any] = field(default_factory=dict)
    # A rotated key's successor counts against its predecessor's rate limits, quota and
    # concurrency (the first key of the rotation chain; None: its own), so rotating never
    # hands out a fresh budget (sidecar/limits/gcra.py ``budget_of``).
    budget_id: str | None = None

    def state(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def with_changes(self, **changes: Any) -> KeyRecord:
        return replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """What the admin API and CLI show: everything but the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "display": self.display,
            "description": self.description,
            "owner": self.owner,
            "state": self.state(),
            "permissions": self.permissions.to_dict(),
            "rate_limits": list(self.rate_limits),
            "quota": self.quota,
            "concurrency": self.concurrency,
            "upstream_token_env": dict(self.upstream_token_env),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
            "last_used_ip": self.last_used_ip,
            "rotated_to": self.rotated_to,
            "parent_id": self.parent_id,
            "grant": dict(self.grant),
        }

    def to_dict(self) -> dict[str, Any]:
        """The stored form (YAML store entries, SQLite JSON column)."""
        d = self.public_dict()
        del d["state"], d["last_used_at"], d["last_used_ip"]
        d["hash"] = self.hash
        d["budget_id"] = self.budget_id
        return {k: v for k, v in d.items() if v not in (None, "", [], {})}

    def to_stored(self) -> dict[str, Any]:
        """The SQLite JSON column: like ``to_dict`` but times as epoch seconds (cheap to load)."""
        d: dict[str, Any] = {"id": self.id, "name": self.name, "hash": self.hash, "display": self.display}
        if self.description:
            d["description"] = self.description
        if self.owner:
            d["owner"] = self.owner
        d["permissions"] = self.permissions.to_dict()
        if self.rate_limits:
            d["rate_limits"] = list(self.rate_limits)
        if self.quota:
            d["quota"] = self.quota
        if self.concurrency is not None:
            d["concurrency"] = self.concurrency
        if self.upstream_token_env:
            d["upstream_token_env"] = dict(self.upstream_token_env)
        d["created_at"] = self.created_at
        for name in ("expires_at", "revoked_at"):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        if self.rotated_to:
            d["rotated_to"] = self.rotated_to
        if self.parent_id:
            d["parent_id"] = self.parent_id
        if self.grant:
            d["grant"] = dict(self.grant)
        if self.budget_id:
            d["budget_id"] = self.budget_id
        return d

    @classmethod
    def from_stored(
        cls, data: Mapping[str, Any], last_used_at: float | None = None, last_used_ip: str | None = None
    ) -> KeyRecord:
        """Rebuild a record this program wrote itself (``to_stored``), without re-validating it.

        Loading 100 000 keys at start must be quick; every field was validated when the
        record was written, so this only converts. Human-edited input uses ``from_dict``.
        """
        p = data.get("permissions") or {}
        tools, resources, prompts = p.get("tools"), p.get("resources"), p.get("prompts")
        mcp_limited = bool(tools or resources or prompts)
        ident = (
            tuple(p.get("upstreams") or ("*",)),
            tuple(p.get("methods") or ()),
            tuple(p.get("paths") or ()),
            p.get("admin") or False,  # True, "full" or False
        )
        perms = None if mcp_limited else _PERMS_INTERN.get(ident)
        if perms is None:
            perms = Permissions(
                upstreams=ident[0],
                methods=ident[1],
                paths=ident[2],
                tools={k: tuple(v) for k, v in tools.items()} if tools else _EMPTY,
                resources={k: tuple(v) for k, v in resources.items()} if resources else _EMPTY,
                prompts={k: tuple(v) for k, v in prompts.items()} if prompts else _EMPTY,
                admin=bool(ident[3]),
                full_admin=ident[3] == "full",
            )
            if not mcp_limited and len(_PERMS_INTERN) < 10_000:
                _PERMS_INTERN[ident] = perms  # most keys share a handful of permission sets
        get = data.get
        ute = get("upstream_token_env")
        return cls(
            id=data["id"],
            name=data["name"],
            hash=data["hash"],
            display=get("display") or "",
            description=get("description") or "",
            owner=get("owner") or None,
            permissions=perms,
            rate_limits=tuple(get("rate_limits") or ()),
            quota=get("quota") or None,
            concurrency=get("concurrency"),
            upstream_token_env=dict(ute) if ute else _EMPTY,
            created_at=_stored_time(get("created_at")) or 0.0,
            expires_at=_stored_time(get("expires_at")),
            revoked_at=_stored_time(get("revoked_at")),
            last_used_at=last_used_at,
            last_used_ip=last_used_ip,
            rotated_to=get("rotated_to"),
            parent_id=get("parent_id"),
            grant=get("grant") or _EMPTY,
            budget_id=get("budget_id"),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyRecord:
        """Build and validate a record; ValueError names the bad field."""
        for req in ("id", "name", "hash"):
            if not isinstance(data.get(req), str) or not data.get(req):
                raise ValueError(f"{req}: required")
        known = {
            "id", "name", "hash", "display", "description", "owner", "permissions", "rate_limits", "quota",
            "concurrency", "upstream_token_env", "created_at", "expires_at", "revoked_at", "last_used_at",
            "last_used_ip", "rotated_to", "state", "parent_id", "grant", "budget_id",
        }  # fmt: skip
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
        if not str(data["hash"]).startswith("$argon2id$"):
            raise ValueError("hash: not an argon2id hash (keys are never stored in clear)")
        limits = _str_tuple(data.get("rate_limits"), "rate_limits")
        for lim in limits:
            parse_limit(lim)
        quota = data.get("quota")
        if quota is not None:
            parse_limit(quota)
        conc = data.get("concurrency")
        if conc is not None and (not isinstance(conc, int) or isinstance(conc, bool) or conc < 1):
            raise ValueError("concurrency: expected a whole number >= 1")
        ute = data.get("upstream_token_env") or {}
        if not isinstance(ute, Mapping):
            raise ValueError("upstream_token_env: expected a mapping of upstream id to variable name")
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            hash=str(data["hash"]),
            display=str(data.get("display") or ""),
            description=str(data.get("description") or ""),
            owner=str(data["owner"]) if data.get("owner") else None,
            permissions=Permissions.from_dict(data.get("permissions")),
            rate_limits=limits,
            quota=str(quota) if quota else None,
            concurrency=conc,
            upstream_token_env={str(k): str(v) for k, v in ute.items()},
            created_at=parse_time(data.get("created_at")) or 0.0,
            expires_at=parse_time(data.get("expires_at")),
            revoked_at=parse_time(data.get("revoked_at")),
            last_used_at=parse_time(data.get("last_used_at")),
            last_used_ip=data.get("last_used_ip"),
            rotated_to=data.get("rotated_to"),
            parent_id=str(data["parent_id"]) if data.get("parent_id") else None,
            grant=dict(data.get("grant") or {}),
            budget_id=str(data["budget_id"]) if data.get("budget_id") else None,
        )
