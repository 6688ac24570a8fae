"""Open streams per key, ended when the key is revoked or expires (security invariant 5).

New requests meet a revoked key at once (the verifier's table changes within a second),
but a websocket, an event stream or a long download authorised minutes ago never asks
again. So every long-lived relay registers here under its key id with a ``closer``; one
task (``run``) looks at the key table every ``interval`` seconds — not a timer per
stream — and ends the streams of every key that is no longer active: websockets with
close code 1008 (policy violation), SSE, MCP streams and downloads by cutting the
client's connection (a truncated body is never mistaken for a whole one). Each ending
is logged and counted in ``sidecar_streams_closed_total{reason}``.

A stream may also carry an end of its own, ``until`` (``scope.until``): the expiry of the
OAuth access token or JWT that opened it. The sweep ends it then (reason ``expired``) even
while its key — a grant a client keeps refreshing, a JWT subject with newer tokens — stays
active: a leaked token's stream never outlives the token. Judged on ``clock``, the
application's ``HighWater`` wall clock, which each sweep reads (a step back revives nothing).

Registration costs two dict operations per streamed response; small answers relayed
whole never register.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter

from ..core.errors import ExpiredKey, Forbidden, RevokedKey

__all__ = ["Closer", "StreamRegistry"]

log = logging.getLogger("sidecar.streams")

Closer = Callable[[str], Awaitable[None]]  # called with the reason ("revoked", "expired", "changed")
Stream = tuple[Closer, object, float | None]  # (closer, granted, until)


class _Watch:
    """``async with registry.watch(key_id, closer):`` around the relay of one stream."""

    __slots__ = ("closer", "granted", "key_id", "registry", "until")

    def __init__(
        self, registry: StreamRegistry, key_id: str, closer: Closer, granted: object = None, until: float | None = None
    ) -> None:
        self.registry, self.key_id, self.closer, self.granted, self.until = registry, key_id, closer, granted, until

    async def __aenter__(self) -> _Watch:
        if self.key_id:
            self.registry._open.setdefault(self.key_id, {})[id(self)] = (self.closer, self.granted, self.until)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        streams = self.registry._open.get(self.key_id)
        if streams is not None:
            streams.pop(id(self), None)
            if not streams:
                del self.registry._open[self.key_id]


class _Wait:
    """``async with registry.waiting(key_id):`` around a wait for the upstream's answer (nothing sent yet).

    An upstream may take its whole ``read_timeout`` (a minute, for a slow Plex or an MCP tool
    answering as JSON) before its headers; a request of a key revoked meanwhile must not be
    answered then. The sweep cancels the wait (closing the upstream request) and the client
    gets ``401 revoked_key``/``expired_key``: nothing had been sent, so a designed answer can be.
    No task of its own: the closer cancels the waiting task, and only while it is inside.
    """

    __slots__ = ("ended", "granted", "inside", "key_id", "registry", "task", "until")

    def __init__(
        self, registry: StreamRegistry, key_id: str, granted: object = None, until: float | None = None
    ) -> None:
        self.registry, self.key_id, self.granted, self.until = registry, key_id, granted, until
        self.task: asyncio.Task[object] | None = None
        self.ended: str | None = None
        self.inside = False

    async def _close(self, reason: str) -> None:
        # Run by the sweep's task: the waiting task is suspended, inside the block or gone past it.
        if self.inside and self.ended is None and self.task is not None:
            self.ended = reason
            self.task.cancel()

    async def __aenter__(self) -> _Wait:
        self.task = asyncio.current_task()
        if self.key_id and self.task is not None:
            self.inside = True
            self.registry._open.setdefault(self.key_id, {})[id(self)] = (self._close, self.granted, self.until)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.inside:
            return
        self.inside = False
        streams = self.registry._open.get(self.key_id)
        if streams is not None:
            streams.pop(id(self), None)
            if not streams:
                del self.registry._open[self.key_id]
        # uncancel() first, always: ours is answered; another (the client going away) stays a cancel.
        ended = self.ended is not None and self.task is not None and self.task.uncancel() == 0
        if ended and et is asyncio.CancelledError:
            if self.ended == "expired":
                raise ExpiredKey("this API key has expired") from None
            if self.ended == "changed":
                raise Forbidden("this API key's permissions changed while the upstream answered") from None
            raise RevokedKey("this API key has been revoked") from None


class StreamRegistry:
    """Key id -> its open streams' closers; ``sweep`` ends those of keys no longer active.

    ``state(key_id)`` answers ``active``, ``revoked`` or ``expired`` from the verifier's
    table (a key gone from the table counts as revoked). ``granted(key_id)``, when given, is
    what the key may reach now (its permissions; None: not known): a stream registered with
    another ``granted`` than the key has now is ended too (reason ``changed``), because an
    operator who narrows a key expects its open websocket to a path it lost to stop; the
    client reconnects, and is authorised again, if it still may.
    """

    def __init__(
        self,
        state: Callable[[str], str],
        registry: CollectorRegistry | None = None,
        granted: Callable[[str], object] | None = None,
    ) -> None:
        self.state = state
        self.granted = granted
        self.clock: Callable[[], float] = time.time  # for ``until``: the application sets its HighWater
        self._open: dict[str, dict[int, Stream]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.closed = Counter(
            "sidecar_streams_closed",
            "Open streams (websockets, SSE, MCP streams, downloads) ended because their key was revoked or expired",
            ["reason"],
            registry=registry,
        )

    def watch(self, key_id: str, closer: Closer, granted: object = None, until: float | None = None) -> _Watch:
        """``granted``: the key's permissions the stream was authorised under (None: not rechecked);
        ``until``: the stream's own end, the expiry of the token that opened it (None: its key's)."""
        return _Watch(self, key_id, closer, granted, until)

    def waiting(self, key_id: str, granted: object = None, until: float | None = None) -> _Wait:
        return _Wait(self, key_id, granted, until)

    def open_streams(self, key_id: str) -> int:
        return len(self._open.get(key_id, ()))

    def sweep(self) -> int:
        """End the streams of every key that is no longer active; how many were ended."""
        ended = 0
        now = self.clock()  # read every sweep, also with no stream open: the HighWater sees the time
        for key_id in list(self._open):
            reason = self.state(key_id)
            if reason == "active":
                ended += self._recheck(key_id, self.granted(key_id) if self.granted is not None else None, now)
                continue
            closers = [c for c, _, _ in self._open.pop(key_id).values()]
            ended += self._end(key_id, closers, reason)
        return ended

    def _recheck(self, key_id: str, granted_now: object, now: float) -> int:
        """End the streams of an active key whose own ``until`` has come, or that were authorised under
        other permissions (or secret, or upstream identity) than it has now."""
        streams = self._open[key_id]
        expired, changed = [], []
        for i, (_, granted, until) in streams.items():
            if until is not None and until <= now:
                expired.append(i)
            elif granted is not None and granted_now not in (None, granted):  # identity, then ==
                changed.append(i)
        if not expired and not changed:
            return 0
        ended = 0
        for ids, reason in ((expired, "expired"), (changed, "changed")):
            if ids:
                ended += self._end(key_id, [streams.pop(i)[0] for i in ids], reason)
        if not streams:
            del self._open[key_id]
        return ended

    def _end(self, key_id: str, closers: list[Closer], reason: str) -> int:
        self.closed.labels(reason=reason).inc(len(closers))
        log.warning("closing %d open stream(s) of key %s: key %s", len(closers), key_id, reason)
        for close in closers:
            task = asyncio.create_task(self._close(close, reason))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return len(closers)

    @staticmethod
    async def _close(close: Closer, reason: str) -> None:
        try:
            await close(reason)
        except Exception as e:  # a stream that is already going away: nothing left to end
            log.debug("closing a stream failed: %s", type(e).__name__)

    async def run(self, interval: float) -> None:
        """Sweep every ``interval`` seconds forever (one task for all streams)."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
            except Exception:  # never let a bug here end revocation checks
                log.exception("stream revocation sweep failed")

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
