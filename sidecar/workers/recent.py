"""The console's recent requests for the host: every worker's rings, merged in the supervisor.

The console's key pages ("last 100 requests") and its Activity page read
``observe.recent.RecentRequests``, fed in process by the access log's tap. With workers
the supervisor serves the console but no proxy traffic, so its own rings hold only what
it saw itself (refused console sign-ins). As for ``/metrics`` (``aggregate``), each worker
serves its rings on its private admin socket (``RECENT_PATH``, added to its admin app
before it starts: that socket is in the supervisor's 0700 directory, reached by nothing
else) and the supervisor reads them all when a page that shows them is asked for
(``wants_recent``), into a ``HostRecent`` that the console reads like its own:

- each key's entries: all workers' together, newest first, ``per_key`` at most; keys
  ordered by their newest entry, ``max_keys`` at most;
- failures and refusals: merged by time, ``max_events`` each; counts by reason and by
  address summed (``max_ips`` addresses, the most failing kept).

Entries are what the access log line says (redacted path, no header, no credential), so
nothing more leaves a worker than its log already shows. Bounded on both ends: a worker
answers with what its bounded rings hold; a worker that does not answer within the
scrape timeout is left out of that page.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Any

from aiohttp import web

from ..observe.recent import Entry, RecentRequests

__all__ = ["RECENT_PATH", "HostRecent", "dump", "serve_recent", "wants_recent"]

RECENT_PATH = "/_worker/recent"
_PAGES = re.compile(r"^/(activity|keys/[^/]+)(/|$)")  # the console pages that show recent requests


def wants_recent(request: web.Request) -> bool:
    """A console page that shows recent requests (a key's page, its grants, Activity)."""
    return request.method in ("GET", "HEAD") and _PAGES.match(request.path) is not None


def dump(recent: RecentRequests) -> dict[str, Any]:
    """A worker's rings as JSON-ready lists (entries as arrays: ``Entry`` field order)."""
    return {
        "keys": {kid: recent.for_key(kid)[::-1] for kid in recent.key_ids()},
        "failures": list(recent.failures),
        "refusals": list(recent.refusals),
        "by_reason": recent.failures_by_reason,
        "by_ip": list(recent.failures_by_ip.items()),
    }


def serve_recent(admin: web.Application) -> None:
    """A worker: answer ``RECENT_PATH`` on its admin app (nothing when the console is off)."""
    from ..console import CONSOLE

    async def recent(request: web.Request) -> web.Response:
        console = request.app.get(CONSOLE)
        return web.json_response(dump(console.recent) if console is not None else {})

    admin.router.add_get(RECENT_PATH, recent)


def _entries(raw: Any) -> list[Entry]:
    return [Entry(*e) for e in raw or ()]


class HostRecent(RecentRequests):
    """The supervisor's console view: its own rings (``own``) and the workers' as last loaded."""

    def __init__(self, own: RecentRequests) -> None:
        super().__init__(
            per_key=own.per_key, max_keys=own.max_keys, max_events=own.failures.maxlen or 500, max_ips=own.max_ips,
            clock=own.clock,
        )  # fmt: skip
        self.own = own

    def note(self, entry: Entry) -> None:
        self.own.note(entry)  # kept across loads
        super().note(entry)  # and shown at once

    def load(self, workers: Sequence[dict[str, Any]]) -> None:
        """Replace what is shown with ``own`` and ``workers`` (each a ``dump``) merged, newest last."""
        sources = [dump(self.own), *(w for w in workers if _valid(w))]
        per_key: dict[str, list[Entry]] = {}
        for src in sources:
            for kid, raw in (src.get("keys") or {}).items():
                per_key.setdefault(kid, []).extend(_entries(raw))
        rings = sorted(
            ((sorted(v, key=_at)[-self.per_key :], kid) for kid, v in per_key.items()), key=lambda x: x[0][-1].at
        )
        self._keys = OrderedDict(
            (kid, deque(ring, maxlen=self.per_key)) for ring, kid in rings[-self.max_keys :] if ring
        )  # fmt: skip
        maxlen = self.failures.maxlen
        self.failures = deque(_merged(_entries(s.get("failures")) for s in sources), maxlen=maxlen)
        self.refusals = deque(_merged(_entries(s.get("refusals")) for s in sources), maxlen=maxlen)
        reasons: dict[str, int] = {}
        ips: dict[str, int] = {}
        for src in sources:
            for reason, n in (src.get("by_reason") or {}).items():
                reasons[reason] = reasons.get(reason, 0) + int(n)
            for ip, n in src.get("by_ip") or ():
                ips[ip] = ips.get(ip, 0) + int(n)
        self.failures_by_reason = reasons
        kept = sorted(ips.items(), key=lambda x: x[1])[-self.max_ips :]
        self.failures_by_ip = OrderedDict(kept)


def _at(e: Entry) -> float:
    return e.at


def _merged(lists: Iterable[list[Entry]]) -> list[Entry]:
    return sorted((e for entries in lists for e in entries), key=_at)


def _valid(src: Any) -> bool:
    """A worker's answer has the shape ``dump`` gives (a worker is ours, but a page must never 500)."""
    try:
        if not isinstance(src, dict):
            return False
        for raw in [*(src.get("keys") or {}).values(), src.get("failures"), src.get("refusals")]:
            _entries(raw)
        return all(isinstance(n, int) for n in (src.get("by_reason") or {}).values())
    except (TypeError, ValueError, AttributeError):
        return False
