"""The key pages: list, create (shown once), details, edit, rotate, revoke; and the tools picker's JSON.

Every change goes through ``KeyManager`` (sidecar/admin/manage.py), the code the admin API
and the CLI use, with the session's actor (``console``, or ``console:key:<id>``) and, for a
session signed in with a delegated admin key, that key as ``by`` — so the same checks
(lifetime, owner limits, delegation) apply and the audit log names the console. After a
change the verifier re-reads the store at once, as the admin API does: a revoked key is
refused by the next request.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from ..admin.delegation import owns
from ..auth.models import KeyRecord
from ..auth.permissions import literal_glob, tool_allowed
from ..config import parse_duration
from ..core.errors import BadRequest, NotFound, SidecarError
from ..observe.logfilter import redact_path_keys
from ..observe.usage import report as usage_report
from .chart import bar_chart, fill_days, human_bytes
from .forms import GRACE_CHOICES, blank_form, changed_fields, fields_from_form, form_from_record, lifetime_choices
from .oauthviews import key_oauth
from .routes import Console, harden, see_other
from .sessions import Session

__all__ = ["edit_key", "key_page", "keys_page", "new_key", "revoke_key", "rotate_key", "tools_json"]

PAGE_ROWS = 100
CHART_DAYS = 30
SORTS = {"last_used": "Last used", "created": "Created", "name": "Name", "expires": "Expires"}


async def _visible(console: Console, session: Session, key_id: str) -> KeyRecord:
    rec = await console.sc.manager().get(key_id)
    if not owns(console.acting_key(session), rec):
        raise NotFound(f"no key with id {redact_path_keys(key_id)!r}")  # a key given for its id: not echoed
    return rec


def _access(rec: KeyRecord) -> str:
    ups = rec.permissions.upstreams
    return "all upstreams" if "*" in ups else ", ".join(ups)


def _quota_text(status: list[dict[str, Any]] | None) -> str:
    if not status:
        return ""
    parts = []
    for s in status:
        used = "?" if s.get("used") is None else s["used"]
        parts.append(f"{used} of {s['quota']}" + ("" if s.get("scope") in (None, "*", "") else f" ({s['scope']})"))
    return "; ".join(parts)


def _state_label(console: Console, rec: KeyRecord, now: float) -> str:
    state = console.sc.verifier.state(rec, now) if rec.id in console.sc.verifier.table else rec.state(now)
    if state == "active" and rec.rotated_to:
        return "rotating"
    return state


async def keys_page(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """The API Keys table: search, filter by state/owner/upstream, sort (last used first by default)."""
    sc = console.sc
    await sc.usage.flush()  # last-used times counted but not yet written
    by = console.acting_key(session)
    records = [r for r in await sc.store.list_keys() if owns(by, r)]
    now = sc.clock()
    q = request.query.get("q", "").strip().lower()[:200]
    state = request.query.get("state", "")
    owner = request.query.get("owner", "")
    upstream = request.query.get("upstream", "")
    sort = request.query.get("sort", "last_used")
    kind = request.query.get("kind", "")  # "key" | "grant" (OAuth grants are child keys)
    sort = sort if sort in SORTS else "last_used"
    owners = sorted({r.owner for r in records if r.owner})
    rows = []
    for r in records:
        label = _state_label(console, r, now)
        if (
            q
            and q not in r.name.lower()
            and q not in r.id
            and q not in (r.description or "").lower()
            and not (r.parent_id and q == str(r.grant.get("client_id", "")).lower())
        ):
            continue
        if state and label != state and not (state == "active" and label == "rotating"):
            continue
        if owner and r.owner != owner:
            continue
        if upstream and "*" not in r.permissions.upstreams and upstream not in r.permissions.upstreams:
            continue
        if (kind == "key" and r.parent_id) or (kind == "grant" and not r.parent_id):
            continue
        rows.append((r, label))
    keyfn = {
        "last_used": lambda x: -(x[0].last_used_at or 0.0),
        "created": lambda x: -x[0].created_at,
        "name": lambda x: x[0].name.lower(),
        "expires": lambda x: x[0].expires_at or float("inf"),
    }[sort]
    rows.sort(key=keyfn)
    shown = []
    for r, label in rows[:PAGE_ROWS]:
        r = sc.limits_of(r)  # a grant: its parent's limits, which hold for it
        shown.append({
            "rec": r, "state": label, "access": _access(r),
            "rate": ", ".join(r.rate_limits) or "default",
            "quota": _quota_text(await sc.limiter.quota_status(r)),
        })  # fmt: skip
    return console.render(
        request, "keys.html", session=session, rows=shown, total=len(rows), all_count=len(records),
        more=max(0, len(rows) - PAGE_ROWS), owners=owners, upstreams=[u.id for u in sc.config.upstreams],
        sorts=SORTS, f={"q": q, "state": state, "owner": owner, "upstream": upstream, "sort": sort, "kind": kind},
        flash=session.take_flash(), oauth=sc.oauth is not None,
    )  # fmt: skip


def _form_page(
    request: web.Request, console: Console, session: Session, form: dict[str, Any], *, rec: KeyRecord | None = None,
    message: str = "", status: int = 200,
) -> web.Response:  # fmt: skip
    cfg = console.sc.config
    return console.render(
        request, "key_form.html", session=session, status=status, form=form, rec=rec, message=message,
        nonce=session.nonce(), upstreams=cfg.upstreams, expiry=lifetime_choices(cfg),
        has_plex=any(u.kind == "plex" for u in cfg.upstreams),
    )  # fmt: skip


async def new_key(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    sc = console.sc
    if request.method == "GET":
        return _form_page(request, console, session, blank_form(sc.config))
    form = await request.post()
    if not session.spend_nonce(_text(form.get("once"))):
        session.flash = "That form was already sent (a key is created once): here is the list."
        return see_other("/")
    state = blank_form(sc.config)
    try:
        fields, state = fields_from_form(form, sc.config, edit=False)  # type: ignore[arg-type]
        by = console.acting_key(session)
        if by is not None and fields.get("owner") is None:
            del fields["owner"]  # as POST /admin/keys without one: a delegated key's keys are its owner's
        rec, key = await sc.manager().create(fields, session.actor, by=by)
    except SidecarError as e:
        return _form_page(request, console, session, state, message=e.message, status=e.status)
    await sc.verifier.refresh()  # usable (and listed) at once, as after POST /admin/keys
    return _created(request, console, session, rec, key, rotated_from=None)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _created(
    request: web.Request, console: Console, session: Session, rec: KeyRecord, key: str, rotated_from: KeyRecord | None
) -> web.Response:
    """The one page that shows a key: never cached, and its script blanks the key when the page is left."""
    sc = console.sc
    base = (console.proxy_url or _guess_proxy(request, sc.config.listen)).rstrip("/")
    allowed = rec.permissions.upstreams
    ups = [u for u in sc.config.upstreams if "*" in allowed or u.id in allowed]
    examples = []
    for u in ups:
        prefix = "" if u.path_prefix == "/" else u.path_prefix
        if u.kind == "plex":
            examples.append((f"curl ({u.id})", f"curl -H 'X-Plex-Token: {key}' {base}{prefix}/library/sections"))
            plexapi = f'plex = PlexServer("{base}{prefix}", "{key}")\nprint(plex.library.sections())'
            examples.append(("python-plexapi", "from plexapi.server import PlexServer\n" + plexapi))
        else:
            snippet = {"mcpServers": {u.id: {"type": "http", "url": f"{base}{prefix}",
                                             "headers": {"Authorization": f"Bearer {key}"}}}}  # fmt: skip
            examples.append((f"MCP client config ({u.id})", json.dumps(snippet, indent=2)))
            examples.append((f"curl ({u.id})", f"curl -H 'Authorization: ApiKey {key}' -H 'Content-Type: "
                             f"application/json' -H 'Accept: application/json, text/event-stream' {base}{prefix} "
                             """-d '{"jsonrpc":"2.0","id":1,"method":"tools/list"}'"""))  # fmt: skip
    return console.render(
        request, "created.html", session=session, rec=rec, key=key, examples=examples, rotated_from=rotated_from
    )


def _guess_proxy(request: web.Request, listen: str) -> str:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = (request.host.rpartition(":")[0] or request.host).strip("[]") or "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}" if port != "0" else f"http://{shown}:PORT"


async def key_page(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """Details, permissions, usage per day, quota, the last requests and the audit trail of one key."""
    sc = console.sc
    await sc.usage.flush()  # as GET /admin/keys/{id}/usage: the answer is up to date
    rec = await _visible(console, session, request.match_info["id"])
    now = sc.clock()
    usage = await usage_report(sc.store, rec.id, CHART_DAYS, now)
    days = fill_days(usage["days"], CHART_DAYS, now)
    total = usage["total"]
    audit = await sc.store.audit_log(rec.id, 50)
    held = sc.limits_of(rec)  # a grant: its parent's limits, which hold for it
    return console.render(
        request, "key.html", session=session, rec=rec, state=_state_label(console, rec, now),
        perms=_permission_lines(held), chart=bar_chart(days), days=[d for d in days if d.requests],
        total=total, total_bytes=human_bytes(int(total["bytes"])), quota=await sc.limiter.quota_status(held),
        recent=console.recent.for_key(rec.id), audit=audit, grace=GRACE_CHOICES, nonce=session.nonce(),
        flash=session.take_flash(), human_bytes=human_bytes, **key_oauth(console, session, rec, now),
    )  # fmt: skip


def _permission_lines(rec: KeyRecord) -> list[tuple[str, str]]:
    p = rec.permissions
    out = [("Upstreams", "all (including upstreams added later)" if "*" in p.upstreams else ", ".join(p.upstreams))]
    out.append(("Methods", ", ".join(p.methods) or "all"))
    out.append(("Paths", ", ".join(p.paths) or "all"))
    for kind, label in (("tools", "MCP tools"), ("resources", "MCP resources"), ("prompts", "MCP prompts")):
        for up, globs in getattr(p, kind).items():
            out.append((f"{label} on {up}", ", ".join(globs) or "none"))
    out.append(("Admin", ("full: manages every key" if p.full_admin else "delegate: keys of its own owner")
                if p.admin else "no"))  # fmt: skip
    out.append(("Rate limits", ", ".join(rec.rate_limits) or "the upstream's or global default"))
    out.append(("Quota", rec.quota or "none of its own"))
    out.append(("Concurrency", "default" if rec.concurrency is None else str(rec.concurrency)))
    return out


async def edit_key(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """What PATCH /admin/keys/{id} allows: name, description, owner, permissions, limits, expiry."""
    sc = console.sc
    rec = await _visible(console, session, request.match_info["id"])
    if request.method == "GET":
        return _form_page(request, console, session, form_from_record(sc.config, rec), rec=rec)
    form = await request.post()
    state = form_from_record(sc.config, rec)
    try:
        fields, state = fields_from_form(form, sc.config, edit=True)  # type: ignore[arg-type]
        fields = changed_fields(sc.config, rec, fields)
        if not fields:
            session.flash = "Nothing changed."
            return see_other(f"/keys/{rec.id}")
        await sc.manager().patch(rec.id, fields, session.actor, by=console.acting_key(session))
    except SidecarError as e:
        return _form_page(request, console, session, state, rec=rec, message=e.message, status=e.status)
    await sc.verifier.refresh()
    session.flash = "Changes saved."
    return see_other(f"/keys/{rec.id}")


async def rotate_key(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    sc = console.sc
    rec = await _visible(console, session, request.match_info["id"])
    form = await request.post()
    if not session.spend_nonce(_text(form.get("once"))):
        session.flash = "That rotation was already sent: the new key is listed (its secret was shown once)."
        return see_other(f"/keys/{rec.id}")
    raw = _text(form.get("grace")) or "0"
    if raw not in dict(GRACE_CHOICES):
        raise BadRequest("grace: choose one of the choices")
    new, key = await sc.manager().rotate(rec.id, session.actor, parse_duration(raw), by=console.acting_key(session))
    await sc.verifier.refresh()
    return _created(request, console, session, new, key, rotated_from=rec)


async def revoke_key(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """GET: the confirmation naming the key (the page's script shows it as a dialog); POST: revoke."""
    sc = console.sc
    rec = await _visible(console, session, request.match_info["id"])
    if request.method == "GET":
        return console.render(request, "revoke.html", session=session, rec=rec)
    await sc.manager().revoke(rec.id, session.actor, by=console.acting_key(session))
    await sc.verifier.refresh()  # refused by the very next request, as after DELETE /admin/keys/{id}
    console.sessions.end_key(rec.id)
    session.flash = f"Key “{rec.name}” revoked. It stays listed, for audit."
    return see_other(f"/keys/{rec.id}")


async def tools_json(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    """The picker's list: ``{"tools": [{"name", "description", "allow"}]}`` (``allow``: the glob matching that
    name only), or ``{"error": "…"}``. A delegated key's session sees what its own ``tools/list`` would."""
    upstream = console.sc.config.upstream(request.match_info["upstream"])
    by = console.acting_key(session)
    if upstream is not None and by is not None and not ({"*", upstream.id} & set(by.permissions.upstreams)):
        upstream = None  # a delegated admin key sees the tools of the upstreams it reaches only
    started, up_id = time.perf_counter(), request.match_info["upstream"]
    try:
        tools = [
            {**t, "allow": literal_glob(t["name"])} for t in await console.tools.tools(upstream)
            if by is None or tool_allowed(by.permissions, up_id, t["name"])  # what its own tools/list shows
        ]  # fmt: skip
        body: dict[str, Any] = {"tools": tools, "ms": round((time.perf_counter() - started) * 1000)}
        status = 200
    except SidecarError as e:
        body, status = {"error": e.message}, 502 if e.status >= 500 else e.status
    except TimeoutError:
        body, status = {"error": "the upstream did not answer tools/list in time"}, 504
    return harden(web.json_response(body, status=status))
