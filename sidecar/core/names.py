"""Names a client chose (MCP tool names, above all) as they may be used as identifiers and output.

A JSON body may spell a lone UTF-16 surrogate (``"\\ud800"``): Python's ``json`` reads it into
a ``str`` that cannot be encoded as UTF-8, so every sink that encodes it fails — the JSON
access log (orjson refuses it: the request was answered 500 and never logged), the
Prometheus exposition (``/metrics`` a 500 for everyone until restart, the label kept), a
Redis key, a hash. Such a name is refused where it enters (``valid``); ``safe`` is the sinks'
own guard for any text that still gets that far.

Several tool names of one request travel as one comma-joined field (``RequestScope.tool``,
read by the access log, the console and the metrics, which split it again): ``join`` escapes
``%`` and ``,`` in each name, so a made-up name ``"search,delete_all"`` stays one name and is
never counted as the real tools ``search`` and ``delete_all``. The field is bounded: a name
is at most ``MAX_NAME`` characters (a body may carry a 1 MiB name), at most ``MAX_NAMES`` names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote

__all__ = ["join", "loads_unicode", "safe", "split", "valid"]


def valid(text: str) -> bool:
    """Encodable as UTF-8 (no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def loads_unicode(text: str | bytes) -> Any:
    """``json.loads``, refusing a lone surrogate anywhere in the document (``ValueError``): what a body
    holds is stored and written out later (the console's pages, ``sidecar keys``), where it cannot be."""
    data = json.loads(text)
    if b"\\u" in text if isinstance(text, bytes) else "\\u" in text:  # only an escape spells one
        json.dumps(data, ensure_ascii=False).encode()  # UnicodeEncodeError is a ValueError
    return data


def safe(text: str) -> str:
    """``text`` encodable as UTF-8: lone surrogates written as ``\\udXXX`` (the common case unchanged)."""
    return text if valid(text) else text.encode("utf-8", "backslashreplace").decode()


MAX_NAME = 128  # longer names are cut in the field (the MCP spec's longest tool name is 128 characters)
MAX_NAMES = 8  # names of one request written in the field; the rest are counted
_CUT = "%\u2026"  # "%…": no escaped name holds it (every '%' of a name is written "%25")


def _escape(name: str) -> str:
    """``%``, ``,`` and every character that does not print (zero-width, bidi, controls) percent-encoded:
    ``search\u200b`` reads ``search%E2%80%8B`` in the log and the console, never as ``search``."""
    if name.isprintable() and "," not in name and "%" not in name:
        return name
    return "".join(c if c.isprintable() and c not in ",%" else quote(c.encode("utf-8", "surrogatepass")) for c in name)


def join(names: Iterable[str]) -> str:
    """Tool names as one bounded field: comma-separated, each name's own ``%`` and ``,`` escaped.

    A client's names are kept in memory (the console's recent requests) and written (the access
    log): a name over ``MAX_NAME`` is cut and marked, names past ``MAX_NAMES`` are only counted. A
    marked piece is no name (``split`` gives None): never a label, never taken for a real tool.
    """
    pieces: list[str] = []
    extra = 0
    for name in names:
        if len(pieces) == MAX_NAMES:
            extra += 1
        elif len(name) > MAX_NAME:
            pieces.append(_escape(name[:MAX_NAME]) + _CUT)
        else:
            pieces.append(_escape(name))
    if extra:
        pieces.append(f"{_CUT}{extra} more")
    return ",".join(pieces)


def split(field: str) -> list[str | None]:
    """The names ``join`` joined, as ``join`` was given them; None for a cut name or the count of the rest."""
    if "%" not in field:
        return list(field.split(","))
    return [None if _CUT in n else unquote(n) if "%" in n else n for n in field.split(",")]
