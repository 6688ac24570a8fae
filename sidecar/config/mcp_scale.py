"""Config for MCP at scale: the keys that seal session ids, and per-tool rate limits.

``mcp_sessions`` (top level)::

    mcp_sessions:
      seal_key_env: SIDECAR_SEAL_KEY            # 32 random bytes, base64 (or hex)
      previous_key_envs: [SIDECAR_SEAL_KEY_OLD] # still open sessions sealed before a rotation
      ttl: 24h                                  # a sealed id is refused after this long

The keys are read from the environment when the file is loaded (never from the file),
and never appear in an error: a problem names the variable, not its value. Without
``seal_key_env`` each process draws a random key at start (``sidecar.upstreams.mcp.sealing``).

``upstreams[].mcp.tool_limits``: tool name or glob -> limits, first match in file order::

    mcp:
      tool_limits:
        search: [60/minute]
        "delete_*": [1/hour]
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .models import PositiveDuration, Section, validate_section
from .units import Limit, parse_limit

__all__ = [
    "DEFAULT_SESSION_TTL",
    "McpSessions",
    "McpSessionsSection",
    "ToolLimits",
    "mcp_sessions_from",
    "parse_mcp_sessions",
    "parse_seal_key",
    "parse_tool_limits",
]

DEFAULT_SESSION_TTL = 24 * 3600.0
_KEY_SIZES = (16, 24, 32)  # AES-128/192/256
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class McpSessionsSection(Section):
    """``mcp_sessions``: where the sealing keys come from, and how long a sealed id lives."""

    seal_key_env: str | None = None
    previous_key_envs: tuple[str, ...] = ()
    ttl: PositiveDuration = DEFAULT_SESSION_TTL


@dataclass(frozen=True, slots=True)
class McpSessions:
    """What the gateway needs: the keys (current first), their env text (for leak checks), the lifetime."""

    keys: tuple[bytes, ...] = field(default=(), repr=False)
    texts: tuple[str, ...] = field(default=(), repr=False)
    ttl: float = DEFAULT_SESSION_TTL

    @property
    def configured(self) -> bool:
        return bool(self.keys)


def parse_seal_key(text: str) -> bytes:
    """16, 24 or 32 bytes, written as base64 (standard or URL-safe, padding optional) or hex."""
    s = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]+", s) and len(s) // 2 in _KEY_SIZES and len(s) % 2 == 0:
        return bytes.fromhex(s)
    try:
        raw = base64.b64decode(s.replace("-", "+").replace("_", "/") + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) not in _KEY_SIZES:
        raise ValueError("expected 32 random bytes (16 and 24 also work) as base64 or hex")
    return raw


def parse_mcp_sessions(raw: object, env: Mapping[str, str], problems: list[str]) -> McpSessions:
    """The ``mcp_sessions`` section with its keys read from the environment; problems name the path."""
    section = validate_section(McpSessionsSection, raw, "mcp_sessions", problems)
    if section is None:
        return McpSessions()
    return mcp_sessions_from(section, env, problems)


def mcp_sessions_from(section: McpSessionsSection, env: Mapping[str, str], problems: list[str]) -> McpSessions:
    """A valid ``mcp_sessions`` section's keys, read from the environment; problems name the path."""
    if section.seal_key_env is None:
        if section.previous_key_envs:
            problems.append("mcp_sessions.previous_key_envs: needs seal_key_env (the current key) too")
        return McpSessions(ttl=section.ttl)
    keys: list[bytes] = []
    texts: list[str] = []
    names = [("mcp_sessions.seal_key_env", section.seal_key_env)]
    names += [(f"mcp_sessions.previous_key_envs[{i}]", n) for i, n in enumerate(section.previous_key_envs)]
    for path, name in names:
        if not _ENV_NAME.match(name):
            problems.append(f"{path}: {name!r} is not an environment variable name")
            continue
        if name not in env:
            problems.append(f"{path}: environment variable {name} is not set")
            continue
        try:
            key = parse_seal_key(env[name])
        except ValueError as e:
            problems.append(f"{path}: environment variable {name}: {e}")
            continue
        if key in keys:
            problems.append(f"{path}: environment variable {name} holds a key already listed")
            continue
        keys.append(key)
        texts.append(env[name].strip())
    return McpSessions(tuple(keys), tuple(texts), section.ttl)


@dataclass(frozen=True, slots=True)
class ToolLimits:
    """``upstreams[].mcp.tool_limits``: (glob, limits) in file order; the first glob that matches decides."""

    rules: tuple[tuple[str, tuple[Limit, ...]], ...] = ()
    _pattern: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def for_tool(self, tool: str) -> tuple[str, tuple[Limit, ...]] | None:
        """The rule that applies to this tool (its glob and limits), or None."""
        for (glob, limits), pat in zip(self.rules, self._pattern, strict=True):
            if pat.match(tool):
                return glob, limits
        return None


def parse_tool_limits(raw: object, path: str, problems: list[str]) -> ToolLimits:
    """A mapping of tool name or glob to one limit or a list of them; problems name the path."""
    if raw is None:
        return ToolLimits()
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping of tool name or glob to limits, got {type(raw).__name__}")
        return ToolLimits()
    rules: list[tuple[str, tuple[Limit, ...]]] = []
    for glob, value in raw.items():
        p = f"{path}.{glob}"
        if not isinstance(glob, str) or not glob:
            problems.append(f"{p}: a tool name or glob must be a non-empty string")
            continue
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) for v in items):
            problems.append(f"{p}: expected a limit such as 60/minute, or a list of them")
            continue
        limits: list[Limit] = []
        for i, v in enumerate(items):
            try:
                limits.append(parse_limit(v))
            except ValueError as e:
                problems.append(f"{p}[{i}]: {e}" if isinstance(value, list) else f"{p}: {e}")
        if limits:
            rules.append((glob, tuple(limits)))
    pats = tuple(re.compile(fnmatch.translate(g)) for g, _ in rules)  # case-sensitive, like tool permissions
    return ToolLimits(tuple(rules), pats)
