"""``_Reader``: walks the YAML mapping and collects every problem with its path instead of raising."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .units import Limit, parse_limit

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOKEN_ENV_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")  # a name, or a prefix and one trailing *


class _Reader:
    """Walks a YAML mapping, collecting problems with their paths instead of raising."""

    def __init__(self, env: Mapping[str, str], base: Path) -> None:
        self.env = env
        self.base = base
        self.problems: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}" if path else msg)

    def mapping(self, value: object, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        return value

    def check_keys(self, data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for k in data:
            if k not in allowed:
                hint = ", ".join(sorted(allowed))
                self.err(_join(path, str(k)) or repr(k), f"unknown option (expected one of: {hint})")

    def expand(self, value: str, path: str) -> str:
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in self.env:
                self.err(path, f"environment variable {name} is not set")
                return ""
            return self.env[name]

        return _ENV_RE.sub(sub, value)

    def string(self, data: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str | None:
        if key not in data or data[key] is None:
            return default
        v = data[key]
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            self.err(_join(path, key), f"expected a string, got {type(v).__name__}")
            return default
        return self.expand(str(v), _join(path, key))

    def boolean(self, data: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        if key not in data or data[key] is None:
            return default
        v = data[key]
        if not isinstance(v, bool):
            self.err(_join(path, key), f"expected true or false, got {v!r}")
            return default
        return v

    def integer(
        self, data: Mapping[str, Any], key: str, path: str, default: int | None, minimum: int = 0
    ) -> int | None:
        if key not in data or data[key] is None:
            return default
        v = data[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            self.err(_join(path, key), f"expected a whole number >= {minimum}, got {v!r}")
            return default
        return v

    def choice(self, data: Mapping[str, Any], key: str, path: str, default: str, options: tuple[str, ...]) -> str:
        v = self.string(data, key, path, default)
        if v not in options:
            self.err(_join(path, key), f"expected one of {', '.join(options)}, got {v!r}")
            return default
        return v

    def parsed(self, data: Mapping[str, Any], key: str, path: str, fn: Any, default: Any) -> Any:
        if key not in data or data[key] is None:
            return default
        try:
            return fn(data[key])
        except ValueError as e:
            self.err(_join(path, key), str(e))
            return default

    def str_list(self, data: Mapping[str, Any], key: str, path: str) -> list[str]:
        if key not in data or data[key] is None:
            return []
        v = data[key]
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            self.err(_join(path, key), "expected a list")
            return []
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, str | int) or isinstance(item, bool):
                self.err(f"{_join(path, key)}[{i}]", "expected a string")
                continue
            out.append(self.expand(str(item), f"{_join(path, key)}[{i}]"))
        return out

    def limits(self, data: Mapping[str, Any], key: str, path: str) -> tuple[Limit, ...] | None:
        if key not in data or data[key] is None:
            return None
        out = []
        for i, item in enumerate(self.str_list(data, key, path)):
            try:
                out.append(parse_limit(item))
            except ValueError as e:
                self.err(f"{_join(path, key)}[{i}]", str(e))
        return tuple(out)

    def secret_env(self, data: Mapping[str, Any], key: str, path: str) -> str | None:
        """Resolve ``<key>: VAR`` naming an environment variable holding a secret."""
        name = self.string(data, key, path)
        if name is None:
            return None
        if name not in self.env:
            self.err(_join(path, key), f"environment variable {name} is not set")
            return None
        return self.env[name]

    def path_value(self, data: Mapping[str, Any], key: str, path: str, default: Path | None) -> Path | None:
        s = self.string(data, key, path)
        if s is None:
            return default
        try:
            p = Path(s).expanduser()
        except RuntimeError:  # ~user that does not exist, or no home directory
            self.err(_join(path, key), f"cannot expand {s!r}: no such home directory")
            return default
        return p if p.is_absolute() else self.base / p


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
