"""Authorization (may you?): upstream, method, path, and the Plex path presets.

Pure: no aiohttp, no I/O. Globs follow ``fnmatch`` (``*`` also crosses ``/``), compiled
once and cached, so a check is a few regex matches. Paths are checked after collapsing
``//`` and are refused outright with ``.``/``..`` segments, so the path we judge is the
path the upstream serves.

Plex changes state on GET (``…/refresh``, ``/:/scrobble``), so "read-only" is a set of
paths, not a method: the presets (``sidecar.auth.presets``) are tables of paths × methods.
Token-minting endpoints hand out the owner's all-powerful token and need the ``admin``
permission whatever the paths say.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Mapping
from functools import lru_cache

from .models import Permissions
from .presets import PLEX_PRESETS, preset_allows

__all__ = [
    "MCP_KINDS", "PLEX_PRESETS", "TOKEN_MINTING", "allowed", "is_token_minting", "literal_glob", "mcp_allowed",
    "mcp_globs", "normalize_path", "tool_allowed",
]  # fmt: skip

# The presets' tables (path x methods) live in sidecar.auth.presets, printed in docs/keys.md.
# Plex endpoints that hand out tokens with the server owner's access. Matched anywhere in
# the path, case-insensitively, so a prefix or odd capitalisation cannot slip past.
TOKEN_MINTING = ("/security/token", "/security/resources", "/myplex")
_TOKEN_MINTING_RE = re.compile(r"(?:^|/)(?:security/(?:token|resources)|myplex)(?![a-z0-9_])", re.IGNORECASE)
_ENCODED_DOTS = frozenset({".", "..", "%2e", "%2e%2e", ".%2e", "%2e."})
# After the one decoding the path has had: an escape left (decoded twice by a lenient upstream).
_ESCAPE = re.compile("%[0-9a-fA-F]{2}")
# A segment a lenient upstream may read as `.` / `..`: `;params` cut off (`..;x`), a C string ended
# at NUL (`..\0`), trailing dots and spaces dropped as Windows does (`.. `, `...`).
_DOTTY = re.compile(r"[. ]*\.[. ]*(?:[;\x00].*)?", re.DOTALL)


def _splits(folded: str, p: str) -> bool:
    """Has ``folded`` (``p`` normalised) a `/`, `\\` or dot segment that ``p`` has not?"""
    return folded.count("/") != p.count("/") or "\\" in folded or any(_DOTTY.fullmatch(s) for s in folded.split("/"))


def _ambiguous(p: str) -> bool:
    """Is ``p`` (decoded once) read as another path by an upstream that is lenient in some common way?

    Refused, rather than guessed at: an escape left after the one decoding (`%252F`, `%252e`; a
    second decoding would make it `/`, `.`), overlong or broken UTF-8 (`%c0%ae`), a NUL, and
    Unicode compatibility forms that normalise (NFKC) into `/`, `\\` or dots (`．．`, `／`, `‥`).
    """
    if "\x00" in p:
        return True
    if "%" in p and _ESCAPE.search(p):
        return True
    if not p.isascii():
        folded = unicodedata.normalize("NFKC", p)
        if folded != p and (_splits(folded, p) or is_token_minting(folded)):
            return True
    return False


def normalize_path(path: str) -> str | None:
    """The path as authorization sees it: runs of ``/`` (and ``\\``) collapsed; None if it
    has ``.``/``..`` segments (plain or still percent-encoded, or made so by ``;params``, a NUL,
    trailing dots or spaces) or is otherwise ambiguous (``_ambiguous``), which would make what we
    check and what the upstream serves two different paths."""
    p = path.replace("\\", "/")
    if "//" in p:
        p = re.sub("/{2,}", "/", p)
    if "." in p or "%" in p:
        for seg in p.split("/"):
            if seg.lower() in _ENCODED_DOTS or ("." in seg and _DOTTY.fullmatch(seg)):
                return None
    if ("%" in p or "\x00" in p or not p.isascii()) and _ambiguous(p):
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
    preset = preset_allows(entry, method, path)
    return _match((entry,), path) if preset is None else preset


def allowed(perms: Permissions, upstream_id: str, kind: str, method: str, path: str) -> str | None:
    """None when allowed, else the reason (safe to show the client)."""
    if "*" not in perms.upstreams and upstream_id not in perms.upstreams:
        return f"this key may not use upstream {upstream_id!r}"
    if perms.methods and method not in perms.methods and not (method == "HEAD" and "GET" in perms.methods):
        return f"this key may not use method {method}"
    norm = normalize_path(path)
    if norm is None:
        return "paths with '.' or '..' segments or an ambiguous spelling (escapes left, NUL, ...) are refused"
    # The admin permission, and nothing in `paths` (not even plex:admin), opens these.
    if kind == "plex" and not perms.admin and is_token_minting(norm):
        return "token-minting endpoints need the admin permission"
    if perms.paths and not any(_path_allowed(p, method, norm) for p in perms.paths):
        return f"this key may not use path {path}"
    return None


MCP_KINDS = ("tools", "resources", "prompts")


def _mcp_entry(table: Mapping[str, tuple[str, ...]], upstream_id: str) -> tuple[str, ...] | None:
    globs = table.get(upstream_id)
    return table.get("*") if globs is None else globs


def mcp_globs(perms: Permissions, upstream_id: str, kind: str) -> tuple[str, ...] | None:
    """The globs a key's ``tools`` / ``resources`` / ``prompts`` allow on an upstream; None = everything.

    A key that names none of the three for this upstream (nor ``"*"``) is not limited
    there. A key that names any of them is limited in all three: what it does not name
    is denied (naming only ``tools`` must not open every resource and prompt).
    """
    own = _mcp_entry(getattr(perms, kind), upstream_id)
    if own is not None:
        return tuple(own)
    if any(_mcp_entry(getattr(perms, k), upstream_id) is not None for k in MCP_KINDS):
        return ()
    return None


def mcp_allowed(perms: Permissions, upstream_id: str, kind: str, name: str) -> bool:
    """May the key use this tool name / resource URI / prompt name (``kind`` one of MCP_KINDS)?"""
    globs = mcp_globs(perms, upstream_id, kind)
    return globs is None or _match(globs, name)


def tool_allowed(perms: Permissions, upstream_id: str, tool: str) -> bool:
    """MCP tools: see :func:`mcp_globs` (no MCP entry at all for this upstream means every tool)."""
    return mcp_allowed(perms, upstream_id, "tools", tool)


def literal_glob(name: str) -> str:
    """``name`` as a glob that matches only itself (fnmatch has no escape character: ``*``, ``?`` and ``[``
    go in brackets). A tool an upstream names ``*``, picked from its list, allows that tool, not all."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
