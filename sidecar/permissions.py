"""Authorization (may you?): upstream, method, path, and the Plex path presets.

Pure: no aiohttp, no I/O. Globs follow ``fnmatch`` (``*`` also crosses ``/``), compiled
once and cached, so a check is a few regex matches. Paths are checked after collapsing
``//`` and are refused outright with ``.``/``..`` segments, so the path we judge is the
path the upstream serves.

Plex changes state on GET (``…/refresh``, ``/:/scrobble``), so "read-only" is a set of
paths, not a method: the presets below are those sets. Token-minting endpoints hand
out the owner's all-powerful token and need the ``admin`` permission whatever the
paths say.
"""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache

from .models import Permissions

__all__ = ["PLEX_PRESETS", "TOKEN_MINTING", "allowed", "is_token_minting", "normalize_path", "tool_allowed"]

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_PLEX_READ = (
    "/", "/identity", "/library*", "/hubs*", "/search*", "/photo/:/transcode*", "/playlists*",
    "/media/providers*", "/servers*", "/:/websockets/notifications*", "/:/eventsource/notifications*",
    "/status/sessions",
)  # fmt: skip
# Paths under the read set that change state on GET, or hand out the media itself
# (downloading a file is playback, not browsing). Matched case-insensitively.
_PLEX_READ_EXCLUDED = (
    "*/refresh*", "*/analyze*", "*/emptytrash*", "*/optimize*", "*/clean/*", "*/match*", "*/unmatch*",
    "*/scrobble*", "*/unscrobble*", "*/timeline*", "*/progress*", "/library/parts*", "/library/streams*",
)  # fmt: skip
_PLEX_PLAYBACK = (
    "/video/:/transcode*", "/audio/:/transcode*", "/music/:/transcode*", "/photo/:/transcode*",
    "/:/timeline*", "/:/scrobble*", "/:/unscrobble*", "/:/progress*", "/:/rate*", "/library/parts/*",
    "/library/streams/*", "/playQueues*", "/player/*", "/transcode/*", "/status/sessions*",
)  # fmt: skip

PLEX_PRESETS = ("plex:read", "plex:playback", "plex:admin")
# Plex endpoints that hand out tokens with the server owner's access. Matched anywhere in
# the path, case-insensitively, so a prefix or odd capitalisation cannot slip past.
TOKEN_MINTING = ("/security/token", "/security/resources", "/myplex")
_TOKEN_MINTING_RE = re.compile(r"(?:^|/)(?:security/(?:token|resources)|myplex)(?![a-z0-9_])", re.IGNORECASE)
_ENCODED_DOTS = frozenset({".", "..", "%2e", "%2e%2e", ".%2e", "%2e."})


def normalize_path(path: str) -> str | None:
    """The path as authorization sees it: runs of ``/`` (and ``\\``) collapsed; None if it
    has ``.``/``..`` segments (plain or still percent-encoded), which would make what we
    check and what the upstream serves two different paths."""
    p = path.replace("\\", "/")
    if "//" in p:
        p = re.sub("/{2,}", "/", p)
    if "." in p or "%" in p:
        for seg in p.split("/"):
            if seg.lower() in _ENCODED_DOTS:
                return None
    return p


@lru_cache(maxsize=4096)
def _compile(globs: tuple[str, ...], ignore_case: bool = False) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs), re.IGNORECASE if ignore_case else 0)


def _match(globs: tuple[str, ...], value: str, ignore_case: bool = False) -> bool:
    pat = _compile(globs, ignore_case)
    return bool(pat and pat.match(value))


def is_token_minting(path: str) -> bool:
    return bool(_TOKEN_MINTING_RE.search(path))


def _path_allowed(entry: str, method: str, path: str) -> bool:
    if entry == "plex:admin":
        return True
    if entry == "plex:read":
        return (
            method in _READ_METHODS
            and _match(_PLEX_READ, path)
            and not _match(_PLEX_READ_EXCLUDED, path, ignore_case=True)
        )
    if entry == "plex:playback":
        return _path_allowed("plex:read", method, path) or _match(_PLEX_PLAYBACK, path)
    return _match((entry,), path)


def allowed(perms: Permissions, upstream_id: str, kind: str, method: str, path: str) -> str | None:
    """None when allowed, else the reason (safe to show the client)."""
    if "*" not in perms.upstreams and upstream_id not in perms.upstreams:
        return f"this key may not use upstream {upstream_id!r}"
    if perms.methods and method not in perms.methods and not (method == "HEAD" and "GET" in perms.methods):
        return f"this key may not use method {method}"
    norm = normalize_path(path)
    if norm is None:
        return "paths with '.' or '..' segments are refused"
    # The admin permission, and nothing in `paths` (not even plex:admin), opens these.
    if kind == "plex" and not perms.admin and is_token_minting(norm):
        return "token-minting endpoints need the admin permission"
    if perms.paths and not any(_path_allowed(p, method, norm) for p in perms.paths):
        return f"this key may not use path {path}"
    return None


def tool_allowed(perms: Permissions, upstream_id: str, tool: str) -> bool:
    """MCP tools: no ``tools`` entry for this upstream means every tool."""
    globs = perms.tools.get(upstream_id)
    if globs is None:
        globs = perms.tools.get("*")
    if globs is None:
        return True
    return _match(tuple(globs), tool)
