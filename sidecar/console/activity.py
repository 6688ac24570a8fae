"""The activity page: what the seeds call monitoring "unusual request volumes, requests from
unexpected locations, error rate spikes".

- authentication failures, by reason and by client address, and the latest of them;
- rate-limit and quota refusals;
- keys by recent volume: requests, error share and distinct client addresses among each
  key's last requests (``observe.recent``), busiest first;
- the audit log (``Store.audit_log``, what ``GET /admin/audit`` reads).

Filters narrow all of it (address, reason, key, actor, action, time window). Everything
comes from bounded memory (``RecentRequests``) or one bounded audit query, so the page
costs the same under attack as on a quiet day. A session signed in with a delegated admin
key sees only its owner's keys: their refusals, volumes and audit entries, and no one
else's failures (as ``GET /admin/audit`` does for such a key).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from aiohttp import web

from ..admin.delegation import manages_all, owns
from ..observe.recent import Entry
from .forms import audit_detail
from .routes import Console
from .sessions import Session

__all__ = ["activity_page"]

WINDOWS = {"15m": 900.0, "1h": 3600.0, "24h": 86400.0, "all": float("inf")}
AUDIT_LIMIT = 200
SHOWN = 100


def _match(e: Entry, ip: str, reason: str, key: str) -> bool:
    return (not ip or e.client_ip == ip) and (not reason or e.error == reason) and (not key or e.key_id == key)


async def activity_page(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    sc = console.sc
    by = console.acting_key(session)
    full = manages_all(by)
    f = {name: request.query.get(name, "").strip()[:200] for name in ("ip", "reason", "key", "actor", "action")}
    window = request.query.get("window", "24h")
    window = window if window in WINDOWS else "24h"
    since = sc.clock() - WINDOWS[window]
    records = await sc.store.list_keys()
    mine = {r.id for r in records if owns(by, r)}
    names = {r.id: r.name for r in records if r.id in mine}

    failures: list[Entry] = []
    if full:
        failures = [e for e in console.recent.failures if e.at >= since and _match(e, f["ip"], f["reason"], f["key"])]
    by_reason = Counter(e.error for e in failures)
    by_ip = Counter(e.client_ip for e in failures)
    refusals = [
        e for e in console.recent.refusals
        if e.at >= since and e.key_id in mine and _match(e, f["ip"], f["reason"], f["key"])
    ]  # fmt: skip

    volumes: list[dict[str, Any]] = []
    for kid in console.recent.key_ids():
        if kid not in mine or (f["key"] and kid != f["key"]):
            continue
        entries = [e for e in console.recent.for_key(kid) if e.at >= since and (not f["ip"] or e.client_ip == f["ip"])]
        if not entries:
            continue
        errors = sum(1 for e in entries if e.status >= 400)
        volumes.append({
            "key": kid, "name": names.get(kid, kid), "requests": len(entries), "errors": errors,
            "error_pct": round(100 * errors / len(entries)), "ips": len({e.client_ip for e in entries}),
            "last_ip": entries[0].client_ip, "last": entries[0].at,
        })  # fmt: skip
    volumes.sort(key=lambda v: (-v["requests"], v["key"]))

    events = await sc.store.audit_log(f["key"] or None, AUDIT_LIMIT)
    events = [e for e in events if full or e.key_id in mine]  # the filters' choices too: no other owner's actors
    audit = [
        {"e": e, "detail": audit_detail(e.detail), "name": names.get(e.key_id or "", "")}
        for e in events
        if (not f["actor"] or e.actor == f["actor"]) and (not f["action"] or e.action == f["action"]) and e.at >= since
    ]
    return console.render(
        request, "activity.html", session=session, f=f, window=window, windows=list(WINDOWS), full=full,
        failures=list(reversed(failures))[:SHOWN], failure_count=len(failures),
        by_reason=by_reason.most_common(), by_ip=by_ip.most_common(20),
        refusals=list(reversed(refusals))[:SHOWN], refusal_count=len(refusals), volumes=volumes[:20],
        audit=audit[:SHOWN], reasons=sorted(console.recent.failures_by_reason) if full else [],
        actions=sorted({e.action for e in events}), actors=sorted({e.actor for e in events}),
    )  # fmt: skip
