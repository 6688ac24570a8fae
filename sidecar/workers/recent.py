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
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from ..observe.recent import Entry, RecentRequests

__all__ = ["RECENT_PATH", "HostRecent", "dump", "serve_recent", "wanted"]

RECENT_PATH = "/_worker/recent"
ACTIVITY_KEYS = 200  # most recently active keys each worker sends for the Activity page
_KEY_PAGE = re.compile(r"^/keys/([^/]+)(/|$)")


def wanted(request: web.Request, grants: Callable[[str], list[str]]) -> str | None:
    """The path to read from each worker for a console page: all rings for Activity, a key's
    and its OAuth grants' (``grants``: a key id's grant ids) for a key's pages; None: the page
    shows no recent requests."""
    if request.method not in ("GET", "HEAD"):
        return None
    if request.path == "/activity":
        return RECENT_PATH
    m = _KEY_PAGE.match(request.path)
    if m is None or m.group(1) == "new":
        return None
    return f"{RECENT_PATH}?{urlencode({'keys': ','.join([m.group(1), *grants(m.group(1))])})}"


def dump(recent: RecentRequests, keys: Collection[str] | None = None) -> dict[str, Any]:
    """A worker's rings as JSON-ready lists (entries as arrays, oldest first): all of them, or
    only the rings of ``keys`` (a key's page needs nothing else, and stays small)."""
    if keys is not None:
        return {"keys": {kid: ring for kid in keys if (ring := recent.for_key(kid)[::-1])}}
    return {
        "keys": {kid: recent.for_key(kid)[::-1] for kid in list(recent.key_ids())[-ACTIVITY_KEYS:]},
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
        if console is None:
            return web.json_response({})
        keys = request.query.get("keys")
        return web.json_response(dump(console.recent, keys.split(",")[:1000] if keys is not None else None))

    admin.router.add_get(RECENT_PATH, recent)


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

    def load(self, workers: Sequence[Any], full: bool = True) -> None:
        """Show ``own`` and ``workers`` (each a ``dump``: all of it, or with ``full`` false some keys') merged."""
        sources = [dump(self.own)]
        for w in workers:
            try:
                sources.append(_parsed(w))
            except (TypeError, ValueError, AttributeError, KeyError):  # not a dump: that worker is left out
                continue
        per_key: dict[str, list[list[Entry]]] = {}
        for src in sources:
            for kid, entries in src["keys"].items():
                if entries:
                    per_key.setdefault(kid, []).append(entries)
        n = self.per_key
        rings = [(v[0][-n:] if len(v) == 1 else _merged(v)[-n:], kid) for kid, v in per_key.items()]
        rings.sort(key=lambda x: x[0][-1].at)
        self._keys = OrderedDict((kid, deque(ring, maxlen=n)) for ring, kid in rings[-self.max_keys :])
        if full:  # Activity; a key's page needs (and asked for) nothing but its keys' rings
            maxlen = self.failures.maxlen
            self.failures = deque(_merged(s.get("failures", ()) for s in sources), maxlen=maxlen)
            self.refusals = deque(_merged(s.get("refusals", ()) for s in sources), maxlen=maxlen)
            reasons: dict[str, int] = {}
            ips: dict[str, int] = {}
            for src in sources:
                for reason, k in src.get("by_reason", {}).items():
                    reasons[reason] = reasons.get(reason, 0) + k
                for ip, k in src.get("by_ip", ()):
                    ips[ip] = ips.get(ip, 0) + k
            self.failures_by_reason = reasons
            self.failures_by_ip = OrderedDict(sorted(ips.items(), key=lambda x: x[1])[-self.max_ips :])


def _parsed(raw: Any) -> dict[str, Any]:
    """A worker's ``dump`` with its entries as ``Entry`` (raises on anything else)."""
    make = Entry._make
    out: dict[str, Any] = {"keys": {str(kid): [make(e) for e in v] for kid, v in raw["keys"].items()}}
    if "failures" in raw:
        out["failures"] = [make(e) for e in raw["failures"]]
        out["refusals"] = [make(e) for e in raw["refusals"]]
        out["by_reason"] = {str(r): int(k) for r, k in raw["by_reason"].items()}
        out["by_ip"] = [(str(ip), int(k)) for ip, k in raw["by_ip"]]
    return out


def _at(e: Entry) -> float:
    return e.at


def _merged(lists: Any) -> list[Entry]:
    return sorted((e for entries in lists for e in entries), key=_at)
