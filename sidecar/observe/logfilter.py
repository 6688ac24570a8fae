"""No full key, token or hash in any log line, ours or a library's, at any level (invariant 7).

Library log lines carry what they were handed: aiohttp's traceback for a malformed header
line quotes the raw line (key included), aiosqlite at debug level logs whole rows
(argon2 hashes included). Redacting in a ``logging.Filter`` would miss records that
reach handlers through propagation (filters on a logger apply only to its own records),
so redaction is installed in the log-record factory: every record of every logger is
cleaned once, as it is created, before any handler, formatter or pytest's ``caplog``
sees it. Message, arguments, exception text and stack are flattened into text and
redacted; ``extra`` fields (set after the factory, so cleaned in ``Logger.makeRecord``)
are redacted too, a structure replaced by its redacted text only when it carried a secret:

* anything shaped like a key body (a run of 40+ hex digits, also percent-encoded):
  every prefix's key, whatever parameter or header carried it;
* argon2 hashes (``$argon2id$v=19$…``);
* JWTs (``eyJ…``.``…``.``…``, sidecar/auth/jwt.py), signed or not;
* a URL's user information (``redis://:password@``, ``https://user:password@``);
* the configured secrets themselves (upstream tokens and credential headers, the admin
  token, allow-listed per-key upstream tokens).

Only records that are actually emitted pay (the factory runs after the level check), and
the sidecar's request path logs nothing, so the hot path is untouched. aiosqlite's
logger is also raised to INFO: its debug lines are whole rows, useless and costly.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..core.redaction import hide_userinfo

__all__ = ["REDACTED", "install", "redact", "redact_path_keys"]

REDACTED = "REDACTED"
MIN_SECRET = 6  # literal secrets shorter than this are not worth (nor safe) replacing everywhere

# A key body is 68 lowercase hex digits; 40+ hex digits (plain or %-encoded) covers it and
# hashes of its kind, together with a key prefix in front of it (``pmcp_``, ``plx_sk_``).
# Percent-encoded hex digits are %30-%39, %41-%46, %61-%66 (no honest client sends one).
_PLAIN_RUN = re.compile(r"[0-9a-fA-F]{40}")  # the cheap test: most text has no such run
_ENCODED_HEX = re.compile(r"%(?:3[0-9]|[46][1-6])")
_KEY_RUN = re.compile(r"(?:[a-z][a-z0-9_]{0,15})?(?:[0-9a-fA-F]|%(?:3[0-9]|[46][1-6])){40,}")
_ARGON2 = re.compile(r"\$argon2(?:id|i|d)\$[A-Za-z0-9+/=$,.-]*")  # parameters, salt and hash
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")  # a JWS compact token

_lock = threading.Lock()
_secrets: set[str] = set()
_literal: re.Pattern[str] | None = None
_installed = False


def _key_run(m: re.Match[str]) -> str:
    start, text = m.start(), m.string
    if start and text[start - 1] == "%":  # the run began inside an escape such as %3D: keep it whole
        return m.group()[:2] + REDACTED
    if start > 1 and text[start - 2] == "%":  # ... or on its second digit (%3d)
        return m.group()[:1] + REDACTED
    return REDACTED


def redact_path_keys(text: str) -> str:
    """Key-shaped runs and JWTs replaced, for a request target (per request: ~0.6 µs, short targets free)."""
    if len(text) < 40:
        return text
    if "eyJ" in text:  # a JWT (base64url of '{"'): header.payload.signature
        text = _JWT.sub(REDACTED, text)
    if _PLAIN_RUN.search(text) or _ENCODED_HEX.search(text):
        return _KEY_RUN.sub(_key_run, text)
    return text


def redact(text: str) -> str:
    """``text`` with every key-shaped run, argon2 hash and configured secret replaced by ``REDACTED``."""
    text = redact_path_keys(text)
    if "$argon2" in text:
        text = _ARGON2.sub(REDACTED, text)
    literal = _literal
    if literal is not None:  # first: a configured DSN or URL goes whole
        text = literal.sub(REDACTED, text)
    return hide_userinfo(text)  # then any other URL's user:password@ (one a library built, say)


# What every record has; anything else was handed in as ``extra`` (a JSON formatter prints it as it is).
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_BASE = len(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)  # a record without extras


def _clean_extras(record: logging.LogRecord) -> None:
    for name, value in list(record.__dict__.items()):
        if name in _STANDARD or value is None or isinstance(value, int | float | bool):
            continue
        text = value if isinstance(value, str) else repr(value)
        cleaned = redact(text)
        if cleaned != text:  # a structure is kept as it is unless it carried a secret
            record.__dict__[name] = cleaned


def _clean(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: log what there is, cleaned
        message = f"{record.msg} {record.args}"
    record.msg, record.args = redact(message), ()  # (): some filters (plexapi's) iterate args
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        record.exc_info = None  # formatters print exc_text; the raw exception cannot leak past here
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def install(secrets: Iterable[str | None] = ()) -> None:
    """Redact every log record of this process from now on, and these secrets too (idempotent)."""
    global _literal, _installed
    with _lock:
        new = {s for s in secrets if s and len(s) >= MIN_SECRET} - _secrets
        if new:
            _secrets.update(new)
            ordered = sorted(_secrets, key=len, reverse=True)  # longest first: no partial leftovers
            _literal = re.compile("|".join(re.escape(s) for s in ordered))
        if not _installed:
            previous: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                _clean(record)
                return record

            logging.setLogRecordFactory(factory)
            # ``extra`` fields are set on the record after the factory made it: cleaned once they are there.
            make = logging.Logger.makeRecord

            def make_record(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
                record = make(self, *args, **kwargs)
                if len(record.__dict__) > _BASE:  # extras (rare): the common record skips the walk
                    _clean_extras(record)
                return record

            logging.Logger.makeRecord = make_record  # type: ignore[method-assign]
            _installed = True
    aiosqlite = logging.getLogger("aiosqlite")
    if aiosqlite.level < logging.INFO:  # NOTSET included: it would inherit DEBUG from the root
        aiosqlite.setLevel(logging.INFO)
