"""Delegated key management: a key manages keys only within its own reach (invariant 10).

Three kinds of actor use the admin API:

- the **admin token** (and the CLI, which is the operator): everything;
- a key with ``admin: full``: everything, like the admin token;
- a key with ``admin: true`` (the same as ``admin: "delegate"``): only keys of **its own
  owner** that are **within its reach** — creating, editing, rotating and revoking them,
  reading them, their usage and their audit trail. Nothing else (quota resets, cache
  purges, other owners' keys).

"Within reach" means every dimension of the other key is a subset of the actor's own,
judged conservatively (when in doubt, no):

- ``upstreams``: ``"*"`` only under ``"*"``; ids among the actor's.
- ``methods``: empty (all) only under empty; each method among the actor's (``HEAD`` under ``GET``).
- ``paths``: empty (all) only under empty, ``"*"`` or ``plex:admin``. A glob is covered by an
  equal glob, by ``*``, by ``plex:admin``, by a glob that matches it as a literal path (no
  ``*?[`` in it), or by a prefix glob ``X*`` (``X`` literal) when the glob's literal start
  begins with ``X``. Presets only by an equal or broader preset (read < playback < admin).
- ``tools`` (and MCP ``resources`` and ``prompts``): per upstream, the same glob rule; "all"
  only under "all".
- ``admin``: a delegate may grant ``admin: true`` (it holds it) but never ``admin: full``.
- rate limits, quota, concurrency, as they apply on each configured upstream (the key's own,
  else the upstream's, else the global default): every limit of the actor is matched by one
  of the other key's with no larger burst and no higher rate; the same quota window with no
  larger count; no higher concurrency. If the actor has limits of its own, so must the other key.
- lifetime: no later than the actor's own end (expiry, or the end of a rotation's grace).
- ``upstream_token_env``: the same upstream identity on every upstream it reaches.

A key can therefore never widen itself: editing itself is judged against itself.
"""

from __future__ import annotations

from ..auth.models import KeyRecord
from ..auth.permissions import MCP_KINDS, mcp_globs
from ..config import Config, Limit
from ..core.errors import Forbidden

__all__ = ["check_grant", "check_target", "glob_covered", "manages_all", "owns"]

_META = frozenset("*?[")
_PRESET_RANK = {"plex:read": 1, "plex:playback": 2, "plex:admin": 3}
_FUTURE = "\x00future-upstream"  # stands for upstreams added to the config later (``"*"``)


def manages_all(actor: KeyRecord | None) -> bool:
    """The admin token / CLI (None) or a key with ``admin: full``."""
    return actor is None or actor.permissions.full_admin


def owns(actor: KeyRecord | None, target: KeyRecord) -> bool:
    """May ``actor`` see ``target`` at all (list, show, usage, audit)?"""
    return manages_all(actor) or (actor is not None and actor.owner is not None and target.owner == actor.owner)


def _literal(glob: str) -> bool:
    return not any(c in _META for c in glob)


def glob_covered(child: str, parent: str) -> bool:
    """Is everything ``child`` matches also matched by ``parent``? Sound, not complete."""
    if child == parent or parent == "*":
        return True
    if _literal(child):
        from fnmatch import fnmatchcase

        return fnmatchcase(child, parent)
    if parent.endswith("*") and _literal(parent[:-1]):
        start = child
        for i, c in enumerate(child):
            if c in _META:
                start = child[:i]
                break
        return start.startswith(parent[:-1])
    return False


def _globs_covered(child: tuple[str, ...] | None, parent: tuple[str, ...] | None) -> bool:
    """``None`` is "all"."""
    if parent is None:
        return True
    if child is None:
        return False
    return all(any(glob_covered(c, p) for p in parent) for c in child)


def _path_covered(child: str, parent: tuple[str, ...]) -> bool:
    if "*" in parent or "plex:admin" in parent:
        return True
    if child in _PRESET_RANK:
        return any(_PRESET_RANK.get(p, 0) >= _PRESET_RANK[child] for p in parent)
    return any(p not in _PRESET_RANK and glob_covered(child, p) for p in parent)


def _rate_dominated(parent: Limit, child: Limit) -> bool:
    """The child's bucket admits no more than the parent's: no larger burst, no higher rate."""
    return child.count <= parent.count and child.count * parent.period <= parent.count * child.period


def _reach_problem(config: Config, actor: KeyRecord, other: KeyRecord, now: float) -> str | None:
    from ..limits.gcra import resolve_plan  # the limits exactly as the limiter applies them

    a, o = actor.permissions, other.permissions
    if actor.owner is None:
        return "this key has no owner, so it may manage keys only with admin: full"
    if other.owner != actor.owner:
        return f"this key may only manage keys of its own owner ({actor.owner!r})"
    if o.full_admin:
        return "only the admin token or an admin: full key may grant admin: full"
    if o.admin and not a.admin:
        return "permissions.admin: broader than this key's own"
    if "*" not in a.upstreams and ("*" in o.upstreams or not set(o.upstreams) <= set(a.upstreams)):
        return "permissions.upstreams: broader than this key's own"
    if a.methods:
        if not o.methods:
            return "permissions.methods: all methods is broader than this key's own"
        for m in o.methods:
            if m not in a.methods and not (m == "HEAD" and "GET" in a.methods):
                return f"permissions.methods: {m} is not among this key's own"
    if a.paths:
        if not o.paths and "*" not in a.paths and "plex:admin" not in a.paths:
            return "permissions.paths: all paths is broader than this key's own"
        for p in o.paths:
            if not _path_covered(p, a.paths):
                return f"permissions.paths: {p!r} is not within this key's own paths"
    reach = [u for u in config.upstreams if "*" in o.upstreams or u.id in o.upstreams]
    ids = [u.id for u in reach] + ([_FUTURE] if "*" in o.upstreams else [])
    for name in MCP_KINDS:
        for uid in ids:
            # Effective globs exactly as the MCP gateway applies them (None: all; naming one kind
            # and not another denies the other), so "absent" means the same on both sides.
            if not _globs_covered(mcp_globs(o, uid, name), mcp_globs(a, uid, name)):
                shown = "upstreams added later" if uid == _FUTURE else repr(uid)
                return f"permissions.{name}: broader than this key's own on {shown}"
    for up in reach:
        if other.upstream_token_env.get(up.id) != actor.upstream_token_env.get(up.id):
            return f"upstream_token_env: this key may only grant its own upstream identity on {up.id!r}"
        pa, po = resolve_plan(config, actor, up), resolve_plan(config, other, up)
        if actor.rate_limits and not other.rate_limits:
            return "rate_limits: this key has rate limits of its own, so must the keys it manages"
        for ra in pa.rates:
            if not any(_rate_dominated(ra.limit, ro.limit) for ro in po.rates):
                return f"rate_limits: nothing as strict as this key's own {ra.limit.text} on {up.id!r}"
        if pa.quota is not None:
            if actor.quota and not other.quota:
                return "quota: this key has a quota of its own, so must the keys it manages"
            q = po.quota
            if q is None or q.limit.name != pa.quota.limit.name or q.limit.count > pa.quota.limit.count:
                return f"quota: not within this key's own {pa.quota.limit.text} on {up.id!r}"
        if pa.concurrency is not None and (po.concurrency is None or po.concurrency > pa.concurrency):
            return f"concurrency: above this key's own {pa.concurrency} on {up.id!r}"
    ends = [t for t in (actor.expires_at, actor.revoked_at) if t is not None]
    if ends and (other.expires_at is None or other.expires_at > min(ends)):
        return "expires: a key this key manages may not outlive it (give an earlier expiry)"
    return None


def check_target(config: Config, actor: KeyRecord | None, target: KeyRecord, now: float) -> None:
    """May ``actor`` change ``target`` (edit, rotate, revoke)? 403 naming why not."""
    if manages_all(actor):
        return
    assert actor is not None
    problem = _reach_problem(config, actor, target, now)
    if problem:
        raise Forbidden(f"this key may not manage key {target.id}: {problem}")


def check_grant(config: Config, actor: KeyRecord | None, child: KeyRecord, now: float) -> None:
    """May ``actor`` write ``child`` (a new key, or a key as it would be after an edit)?"""
    if manages_all(actor):
        return
    assert actor is not None
    problem = _reach_problem(config, actor, child, now)
    if problem:
        raise Forbidden(problem)
