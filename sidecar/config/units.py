"""The value parsers of the config file: durations, sizes, limits, networks, key prefixes.

Each raises ``ValueError`` with a message the reader prefixes with the YAML path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..core.redaction import hide_userinfo, hide_values

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|TiB|K|M|G)?\s*$", re.IGNORECASE)
_LIMIT_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+\s*)?(second|minute|hour|day|week|month)s?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "k": 1024, "m": 1024**2, "g": 1024**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
PERIOD_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 604800,
    "month": 2592000,  # 30 days for rate-limit periods; a /month quota follows the calendar (sidecar/limits/quota.py)
}


class ConfigError(Exception):
    """Every problem found in a config file, one per line, each with its YAML path."""

    def __init__(self, problems: list[str], hide: Iterable[str] = ()) -> None:
        # A problem may quote the value it refuses: never a URL's password, nor ``hide`` (what ${VAR}s brought in).
        hide = tuple(hide)
        problems = [hide_values(hide_userinfo(p), hide) for p in problems]
        self.problems = problems
        super().__init__("\n".join(problems))


def parse_duration(value: object) -> float:
    """``"30s"``, ``"5m"``, ``"90d"``, ``"250ms"`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 1h, 90d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration such as 30s, 5m, 1h, 90d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_positive_duration(value: object) -> float:
    """A duration that must be more than zero (timeouts, poll intervals)."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than 0")
    return seconds


def parse_public_url(value: object) -> str:
    """An origin such as ``https://sidecar.example``; returned without a trailing slash."""
    parts = urlsplit(str(value))
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None:
        raise ValueError(f"{value!r} is not an origin such as https://sidecar.example")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{value!r}: give the origin only (scheme, host and port), no path or query")
    return f"{parts.scheme}://{parts.netloc}"


def parse_header_size(value: object) -> int:
    """A request-head size cap: at least 1KiB (a smaller one refuses ordinary clients)."""
    size = parse_size(value)
    if size < 1024:
        raise ValueError("must be at least 1KiB")
    return size


def parse_busy_timeout(value: object) -> float:
    """``store.busy_timeout``: 10 ms to 5 minutes."""
    seconds = parse_duration(value)
    if not 0.01 <= seconds <= 300:
        raise ValueError("expected a duration from 10ms to 5m")
    return seconds


def parse_flush_interval(value: object) -> float:
    """``rate_limits.quota_flush_interval``, ``store.usage_flush_interval``: 100 ms to 5 minutes."""
    seconds = parse_duration(value)
    if not 0.1 <= seconds <= 300:
        raise ValueError("expected a duration from 100ms to 5m")
    return seconds


def parse_network(value: object) -> str:
    """A CIDR such as ``10.0.0.0/8`` or a single address; returned as written."""
    try:
        ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network such as 10.0.0.0/8 or 192.168.1.10") from None
    return str(value)


def parse_size(value: object) -> int:
    """``"64MiB"``, ``"1GB"``, ``"512KiB"`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size such as 512KiB, 64MiB, 1GiB")
    size = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    if size >= 2**63:  # "9999…9" would be inf, which int() refuses with OverflowError
        raise ValueError(f"{value!r} is too large")
    return int(size)


@dataclass(frozen=True, slots=True)
class Limit:
    """``count`` requests per ``period`` seconds; ``name`` is the policy name in headers."""

    count: int
    period: int
    name: str
    text: str


def parse_limit(value: object) -> Limit:
    """``"10/second"``, ``"600/minute"``, ``"10000/month"``, ``"5/10minutes"``."""
    m = _LIMIT_RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a limit such as 10/second, 600/minute, 10000/day")
    count = int(m.group(1))
    mult = int(m.group(2)) if m.group(2) else 1
    unit = m.group(3)
    if count <= 0 or mult <= 0:
        raise ValueError(f"{value!r}: the count and the period must be positive")
    name = unit if mult == 1 else f"{mult}{unit}"
    return Limit(count=count, period=PERIOD_SECONDS[unit] * mult, name=name, text=str(value).strip())


_PREFIX = re.compile(r"^[a-z][a-z0-9_]{0,15}$")


def check_prefix(prefix: str) -> str | None:
    """None when ``prefix`` is usable as a key prefix, else why not (``keys.prefix``)."""
    if not _PREFIX.match(prefix):
        return f"{prefix!r} must be 1-16 lowercase letters, digits or '_', starting with a letter"
    if "http" in prefix:
        # python-plexapi rewrites every "http" in a notification URL, token included.
        return f"{prefix!r} must not contain 'http' (python-plexapi would rewrite it to 'ws')"
    return None
