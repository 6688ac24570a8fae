"""Text cleaning shared by the log redactor (observe/logfilter.py) and config errors (config/).

A URL's user information (``scheme://user:password@host``) is a credential wherever it is
written: a Redis or PostgreSQL URL, a JWKS URL, a value a config error quotes back. It is
replaced whole (a token is sometimes the user name: ``https://<token>@host``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

__all__ = ["REDACTED", "hide_userinfo", "hide_values", "url_origin", "url_secrets"]

REDACTED = "REDACTED"
MIN_SECRET = 6  # shorter values are not worth (nor safe) replacing everywhere

# scheme://, then anything up to the authority's last '@' (a password may hold a raw '@').
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#'\"<>]*@")


def hide_userinfo(text: str) -> str:
    """``text`` with every URL's ``user:password@`` replaced by ``REDACTED@``."""
    if "@" not in text or "://" not in text:  # the common case: nothing to look at
        return text
    return _USERINFO.sub(rf"\1{REDACTED}@", text)


def hide_values(text: str, values: Iterable[str]) -> str:
    """``text`` with each of ``values`` (longest first, at least ``MIN_SECRET`` long) replaced."""
    for value in sorted({v for v in values if len(v) >= MIN_SECRET}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def url_secrets(url: str | None) -> list[str]:
    """A URL's password and user name as written and decoded (for the log redactor's literal list)."""
    if not url or "@" not in url:
        return []
    userinfo = url.partition("://")[2].split("/", 1)[0].rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    return [v for raw in (password, user if not password else "") for v in (raw, unquote(raw)) if v]


def url_origin(url: str) -> str:
    """``scheme://host:port`` of a URL, for messages: its path may hold a secret (``/api/mcp/s/<secret>/mcp``)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.split('/', 1)[0].rpartition('@')[2]}" if sep else REDACTED
