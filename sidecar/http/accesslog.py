"""One JSON access-log line per request (the canonical log line).

Paths are logged with credential query values redacted; headers are never logged.
Lines are buffered and written together, like nginx's ``access_log … buffer= flush=``:
at most ``FLUSH_AFTER`` (50 ms) after the first line of a batch, or as soon as
``MAX_PENDING`` lines wait. A ``write`` syscall per request (or per loop iteration) was a
measurable share of a cache hit's cost. ``docker logs``/``kubectl logs`` see a line within
50 ms; shutdown writes what is pending; a crash loses at most the last 50 ms.

A line is at most ``MAX_LINE`` (``PIPE_BUF``, 4096) bytes with its newline: under ``workers: N``
every worker appends to the same pipe or file, and a pipe interleaves two writers' writes only
when one is over ``PIPE_BUF``. The client writes most of a line (its path and query, up to the
64 KiB request-line bound), so an oversized line has its longest strings cut (``fit_line``),
marked ``…`` and ``"truncated": true``; never dropped, never split, always valid JSON.
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
from typing import Any, TextIO

import orjson

from ..core.names import safe
from ..core.scope import RequestScope
from ..observe.logfilter import redact_path_keys
from ..store.filemodes import open_private_append

__all__ = ["FLUSH_AFTER", "MAX_LINE", "AccessLog", "fit_line", "redact_path"]

FLUSH_AFTER = 0.05  # seconds the first line of a batch may wait for company
MAX_PENDING = 512  # lines that are written at once, whatever the time
MAX_LINE = select.PIPE_BUF  # bytes of one line with its newline: one write a pipe never interleaves
CUT = "…"  # ends a string that was cut to fit the line
_CUT_SIZE = len(CUT.encode())

# A credential-named parameter and its value, also when nested percent-encoded in another
# parameter (Plex's ``/photo/:/transcode?url=/library/…/thumb?X-Plex-Token%3D<key>``) and
# with blanks around the name (``X-Plex-Token%20=``).
_BLANK = r"(?:%20|%09|\+|\s)*"
# Names a credential goes by, ours and OAuth's (a careless client puts a form's fields in the query):
# what a client sends under them is not key-shaped (a PKCE verifier, a client secret, a password).
_NAMES = (
    "X-Plex-Token|token|api_key|apikey|key|access_token|refresh_token|id_token|client_secret|code_verifier|code"
    "|password|passwd|secret|auth|authorization|csrf"
)
_SECRET_PARAM = re.compile(
    rf"((?:^|[?&;/]|%3F|%26|%2F){_BLANK}(?:{_NAMES}){_BLANK}(?:=|%3D))"
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
            entry["tool"] = redact_path_keys(scope.tool)  # the client's text: a key pasted as a tool name goes
        if scope.credential:
            entry["credential"] = scope.credential
        # orjson rather than json: the stdlib encoder was ~10 µs a line, a visible share of a
        # cache hit; orjson is ~1 µs and writes the same compact JSON (UTF-8, not \u escapes).
        pending = self._pending
        try:
            raw = orjson.dumps(entry)
        except TypeError:  # a string orjson cannot encode (a lone surrogate): the line is still written
            entry = {k: safe(v) if isinstance(v, str) else v for k, v in entry.items()}
            raw = orjson.dumps(entry)
        pending.append((raw if len(raw) < MAX_LINE else fit_line(entry)).decode())
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
        """Whole lines, in ``write`` calls of at most ``MAX_LINE`` bytes each, straight to the descriptor.

        ``os.write`` rather than the text stream: its buffer could join our bytes with something
        else written to stdout, or cut them where its own size says.
        """
        assert self.stream is not None
        self.stream.flush()  # whatever else went to this stream goes first, on its own
        try:
            fd = self.stream.fileno()
        except (OSError, ValueError, AttributeError):  # not a real descriptor (a test's capture)
            self.stream.write("\n".join(lines) + "\n")
            return
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            data = line.encode() + b"\n"
            if chunk and size + len(data) > MAX_LINE:
                _write_all(fd, b"".join(chunk))
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        _write_all(fd, b"".join(chunk))

    def close(self) -> None:
        self.flush()
        if self._own and self.stream is not None:
            self.stream.close()
        self.stream = None


def _write_all(fd: int, data: bytes) -> None:
    """One ``write`` (atomic on a pipe at up to ``PIPE_BUF`` bytes); the rest, should a file take less."""
    while data:
        data = data[os.write(fd, data) :]


def fit_line(entry: dict[str, Any], limit: int = MAX_LINE - 1) -> bytes:
    """``entry`` as compact JSON of at most ``limit`` bytes: its longest strings cut until it fits.

    The strings over a common cap are cut to it (the cap as high as fits), so a long path and a
    long tool name both keep their start. Cut by characters (never inside a UTF-8 sequence or a
    JSON escape), each cut string ending in ``CUT``, and ``"truncated": true`` added. Only on the
    rare oversized line: a few encodes.
    """
    raw = orjson.dumps(entry)
    if len(raw) <= limit:
        return raw
    entry = {**entry, "truncated": True}
    sizes = {k: _json_size(v) for k, v in entry.items() if isinstance(v, str) and k != "time"}
    room = sum(sizes.values()) - (len(orjson.dumps(entry)) - limit)  # bytes the strings may keep
    lo, hi = 0, max(sizes.values(), default=0)  # the highest cap whose capped sizes fit in room
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in sizes.values()) <= room:
            lo = mid
        else:
            hi = mid - 1
    for name, n in sizes.items():
        if n > lo:
            entry[name] = _cut(entry[name], lo)
    raw = orjson.dumps(entry)
    if len(raw) > limit:  # unreachable with the fields we log; still one valid line, never none
        raw = orjson.dumps({"time": entry.get("time"), "status": entry.get("status"), "truncated": True})
    return raw


def _json_size(s: str) -> int:
    """Bytes of ``s`` as a JSON string, quotes included (escapes make it more than its UTF-8)."""
    return len(orjson.dumps(s))


def _cut(s: str, budget: int) -> str:
    """The longest prefix of ``s`` that with ``CUT`` is at most ``budget`` bytes of JSON (``CUT`` alone if none)."""
    lo, hi = 0, len(s)  # a prefix of lo characters fits; hi is the most that might
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _json_size(s[:mid]) + _CUT_SIZE <= budget:
            lo = mid
        else:
            hi = mid - 1
    return s[:lo] + CUT
