"""The pool's answer (``sidecar.http.pool``): the subset of aiohttp's response and reader the forwarder reads.

The body arrives in the connection's ``data_received`` and waits here until read; past
``HIGH_WATER`` unread bytes the connection stops reading (backpressure), below ``CHUNK`` it
reads again.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from multidict import CIMultiDictProxy

from .outbound import CHUNK

if TYPE_CHECKING:
    from .pool import _Connection

__all__ = ["HIGH_WATER", "PooledBody", "PooledResponse"]

HIGH_WATER = 2 * CHUNK  # unread answer bytes before the socket stops being read


class PooledBody:
    """The answer's body as it arrives: the subset of ``aiohttp.StreamReader`` the forwarder reads."""

    __slots__ = ("_buffer", "_callbacks", "_conn", "_discard", "_eof", "_exception", "_size", "_waiter", "total_bytes")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._buffer: collections.deque[bytes] = collections.deque()
        self._size = 0  # unread bytes
        self.total_bytes = 0
        self._eof = False
        self._exception: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._discard = False

    def feed(self, data: bytes) -> None:
        if self._discard:
            return
        self._buffer.append(data)
        self._size += len(data)
        self.total_bytes += len(data)
        if self._size > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def set_exception(self, exc: BaseException) -> None:
        self._exception = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def on_eof(self, callback: Callable[[], None]) -> None:
        if self._eof:
            callback()
        else:
            self._callbacks.append(callback)

    def is_eof(self) -> bool:
        return self._eof

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    def failed(self) -> bool:
        return self._exception is not None

    def peek(self) -> bytes:
        """What has arrived and is unread, left in place."""
        return self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)

    async def more(self, within: float) -> None:
        """Wait until something arrives (bytes, the end, a failure) or ``within`` seconds pass."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(within, self._wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def discard(self) -> None:
        """Drop what is unread and whatever else arrives: the rest of a stream already answered."""
        self._discard = True
        self._buffer.clear()
        self._size = 0
        self._conn.resume()

    async def _wait(self) -> None:
        if self._exception is not None:
            raise self._exception
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _take(self, n: int) -> bytes:
        if n >= self._size:
            data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
            self._buffer.clear()
        else:
            joined = b"".join(self._buffer)
            data, rest = joined[:n], joined[n:]
            self._buffer.clear()
            self._buffer.append(rest)
        self._size -= len(data)
        if self._size <= CHUNK:
            self._conn.resume()
        return data

    async def readany(self) -> bytes:
        """What has arrived (at least one byte), or ``b""`` at the end."""
        while not self._buffer:
            if self._exception is not None:
                raise self._exception
            if self._eof:
                return b""
            await self._wait()
        return self._take(self._size)

    async def readexactly(self, n: int) -> bytes:
        while self._size < n:
            if self._exception is not None:
                raise self._exception
            if self._eof:
                partial = self._take(self._size)
                raise asyncio.IncompleteReadError(partial, n)
            await self._wait()
        return self._take(n)


class PooledResponse:
    """An upstream answer: the subset of ``aiohttp.ClientResponse`` the forwarder reads."""

    __slots__ = ("_conn", "content", "headers", "reason", "status")

    def __init__(self, conn: _Connection, status: int, reason: str, headers: CIMultiDictProxy[str]) -> None:
        self._conn = conn
        self.status = status
        self.reason: str | None = reason
        self.headers = headers
        self.content = PooledBody(conn)

    def release(self) -> None:
        """The body was read to its end: the connection goes back to the pool if it may."""
        if self._conn.response is self:  # late, once the connection carries another exchange: not ours
            self._conn.done(reuse=self.content.at_eof())

    def release_at_end(self, wait: float) -> None:
        """The answer is out and the rest of its stream is of no use: read it to its end and keep
        the connection, or close it if the end does not come within ``wait`` seconds."""
        body = self.content
        body.discard()
        if body.is_eof():
            self.release()
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(wait, self.close)

        def ended() -> None:  # from inside the parser's callback: the pool takes it back a turn later
            timer.cancel()
            loop.call_soon(self.release)

        body.on_eof(ended)

    def close(self) -> None:
        """Give up on the answer (a client that left, a cancelled call): the connection is closed."""
        if self._conn.response is self:
            self._conn.done(reuse=False)
        if not self.content.is_eof():
            # A read still waiting fails, as with aiohttp: the forwarder ends an event stream on a
            # drain by closing its answer (``end_stream``), and the closed connection tells nothing more.
            self.content.set_exception(aiohttp.ClientConnectionError("the answer was given up"))
