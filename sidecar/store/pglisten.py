"""The PostgreSQL store's connection to change: LISTEN with reconnects, and its error wording.

``Listener`` holds one dedicated connection that LISTENs on the keys channel. When the
connection drops (a database restart, a failover, a network cut) it says so (``on_down``),
reconnects with exponential back-off and jitter (100 ms doubling to ``max_backoff``), and
on every (re)connection calls ``on_up``: the store then catches up with whatever changed
while nobody was listening. A keep-alive query every ``keepalive`` seconds finds a
connection that died without a goodbye (a cut cable sends none). A half-open socket gives
no error until that query times out, so ``fresh`` says whether the connection proved itself
(connected, a notification, a keep-alive answer) within ``STALE`` seconds: when it did not,
the store reads by ``seq`` on every poll instead of trusting that silence means no change
(a revocation reaches the replica within 1 s even then).

``wrap`` turns asyncpg's and the OS's errors into ``StoreError`` with the database named
by ``describe_dsn`` (host, port, database: never the user or the password); a fault of
the connection gets ``reason="unavailable"``, so the admin API answers 503 and the CLI
exits 75 (try again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from .base import StoreError

__all__ = ["KEEPALIVE", "STALE", "Listener", "is_connection_error", "wrap"]

log = logging.getLogger("sidecar.store")

KEEPALIVE = 0.25  # seconds between keep-alive queries on the LISTEN connection (one SELECT 1)
STALE = 0.75  # a listener silent this long is not trusted: polls read by seq (revocation within 1 s)
_CONNECTION_STATES = ("08", "57P01", "57P02", "57P03", "53300")  # connection exception, shutdown, too many


def is_connection_error(e: BaseException) -> bool:
    """Is this the connection failing (retry later), rather than the statement being refused?"""
    if isinstance(e, OSError | TimeoutError | asyncpg.InterfaceError | ConnectionError):
        return True
    if isinstance(e, asyncpg.PostgresError):
        state = getattr(e, "sqlstate", "") or ""
        return state.startswith(_CONNECTION_STATES)
    return False


def wrap(e: BaseException, where: str) -> StoreError:
    """The error as the API and CLI show it; the message names the database, never its credentials."""
    if isinstance(e, StoreError):
        return e
    if is_connection_error(e):
        detail = type(e).__name__ if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
        return StoreError(f"the key database ({where}) is unreachable ({detail}); try again", "unavailable")
    if isinstance(e, asyncpg.UniqueViolationError):
        return StoreError("a key with that id already exists")
    return StoreError(f"key database ({where}): {type(e).__name__}: {e}")


class Listener:
    """One LISTENing connection, kept alive and reconnected (see the module docstring)."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        channel: str,
        *,
        where: str,
        on_notify: Callable[[], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
        keepalive: float = KEEPALIVE,
        timeout: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        self._connect = connect
        self.channel = channel
        self.where = where
        self._on_notify, self._on_up, self._on_down = on_notify, on_up, on_down
        self.keepalive = keepalive
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.listening = False
        self.reconnects = 0  # connections made after the first (sidecar_store_reconnects_total, tests)
        self.connected = asyncio.Event()  # set while listening
        self.alive_at = 0.0  # monotonic time the connection last proved it delivers (``fresh``)
        self._conn: Any = None

    @property
    def fresh(self) -> bool:
        """Listening, and heard from within ``STALE`` s: silence on it means nothing changed."""
        return self.listening and time.monotonic() - self.alive_at < STALE

    def _notified(self, *_: Any) -> None:
        self.alive_at = time.monotonic()
        self._on_notify()

    async def run(self) -> None:
        """Forever (a task): listen, and reconnect whenever the connection goes."""
        delay = 0.1
        first = True
        down_since: float | None = None
        while True:
            lost = asyncio.Event()
            try:
                self._conn = await self._connect()
                self._conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await self._conn.add_listener(self.channel, self._notified)
                self.listening = True
                self.alive_at = time.monotonic()
                self.connected.set()
                if not first:
                    self.reconnects += 1
                if down_since is not None:
                    log.warning("key database (%s) is back after %.1fs: listening again", self.where,
                                time.monotonic() - down_since)  # fmt: skip
                    down_since = None
                first = False
                delay = 0.1
                self._on_up()
                await self._watch(lost)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if down_since is None:
                    log.warning("key database (%s): lost the LISTEN connection (%s); reconnecting with back-off",
                                self.where, wrap(e, self.where))  # fmt: skip
            finally:
                was = self.listening
                self.listening = False
                self.connected.clear()
                await self._drop()
            if down_since is None:
                down_since = time.monotonic()
            if was:
                self._on_down()
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
            delay = min(self.max_backoff, delay * 2)

    async def _watch(self, lost: asyncio.Event) -> None:
        """Return when the connection is gone: closed by the server, or silent to a keep-alive."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self.keepalive)
            if not lost.is_set():
                await self._conn.execute("SELECT 1", timeout=self.timeout)
                self.alive_at = time.monotonic()  # notifications sent before it were delivered before its answer
        raise ConnectionError("the server closed the connection")

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # no goodbye needed: the server cleans up a vanished session

    async def close(self) -> None:
        await self._drop()
