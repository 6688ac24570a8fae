"""A grant is a key: the child key of the API key that approved it.

Made when a code is exchanged (``create``): same owner, limits and upstream identity as
its parent, permissions narrowed to the one resource (MCP upstream) and the tools the
person chose, an expiry no later than the parent's, and ``grant`` naming the client.
From then on the pipeline treats it as any key: permissions, tool filtering, rate
limits, quota, metrics, usage and audit are the key machinery's. ``Verifier.state``
ends it with its parent. Revoking one (``revoke``) goes through ``KeyManager.revoke``
(audited) and deletes its tokens.

**Limits: the parent's, now, from the parent's budget.** A grant's rate limits, quota and
concurrency are not the copy written at the exchange but the parent's *current* ones, and
it spends from the parent's budget (``budget_id``: the parent's buckets, quota counter and
in-flight count, as a rotated key's successor does). ``allowed_now`` puts them on the record
the pipeline limits, at request time: the parent is already in the verifier's table, and the
result is cached until either record changes, so it costs nothing per request and a change of
the parent reaches every replica with its poll, as any key change does; no store has to
rewrite the grants (the alternative, updating every child in the parent's transaction, would
have to be done in each store and is still a copy that can drift). Sharing the budget is what
"same limits" means: N grants with budgets of their own would have been N times the parent's
rate. The copy stays in the record; the admin API and the console show the parent's current
limits and quota counter for a grant (``Sidecar.limits_of``), and an edit of a grant's limits
apart from its parent's is refused (``KeyManager.patch``): it could not hold.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..admin.delegation import glob_covered
from ..auth.keys import display_form
from ..auth.models import KeyRecord, Permissions
from ..auth.permissions import MCP_KINDS, mcp_globs
from ..auth.verify import argon2_pool
from ..core.errors import NotFound
from ..observe.logfilter import redact_path_keys
from ..store.base import AuditEvent, GrantLimitReached

if TYPE_CHECKING:
    from .host import GrantHost

__all__ = [
    "GRANTS_FULL",
    "GRANTS_TODAY",
    "GrantError",
    "allowed_now",
    "child_permissions",
    "create_grant",
    "grant_refusal",
    "grants_of",
    "grants_per_day",
    "new_grant_id",
    "revoke_grant",
    "with_parent_limits",
]


MAX_TOOLS = 500  # tool names one grant may name
GRANTS_FULL = "that API key has reached its number of OAuth grants; revoke one first"
GRANTS_TODAY = "that API key has approved too many OAuth grants in the last day; try again later"
GRANTS_PER_DAY_FACTOR = 5  # grants a key may approve in a day, in units of oauth.max_grants_per_key


class GrantError(Exception):
    """The approving key cannot grant this; the message is shown on the consent page."""


def new_grant_id() -> str:
    return secrets.token_hex(6)  # a key id: 12 hex


def child_permissions(parent: KeyRecord, upstream_id: str, tools: tuple[str, ...]) -> Permissions:
    """The parent's permissions narrowed to ``upstream_id`` and ``tools`` (empty: every tool the parent may use).

    ``GrantError`` when a tool is not within the parent's own (``glob_covered``: sound, never wider)."""
    p = parent.permissions
    if len(tools) > MAX_TOOLS or not all(t.isprintable() and len(t) <= 200 for t in tools):
        raise GrantError(f"at most {MAX_TOOLS} tool names, each printable text")
    if "*" not in p.upstreams and upstream_id not in p.upstreams:
        raise GrantError(f"this API key may not use {upstream_id!r}")
    own = {kind: mcp_globs(p, upstream_id, kind) for kind in MCP_KINDS}
    if tools:
        allowed = own["tools"]
        for t in tools:
            if allowed is not None and not any(glob_covered(t, g) for g in allowed):
                raise GrantError(f"tool {t!r} is not among this API key's own tools")
        own["tools"] = tools
    tables: dict[str, dict[str, tuple[str, ...]]] = {k: {} for k in MCP_KINDS}
    if any(v is not None for v in own.values()):
        for kind, globs in own.items():
            tables[kind] = {upstream_id: globs if globs is not None else ("*",)}
    return Permissions(
        upstreams=(upstream_id,), methods=p.methods, paths=p.paths,
        tools=tables["tools"], resources=tables["resources"], prompts=tables["prompts"],
    )  # fmt: skip


def _both(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    """Globs within both lists (sound, not complete: a glob only partly covered is dropped)."""
    return tuple(dict.fromkeys([g for g in a if any(glob_covered(g, h) for h in b)]
                               + [h for h in b if any(glob_covered(h, g) for g in a)]))  # fmt: skip


def with_parent_limits(grant: KeyRecord, parent: KeyRecord) -> KeyRecord:
    """The grant with the limits that hold for it: its parent's current ones, on the parent's budget."""
    return dataclasses.replace(grant, rate_limits=parent.rate_limits, quota=parent.quota,
                               concurrency=parent.concurrency, budget_id=parent.budget_id or parent.id)  # fmt: skip


def allowed_now(grant: KeyRecord, parent: KeyRecord) -> KeyRecord:
    """The grant as its parent allows it *now*: its permissions as written, intersected with the
    parent's current ones on the grant's resource, the parent's current upstream identity, and the
    parent's current limits, spent from the parent's budget (module docstring).

    A grant is a snapshot made at the code exchange; the parent may be narrowed later (a tool, a
    path, the upstream taken away, a lower rate or quota). The grant must never be wider than its
    parent, so every use and every refresh sees this intersection. Nothing in common: no upstream
    at all (403)."""
    up, g, p = str(grant.grant.get("resource") or ""), grant.permissions, parent.permissions
    grant = with_parent_limits(grant, parent)
    nothing = dataclasses.replace(grant, permissions=Permissions(upstreams=()))
    if not up or not all("*" in x.upstreams or up in x.upstreams for x in (g, p)):
        return nothing
    methods = tuple(m for m in g.methods if m in p.methods) if g.methods and p.methods else g.methods or p.methods
    paths = _both(g.paths, p.paths) if g.paths and p.paths else g.paths or p.paths
    if (g.methods and not methods) or (g.paths and not paths):  # nothing in common: empty would mean "all"
        return nothing
    globs: dict[str, tuple[str, ...] | None] = {}
    for kind in MCP_KINDS:
        mine_g, theirs_g = mcp_globs(g, up, kind), mcp_globs(p, up, kind)
        globs[kind] = theirs_g if mine_g is None else mine_g if theirs_g is None else _both(mine_g, theirs_g)
    limited = any(v is not None for v in globs.values())
    tables = {k: ({up: v if v is not None else ("*",)} if limited else {}) for k, v in globs.items()}
    perms = Permissions(upstreams=(up,), methods=methods, paths=paths, tools=tables["tools"],
                        resources=tables["resources"], prompts=tables["prompts"])  # fmt: skip
    return dataclasses.replace(grant, permissions=perms, upstream_token_env=parent.upstream_token_env)


async def create_grant(sc: GrantHost, grant_id: str, parent_id: str, spec: Mapping[str, Any], now: float) -> KeyRecord:
    """Write the child key for an exchanged code (``spec``: what the consent page recorded)."""
    parent = sc.verifier.table.get(parent_id) or await sc.store.get(parent_id)
    if parent is None or sc.verifier.state(parent, now) != "active":
        raise GrantError("the API key that approved this grant is no longer active")
    if grant_refusal(sc, parent_id, now, sc.config.oauth.max_grants_per_key) == GRANTS_TODAY:
        raise GrantError(GRANTS_TODAY)  # again: codes collected together were each approved under the cap
    perms = child_permissions(parent, spec["resource"], tuple(spec.get("tools") or ()))
    expires = float(spec["expires_at"])
    if parent.expires_at is not None:
        expires = min(expires, parent.expires_at)
    # The child is reached only through OAuth tokens: its own secret is random and thrown away.
    hashed = await asyncio.get_running_loop().run_in_executor(
        argon2_pool(), sc.verifier.hasher.hash, secrets.token_hex(24)
    )
    grant = {
        k: spec[k] for k in ("client_id", "client_name", "resource", "tools", "scope", "redirect_uri") if k in spec
    }
    child = KeyRecord(
        id=grant_id,
        name=f"oauth: {spec.get('client_name') or spec['client_id']}"[:200],
        hash=hashed,
        display=display_form(sc.config.keys.prefix, grant_id) + " (oauth)",
        description=f"OAuth grant approved with key {parent.id}",
        owner=parent.owner,
        permissions=perms,
        rate_limits=parent.rate_limits,
        quota=parent.quota,
        concurrency=parent.concurrency,
        upstream_token_env=parent.upstream_token_env,
        created_at=now,
        expires_at=expires,
        parent_id=parent.id,
        grant=grant,
        budget_id=parent.budget_id or parent.id,  # the parent's budget (``limits.gcra.budget_of``), not a fresh one
    )
    try:  # grants are capped per approving key, in the write's transaction: the approvals' checks saw
        # no grant of the codes still waiting, so the cap must hold here, when a code becomes a grant
        cap = sc.config.oauth.max_grants_per_key
        await sc.store.create_key(child, max_per_owner=None, now=now, max_grants=cap)
    except GrantLimitReached:
        raise GrantError(GRANTS_FULL) from None
    await sc.store.audit(AuditEvent(now, f"key:{parent.id}", "oauth_granted", child.id, dict(grant)))
    await sc.verifier.refresh()
    return child


def grants_of(records: list[KeyRecord], *, key_id: str | None = None, client_id: str | None = None) -> list[KeyRecord]:
    """Grants (child keys), optionally of one approving key or one client."""
    return [
        r
        for r in records
        if r.parent_id is not None
        and (key_id is None or r.parent_id == key_id)
        and (client_id is None or r.grant.get("client_id") == client_id)
    ]


async def revoke_grant(sc: GrantHost, grant_id: str, actor: str) -> KeyRecord:
    """Revoke a grant (audited as any key's revocation) and delete its codes and tokens."""
    rec = await sc.store.get(grant_id)
    if rec is None or rec.parent_id is None:
        raise NotFound(f"no OAuth grant with id {redact_path_keys(grant_id)!r}")  # a token given for an id
    after = await sc.manager().revoke(grant_id, actor)
    await sc.store.oauth_forget(grant_id, sc.clock())
    await sc.verifier.refresh()
    return after


def grants_per_day(max_grants_per_key: int) -> int:
    return GRANTS_PER_DAY_FACTOR * max_grants_per_key


def grant_refusal(sc: GrantHost, parent_id: str, now: float, max_grants_per_key: int) -> str | None:
    """Why this key may approve no grant now, or None. Active grants are capped; so are grants approved
    in the last day, active or not: grants are kept for audit whatever their lifetime (which may be a
    second), so the active cap alone let one key add key records to every process without end."""
    active = recent = 0
    since = now - 86400
    for r in sc.verifier.table.values():
        if r.parent_id == parent_id:
            if r.created_at > since:
                recent += 1
            if sc.verifier.state(r, now) == "active":
                active += 1
    if active >= max_grants_per_key:
        return GRANTS_FULL
    if recent >= grants_per_day(max_grants_per_key):
        return GRANTS_TODAY
    return None


def active_grants(sc: GrantHost, parent_id: str, now: float) -> int:
    """Active grants of one key (the consent page caps them; they all spend from the key's budget)."""
    return sum(
        1 for r in sc.verifier.table.values() if r.parent_id == parent_id and sc.verifier.state(r, now) == "active"
    )
