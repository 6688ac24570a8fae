"""One JSON access-log line per request (the canonical log line).

Paths are logged with credential query values redacted; headers are never logged.
Lines are buffered and written together, like nginx's ``access_log … buffer= flush=``:
at most ``FLUSH_AFTER`` (50 ms) after the first line of a batch, or as soon as
``MAX_PENDING`` lines wait. A ``write`` syscall per request (or per loop iteration) was a
measurable share of a cache hit's cost. ``docker logs``/``kubectl logs`` see a line within
50 ms; shutdown writes what is pending; a crash loses at most the last 50 ms.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import orjson

from ..core.scope import RequestScope
from ..observe.logfilter import redact_path_keys
from ..store.filemodes import open_private_append

__all__ = ["FLUSH_AFTER", "AccessLog", "redact_path"]

FLUSH_AFTER = 0.05  # seconds the first line of a batch may wait for company
MAX_PENDING = 512  # lines that are written at once, whatever the time

# A credential-named parameter and its value, also when nested percent-encoded in another
# parameter (Plex's ``/photo/:/transcode?url=/library/…/thumb?X-Plex-Token%3D<key>``) and
# with blanks around the name (``X-Plex-Token%20=``).
_BLANK = r"(?:%20|%09|\+|\s)*"
_SECRET_PARAM = re.compile(
    rf"((?:^|[?&;/]|%3F|%26|%2F){_BLANK}(?:X-Plex-Token|token|api_key|apikey|key|access_token){_BLANK}(?:=|%3D))"
    r"(?:(?!%26)[^&;#\s])*",
    re.I,
)


def redact_path(path_qs: str) -> str:
    """The path as logged: credential-named query values and anything shaped like a key replaced.

    Key-shaped runs (``logfilter.redact_path_keys``) go whatever parameter carries them
    (``?foo=<key>``), so a key never reaches the log under a name we did not foresee.
    """
    if "=" in path_qs or "%3D" in path_qs or "%3d" in path_qs:  # else nothing carries a value (the common case)
        path_qs = _SECRET_PARAM.sub(r"\1REDACTED", path_qs)
    return redact_path_keys(path_qs)


class AccessLog:
    """Writes the canonical log line for each request to stdout, a file, or nowhere (``off``)."""

    def __init__(self, target: str = "stdout") -> None:
        self._own = False
        self._pending: list[str] = []
        self._scheduled = False
        self._second = -1  # the whole second last formatted, and its text: strftime once a second
        self._second_text = ""
        self._ms = -1  # the millisecond last formatted, and its timestamp
        self._stamp = ""
        # Also called with every finished request, whatever the target (the console's recent requests,
        # sidecar.observe.recent): it sees what the line says, the path redacted as logged.
        self.tap: Callable[[RequestScope], None] | None = None
        # Several processes share the stream (workers: N): each write at most PIPE_BUF bytes of whole
        # lines, which a pipe (stdout under a container runtime) never interleaves with another's.
        self.shared = False
        self.stream: TextIO | None
        if target == "off":
            self.stream = None
        elif target == "stdout":
            self.stream = sys.stdout
        else:
            # 0600 when created (paths and client addresses are nobody else's business).
            self.stream = os.fdopen(open_private_append(Path(target)), "a", encoding="utf-8")
            self._own = True

    def write(self, scope: RequestScope) -> None:
        if self.tap is not None:
            self.tap(scope)
        if self.stream is None:
            return
        entry = {
            "time": self._now(),
            "client_ip": scope.client_ip,
            "method": scope.method,
            "path": scope.path,
            "status": scope.status,
            "bytes": scope.bytes_sent,
            "duration_ms": round(scope.elapsed() * 1000, 3),
            "upstream": scope.upstream or None,
            "key": scope.key_id or None,
        }
        if scope.upstream_seconds is not None:
            entry["upstream_ms"] = round(scope.upstream_seconds * 1000, 3)
        if scope.error:
            entry["error"] = scope.error
        if scope.cache:
            entry["cache"] = scope.cache
        if scope.tool:
            entry["tool"] = scope.tool
        if scope.credential:
            entry["credential"] = scope.credential
        # orjson rather than json: the stdlib encoder was ~10 µs a line, a visible share of a
        # cache hit; orjson is ~1 µs and writes the same compact JSON (UTF-8, not \u escapes).
        pending = self._pending
        pending.append(orjson.dumps(entry).decode())
        if len(pending) >= MAX_PENDING:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop (a test, the CLI): write at once
                self.flush()

    def _now(self) -> str:
        """UTC, ISO 8601, milliseconds: ``2025-01-31T12:00:00.123Z``."""
        ms = int(time.time() * 1000)
        if ms != self._ms:  # under load several requests end in one millisecond
            sec, frac = divmod(ms, 1000)
            if sec != self._second:
                self._second, self._second_text = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self._ms, self._stamp = ms, f"{self._second_text}.{frac:03d}Z"
        return self._stamp

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending or self.stream is None:
            return
        lines, self._pending = self._pending, []
        try:
            if self.shared:
                self._write_whole(lines)
            else:
                self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a full disk or closed stdout must not fail requests

    def _write_whole(self, lines: list[str]) -> None:
        assert self.stream is not None
        chunk: list[str] = []
        size = 0
        for line in lines:
            n = len(line.encode()) + 1
            if chunk and size + n > select.PIPE_BUF:
                self.stream.write("\n".join(chunk) + "\n")
                self.stream.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += n
        self.stream.write("\n".join(chunk) + "\n")

    def close(self) -> None:
        self.flush()
        if self._own and self.stream is not None:
            self.stream.close()
        self.stream = None
