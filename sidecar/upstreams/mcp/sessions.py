"""MCP sessions belong to keys: every form a session id can take, checked against its owner.

The upstream sees one credential (the sidecar's) for every client, so only the sidecar
can tell whose session an id is. An id reaches the upstream in two forms: the
``Mcp-Session-Id`` header (Streamable HTTP) and the ``?session_id=`` / ``?sessionId=``
parameter (the legacy HTTP+SSE transport's message endpoint). Servers differ in which
form, and which copy of a repeated one, they read (aiohttp the first value, Starlette
the last), so :func:`presented_ids` refuses anything ambiguous — a repeated or empty id,
an id hidden behind ``;``, a header and a parameter that disagree — and
:meth:`SessionTable.resolve` checks *every* id presented against *both* tables.

The table is bounded per key (a key's own oldest session goes first), so no key can
push another key's sessions out by opening many of its own; the global bound is only a
memory backstop far above the per-key one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

from multidict import MultiMapping

from ...core.errors import BadRequest, Forbidden, NoRoute
from .filter import PendingIds

__all__ = ["SESSION_HEADER", "McpSession", "SessionIds", "SessionTable", "presented_ids"]

SESSION_HEADER = "Mcp-Session-Id"
LEGACY_PARAMS = frozenset({"session_id", "sessionid"})  # compared case-insensitively
MAX_SESSIONS = 50_000  # all keys together (memory backstop)
MAX_SESSIONS_PER_KEY = 500

HTTP, SSE = "http", "sse"
LEGACY_ELSEWHERE = (
    "no such MCP SSE session in this sidecar process: a legacy SSE session lives in the process that holds "
    "its event stream (open the stream through this sidecar, and route a client's requests to one "
    "worker/replica: see docs/mcp.md, 'Legacy SSE needs affinity')"
)


@dataclass
class McpSession:
    """What the sidecar remembers about one upstream session (Streamable HTTP or legacy SSE)."""

    owner: str  # key id
    lists: PendingIds = field(default_factory=PendingIds)  # list ids whose answers may come down a stream
    refusals: PendingIds = field(default_factory=PendingIds)  # legacy SSE: ids answered by a refusal


@dataclass(frozen=True, slots=True)
class SessionIds:
    """The session ids a request presents: the header's and the query's (each at most one)."""

    header: str | None = None
    query: str | None = None

    def __bool__(self) -> bool:
        return self.header is not None or self.query is not None


def _valid(sid: str) -> bool:
    """MCP: a session id is visible ASCII (0x21-0x7E); a comma would read as a list to some servers."""
    # isascii + isprintable is 0x20-0x7E, checked in C (a sealed id is ~120 characters); minus the space.
    return bool(sid) and sid.isascii() and sid.isprintable() and " " not in sid and "," not in sid and ";" not in sid


def presented_ids(headers: MultiMapping[str], raw_query: str) -> SessionIds:
    """The request's session ids, or ``400 bad_request`` for any form two servers could read differently."""
    values = headers.getall(SESSION_HEADER, [])
    if len(values) > 1:
        raise BadRequest("Mcp-Session-Id appears more than once")
    header = values[0].strip() if values else None
    if header is not None and not _valid(header):
        raise BadRequest("Mcp-Session-Id must be one non-empty id of visible ASCII characters")
    found: list[str] = []
    if raw_query:
        for part in raw_query.split("&"):
            pieces = part.split(";")
            for piece in pieces:
                name, _, value = piece.partition("=")
                if unquote_plus(name).strip().lower() not in LEGACY_PARAMS:
                    continue
                if len(pieces) > 1:
                    raise BadRequest("a session id next to ';' in the query is ambiguous: use '&' only")
                found.append(unquote_plus(value))
    if len(found) > 1:
        raise BadRequest("the session id (session_id / sessionId) appears more than once in the query")
    query = found[0] if found else None
    if query is not None and not _valid(query):
        raise BadRequest("the session id in the query must be one non-empty id of visible ASCII characters")
    if header is not None and query is not None and header != query:
        raise BadRequest("Mcp-Session-Id and the query's session id differ")
    return SessionIds(header, query)


class SessionTable:
    """``(upstream, transport, session id) -> McpSession``, bounded per key and in all."""

    def __init__(self, limit: int = MAX_SESSIONS, per_key: int = MAX_SESSIONS_PER_KEY) -> None:
        self.limit = limit
        self.per_key = per_key
        self._items: OrderedDict[tuple[str, str, str], McpSession] = OrderedDict()
        self._by_owner: dict[str, OrderedDict[tuple[str, str, str], None]] = {}

    def get(self, upstream: str, kind: str, sid: str) -> McpSession | None:
        k = (upstream, kind, sid)
        s = self._items.get(k)
        if s is not None:
            self._items.move_to_end(k)
            self._by_owner[s.owner].move_to_end(k)
        return s

    def bind(self, upstream: str, kind: str, sid: str, owner: str) -> McpSession | None:
        """Record a session for ``owner``; None if it is another key's (ownership never moves)."""
        k = (upstream, kind, sid)
        s = self._items.get(k)
        if s is not None:
            if s.owner != owner:
                return None
            self._items.move_to_end(k)
            self._by_owner[owner].move_to_end(k)
            return s
        s = McpSession(owner)
        self._items[k] = s
        mine = self._by_owner.setdefault(owner, OrderedDict())
        mine[k] = None
        while len(mine) > self.per_key:  # the key's own oldest session makes room
            self._drop(next(iter(mine)))
        while len(self._items) > self.limit:  # the biggest holder's oldest goes: a flood evicts its own
            biggest = max(self._by_owner.values(), key=len)
            self._drop(next(iter(biggest)))
        return s

    def forget(self, upstream: str, kind: str, sid: str) -> None:
        self._drop((upstream, kind, sid))

    def _drop(self, k: tuple[str, str, str]) -> None:
        s = self._items.pop(k, None)
        if s is None:
            return
        mine = self._by_owner.get(s.owner)
        if mine is not None:
            mine.pop(k, None)
            if not mine:
                del self._by_owner[s.owner]

    def resolve(
        self,
        upstream: str,
        owner: str,
        ids: SessionIds,
        *,
        post: bool,
        unseal: Callable[[str], str] | None = None,
    ) -> tuple[McpSession | None, McpSession | None, str | None]:
        """``(streamable session, legacy session, upstream session id)`` of a request, checked against its key.

        Every id presented is looked up in the legacy table (raw ids): another key's session,
        in any form, is ``403``. A query id (legacy message POST or any other method) must name
        a legacy session opened through this process (``404`` otherwise: with workers its owner
        is known only where its stream lives, so forwarding it let another key act on it): a
        message's answer goes down that session's event stream, which only this process holds
        and filters. A header id that is not a legacy
        session is a sealed Streamable HTTP session (``sealing.py``): ``unseal`` opens it
        (``403`` for another key's, ``404`` for anything that does not open) and returns the
        upstream's id, which is what goes upstream.
        """
        for sid in {ids.header, ids.query}:
            if sid is None:
                continue
            for kind in (HTTP, SSE):
                s = self._items.get((upstream, kind, sid))
                if s is not None and s.owner != owner:
                    raise Forbidden("this MCP session belongs to another key")
        legacy = None
        if ids.query is not None:
            legacy = self.get(upstream, SSE, ids.query)
            if legacy is None:  # any method: the query names only legacy sessions, whose owner only their process knows
                raise NoRoute(LEGACY_ELSEWHERE)
        http = None
        sid = ids.header
        if sid is not None and legacy is None and self._items.get((upstream, SSE, sid)) is None:
            if unseal is not None:
                sid = unseal(sid)
            http = self.get(upstream, HTTP, sid) or self.bind(upstream, HTTP, sid, owner)
            if http is None:
                raise Forbidden("this MCP session belongs to another key")
        return http, legacy, sid

    def __len__(self) -> int:
        return len(self._items)
