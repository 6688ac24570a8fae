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
never counted as the real tools ``search`` and ``delete_all``.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote

__all__ = ["join", "safe", "split", "valid"]


def valid(text: str) -> bool:
    """Encodable as UTF-8 (no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def safe(text: str) -> str:
    """``text`` encodable as UTF-8: lone surrogates written as ``\\udXXX`` (the common case unchanged)."""
    return text if valid(text) else text.encode("utf-8", "backslashreplace").decode()


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace(",", "%2C") if ("," in name or "%" in name) else name


def join(names: Iterable[str]) -> str:
    """Tool names as one field: comma-separated, each name's own ``%`` and ``,`` escaped."""
    return ",".join(_escape(n) for n in names)


def split(field: str) -> list[str]:
    """The names ``join`` joined, as ``join`` was given them (escapes undone)."""
    if "%" not in field:
        return field.split(",")
    return [unquote(n) if "%" in n else n for n in field.split(",")]
