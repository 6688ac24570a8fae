"""Host names: ``admin.allowed_hosts`` entries and the ``Host`` headers they are matched against.

Both sides are reduced to one form once, ``(name, port)``: the name in lower case without a trailing
dot (an IP address in its canonical text, an IPv6 one without brackets), the port as written or ``""``
when absent, so the admin listener's guard (``admin/hostguard.py``) compares with a set lookup.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["host_and_port", "parse_allowed_host"]

_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_NAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_EXAMPLE = "a host name such as admin.example.com, or host:port such as admin.example.com:8443"


def host_and_port(value: str) -> tuple[str, str]:
    """``[::1]:9188`` → ``("::1", "9188")``; ``Admin.Example.``  → ``("admin.example", "")``.
    A value that does not split cleanly comes back whole as the name (it then matches nothing)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :] if end > 0 else ""
        if end > 0 and (not rest or (rest[0] == ":" and rest[1:].isdigit())):
            return _canonical(value[1:end]), _port(rest[1:])
        return value, ""
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return _canonical(name.rstrip(".")), _port(port)
    return _canonical(value.rstrip(".")), ""


def _port(port: str) -> str:
    return str(int(port)) if port else ""  # 09188 is 9188


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def parse_allowed_host(value: object) -> str:
    """An ``admin.allowed_hosts`` entry: a host name or IP address, optionally with ``:port``; normalized."""
    text = str(value).strip()
    if text == "*" or "*" in text:
        raise ValueError(f"{text!r}: no wildcards; list each name the admin listener is reached at ({_EXAMPLE})")
    if "/" in text or "@" in text or not text:
        raise ValueError(f"{text!r} is not {_EXAMPLE} (no scheme, path or user)")
    name, port = host_and_port(text)
    if port and not 0 < int(port) <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range")
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        if not _NAME_RE.match(name) or len(name) > 253:
            raise ValueError(f"{text!r} is not {_EXAMPLE}") from None
        return f"{name}:{port}" if port else name
    if ip.version == 6 and not text.startswith("["):
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, as in a Host header: [{ip}]")
    shown = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{shown}:{port}" if port else shown
