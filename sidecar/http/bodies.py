"""What the body relays share: the idle deadline, the upload record, small and streaming answers."""

from __future__ import annotations

import asyncio
from types import TracebackType

from multidict import CIMultiDict, CIMultiDictProxy

from ..core.errors import RequestTimeout
from .outbound import CHUNK

SMALL_BODY = CHUNK  # answers up to this size with a Content-Length are relayed whole (``_relay_whole``)


def small_body(method: str, status: int, headers: CIMultiDictProxy[str]) -> int | None:
    """The body's length when it is small, known and really follows the headers, else None."""
    if method == "HEAD" or status < 200 or status in (204, 304) or "Transfer-Encoding" in headers:
        return None
    length = headers.get("Content-Length")
    if length is None or not length.isdigit():
        return None
    size = int(length)
    return size if size <= SMALL_BODY else None


def is_stream(headers: CIMultiDict[str]) -> bool:
    return headers.get("Content-Type", "").lower().startswith("text/event-stream")


class IdleDeadline:
    """An idle timer: progress pushes it back, waiting on the client pauses it.

    Hand-written rather than ``asyncio.timeout`` + ``reschedule``: that cancels and
    re-creates a timer handle on every chunk (several % of a small request's CPU). Here
    ``touch`` only stores a new due time; the one armed handle checks it when it fires
    and re-arms itself if progress was made meanwhile. Cancellation follows
    ``asyncio.timeout``: the task is cancelled and ``TimeoutError`` raised at the exit.

    It may be moved from another task (aiohttp writes the request body in a task of its
    own); outside its ``async with`` every call is a no-op, so a body still streaming
    after the upstream answered early cannot touch a finished timer.
    """

    __slots__ = ("_due", "_fired", "_handle", "_loop", "_task", "seconds")

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._task: asyncio.Task[object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due: float | None = None
        self._fired = False

    async def __aenter__(self) -> IdleDeadline:
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._fired = False
        self.touch()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        task, self._task = self._task, None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._fired and task is not None and task.uncancel() == 0 and et is asyncio.CancelledError:
            raise TimeoutError from exc
        return None

    def touch(self) -> None:
        """Progress: the upstream has ``seconds`` again from now."""
        if self._task is None or self.seconds is None or self._fired:
            return
        assert self._loop is not None
        self._due = self._loop.time() + self.seconds
        if self._handle is None:
            self._handle = self._loop.call_at(self._due, self._fire)

    def pause(self) -> None:
        """Waiting on the client, which is not the upstream's fault."""
        self._due = None

    def _fire(self) -> None:
        self._handle = None
        if self._task is None or self._due is None:
            return  # finished, or paused: the next touch arms it again
        assert self._loop is not None
        if self._loop.time() < self._due:  # touched since it was armed
            self._handle = self._loop.call_at(self._due, self._fire)
            return
        self._fired = True
        self._task.cancel()


class Upload:
    """What the request-body pump learned, read by ``forward`` when the upstream request fails."""

    __slots__ = ("stalled", "too_large")

    def __init__(self) -> None:
        self.too_large = False
        self.stalled: RequestTimeout | None = None  # the client stopped sending its body
