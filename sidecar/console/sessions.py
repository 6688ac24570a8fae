"""Console sign-in state: server-side sessions, CSRF tokens, the sign-in throttle, one-time links.

A session lives in this process's memory only; the browser holds a random id (256 bits) in
a cookie that is ``HttpOnly`` and ``SameSite=Strict``, and, when the admin listener speaks
TLS, ``Secure`` with the ``__Host-`` prefix (no Domain, Path=/: no sibling host can plant or
shadow it). The table is keyed by a hash of the id, so not even a memory dump of the table
yields a cookie that works. A session ends after ``admin.console.session_idle`` without a
request, ``session_lifetime`` after sign-in whatever happens, at sign-out, or when the table
is full and it is the least recently used one of the actor (admin token, or key) holding the most.

Each session carries its own CSRF token (the synchronizer-token pattern): every form that
changes something sends it back and it is compared in constant time. Creation and rotation
forms also carry a one-time nonce, so reloading the page that shows a new key does not
make a second key.

Failed sign-ins are throttled per client address (an IPv6 /64 counts as one, as for failed
keys: ``auth.verify.throttle_bucket``): past ``keys.failed_attempts_per_minute`` in a
minute, the token is not even compared until the window has room again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..auth.verify import throttle_bucket

__all__ = [
    "COOKIE",
    "COOKIE_TLS",
    "LINK_TTL",
    "OneTimeLinks",
    "Session",
    "SessionStore",
    "SignInThrottle",
    "cookie_name",
]

COOKIE = "sidecar_console"  # a sidecar_* name: the proxy never forwards it to an upstream (http/browser.py)
COOKIE_TLS = "__Host-sidecar_console"  # the prefix browsers enforce: Secure, Path=/, no Domain
LINK_TTL = 120.0  # a one-time sign-in link (``sidecar demo``) works this long, once
THROTTLE_WINDOW = 60.0
MAX_TRACKED = 10_000  # failing addresses remembered (bounded under a flood)
MAX_NONCES = 64  # one-time form nonces outstanding per session
MAX_LINKS = 16


def cookie_name(secure: bool) -> str:
    return COOKIE_TLS if secure else COOKIE


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(slots=True)
class Session:
    """One signed-in browser."""

    actor: str  # what the audit log says: "console", or "console:key:<id>" for a key with admin
    key_id: str | None  # the admin key signed in with; None for the admin token
    created: float
    seen: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    nonces: OrderedDict[str, None] = field(default_factory=OrderedDict, repr=False)
    flash: str = ""  # one message for the next page ("Key revoked.")

    def take_flash(self) -> str:
        message, self.flash = self.flash, ""
        return message

    def check_csrf(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), self.csrf.encode())  # type: ignore[union-attr]

    def nonce(self) -> str:
        """A one-time value for a form whose second submission must not act again."""
        value = secrets.token_urlsafe(16)
        self.nonces[value] = None
        while len(self.nonces) > MAX_NONCES:
            self.nonces.popitem(last=False)
        return value

    def spend_nonce(self, value: str | None) -> bool:
        return bool(value) and self.nonces.pop(value or "", 0) is None


class SessionStore:
    def __init__(self, *, idle: float, lifetime: float, max_sessions: int, clock: Callable[[], float]) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self.clock = clock  # steady: a wall-clock step neither ends nor extends sessions
        self._table: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def create(self, actor: str, key_id: str | None = None) -> tuple[str, Session]:
        """A new session and the id for its cookie (never reused: no session fixation)."""
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(actor=actor, key_id=key_id, created=now, seen=now)
        self._table[_digest(sid)] = session
        while len(self._table) > self.max_sessions:
            self._evict()
        return sid, session

    def _evict(self) -> None:
        """The table is full: the least recently used session of the actor holding the most goes, so one
        credential signing in again and again drops its own sessions, not an operator's."""
        counts = Counter(s.actor for s in self._table.values())
        top = max(counts.values())
        victim = next(h for h, s in self._table.items() if counts[s.actor] == top)  # least recently used first
        del self._table[victim]

    def get(self, sid: str | None) -> Session | None:
        """The live session for a cookie value (and note the activity), or None."""
        if not sid or len(sid) > 100:
            return None
        h = _digest(sid)
        session = self._table.get(h)
        if session is None:
            return None
        now = self.clock()
        if now - session.seen > self.idle or now - session.created > self.lifetime:
            del self._table[h]
            return None
        session.seen = now
        self._table.move_to_end(h)
        return session

    def end(self, sid: str | None) -> None:
        if sid:
            self._table.pop(_digest(sid), None)

    def end_key(self, key_id: str) -> None:
        """End every session signed in with this key (it was revoked, or lost ``admin``)."""
        for h in [h for h, s in self._table.items() if s.key_id == key_id]:
            del self._table[h]


class SignInThrottle:
    """Failed sign-ins per address bucket within a sliding minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def wait(self, ip: str) -> float:
        """Seconds before this address may try again; 0 when it may now."""
        q = self._failures.get(throttle_bucket(ip))
        if not q:
            return 0.0
        now = self.clock()
        while q and q[0] <= now - THROTTLE_WINDOW:
            q.popleft()
        if len(q) < self.per_minute:
            return 0.0
        return q[0] + THROTTLE_WINDOW - now

    def fail(self, ip: str) -> None:
        bucket = throttle_bucket(ip)
        q = self._failures.get(bucket)
        if q is None:
            if len(self._failures) >= MAX_TRACKED:
                self._failures.clear()  # bounded memory beats perfect bookkeeping under attack
            q = self._failures[bucket] = deque(maxlen=self.per_minute)
        q.append(self.clock())


class OneTimeLinks:
    """Sign-in links for ``sidecar demo``: each works once, within ``LINK_TTL`` seconds."""

    def __init__(self, clock: Callable[[], float], ttl: float = LINK_TTL) -> None:
        self.clock = clock
        self.ttl = ttl
        self._links: OrderedDict[str, float] = OrderedDict()

    def issue(self) -> str:
        token = secrets.token_urlsafe(32)
        self._links[_digest(token)] = self.clock() + self.ttl
        while len(self._links) > MAX_LINKS:
            self._links.popitem(last=False)
        return token

    def redeem(self, token: str) -> bool:
        """True once for a live link; a second use, a stale or an unknown one is False."""
        if not token or len(token) > 100:
            return False
        ends = self._links.pop(_digest(token), None)
        return ends is not None and self.clock() < ends
