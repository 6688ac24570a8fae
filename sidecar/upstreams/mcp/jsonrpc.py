"""JSON-RPC 2.0 as the MCP gateway needs it: parse a POST body, check it against its headers.

Pure: no aiohttp, no I/O, so it is unit-tested byte by byte. The gateway authorizes
from what this module parses out of the *body*; the ``Mcp-Method`` / ``Mcp-Name``
routing headers of MCP 2026-07-28 are only ever compared against it, never trusted
on their own (an intermediary routing on a header the body contradicts is exactly
the confusion the spec's header-mismatch rule exists to stop).

Problems with the body as a whole raise :class:`JsonRpcError`; the gateway answers
those with HTTP 400 and the JSON-RPC error object as the body (see ``docs/mcp.md``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from multidict import MultiMapping

__all__ = [
    "AUTHORIZED_PARAMS",
    "HEADER_MISMATCH",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "NAME_BEARING_METHODS",
    "PARSE_ERROR",
    "TOOL_FORBIDDEN",
    "TOOL_RATE_LIMITED",
    "Body",
    "JsonRpcError",
    "Message",
    "check_headers",
    "decode_header_value",
    "dumps",
    "error_object",
    "id_key",
    "loads_exact",
    "parse_body",
    "routing_headers",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020  # MCP 2026-07-28: headers disagree with the body
# The key may not call this tool. MCP leaves -32000..-32019 to implementations; the
# Python SDK uses -32000 and -32001 internally, so the sidecar takes -32010.
TOOL_FORBIDDEN = -32010
TOOL_RATE_LIMITED = -32011  # a tools/call over its per-tool rate limit (toollimits.py); data has the headers' fields

# Method -> the params key mirrored into the ``Mcp-Name`` header (MCP 2026-07-28).
NAME_BEARING_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
# Methods the gateway authorizes by one param (sidecar/upstreams/mcp/authz.py): it must be a string.
AUTHORIZED_PARAMS = {**NAME_BEARING_METHODS, "resources/subscribe": "uri", "resources/unsubscribe": "uri"}

_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")


class JsonRpcError(Exception):
    """A body the gateway refuses as a whole; ``id`` is the request's when it could be read."""

    def __init__(self, code: int, message: str, id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id

    def body(self, **data: Any) -> dict[str, Any]:
        return error_object(self.id, self.code, self.message, data or None)


def error_object(id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    """A JSON-RPC error response (``id`` null when the request's could not be read)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": err}


def dumps(obj: Any) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate the client spelled "\\ud800": written back as it came (was a 500)
        return json.dumps(obj, separators=(",", ":")).encode()


def id_key(value: Any) -> str:
    """A hashable, type-exact form of a JSON-RPC id (``1`` and ``"1"`` are different ids)."""
    return json.dumps(value)


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message from a client: a request, a notification, or a response."""

    raw: dict[str, Any]

    @property
    def method(self) -> str | None:
        m = self.raw.get("method")
        return m if isinstance(m, str) else None

    @property
    def is_request(self) -> bool:
        return self.method is not None and "id" in self.raw

    @property
    def is_notification(self) -> bool:
        return self.method is not None and "id" not in self.raw

    @property
    def id(self) -> Any:
        return self.raw.get("id")

    @property
    def params(self) -> dict[str, Any]:
        p = self.raw.get("params")
        return p if isinstance(p, dict) else {}

    @property
    def tool(self) -> str | None:
        """The tool a ``tools/call`` names (validated to be a string by :func:`parse_body`)."""
        if self.method != "tools/call":
            return None
        name = self.params.get("name")
        return name if isinstance(name, str) else None


@dataclass(frozen=True, slots=True)
class Body:
    messages: tuple[Message, ...]
    batch: bool

    @property
    def single_id(self) -> Any:
        """The id to put on a whole-body error: the request's, when there is exactly one."""
        if not self.batch and self.messages and "id" in self.messages[0].raw:
            return self.messages[0].id
        return None


# Integer ids JavaScript's numbers hold exactly: the gateway finds an answer (a list to filter) by its
# id, and an upstream that reads numbers as doubles (the TypeScript SDK's) echoes 2**60 + 1 as 2**60.
MAX_SAFE_ID = 2**53 - 1


def _valid_id(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return -MAX_SAFE_ID <= value <= MAX_SAFE_ID
    return isinstance(value, str)


def _message(obj: Any) -> Message:
    if not isinstance(obj, dict):
        raise JsonRpcError(INVALID_REQUEST, "Invalid Request: a JSON-RPC message must be an object")
    rid = obj.get("id")
    if obj.get("jsonrpc") != "2.0":
        raise JsonRpcError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', rid if _valid_id(rid) else None)
    if "method" in obj:
        if not isinstance(obj["method"], str) or not obj["method"]:
            raise JsonRpcError(INVALID_REQUEST, 'Invalid Request: "method" must be a non-empty string')
        if "id" in obj and not _valid_id(rid):
            raise JsonRpcError(INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer within ±(2^53-1)')
        params = obj.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise JsonRpcError(INVALID_REQUEST, 'Invalid Request: "params" must be an object', rid)
        if obj["method"] in AUTHORIZED_PARAMS:
            key = AUTHORIZED_PARAMS[obj["method"]]
            if not isinstance(params, dict) or not isinstance(params.get(key), str):
                msg = f"Invalid params: {obj['method']} needs params.{key} (a string)"
                raise JsonRpcError(INVALID_PARAMS, msg, rid)
    elif "result" in obj or "error" in obj:
        if rid is not None and not _valid_id(rid):
            raise JsonRpcError(INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer within ±(2^53-1)')
    else:
        raise JsonRpcError(INVALID_REQUEST, "Invalid Request: neither a request, a notification nor a response")
    return Message(obj)


_LONG_NUMBER = re.compile(rb"\d{19}")  # past what orjson reads exactly (it makes such integers floats)


def loads_exact(data: bytes) -> Any:
    """``json.loads``, through orjson where it reads the same tree (a tenth of the time).

    orjson turns integers beyond 64 bits into floats and refuses what the standard library
    accepts (``NaN``, lone surrogates, UTF-16, a BOM, deep nesting): a body with a run of 19
    digits, or one orjson refuses, is read by the standard library, so the tree is always the
    one ``json.loads`` — and the upstream — makes.
    """
    if not _LONG_NUMBER.search(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def parse_body(data: bytes) -> Body:
    """Parse a POSTed JSON-RPC message or batch; raise JsonRpcError for anything else."""
    try:
        decoded = loads_exact(data)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, huge ints, deep nesting
        raise JsonRpcError(PARSE_ERROR, "Parse error: the body is not valid JSON") from None
    if isinstance(decoded, list):
        if not decoded:
            raise JsonRpcError(INVALID_REQUEST, "Invalid Request: empty batch")
        return Body(tuple(_message(m) for m in decoded), batch=True)
    return Body((_message(decoded),), batch=False)


def decode_header_value(value: str) -> str | None:
    """Undo MCP's ``=?base64?…?=`` header encoding; None for a malformed sentinel."""
    m = _B64_SENTINEL.fullmatch(value)
    if m is None:
        return value
    payload = m.group("payload")
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:
            return None
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def routing_headers(headers: MultiMapping[str]) -> list[tuple[str, str]]:
    """Every ``Mcp-Method`` / ``Mcp-Name`` copy of a request: all :func:`check_headers` reads (two lookups
    in C rather than a walk over every header)."""
    return [(n, v) for n in ("mcp-method", "mcp-name") for v in headers.getall(n, ())]


def check_headers(body: Body, headers: Iterable[tuple[str, str]]) -> None:
    """Refuse a body its ``Mcp-Method`` / ``Mcp-Name`` headers disagree with (every batch element).

    Absent headers are no disagreement (clients before 2026-07-28 send none); a header
    sent twice is, since first-copy and last-copy readers would route differently.
    """
    seen: dict[str, list[str]] = {}
    for name, value in headers:
        lname = name.lower()
        if lname in ("mcp-method", "mcp-name"):
            seen.setdefault(lname, []).append(value)
    rid = body.single_id
    for lname, values in seen.items():
        if len(values) > 1:
            raise JsonRpcError(HEADER_MISMATCH, f"Header mismatch: {lname} appears more than once", rid)
    method_h = seen.get("mcp-method", [None])[0]
    name_h = seen.get("mcp-name", [None])[0]
    for msg in body.messages:
        if method_h is not None and msg.method != method_h:
            raise JsonRpcError(HEADER_MISMATCH, "Header mismatch: Mcp-Method does not match the body's method", rid)
        if name_h is not None:
            key = NAME_BEARING_METHODS.get(msg.method or "")
            if key is None or decode_header_value(name_h) != msg.params.get(key):
                raise JsonRpcError(HEADER_MISMATCH, "Header mismatch: Mcp-Name does not match the body", rid)
