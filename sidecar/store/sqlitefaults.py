"""How the SQLite store meets faults of its file: errors named for what happened, and write
transactions that a cancel cannot interrupt halfway (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .base import StoreBusy, StoreError

__all__ = ["shielded", "wrap"]

T = TypeVar("T")


def reason_of(e: sqlite3.Error) -> str:
    """Which fault of the file an SQLite error is (``StoreError.reason``), or ``""``."""
    name = getattr(e, "sqlite_errorname", "") or ""
    text = str(e)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return "locked"
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return "disk_full"
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return "read_only"
    if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")) or "I/O error" in text:
        return "io_error"
    return ""


def wrap(e: sqlite3.Error, path: Path) -> StoreError:
    """The error as the API and CLI show it: what happened to the file and what to do."""
    reason = reason_of(e)
    if reason == "locked":
        return StoreBusy(f"the key database {path.name} is locked by another process; try again")
    if reason == "disk_full":
        return StoreError(f"the key database {path.name} cannot be written: the disk is full ({e}); "
                          "free space and try again", reason)  # fmt: skip
    if reason == "read_only":
        return StoreError(f"the key database {path.name} is read-only ({e}): check the permissions and "
                          "attributes of the file and its -wal file", reason)  # fmt: skip
    if reason == "io_error":
        return StoreError(f"the key database {path.name} cannot be written ({e}): check the file, its "
                          "permissions and its disk", reason)  # fmt: skip
    return StoreError(f"key database {path.name}: {e}")


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # its caller was cancelled: nobody else will look at it


async def shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Run a write transaction to its end even when the caller is cancelled (shutdown, a flush
    task stopped): cancelled halfway, its ``BEGIN`` would still run in aiosqlite's thread and
    leave the shared connection inside a transaction, failing the writes after it."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)
