"""The response cache: in memory, LRU by bytes, rule-driven, safe across keys.

Nothing is cached without a rule (``cache.rules``: upstream, path glob, TTL, …); what
may be stored and under which key is decided in ``sidecar.cache.policy`` (pure). This
module serves, coalesces and refreshes; ``sidecar.cache.store`` keeps the entries (LRU, purge).

Where it sits. The pipeline authenticates, authorizes and rate-limits *before* calling
``hit`` or ``serve``, so a hit is never served to a key that may not see the path.
``hit`` answers a fresh entry straight from the client's request, before anything is
prepared for the upstream (keys are computed from the client's request: see
``sidecar.cache.policy``); that is most of why a hit costs a fraction of a proxied
request. Everything else goes through ``serve``, which answers from memory or calls
the pipeline's ``fetch(tap, on_headers)``, which
streams the upstream's answer to the client through ``Forwarder`` as usual while the
``tap`` records the raw bytes (up to the rule's ``max_object_bytes``; a bigger body
stops being recorded and streams on untouched).

Scrubbing and caching. An entry holds the upstream's answer as it arrived, *before*
the per-client ``ResponseFilter`` (the Plex ``ScrubFilter`` that swaps the real token
for the client's own key). Every answer, hit or miss, goes through the requesting
client's filter, so a stored body never holds any client's key, and one client's key
can never be served to another. Entries are keyed by the upstream identity (the token
in use, hashed), so the token in a stored body is always the one that client's filter
replaces. An entry in which the token appears nowhere (and whose body is not encoded)
is ``plain`` and a hit sends its stored bytes as they are; otherwise the filter runs over
it (one ``bytes.replace``, after a decompression for gzip) or refuses it (``Unscrubbable``:
a 502, as for a fresh answer; see ``sidecar.upstreams.scrub``).

Coalescing. Concurrent misses for one key make one upstream request: the first
becomes the leader, the rest wait. The leader releases them as soon as it knows: at
the headers when the answer is not storable (they then make their own requests at
once), when the body outgrows the limit, or when the entry is stored (they re-read it
as HITs). A leader that fails (its client left, the upstream broke) lets one follower
lead the next round.

Staleness. With ``stale_while_revalidate`` an expired entry is served ``STALE`` while
one background request refreshes it; with ``stale_if_error`` an expired entry is
served ``STALE`` when the upstream is down or answers 5xx.

Purge: ``purge(upstream=, path_glob=)`` (``DELETE /admin/cache``). A config reload
(none yet) must call ``purge(upstream=id)`` for every upstream whose URL, token or
rules changed. A purge also voids fills in flight when it happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from ..config import CacheConfig, CacheRule, UpstreamConfig
from ..core.errors import UpstreamTimeout, UpstreamUnavailable
from ..core.relay import HOP_BY_HOP, ResponseFilter, ResponseTap, as_sent
from ..core.scope import RequestScope
from ..upstreams.scrub import ScrubFilter, Unscrubbable
from .policy import (
    CONDITIONAL_HEADERS,
    CacheKey,
    Storable,
    compile_glob,
    normalise_query,
    origin_of,
    primary_key,
    request_bypass,
    storable,
    variant_key,
)
from .store import Entry, EntryStore

__all__ = ["Entry", "Fetch", "OnHeaders", "ResponseCache"]

OnHeaders = Callable[[int, CIMultiDict[str]], None]
Fetch = Callable[[ResponseTap | None, OnHeaders], Awaitable[web.StreamResponse]]

HIT, MISS, BYPASS, EXPIRED, STALE = "HIT", "MISS", "BYPASS", "EXPIRED", "STALE"
COALESCE_WAIT: Final = 30.0  # longest a follower waits for its leader before going alone

_STORED, _PASS, _FAILED = "stored", "pass", "failed"


@dataclass(slots=True, eq=False)
class _Flight:
    """One fill in progress; followers wait on ``done``."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str = ""

    def finish(self, outcome: str) -> None:
        if not self.outcome:
            self.outcome = outcome
            self.done.set()


class _UseStale(Exception):
    """Raised from the tap at the headers of a 5xx when a stale entry may stand in."""


@dataclass(slots=True, eq=False)
class _Ask:
    """One request's business with the cache: what it needs to look up, fetch and answer."""

    request: web.Request
    scope: RequestScope
    response_filter: ResponseFilter | None
    on_headers: OnHeaders | None
    plain_ok: bool  # the filter is a no-op on entries marked plain
    upstream: UpstreamConfig
    rule: CacheRule
    path: str
    url: URL
    headers: CIMultiDict[str]  # going upstream
    token: bytes  # the upstream identity, for the token-free check when storing (never stored)
    fetch: Fetch


class ResponseCache(EntryStore):
    """Interface used by the pipeline and admin API:

    ``rule_for(upstream_id, method, path) -> CacheRule | None``;
    ``primary(request, upstream_id, rule, identity, client_key) -> CacheKey``;
    ``hit(request, scope, primary, identity, …) -> web.Response | None``;
    ``await serve(request, scope, upstream, rule, path, url, headers, identity, client_key, fetch, …)``;
    ``purge(upstream=None, path_glob=None) -> int``; ``await close()``.
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sessions: Mapping[str, aiohttp.ClientSession] | None = None,
    ) -> None:
        super().__init__(config.max_bytes, clock)
        self.config = config
        self.sessions = sessions if sessions is not None else {}
        self.waiting = 0  # requests waiting on another's fill right now
        self._salt = os.urandom(16)  # identities are keyed digests in keys: no token is guessable from them
        self._flights: dict[CacheKey, _Flight] = {}
        self._refreshing: set[CacheKey] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._rules: dict[str, list[tuple[CacheRule, re.Pattern[str]]]] = {}
        if config.max_bytes > 0:
            for rule in config.rules:
                self._rules.setdefault(rule.upstream, []).append((rule, compile_glob(rule.path)))

    # ------------------------------------------------------------------ lookup

    def rule_for(self, upstream_id: str, method: str, path: str) -> CacheRule | None:
        """The first rule for this upstream whose methods and path glob match, if any."""
        for rule, pattern in self._rules.get(upstream_id, ()):
            if method in rule.methods and pattern.match(path):
                return rule
        return None

    def primary(
        self, request: web.Request, upstream_id: str, rule: CacheRule, identity: str, client_key: str
    ) -> CacheKey:
        """The request's primary key: from the client's request alone (see ``sidecar.cache.policy``)."""
        url = request.rel_url
        query = normalise_query(url.query.items(), client_key) if url.raw_query_string else ()
        h = request.headers
        origin = origin_of(request.scheme, h)
        return primary_key(self._salt, upstream_id, identity, url.raw_path, query, rule.vary, h, origin)

    def hit(
        self,
        request: web.Request,
        scope: RequestScope,
        primary: CacheKey,
        identity: str,
        *,
        response_filter: ResponseFilter | None = None,
        on_headers: OnHeaders | None = None,
    ) -> web.Response | None:
        """The answer from a fresh entry, or None: then prepare the upstream request and ``serve``.

        Looked up from the client's request alone, so a hit skips every rewrite meant for
        the upstream. Stale entries, misses and coalescing need that request: not here.
        The caller has checked ``request_bypass``.
        """
        entry = self.fresh(request, primary)
        if entry is None:
            return None
        plain_ok = _plain_ok(response_filter, identity)
        return self._answer(request, scope, response_filter, plain_ok, on_headers, entry, HIT, self.clock())

    def fresh(self, request: web.Request, primary: CacheKey) -> Entry | None:
        """The fresh entry this request's variant of ``primary`` names, if any (no bypass check)."""
        entry = self._entries.get(variant_key(primary, self._variants.get(primary, ()), request.headers))
        if entry is None or self.clock() >= entry.fresh_until:
            return None
        return entry

    def answer_unfiltered(
        self, request: web.Request, scope: RequestScope, entry: Entry, on_headers: OnHeaders | None
    ) -> web.Response:
        """A HIT for a request whose response filter would change nothing on this entry (the caller checked)."""
        return self._answer(request, scope, None, True, on_headers, entry, HIT, self.clock())

    async def serve(
        self,
        request: web.Request,
        scope: RequestScope,
        upstream: UpstreamConfig,
        rule: CacheRule,
        path: str,
        url: URL,
        headers: CIMultiDict[str],
        identity: str,
        client_key: str,
        fetch: Fetch,
        *,
        response_filter: ResponseFilter | None = None,
        on_headers: OnHeaders | None = None,
        waiting: Callable[[], contextlib.AbstractAsyncContextManager[object]] | None = None,
    ) -> web.StreamResponse:
        """Answer from the cache, or fetch (filling the cache when the answer is storable).

        ``waiting()``: held around a follower's wait for its leader, so that the wait ends (401)
        when the follower's own key is revoked or expires meanwhile (``http.streams``, invariant 5).

        ``path`` is the upstream-relative path the rule matched (what purge globs see).
        ``url`` and ``headers`` are the ones going upstream; ``fetch`` sends them, so edits
        made here (conditional headers dropped on a fill) reach the upstream. ``identity``
        is the upstream credential in use: entries for different identities are never
        shared. ``client_key`` is the key the client presented (kept out of the cache key).
        """
        if request_bypass(request.method, request.headers) is not None:
            scope.cache = BYPASS
            return await fetch(None, _tagger(BYPASS, on_headers))
        ask = _Ask(
            request, scope, response_filter, on_headers, _plain_ok(response_filter, identity),
            upstream, rule, path, url, headers, identity.encode(), fetch,
        )  # fmt: skip
        primary = self.primary(request, upstream.id, rule, identity, client_key)
        rounds = 0
        while True:
            key = variant_key(primary, self._variants.get(primary, ()), request.headers)
            now = self.clock()
            entry = self._entries.get(key)
            if entry is not None:
                if now < entry.fresh_until:
                    return self._reply(ask, entry, HIT, now)
                if now < entry.stale_revalidate_until:
                    self._revalidate(ask, entry)
                    return self._reply(ask, entry, STALE, now)
            label = EXPIRED if entry is not None else MISS
            if request.method != "GET":
                return await self._pass(ask, label)  # a HEAD is answered from a GET entry, never fills one
            flight = self._flights.get(key)
            if flight is None:
                return await self._lead(ask, key, primary, entry, label)
            rounds += 1
            self.waiting += 1
            try:
                async with (
                    waiting() if waiting is not None else contextlib.nullcontext(),
                    asyncio.timeout(min(COALESCE_WAIT, upstream.read_timeout)),
                ):
                    await flight.done.wait()
            except TimeoutError:
                pass  # the leader is too slow: go alone (below)
            finally:
                self.waiting -= 1
            if flight.outcome == _STORED and rounds < 3:
                continue  # read it back (its Vary may send this request to another entry)
            if flight.outcome == _FAILED and entry is not None and self.clock() < entry.stale_error_until:
                return self._reply(ask, entry, STALE, self.clock())
            if flight.outcome != _FAILED or rounds >= 2:
                return await self._pass(ask, label)
            # The leader failed (its client left, the upstream broke): one of us leads the next round.

    async def _pass(self, ask: _Ask, label: str, tap: ResponseTap | None = None) -> web.StreamResponse:
        ask.scope.cache = label
        return await ask.fetch(tap, _tagger(label, ask.on_headers))

    async def _lead(
        self, ask: _Ask, key: CacheKey, primary: CacheKey, entry: Entry | None, label: str
    ) -> web.StreamResponse:
        flight = self._flights[key] = _Flight()
        for name in CONDITIONAL_HEADERS:
            ask.headers.popall(name, None)  # fill with a full answer, never a 304
        tap = _Recorder(self, flight, ask, primary, entry)
        try:
            return await self._pass(ask, label, tap)
        except _UseStale:
            assert entry is not None  # the tap raises it only with an entry to serve
            flight.finish(_FAILED)
            return self._reply(ask, entry, STALE, self.clock())
        except (UpstreamUnavailable, UpstreamTimeout):
            now = self.clock()
            if entry is None or now >= entry.stale_error_until:
                raise
            flight.finish(_FAILED)
            return self._reply(ask, entry, STALE, now)
        finally:
            flight.finish(_FAILED)
            if self._flights.get(key) is flight:
                del self._flights[key]

    def _reply(self, ask: _Ask, entry: Entry, label: str, now: float) -> web.Response:
        a = ask
        return self._answer(a.request, a.scope, a.response_filter, a.plain_ok, a.on_headers, entry, label, now)

    def _answer(
        self,
        request: web.Request,
        scope: RequestScope,
        rf: ResponseFilter | None,
        plain_ok: bool,
        on_headers: OnHeaders | None,
        entry: Entry,
        label: str,
        now: float,
    ) -> web.Response:
        """Build the answer from stored bytes: no upstream, no session, at most one filter pass."""
        scope.cache = label
        try:
            self._entries.move_to_end(entry.key)
        except KeyError:
            pass  # evicted or superseded since it was looked up: still a valid answer for this request
        status = entry.status
        if rf is None or (entry.plain and plain_ok):
            response = web.Response(status=status, headers=entry.headers, body=entry.body)
        else:
            headers = entry.headers.copy()
            body = entry.body
            if rf.headers(status, headers):
                body = rf.feed(body) + rf.flush()
            response = web.Response(status=status, headers=headers, body=body)
        out = response.headers
        if on_headers is not None:
            on_headers(status, out)
        out["X-Cache-Status"] = label
        out["Age"] = str(entry.age + max(0, int(now - entry.stored_at)))
        inm = request.headers.get("If-None-Match")
        if inm is not None and "ETag" in out and _etag_matches(inm, out["ETag"]):
            return web.Response(status=304, headers=_not_modified(out))
        return response

    # ------------------------------------------------------------------ background refresh

    def _revalidate(self, ask: _Ask, entry: Entry) -> None:
        """Refresh a stale entry once, in the background (stale-while-revalidate)."""
        session = self.sessions.get(ask.upstream.id)
        if session is None or entry.key in self._refreshing:
            return
        self._refreshing.add(entry.key)
        headers = ask.headers.copy()
        for name in (*CONDITIONAL_HEADERS, "Range"):
            headers.popall(name, None)
        task = asyncio.create_task(
            self._refresh(session, entry, ask.rule, ask.upstream, ask.url, headers, ask.request.headers, ask.token)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(
        self,
        session: aiohttp.ClientSession,
        entry: Entry,
        rule: CacheRule,
        upstream: UpstreamConfig,
        url: URL,
        headers: CIMultiDict[str],
        client_headers: MultiMapping[str],
        token: bytes,
    ) -> None:
        generation = self._generation
        try:
            async with asyncio.timeout(upstream.read_timeout):
                async with session.get(url, headers=headers, allow_redirects=False) as resp:
                    try:  # ``Transfer-Encoding: gzip, chunked`` is opaque bytes: refused on a fill, never stored here
                        ScrubFilter.check_framing(resp.headers)
                    except Unscrubbable:
                        return  # the stale copy stays until it runs out
                    out = CIMultiDict((k, as_sent(v)) for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP)
                    verdict = storable(resp.status, out, rule, now=self.clock())
                    if verdict is None:
                        if resp.status < 500:
                            self._drop(entry)  # the upstream no longer lets it be cached
                        return
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in resp.content.iter_any():
                        size += len(chunk)
                        if size > rule.max_object_bytes:
                            self._drop(entry)
                            return
                        chunks.append(chunk)
                    body = b"".join(chunks)
                    if generation == self._generation and out.get("Content-Length", str(len(body))) == str(len(body)):
                        self._store(
                            entry.primary, entry.upstream, entry.path, resp.status, out, body, verdict,
                            client_headers, token,
                        )  # fmt: skip
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass  # keep serving the stale copy until it runs out
        finally:
            self._refreshing.discard(entry.key)

    async def close(self) -> None:
        """Cancel background refreshes (the app calls this on shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()


class _Recorder:
    """The tap of one fill: decides at the headers, buffers up to the limit, stores at the end."""

    __slots__ = ("_ask", "_cache", "_chunks", "_entry", "_flight", "_generation", "_headers", "_primary", "_size",
                 "_status", "_verdict")  # fmt: skip

    def __init__(
        self, cache: ResponseCache, flight: _Flight, ask: _Ask, primary: CacheKey, entry: Entry | None
    ) -> None:
        self._cache = cache
        self._flight = flight
        self._ask = ask
        self._primary = primary
        self._entry = entry
        self._generation = cache._generation
        self._chunks: list[bytes] = []
        self._size = 0
        self._status = 0
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._verdict: Storable | None = None

    def start(self, status: int, headers: CIMultiDict[str]) -> bool:
        entry = self._entry
        now = self._cache.clock()
        if status >= 500 and entry is not None and now < entry.stale_error_until:
            raise _UseStale
        verdict = storable(status, headers, self._ask.rule, now=now)
        if verdict is None:
            if entry is not None and status < 500:
                self._cache._drop(entry)  # superseded by an answer that may not be stored
            self._flight.finish(_PASS)
            return False
        self._status, self._headers, self._verdict = status, headers, verdict
        return True

    def feed(self, chunk: bytes) -> bool:
        self._size += len(chunk)
        if self._size > self._ask.rule.max_object_bytes:
            self._chunks.clear()
            self._flight.finish(_PASS)  # followers need not wait for a body that will not be kept
            return False
        self._chunks.append(chunk)
        return True

    def end(self) -> None:
        body = b"".join(self._chunks)
        self._chunks.clear()
        ask, verdict = self._ask, self._verdict
        ok = (
            verdict is not None
            and self._generation == self._cache._generation  # no purge since the fill began
            and self._headers.get("Content-Length", str(len(body))) == str(len(body))
            and self._cache._store(
                self._primary, ask.upstream.id, ask.path, self._status, self._headers, body, verdict,
                ask.request.headers, ask.token,
            )
        )  # fmt: skip
        self._flight.finish(_STORED if ok else _PASS)


def _plain_ok(response_filter: ResponseFilter | None, identity: str) -> bool:
    """A ScrubFilter for this very token changes nothing on an entry the token is absent from."""
    return response_filter is None or (
        isinstance(response_filter, ScrubFilter) and response_filter.token == identity.encode()
    )


def _tagger(label: str, on_headers: OnHeaders | None) -> OnHeaders:
    def tag(status: int, headers: CIMultiDict[str]) -> None:
        if on_headers is not None:
            on_headers(status, headers)
        headers["X-Cache-Status"] = label

    return tag


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison (RFC 9110 §13.1.2), as If-None-Match uses."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    want = etag.strip().removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == want for tag in if_none_match.split(","))


# What a 304 keeps of the 200 it stands for (RFC 9110 §15.4.5), plus the sidecar's own fields.
_NOT_MODIFIED_KEEP = frozenset({"etag", "cache-control", "content-location", "date", "expires", "vary",
                                "last-modified", "age", "x-cache-status"})  # fmt: skip


def _not_modified(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname in _NOT_MODIFIED_KEEP or lname.startswith(("ratelimit", "x-ratelimit")):
            out.add(name, value)
    return out
