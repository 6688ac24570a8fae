"""A credential in the URL *path* is refused (DESIGN invariant 3).

The key is removed from the query and the headers on the way up (``strip_credential``), but
a path cannot lose a piece without naming another resource, so a request whose path holds
the credential it presents is a 400 before anything is forwarded, cached or counted. The
path is read as sent, once percent-decoded and twice (``%2570…``: a server or framework
behind may decode again), and in any letter case: a key is case-sensitive, but an upstream
that saw it upper-cased can read it back exactly (keys are lower-case), and a random key's
letters in another case are no path's by chance. The error names
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

    Substring tests only, case-folded; a path without ``%`` (the common case) costs a
    ``lower`` and one ``in`` per spelling.
    """
    if not key:
        return False
    secrets = tuple(s.lower() for s in (key, *also)) if also else (key.lower(),)
    path = raw_path.lower()
    if any(s in path for s in secrets):
        return True
    if "%" not in path:
        return False
    decoded = unquote(raw_path)
    once = decoded.lower()
    twice = unquote(decoded).lower() if "%" in decoded else once
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
