"""Request ids the MCP gateway waits to see answered: list requests to filter, refused calls to answer."""

from __future__ import annotations

from typing import Any

from .jsonrpc import id_key

__all__ = ["PendingIds"]


class PendingIds:
    """Request ids the gateway is waiting to see answered, bounded (oldest dropped first).

    An id can be pending more than once — a client may reuse one within a batch or across
    the POSTs of a legacy session — so each ``add`` is one mark and each ``pop`` takes the
    oldest: one answer never uses up the mark another answer with the same id needs.
    """

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._ids: dict[str, list[Any]] = {}
        self._count = 0

    def add(self, rid: Any, value: Any = True) -> None:
        key = id_key(rid)
        marks = self._ids.pop(key, None) or []
        marks.append(value)
        self._ids[key] = marks
        self._count += 1
        while self._count > self.limit:
            self._count -= len(self._ids.pop(next(iter(self._ids))))

    def pop(self, rid: Any) -> Any:
        key = id_key(rid)
        marks = self._ids.get(key)
        if not marks:
            return None
        self._count -= 1
        if len(marks) == 1:
            del self._ids[key]
        return marks.pop(0)

    def __contains__(self, rid: Any) -> bool:
        return id_key(rid) in self._ids

    def __bool__(self) -> bool:
        return bool(self._ids)

    def __len__(self) -> int:
        return self._count
