"""The Plex path presets as explicit tables: which paths, with which methods.

Plex changes state on GET (``…/refresh``, ``/:/scrobble``), so "read-only" is a set of
paths, not a method. Each preset is a list of rows (path glob × methods); a request is
allowed when one row matches both. ``docs/keys.md`` prints the same rows and
``tests/security/test_sec_presets.py`` checks every row, allowed and refused, and that
the page and this module agree.

Globs follow ``fnmatch`` (``*`` also crosses ``/``); the path is the canonical one
``sidecar.auth.permissions.allowed`` hands in. HEAD is listed wherever GET is (a HEAD is a GET
without the body). Pure: no I/O; patterns compiled once, at import.
"""

from __future__ import annotations

import fnmatch
import re

__all__ = ["PLEX_PRESETS", "PLEX_READ_EXCLUDED", "PRESET_ROWS", "preset_allows"]

GET = ("GET", "HEAD")

# plex:read: browse, search, artwork, who is playing now. GET/HEAD only.
_READ: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/", GET),
    ("/identity", GET),
    ("/library*", GET),
    ("/hubs*", GET),
    ("/search*", GET),
    ("/playlists*", GET),
    ("/photo/:/transcode*", GET),
    ("/media/providers*", GET),
    ("/servers*", GET),
    ("/:/websockets/notifications*", GET),
    ("/:/eventsource/notifications*", GET),
    ("/status/sessions", GET),  # exactly: not …/history/all (every user's history), not …/terminate
)
# Paths under the read rows that change state on GET, or hand out the media itself
# (downloading a file is playback, not browsing). Matched case-insensitively.
PLEX_READ_EXCLUDED = (
    "*/refresh*", "*/analyze*", "*/emptytrash*", "*/optimize*", "*/clean/*", "*/match*", "*/unmatch*",
    "*/scrobble*", "*/unscrobble*", "*/timeline*", "*/progress*", "/library/parts*", "/library/streams*",
)  # fmt: skip
# plex:playback adds: the media, transcoding (sessions owned per key), playback state, play queues.
_PLAYBACK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/library/parts/*", (*GET, "PUT")),  # the files; PUT selects the audio/subtitle stream
    ("/library/streams/*", GET),
    ("/video/:/transcode/*", GET),
    ("/audio/:/transcode/*", GET),
    ("/music/:/transcode/*", GET),
    ("/:/timeline*", GET),
    ("/:/scrobble*", GET),
    ("/:/unscrobble*", GET),
    ("/:/progress*", GET),
    ("/:/rate*", (*GET, "PUT")),
    ("/playQueues*", (*GET, "POST", "PUT", "DELETE")),
    ("/player/*", (*GET, "POST")),
)

PLEX_PRESETS = ("plex:read", "plex:playback", "plex:admin")
# The tables as documented: preset -> its own rows (plex:playback also has every plex:read row).
PRESET_ROWS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "plex:read": _READ,
    "plex:playback": _PLAYBACK,
    "plex:admin": (("*", ("*",)),),  # every path and method; token minting still needs `admin`
}


def _by_method(rows: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, re.Pattern[str]]:
    globs: dict[str, list[str]] = {}
    for glob, methods in rows:
        for m in methods:
            globs.setdefault(m, []).append(glob)
    return {m: re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in gs)) for m, gs in globs.items()}


_READ_RE = _by_method(_READ)
_PLAYBACK_RE = _by_method(_PLAYBACK)
_EXCLUDED_RE = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in PLEX_READ_EXCLUDED), re.IGNORECASE)


def _read(method: str, path: str) -> bool:
    pat = _READ_RE.get(method)
    return bool(pat and pat.match(path)) and not _EXCLUDED_RE.match(path)


def preset_allows(entry: str, method: str, path: str) -> bool | None:
    """Whether preset ``entry`` allows ``method`` on ``path``; None if ``entry`` is no preset (a glob)."""
    if entry == "plex:admin":
        return True
    if entry == "plex:read":
        return _read(method, path)
    if entry == "plex:playback":
        if _read(method, path):
            return True
        pat = _PLAYBACK_RE.get(method)
        return bool(pat and pat.match(path))
    return None
