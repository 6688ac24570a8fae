"""Authorization (may you?): upstream, method, path, and the Plex path presets.

Pure: no aiohttp, no I/O. Globs follow ``fnmatch`` (``*`` also crosses ``/``), compiled
once and cached, so a check is a few regex matches.

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

__all__ = ["PLEX_PRESETS", "TOKEN_MINTING", "allowed", "tool_allowed"]

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_PLEX_READ = (
    "/", "/identity", "/library*", "/hubs*", "/search*", "/photo/:/transcode*", "/playlists*",
    "/media/providers*", "/servers*", "/:/websockets/notifications*", "/:/eventsource/notifications*",
    "/status/sessions",
)  # fmt: skip
# GET paths that nonetheless change state on the server.
_PLEX_READ_EXCLUDED = ("*/refresh*", "*/analyze*", "*/emptyTrash*", "*/optimize*", "*/clean/*", "*/matches*")
_PLEX_PLAYBACK = (
    "/video/:/transcode*", "/audio/:/transcode*", "/music/:/transcode*", "/photo/:/transcode*",
    "/:/timeline*", "/:/scrobble*", "/:/unscrobble*", "/:/progress*", "/:/rate*", "/library/parts/*",
    "/playQueues*", "/player/*", "/transcode/*", "/status/sessions*",
)  # fmt: skip

PLEX_PRESETS = ("plex:read", "plex:playback", "plex:admin")
TOKEN_MINTING = ("/security/token*", "/security/resources*", "/myplex/*", "/myplex")


@lru_cache(maxsize=4096)
def _compile(globs: tuple[str, ...]) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


def _match(globs: tuple[str, ...], value: str) -> bool:
    pat = _compile(globs)
    return bool(pat and pat.match(value))


def _path_allowed(entry: str, method: str, path: str) -> bool:
    if entry == "plex:admin":
        return True
    if entry == "plex:read":
        return method in _READ_METHODS and _match(_PLEX_READ, path) and not _match(_PLEX_READ_EXCLUDED, path)
    if entry == "plex:playback":
        return _path_allowed("plex:read", method, path) or _match(_PLEX_PLAYBACK, path)
    return _match((entry,), path)


def allowed(perms: Permissions, upstream_id: str, kind: str, method: str, path: str) -> str | None:
    """None when allowed, else the reason (safe to show the client)."""
    if "*" not in perms.upstreams and upstream_id not in perms.upstreams:
        return f"this key may not use upstream {upstream_id!r}"
    if perms.methods and method not in perms.methods and not (method == "HEAD" and "GET" in perms.methods):
        return f"this key may not use method {method}"
    if kind == "plex" and not perms.admin and "plex:admin" not in perms.paths and _match(TOKEN_MINTING, path):
        return "token-minting endpoints need the admin permission"
    if perms.paths and not any(_path_allowed(p, method, path) for p in perms.paths):
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
