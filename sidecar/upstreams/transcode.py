"""Plex transcode sessions, owned by the key that started them (DESIGN invariant 4).

``start.m3u8`` answers with relative segment URLs and players do not re-attach the key
to them, so requests under ``…/transcode/universal/session/<id>/`` are authorised as the
owning key, and nobody else's key may touch the session.

How ownership stays sound:

- **Every form an id can take is checked.** On any ``…/:/transcode/universal/…`` path the
  ids are the one in the path (``session/<id>/``), the ``session`` and
  ``X-Plex-Session-Identifier`` query parameters (names matched case-insensitively) and
  the ``X-Plex-Session-Identifier`` header. A repeated or empty one is ``400``: aiohttp
  reads the first of two values, other servers the last, so the sidecar refuses to guess.
- **Paths are the upstream's.** The pipeline hands in the canonical, prefix-stripped,
  decoded path (``sidecar.http.canonical``), so ``//video/…`` cannot hide a session, and this
  module reads it as leniently as any upstream could (``\\`` as ``/``, runs of ``/``
  collapsed, letters in any case): ``…/session%2F%2FID/…`` still names ``ID``.
- **One spelling per id.** An id is printable ASCII without spaces (anything else is ``400``),
  and ids are owned case-insensitively: ``sess1``, ``Sess1 `` or ``Sess1%00x`` must not name
  another session for the sidecar while a server that folds case, trims or stops at a NUL
  reads ``Sess1``; a parameter name is read without spaces or control characters
  (``session%00=`` is ``session=``).
- **Claimed late.** ``check`` runs with authorisation (a refusal is free); ``claim`` only
  once the rate limiter has let the request through, so a refused request records nothing.
- **Keyless requests claim nothing, and come from the player.** A segment request without a
  key is authorised as the session's owner only from the address of the owner's latest
  request naming the session (the player that started it fetches its segments), and every id
  it names must already be that owner's (``check_keyless``). Why the address: a session id
  is a bearer capability, and ``/status/sessions`` (``plex:read``) lists every session's id;
  without the binding anyone who read one there could watch that stream, spending the
  owner's budget. A player that moves to another address sends its key again (a new
  ``start.m3u8``), which moves the binding.
- **Bounded per key.** Each key keeps at most ``per_key`` sessions (its oldest goes
  first): a flood evicts only the flooder's own entries. When the whole table is full
  even after dropping expired entries, a key with entries gives up its oldest; a key
  without any is refused (503), never granted another key's slot.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from multidict import MultiMapping

from ..core.errors import BadRequest, Forbidden, ServiceUnavailable

__all__ = ["TranscodeSessions"]

_UNIVERSAL = re.compile(r"^/(?:video|audio|music|photo)/:/transcode/universal(?:/|$)", re.IGNORECASE)
_SESSION_PATH = re.compile(r"^/(?:video|audio|music|photo)/:/transcode/universal/session/([^/]+)(?:/|$)", re.IGNORECASE)
_SLASHES = re.compile(r"/{2,}")
_ID_PARAMS = frozenset({"session", "x-plex-session-identifier"})
_ID_HEADER = "X-Plex-Session-Identifier"
_PRINTABLE = re.compile(r"[!-~]+")  # what an id may be made of: visible ASCII, no space, no control
_UNPRINTABLE = re.compile(r"[^!-~]")  # dropped from parameter names: ``session%00`` or ``session%20`` is ``session``


class TranscodeSessions:
    """Transcode session id -> the key that started it (see the module docstring)."""

    def __init__(
        self,
        ttl: float = 6 * 3600,
        max_sessions: int = 100_000,
        per_key: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.per_key = per_key
        self.clock = clock
        self._owners: dict[str, tuple[str, float, str]] = {}  # id -> (key id, expires, client address)
        self._by_key: dict[str, OrderedDict[str, None]] = {}  # key id -> its ids, least recently claimed first
        self._next_sweep = 0.0  # when a full table may next be swept for expired entries

    @staticmethod
    def untracked(path: str) -> bool:
        """True when this path names no session (nothing to check or claim; repeat hits may be memoised)."""
        return _UNIVERSAL.match(_lenient(path)) is None

    def ids(self, path: str, query: MultiMapping[str], headers: MultiMapping[str] | None = None) -> tuple[str, ...]:
        """Every session id this request names (lower-cased), or ``()`` off the transcode paths. BadRequest if
        ambiguous."""
        path = _lenient(path)
        if _UNIVERSAL.match(path) is None:
            return ()
        found: list[str] = []
        sid = self.session_of(path)
        if sid is not None:
            _one_id("the session in the path", 1, sid, found)
        counts: dict[str, int] = {}
        for name, value in query.items():
            lname = name.lower()
            if _PRINTABLE.fullmatch(lname) is None:  # as a server that trims names or stops at a NUL reads it
                lname = _UNPRINTABLE.sub("", lname)
            if lname in _ID_PARAMS:
                counts[lname] = counts.get(lname, 0) + 1
                _one_id(f"the {name!r} parameter", counts[lname], value, found)
        if headers is not None:
            values = headers.getall(_ID_HEADER, ())
            for i, value in enumerate(values, 1):
                _one_id(f"the {_ID_HEADER} header", i, value, found)
        return tuple(dict.fromkeys(found))

    def check(self, ids: Iterable[str], key_id: str) -> None:
        """Forbidden if another key owns any of ``ids`` (records nothing)."""
        for sid in ids:
            owner = self.owner(sid)
            if owner is not None and owner != key_id:
                raise Forbidden("this transcode session belongs to another key")

    def check_keyless(self, ids: Iterable[str], key_id: str, address: str) -> None:
        """Forbidden unless ``key_id`` already owns every id, claimed from ``address``: a request authorised by
        its session path alone (no key) claims nothing new, or whoever learnt one id could push the owner's
        other sessions out."""
        for sid in ids:
            if self.keyless_owner(sid, address) != key_id:
                raise Forbidden("a request without a key may name only its owner's transcode sessions")

    def claim(self, ids: Iterable[str], key_id: str, address: str) -> None:
        """Record ``key_id`` as the owner of ``ids``, used from ``address`` (after ``check`` and the rate limiter)."""
        ids = tuple(sid.lower() for sid in ids)
        self.check(ids, key_id)  # again: another key may have claimed one while we awaited the limiter
        now = self.clock()
        mine = self._by_key.setdefault(key_id, OrderedDict())
        for sid in ids:
            if sid in mine:
                mine.move_to_end(sid)
            else:
                self._make_room(key_id, mine, now)
                self._by_key.setdefault(key_id, mine)[sid] = None  # _make_room may have dropped an emptied map
            self._owners[sid] = (key_id, now + self.ttl, address)

    def owner(self, session_id: str) -> str | None:
        entry = self._entry(session_id)
        return entry[0] if entry is not None else None

    def keyless_owner(self, session_id: str, address: str) -> str | None:
        """The owner, for a request without a key from ``address``: only the address that last used the
        session with the key (see the module docstring)."""
        entry = self._entry(session_id)
        return entry[0] if entry is not None and entry[2] == address else None

    def _entry(self, session_id: str) -> tuple[str, float, str] | None:
        session_id = session_id.lower()
        entry = self._owners.get(session_id)
        if entry is None:
            return None
        if entry[1] < self.clock():
            self._forget(session_id, entry[0])
            return None
        return entry

    @staticmethod
    def session_of(path: str) -> str | None:
        m = _SESSION_PATH.match(_lenient(path))
        return m.group(1) if m else None

    def __len__(self) -> int:
        return len(self._owners)

    def _make_room(self, key_id: str, mine: OrderedDict[str, None], now: float) -> None:
        """Free one slot for a new id of ``key_id``, taking it only from ``key_id`` itself."""
        while mine:  # the key's own expired entries first (oldest claims expire first)
            oldest = next(iter(mine))
            if self._owners[oldest][1] >= now:
                break
            self._forget(oldest, key_id)
        if len(mine) >= self.per_key:
            self._forget(next(iter(mine)), key_id)
        if len(self._owners) < self.max_sessions:
            return
        if now >= self._next_sweep:  # a full scan, so at most once a minute however hard the table is pushed
            self._next_sweep = now + 60
            for sid, (kid, expires, _) in list(self._owners.items()):
                if expires < now:
                    self._forget(sid, kid)
            if len(self._owners) < self.max_sessions:
                return
        if mine:
            self._forget(next(iter(mine)), key_id)
            return
        raise ServiceUnavailable("too many transcode sessions are open; try again later")

    def _forget(self, session_id: str, key_id: str) -> None:
        self._owners.pop(session_id, None)
        mine = self._by_key.get(key_id)
        if mine is not None:
            mine.pop(session_id, None)
            if not mine:
                del self._by_key[key_id]


def _lenient(path: str) -> str:
    """The decoded path as the most lenient upstream reads it: ``\\`` as ``/``, runs of ``/`` as one
    (``…/session%2F%2FID/…`` decodes to ``…/session//ID/…``, which must still name ``ID``)."""
    if "\\" in path:
        path = path.replace("\\", "/")
    return _SLASHES.sub("/", path) if "//" in path else path


def _one_id(where: str, count: int, value: str, found: list[str]) -> None:
    if count > 1:
        raise BadRequest(f"{where} is repeated; a transcode session is named once")
    if not value.strip():
        raise BadRequest(f"{where} is empty")
    if _PRINTABLE.fullmatch(value) is None:
        raise BadRequest(f"{where} is not a transcode session id (printable ASCII, no spaces)")
    found.append(value.lower())  # owned case-insensitively: one session, however it is spelled
