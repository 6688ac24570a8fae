"""A credential in the URL *path* is refused (DESIGN invariant 3).

The key is removed from the query and the headers on the way up (``strip_credential``), but
a path cannot lose a piece without naming another resource, so a request whose path holds
the credential it presents is a 400 before anything is forwarded, cached or counted. The
path is read as sent, once percent-decoded and twice (``%2570…``: a server or framework
behind may decode again); keys are case-sensitive, so the test is too. The error names
neither the path nor the key, and the access log gets a placeholder for the path — also when
the key then fails to verify (401) and when no upstream serves the path (404, whose message
then leaves the path out). The Basic form's base64 of ``user:key`` counts as the key.
"""

from __future__ import annotations

from urllib.parse import unquote

from multidict import MultiMapping

__all__ = ["KEY_IN_PATH", "key_in_path", "logged_path", "presented_spellings"]

KEY_IN_PATH = "the API key must not appear in the URL path: send it in a header"


def key_in_path(key: str, raw_path: str, also: tuple[str, ...] = ()) -> bool:
    """``key`` (or one of ``also``: other spellings the client presented) is in ``raw_path`` (no
    query), raw or percent-decoded once or twice.

    Substring tests only; a path without ``%`` (the common case) costs one ``in`` per spelling.
    """
    if not key:
        return False
    secrets = (key, *also) if also else (key,)
    if any(s in raw_path for s in secrets):
        return True
    if "%" not in raw_path:
        return False
    once = unquote(raw_path)
    twice = unquote(once) if "%" in once else once
    return any(s in once or s in twice for s in secrets)


def presented_spellings(forms: tuple[str, ...], headers: MultiMapping[str]) -> tuple[str, ...]:
    """The credential as the client wrote it, where that is not the key itself: the Basic header's
    base64 of ``user:key`` (unpadded too), which anyone upstream decodes back to the key."""
    if "basic" not in forms:
        return ()
    out: list[str] = []
    for value in headers.getall("Authorization", ()):
        scheme, _, rest = value.strip().partition(" ")
        blob = rest.strip().rstrip("=")
        if scheme.lower() == "basic" and len(blob) >= 8:
            out.append(blob)
    return tuple(out)


def logged_path(path_prefix: str) -> str:
    """What the access log says for such a request: its route, the rest withheld."""
    return path_prefix.rstrip("/") + "/REDACTED"
