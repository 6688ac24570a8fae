"""A credential in the URL *path* is refused (DESIGN invariant 3).

The key is removed from the query and the headers on the way up (``strip_credential``), but
a path cannot lose a piece without naming another resource, so a request whose path holds
the credential it presents is a 400 before anything is forwarded, cached or counted. The
path is read as sent, once percent-decoded and twice (``%2570…``: a server or framework
behind may decode again); keys are case-sensitive, so the test is too. The error names
neither the path nor the key, and the access log gets a placeholder for the path.
"""

from __future__ import annotations

from urllib.parse import unquote

__all__ = ["KEY_IN_PATH", "key_in_path", "logged_path"]

KEY_IN_PATH = "the API key must not appear in the URL path: send it in a header"


def key_in_path(key: str, raw_path: str) -> bool:
    """``key`` is in ``raw_path`` (no query), raw or percent-decoded once or twice.

    Substring tests only; a path without ``%`` (the common case) costs one ``in``.
    """
    if not key:
        return False
    if key in raw_path:
        return True
    if "%" not in raw_path:
        return False
    once = unquote(raw_path)
    return key in once or ("%" in once and key in unquote(once))


def logged_path(path_prefix: str) -> str:
    """What the access log says for such a request: its route, the rest withheld."""
    return path_prefix.rstrip("/") + "/REDACTED"
