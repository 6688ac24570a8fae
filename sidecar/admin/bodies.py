"""The admin API's request and response bodies, declared once as pydantic models.

Handlers validate what they receive through the request models (``parse``), and the OpenAPI
document's ``components.schemas`` is generated from all of them (``sidecar.admin.openapi``),
so the document and the checks cannot drift.

A request model checks the *shape*: known fields, JSON types, ranges. What a value means
(a limit, an expiry, an upstream that exists, a delegate's reach) is judged where the CLI gets
the same answer, ``KeyManager`` and the limiter. Errors keep the API's wording: ``field: why``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from ..core.errors import BadRequest
from ..limits.ratelimit import MAX_QUOTA_ADJUST
from .manage import MAX_CONCURRENCY, MAX_GRACE

_NAME = 200
_DESCRIPTION = 2000
REF_TEMPLATE = "#/components/schemas/{model}"


class Request(BaseModel):
    """A request body: unknown fields refused, JSON types as sent (``"5"`` is not 5)."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)
    # What a field's error says, whatever pydantic found wrong with it (today's wording).
    messages: ClassVar[dict[str, str]] = {}


R = TypeVar("R", bound=Request)


def parse(model: type[R], data: dict[str, Any]) -> R:
    """``data`` checked against ``model``; 400 ``bad_request`` naming the field when it does not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        unknown = sorted(str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden")
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}") from None
        field = str(errors[0]["loc"][0])
        raise BadRequest(f"{field}: {model.messages.get(field) or errors[0]['msg']}") from None


class Permissions(BaseModel):
    """What a key may reach. Absent lists mean all; MCP tables map an upstream id (or *) to globs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    upstreams: list[str] = ["*"]
    """Upstream ids, or * for all."""
    methods: list[str] = []
    """HTTP methods; none: all."""
    paths: list[str] = []
    """Path globs or presets (plex:read, plex:playback, plex:admin); none: all."""
    tools: dict[str, list[str]] = {}
    """MCP upstream id (or *) -> tool names or globs."""
    resources: dict[str, list[str]] = {}
    """MCP upstream id (or *) -> resource URI globs."""
    prompts: dict[str, list[str]] = {}
    """MCP upstream id (or *) -> prompt names or globs."""
    admin: bool | Literal["delegate", "full"] = False
    """true (= "delegate"): keys of its own owner within its reach; "full": every key."""


# Checked by Permissions.from_dict (its messages, shared with the CLI); documented inline as Permissions.
_PERMISSIONS = Annotated[
    dict[str, Any] | None, WithJsonSchema({**Permissions.model_json_schema(), "type": ["object", "null"]})
]
_LIMIT_EXAMPLE: dict[str, Any] = {"examples": ["60/minute"]}


class KeyInput(Request):
    """A key's fields, to create it (``name`` required) or to change some of them (PATCH)."""

    messages: ClassVar[dict[str, str]] = {
        "name": f"required, 1-{_NAME} characters",
        "description": "expected a string",
        "owner": "expected a string",
        "permissions": "expected an object",
        "rate_limits": 'expected a list such as ["60/minute"]',
        "quota": "expected a limit such as 10000/month",
        "concurrency": f"expected a whole number from 1 to {MAX_CONCURRENCY}",
        "expires": "expected a duration (90d), an ISO date or time, epoch seconds, or null",
        "expires_at": "expected a duration (90d), an ISO date or time, epoch seconds, or null",
        "upstream_token_env": "expected {upstream id: ENV_VAR_NAME}",
    }

    name: str | None = Field(None, min_length=1, max_length=_NAME)
    description: str | None = Field(None, json_schema_extra={"maxLength": _DESCRIPTION})
    owner: str | None = Field(None, json_schema_extra={"maxLength": _NAME})
    """Who the key belongs to (a metrics label; delegated admin works per owner)."""
    permissions: _PERMISSIONS = None
    rate_limits: list[str] | str | None = Field(None, json_schema_extra=_LIMIT_EXAMPLE)
    """Limits of this key (else the upstream's, else rate_limits.default)."""
    quota: str | None = Field(None, json_schema_extra={"examples": ["10000/month"]})
    concurrency: int | None = Field(None, ge=1, le=MAX_CONCURRENCY)
    expires: str | float | None = Field(None, json_schema_extra={"examples": ["90d", "2027-01-31"]})
    """When the key stops working: a duration from now, an ISO date/time, epoch seconds; null: never."""
    expires_at: str | float | None = None
    """The same as expires."""
    upstream_token_env: dict[str, str] | None = None
    """Upstream id -> environment variable with this key's own upstream token (keys.upstream_token_envs)."""


class Rotate(Request):
    """How long the old key keeps working after its successor is issued."""

    messages: ClassVar[dict[str, str]] = {"grace": "expected a duration such as 1h or 3600"}

    grace: str | float = Field(0, json_schema_extra={"examples": ["1h", 3600], "maximum": MAX_GRACE})


class QuotaChange(Request):
    """Set (``used``) or move (``add``) the count of the current quota window: give exactly one."""

    messages: ClassVar[dict[str, str]] = {
        "used": f"expected a whole number from 0 to {MAX_QUOTA_ADJUST}",
        "add": f"expected a whole number from -{MAX_QUOTA_ADJUST} to {MAX_QUOTA_ADJUST}",
        "upstream": "expected an upstream id",
    }

    used: int | None = Field(None, ge=0, le=MAX_QUOTA_ADJUST)
    add: int | None = Field(None, ge=-MAX_QUOTA_ADJUST, le=MAX_QUOTA_ADJUST)
    upstream: str | None = None
    """Only this upstream's quota (default: every quota that applies to the key)."""


Time = Annotated[str | None, Field(json_schema_extra={"format": "date-time"})]


class Key(BaseModel):
    """A key as shown: the display form, never the key or its hash."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    id: str = Field(pattern="^[0-9a-f]{12}$")
    name: str
    display: str = Field(json_schema_extra={"examples": ["pmcp_3f9a…c41e"]})
    description: str
    owner: str | None
    state: Literal["active", "expired", "revoked"]
    permissions: Permissions
    rate_limits: list[str]
    quota: str | None
    concurrency: int | None
    upstream_token_env: dict[str, str]
    created_at: Time
    expires_at: Time
    revoked_at: Time
    last_used_at: Time
    last_used_ip: str | None
    rotated_to: str | None
    """The successor's id, once rotated."""


class NewKey(Key):
    """A key just created or rotated: ``key`` is the full key, shown this once."""

    key: str


class AuditEvent(BaseModel):
    """One entry of the audit trail, with the action's own details beside these fields."""

    model_config = ConfigDict(extra="allow")

    at: str = Field(json_schema_extra={"format": "date-time"})
    actor: str = Field(json_schema_extra={"examples": ["admin", "cli", "key:3f9a0b1c2d3e"]})
    action: str = Field(json_schema_extra={"examples": ["created", "patched", "revoked", "rotated"]})
    key: str | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str


class Error(BaseModel):
    """Every error the sidecar answers (sidecar/core/errors.py)."""

    success: Literal[False]
    error: ErrorDetail


class Envelope(BaseModel):
    """A success: ``data`` is the answer."""

    success: Literal[True]
    data: Any


REQUESTS: tuple[type[BaseModel], ...] = (KeyInput, Rotate, QuotaChange)
RESPONSES: tuple[type[BaseModel], ...] = (Permissions, Key, NewKey, AuditEvent, Error, Envelope)
